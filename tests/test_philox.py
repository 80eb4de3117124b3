"""emu.diffusion.philox, the numpy reference of the in-kernel noise: known answers, the layout of the
convention, argument checks, and the statistics of the noise (moments, the normal CDF, independence
across lags, batch elements, offsets and seeds).

Statistical bounds are derived from the sample size: a sample mean of N unit-variance draws has
standard error 1/sqrt(N), a correlation of N pairs of independent draws 1/sqrt(N), the sample
variance sqrt(2/N), skewness sqrt(6/N), excess kurtosis sqrt(24/N); the tests allow 5 standard
errors. Every draw is from fixed seeds, so the outcomes are deterministic (no flakiness).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emu.diffusion.philox import box_muller, philox4x32_10, philox_counters, philox_key, philox_normal

N = 2**20
Z_BOUND = 5.0  # standard errors allowed in every statistical check


def test_philox_numpy_known_answers():
    # Random123 kat_vectors, philox4x32 with 10 rounds.
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((2**32 - 1,) * 4, (2**32 - 1,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in cases:
        words = philox4x32_10(np.array(counter, dtype=np.uint32), np.array(key, dtype=np.uint32))
        assert tuple(int(w) for w in words) == expected


def test_philox_counter_and_key_layout_of_the_convention():
    counters = philox_counters(3, 2**40 + 7)
    np.testing.assert_array_equal(counters, [[0, 0, 7, 256], [1, 0, 7, 256], [2, 0, 7, 256]])
    np.testing.assert_array_equal(philox_key(2**32 + 5), [5, 1])
    np.testing.assert_array_equal(philox_key(2**64 - 1), [2**32 - 1, 2**32 - 1])


def test_philox_normal_layout_is_flat_index_and_tail_safe():
    full = philox_normal((1001,), seed=3, offset=1, dtype=np.float64)
    np.testing.assert_array_equal(philox_normal((7, 11, 13), 3, 1, np.float64).reshape(-1), full)
    for size in (1, 2, 3, 5, 1000):  # a shorter tensor is a prefix: partial last groups change nothing
        np.testing.assert_array_equal(philox_normal((size,), 3, 1, np.float64), full[:size])
    # Group g's four normals come from the words of counter (g, 0, offset, 0): check group 5 by hand.
    words = philox4x32_10(philox_counters(6, 1)[5], philox_key(3))
    z0, z1 = box_muller(words[0:1], words[1:2])
    z2, z3 = box_muller(words[2:3], words[3:4])
    np.testing.assert_array_equal(full[20:24], np.concatenate([z0, z1, z2, z3]))
    np.testing.assert_array_equal(philox_normal((1001,), 3, 1, np.float32), full.astype(np.float32))


def test_philox_box_muller_is_finite_at_the_extreme_words():
    extremes = np.array([0, 1, 2**31, 2**32 - 1], dtype=np.uint32)
    radius_words, angle_words = np.meshgrid(extremes, extremes)
    z_cos, z_sin = box_muller(radius_words.ravel(), angle_words.ravel())
    assert np.isfinite(z_cos).all() and np.isfinite(z_sin).all()
    # u = (r + 0.5) 2^-32 keeps ln u finite: the largest radius is sqrt(-2 ln(2^-33)) ~ 6.76.
    assert np.abs(np.hypot(z_cos, z_sin)).max() == pytest.approx(np.sqrt(-2 * np.log(0.5 * 2.0**-32)))


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True, "3"])
def test_philox_normal_rejects_bad_seeds_and_offsets_naming_them(name, bad):
    arguments = {"seed": 1, "offset": 0, name: bad}
    with pytest.raises(ValueError, match=name):
        philox_normal((4,), **arguments)


def test_philox_normal_rejects_other_dtypes():
    with pytest.raises(ValueError, match="dtype"):
        philox_normal((4,), 1, dtype=np.float16)


def test_philox_edge_seeds_and_offsets_give_distinct_streams():
    edges = [0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
    streams = {}
    for seed in edges:
        for offset in edges:
            z = philox_normal((64,), seed, offset, np.float64)
            assert np.isfinite(z).all()
            streams[(seed, offset)] = z
    again = philox_normal((64,), 2**64 - 1, 2**64 - 1, np.float64)
    np.testing.assert_array_equal(again, streams[(2**64 - 1, 2**64 - 1)])  # reproducible
    distinct = {z.tobytes() for z in streams.values()}
    assert len(distinct) == len(streams), "two (seed, offset) pairs gave the same noise"


def test_philox_normal_moments_and_distribution():
    z = philox_normal((N,), seed=20240607, offset=0, dtype=np.float64)
    mean, variance = z.mean(), z.var()
    centred = (z - mean) / np.sqrt(variance)
    skewness, excess_kurtosis = (centred**3).mean(), (centred**4).mean() - 3
    assert abs(mean) < Z_BOUND / np.sqrt(N)
    assert abs(variance - 1) < Z_BOUND * np.sqrt(2 / N)
    assert abs(skewness) < Z_BOUND * np.sqrt(6 / N)
    assert abs(excess_kurtosis) < Z_BOUND * np.sqrt(24 / N)
    # Kolmogorov-Smirnov distance to the normal CDF: P(sqrt(N) D > 1.95) ~ 0.1%.
    ordered = torch.from_numpy(np.sort(z))
    cdf = torch.special.ndtr(ordered).numpy()
    ranks = np.arange(1, N + 1) / N
    distance = max(np.abs(ranks - cdf).max(), np.abs(ranks - 1 / N - cdf).max())
    assert distance * np.sqrt(N) < 1.95


def test_philox_normal_lags_within_and_across_groups_are_uncorrelated():
    z = philox_normal((N,), seed=11, offset=5, dtype=np.float64)
    for lag in range(1, 9):  # lags 1-3 pair lanes of one group (one Philox call), 4+ cross groups
        correlation = np.corrcoef(z[:-lag], z[lag:])[0, 1]
        assert abs(correlation) < Z_BOUND / np.sqrt(N - lag), f"lag {lag}: correlation {correlation:.2e}"
    # The two normals of one Box-Muller pair are independent, not just uncorrelated: |z0| and |z1| too.
    pairs = z.reshape(-1, 2)
    correlation = np.corrcoef(np.abs(pairs[:, 0]), np.abs(pairs[:, 1]))[0, 1]
    assert abs(correlation) < Z_BOUND / np.sqrt(len(pairs))


def test_philox_normal_batch_elements_are_independent():
    batch, per_sample = 64, 4096
    z = philox_normal((batch, per_sample), seed=99, offset=0, dtype=np.float64)
    correlations = np.corrcoef(z)[np.triu_indices(batch, k=1)]
    # For independent samples E[r^2] = 1/(P - 1) with relative standard error ~sqrt(2 / #pairs).
    mean_square, expected = (correlations**2).mean(), 1 / (per_sample - 1)
    assert abs(mean_square / expected - 1) < Z_BOUND * np.sqrt(2 / len(correlations))
    assert np.abs(correlations).max() < 6 / np.sqrt(per_sample)
    means = z.mean(axis=1) * np.sqrt(per_sample)  # per-sample means, ~N(0, 1) each
    assert abs(means.var() - 1) < Z_BOUND * np.sqrt(2 / batch)


def test_philox_normal_offsets_and_seeds_give_uncorrelated_streams():
    size = 2**18
    base = philox_normal((size,), seed=7, offset=0, dtype=np.float64)
    for seed, offset in [(7, 1), (7, 2**32), (8, 0), (7 + 2**32, 0)]:
        other = philox_normal((size,), seed, offset, np.float64)
        correlation = np.corrcoef(base, other)[0, 1]
        assert abs(correlation) < Z_BOUND / np.sqrt(size), f"seed {seed}, offset {offset}: {correlation:.2e}"
