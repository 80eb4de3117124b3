"""emu.metrics.forecast: RMSE, MAE, MS-SSIM, spectral divergence and spread-skill on hand cases.

All numpy float64 on 16-64 point grids; the whole file runs in a few seconds on one thread.
"""

from __future__ import annotations

import numpy as np
import pytest

from emu.metrics import (
    SpreadSkill,
    ensemble_spread_skill,
    kinetic_energy_spectrum,
    mae,
    ms_ssim,
    ms_ssim_scales,
    rmse,
    spectral_divergence,
)
from emu.systems import make_config

DEFAULT_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def smooth_field(shape, num_points: int, max_index: int, seed: int) -> np.ndarray:
    """A random real periodic field (*shape, n, n) with Fourier modes only at 0 < |index| <= max_index."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(tuple(shape) + (num_points, num_points))
    index = np.fft.fftfreq(num_points, d=1.0 / num_points)
    radius = np.hypot(index[:, np.newaxis], np.fft.rfftfreq(num_points, d=1.0 / num_points)[np.newaxis, :])
    keep = (radius > 0) & (radius <= max_index)
    field = np.fft.irfft2(np.fft.rfft2(white) * keep, s=(num_points, num_points))
    return field / field.std()


def plane_wave(num_points: int, index_x: int, index_y: int, amplitude: float) -> np.ndarray:
    """amplitude cos(2 pi (index_x x + index_y y) / n) on the n x n grid, (y, x) layout."""
    y, x = np.meshgrid(np.arange(num_points), np.arange(num_points), indexing="ij")
    return amplitude * np.cos(2 * np.pi * (index_x * x + index_y * y) / num_points)


# -- RMSE, MAE --------------------------------------------------------------------------------------
def test_rmse_and_mae_of_a_constant_shift_are_the_shift_per_leading_index():
    truth = smooth_field((4, 3, 2), 16, 5, seed=0)  # (member, time, channel, y, x)
    prediction = truth + 0.3
    for metric in (rmse, mae):
        values = metric(prediction, truth)
        assert values.shape == (4, 3) and values.dtype == np.float64
        np.testing.assert_allclose(values, 0.3, rtol=1e-12)
    # Broadcasting: (member, time, ...) against (time, ...), with a different shift per time.
    shifts = np.array([0.1, -0.2, 0.5]).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(rmse(truth[0] + shifts, truth[0]), [0.1, 0.2, 0.5], rtol=1e-12)
    members = np.broadcast_to(truth[0], truth.shape) + shifts  # 4 copies of the shifted truth[0]
    np.testing.assert_allclose(mae(members, truth[0]), np.broadcast_to([0.1, 0.2, 0.5], (4, 3)), rtol=1e-12)
    # RMSE and MAE differ for a non-constant error: 2 on a quarter of the points -> RMSE 1, MAE 0.5.
    error = np.zeros((1, 4, 4))
    error[0, :2, :2] = 2.0
    assert rmse(error, np.zeros_like(error)) == pytest.approx(1.0, rel=1e-15)
    assert mae(error, np.zeros_like(error)) == pytest.approx(0.5, rel=1e-15)


def test_rmse_and_mae_propagate_nan_and_inf_and_reject_mismatched_shapes():
    truth = np.zeros((3, 1, 8, 8))
    prediction = np.ones_like(truth)
    prediction[1, 0, 2, 3] = np.nan
    prediction[2, 0, 0, 0] = np.inf
    for metric in (rmse, mae):
        values = metric(prediction, truth)
        assert values[0] == 1.0 and np.isnan(values[1]) and values[2] == np.inf
    with pytest.raises(ValueError, match="broadcast"):
        rmse(np.zeros((3, 1, 8, 8)), np.zeros((2, 1, 8, 8)))
    with pytest.raises(ValueError, match="broadcast"):
        mae(np.zeros((1, 8, 8)), np.zeros((1, 8, 9)))


# -- MS-SSIM ----------------------------------------------------------------------------------------
def test_ms_ssim_of_identical_fields_is_one_and_noise_lowers_it_monotonically():
    truth = smooth_field((2, 2), 64, 8, seed=1)  # (time, channel, 64, 64)
    np.testing.assert_allclose(ms_ssim(truth, truth), 1.0, rtol=0, atol=1e-12)
    noise = np.random.default_rng(2).standard_normal(truth.shape)
    levels = [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    scores = np.array([ms_ssim(truth + level * noise, truth) for level in levels])  # (levels, time)
    assert scores.shape == (len(levels), 2)
    assert np.all(scores < 1.0) and np.all(scores > 0.0)
    assert np.all(np.diff(scores, axis=0) < 0), scores
    # Symmetric in its arguments when the data range is fixed (the formula is).
    noisy = truth + 0.2 * noise
    np.testing.assert_allclose(ms_ssim(noisy, truth, data_range=6.0), ms_ssim(truth, noisy, data_range=6.0),
                               rtol=1e-13)


def test_ms_ssim_is_invariant_to_a_periodic_shift_of_both_fields():
    truth = smooth_field((1,), 64, 10, seed=3)
    prediction = truth + 0.3 * smooth_field((1,), 64, 20, seed=4)
    reference = ms_ssim(prediction, truth)
    assert ms_ssim_scales((64, 64)) == 3  # so the 2x2 blocks line up again after shifts by 4
    for shift in [(4, 0), (0, -12), (8, 20), (60, 36)]:
        shifted = ms_ssim(np.roll(prediction, shift, axis=(-2, -1)), np.roll(truth, shift, axis=(-2, -1)))
        np.testing.assert_allclose(shifted, reference, rtol=0, atol=1e-12)
    # At one scale there is no block grid, so any shift leaves the score unchanged, but a
    # non-periodic SSIM (zero padding or cropping at the edges) would not be invariant.
    single = ms_ssim(prediction, truth, scales=1)
    for shift in [(1, 0), (3, 5), (31, 17)]:
        shifted = ms_ssim(np.roll(prediction, shift, axis=(-2, -1)), np.roll(truth, shift, axis=(-2, -1)), scales=1)
        np.testing.assert_allclose(shifted, single, rtol=0, atol=1e-12)


def test_single_scale_ssim_of_a_constant_offset_is_the_closed_form_luminance():
    """prediction = truth + c leaves the local variances and covariance unchanged, so the
    contrast-structure term is 1 and SSIM = mean over the grid of
    l = (2 mu (mu + c) + C1) / (mu^2 + (mu + c)^2 + C1), with mu the Gaussian-filtered truth."""
    n, k, sigma, window = 32, 2, 1.5, 11
    # Per-sample truths m + a cos(2 pi k x / n) (samples differ, so the default data range is per
    # sample: L = 2a, as x = 0 and x = n / (2k) hit cos = +1 and -1).
    means, amplitudes, offset = np.array([1.0, -0.5]), np.array([0.7, 2.0]), 0.4
    truth = np.stack([m + plane_wave(n, k, 0, a) for m, a in zip(means, amplitudes)])[:, np.newaxis]
    prediction = truth + offset
    # The circular Gaussian blur of cos(theta x) is G cos(theta x), G = sum_j g_j cos(theta j).
    offsets = np.arange(window) - window // 2
    taps = np.exp(-offsets**2 / (2 * sigma**2))
    taps /= taps.sum()
    gain = np.sum(taps * np.cos(2 * np.pi * k * offsets / n))
    x = np.arange(n)
    expected = []
    for m, a in zip(means, amplitudes):
        local_mean = m + a * gain * np.cos(2 * np.pi * k * x / n)
        c1 = (0.01 * 2 * a) ** 2
        luminance = (2 * local_mean * (local_mean + offset) + c1) / (local_mean**2 + (local_mean + offset) ** 2 + c1)
        expected.append(luminance.mean())
    np.testing.assert_allclose(ms_ssim(prediction, truth, scales=1), expected, rtol=1e-12)
    # A constant truth has no data range of its own: with one given, the closed form is exact
    # (and without one, C1 = C2 = 0 makes it 0/0 = NaN rather than a made-up number).
    constant = np.full((1, 16, 16), 2.0)
    c1 = (0.01 * 5.0) ** 2
    expected_constant = (2 * 2.0 * 2.4 + c1) / (2.0**2 + 2.4**2 + c1)
    assert ms_ssim(constant + 0.4, constant, data_range=5.0, scales=1) == pytest.approx(expected_constant, rel=1e-14)
    assert np.isnan(ms_ssim(constant + 0.4, constant, scales=1))


def test_ms_ssim_scale_reduction_renormalises_the_weights_of_the_scales_used():
    assert [ms_ssim_scales((n, n)) for n in (11, 21, 22, 32, 44, 48, 50, 64, 176)] == [1, 1, 2, 2, 3, 3, 2, 3, 5]
    assert ms_ssim_scales((64, 32)) == 2 and ms_ssim_scales((64, 64), scales=2) == 2
    assert ms_ssim_scales((64, 64), window=7) == 4  # 64, 32, 16, 8
    truth = smooth_field((2, 1), 64, 12, seed=5)
    prediction = truth + 0.3 * np.random.default_rng(6).standard_normal(truth.shape)
    five = ms_ssim(prediction, truth)  # 5 requested, 3 used at 64 x 64
    np.testing.assert_array_equal(five, ms_ssim(prediction, truth, scales=3, weights=DEFAULT_WEIGHTS[:3]))
    # Renormalised, not truncated: scaling all weights changes nothing ...
    np.testing.assert_allclose(ms_ssim(prediction, truth, weights=[10 * w for w in DEFAULT_WEIGHTS]), five,
                               rtol=1e-13)
    # ... and the third scale does take part.
    assert np.all(np.abs(ms_ssim(prediction, truth, scales=2) - five) > 1e-4)
    # 32 x 32: 2 scales.
    small_truth, small_prediction = truth[..., ::2, ::2], prediction[..., ::2, ::2]
    np.testing.assert_array_equal(ms_ssim(small_prediction, small_truth),
                                  ms_ssim(small_prediction, small_truth, scales=2, weights=DEFAULT_WEIGHTS[:2]))


def test_ms_ssim_clips_anticorrelated_structure_and_propagates_nan():
    truth = smooth_field((2, 1), 32, 6, seed=7)
    # -truth has cs < 0 at every scale; clipped at 0 the product is 0 (not NaN from a fractional power).
    np.testing.assert_array_equal(ms_ssim(-truth, truth), [0.0, 0.0])
    broken = truth.copy()
    broken[1, 0, 3, 4] = np.nan
    scores = ms_ssim(broken, truth)
    assert np.isfinite(scores[0]) and np.isnan(scores[1])


def test_ms_ssim_shapes_broadcasting_channels_and_errors():
    truth = smooth_field((3, 2), 32, 6, seed=8)  # (time, channel, y, x)
    noise = np.random.default_rng(9).standard_normal((4, 3, 2, 32, 32))
    members = truth + 0.2 * noise  # (member, time, channel, y, x)
    scores = ms_ssim(members, truth)
    assert scores.shape == (4, 3) and scores.dtype == np.float64
    np.testing.assert_allclose(scores[2], ms_ssim(members[2], truth), rtol=1e-14)
    # Averaged over channels: the mean of the single-channel scores (same per-sample data range).
    data_range = truth.max(axis=(-3, -2, -1)) - truth.min(axis=(-3, -2, -1))
    per_channel = [ms_ssim(members[:, :, c:c + 1], truth[:, c:c + 1], data_range=data_range) for c in range(2)]
    np.testing.assert_allclose(scores, np.mean(per_channel, axis=0), rtol=1e-13)
    assert ms_ssim(truth[0], truth[0]).shape == ()
    with pytest.raises(ValueError, match=r"same \(channel, y, x\)"):
        ms_ssim(truth[..., :16], truth)
    with pytest.raises(ValueError, match="leading axes"):
        ms_ssim(members, truth[:2])
    with pytest.raises(ValueError, match="scales must be an integer >= 1"):
        ms_ssim(truth, truth, scales=0)
    with pytest.raises(ValueError, match="window must be an odd integer"):
        ms_ssim(truth, truth, window=10)
    with pytest.raises(ValueError, match="window must be <= the grid's smaller side 8"):
        ms_ssim(truth[..., :8, :8], truth[..., :8, :8])
    with pytest.raises(ValueError, match="sigma"):
        ms_ssim(truth, truth, sigma=0.0)
    with pytest.raises(ValueError, match="weights must be at least scales=5"):
        ms_ssim(truth, truth, weights=DEFAULT_WEIGHTS[:3])
    with pytest.raises(ValueError, match="data_range must be finite and > 0"):
        ms_ssim(truth, truth, data_range=0.0)


# -- spectral divergence ----------------------------------------------------------------------------
def test_spectral_divergence_is_zero_for_identical_fields_and_positive_with_small_scale_noise():
    truth = smooth_field((3, 2), 64, 30, seed=10)  # power up to shell 30, inside the top band 29..32
    assert np.array_equal(spectral_divergence(truth, truth), np.zeros(3))
    noise = np.random.default_rng(11).standard_normal(truth.shape)
    divergence = spectral_divergence(truth + 0.5 * noise, truth)
    assert divergence.shape == (3,) and np.all(divergence > 1e-3)
    # Only the top 10% of shells count: a large-scale change leaves the score at round-off.
    large_scale = 5.0 * smooth_field((3, 2), 64, 4, seed=12)
    assert np.all(np.abs(spectral_divergence(truth + large_scale, truth)) < 1e-12)
    # The level of the band does not count, its shape does.
    np.testing.assert_allclose(spectral_divergence(3.0 * truth, truth), 0.0, atol=1e-14)


def test_spectral_divergence_is_the_hand_kl_of_two_crafted_spectra():
    """n = 16 has shells 1..8; fraction 0.25 keeps shells 7 and 8. A plane wave of amplitude a
    puts a^2 / 2 in its shell. Truth: channel 0 holds a7 at index (7, 0) plus a large mode at
    (2, 1) outside the band, channel 1 holds a8 at (7, 4) (|index| = 8.06, shell 8). The averaged
    spectrum's band is (a7^2, a8^2) / 4, so P = (a7^2, a8^2) / (a7^2 + a8^2), and likewise Q."""
    n = 16
    a7, a8, b7, b8 = 1.0, 0.5, 0.6, 0.9

    def crafted(amplitude_7, amplitude_8, low):
        return np.stack([plane_wave(n, 7, 0, amplitude_7) + plane_wave(n, 2, 1, low), plane_wave(n, 7, 4, amplitude_8)])

    truth, prediction = crafted(a7, a8, 3.0), crafted(b7, b8, 0.1)
    p = np.array([a7**2, a8**2]) / (a7**2 + a8**2)
    q = np.array([b7**2, b8**2]) / (b7**2 + b8**2)
    expected = np.sum(p * np.log(p / q))
    assert expected > 0.1
    assert spectral_divergence(prediction, truth, fraction=0.25) == pytest.approx(expected, rel=1e-12)
    # KL is not symmetric: swapping the arguments gives KL(Q || P).
    assert spectral_divergence(truth, prediction, fraction=0.25) == pytest.approx(np.sum(q * np.log(q / p)), rel=1e-12)
    # A prediction with nothing in shell 8 is far (round-off power there, ~1e-32, keeps it finite);
    # one with exactly no power in the band is infinitely far; a truth with none is undefined.
    assert spectral_divergence(crafted(b7, 0.0, 0.1), truth, fraction=0.25) > 10.0
    assert spectral_divergence(np.zeros_like(truth), truth, fraction=0.25) == np.inf
    assert np.isnan(spectral_divergence(prediction, np.zeros_like(truth), fraction=0.25))


def test_spectral_divergence_with_a_config_uses_the_kinetic_energy_spectrum():
    """Kolmogorov on [0, 2 pi): a vorticity mode of amplitude a at |index|^2 = K puts
    a^2 / (2 K) x 1/2 of kinetic energy in its shell, so P weighs the modes by a^2 / K."""
    n = 16
    config = make_config("kolmogorov", grid_size=n)

    def vorticity(amplitude_7, amplitude_8):
        return (plane_wave(n, 7, 0, amplitude_7) + plane_wave(n, 7, 4, amplitude_8) + plane_wave(n, 1, 2, 5.0))[np.newaxis]

    truth, prediction = vorticity(1.0, 0.5), vorticity(0.6, 0.9)
    p = np.array([1.0**2 / 49, 0.5**2 / 65])
    q = np.array([0.6**2 / 49, 0.9**2 / 65])
    p, q = p / p.sum(), q / q.sum()
    expected = np.sum(p * np.log(p / q))
    _, spectrum = kinetic_energy_spectrum(truth, config)
    assert spectrum[-2] / spectrum[-1] == pytest.approx(p[0] / p[1], rel=1e-10)  # the hand weights hold
    assert spectral_divergence(prediction, truth, config, fraction=0.25) == pytest.approx(expected, rel=1e-10)
    assert spectral_divergence(prediction, truth, config.to_dict(), fraction=0.25) == pytest.approx(expected, rel=1e-10)
    # The plain power spectrum weighs the modes by a^2 alone, a different number.
    assert abs(spectral_divergence(prediction, truth, fraction=0.25) - expected) > 0.01


def test_spectral_divergence_band_rule_shapes_nan_and_errors():
    truth = smooth_field((2, 3, 1), 32, 16, seed=13)  # (member, time, channel, y, x)
    noisy = truth + 0.3 * np.random.default_rng(14).standard_normal(truth.shape)
    values = spectral_divergence(noisy, truth[0])  # broadcast (member, time) against (time,)
    assert values.shape == (2, 3) and values.dtype == np.float64
    np.testing.assert_allclose(values[1], spectral_divergence(noisy[1], truth[0]), rtol=1e-14)
    # 32 x 32 has 16 shells: 10% keeps ceil(1.6) = 2 shells, the same as fraction 2/16.
    np.testing.assert_array_equal(values, spectral_divergence(noisy, truth[0], fraction=2 / 16))
    assert np.all(np.abs(values - spectral_divergence(noisy, truth[0], fraction=3 / 16)) > 0)
    broken = noisy.copy()
    broken[0, 1, 0, 5, 5] = np.nan
    values = spectral_divergence(broken, truth)
    assert np.isnan(values[0, 1]) and np.isfinite(np.delete(values.ravel(), 1)).all()
    for fraction in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            spectral_divergence(truth, truth, fraction=fraction)
    with pytest.raises(ValueError, match="needs at least 2"):
        spectral_divergence(truth, truth, fraction=0.05)  # 0.8 of a shell -> 1 shell
    with pytest.raises(ValueError, match=r"same \(channel, y, x\)"):
        spectral_divergence(truth[..., :16, :16], truth)
    with pytest.raises(ValueError, match="square grid"):
        spectral_divergence(truth[..., :16], truth[..., :16])


# -- ensemble spread-skill --------------------------------------------------------------------------
def test_a_reliable_ensemble_has_spread_skill_ratio_one():
    """Truth and members are draws of the same distribution around a shared signal: with the
    sqrt((M + 1)/M) correction the ratio is 1 up to sampling noise (~1.5% per sample at 64 x 64),
    without it sqrt(3/4) = 0.87 for M = 3, so the 10% bound tells the two apart."""
    rng = np.random.default_rng(15)
    members_count, times = 3, 16
    signal = 2.0 * smooth_field((times, 1), 64, 8, seed=16)
    members = signal + rng.standard_normal((members_count, times, 1, 64, 64))
    truth = signal + rng.standard_normal((times, 1, 64, 64))
    result = ensemble_spread_skill(members, truth)
    assert isinstance(result, SpreadSkill)
    assert result.spread.shape == result.skill.shape == result.ratio.shape == (times,)
    assert np.all(np.abs(result.ratio - 1.0) < 0.1), result.ratio
    pooled = np.sqrt(np.mean(result.spread**2) / np.mean(result.skill**2))
    assert pooled == pytest.approx(1.0, abs=0.02)
    # The spread is the (corrected) standard deviation of the members: sqrt(4/3) x 1 here.
    np.testing.assert_allclose(result.spread, np.sqrt(4 / 3), rtol=0.05)
    # member_axis: the same ensemble with the members on axis 1.
    moved = ensemble_spread_skill(np.moveaxis(members, 0, 1), truth, member_axis=1)
    np.testing.assert_allclose(moved.ratio, result.ratio, rtol=1e-13)


def test_a_collapsed_ensemble_has_zero_spread_and_an_overdispersed_one_a_large_ratio():
    rng = np.random.default_rng(17)
    truth = rng.standard_normal((5, 2, 16, 16))
    forecast = truth + 0.5
    collapsed = ensemble_spread_skill(np.broadcast_to(forecast, (4,) + truth.shape), truth)
    np.testing.assert_array_equal(collapsed.spread, np.zeros(5))
    np.testing.assert_allclose(collapsed.skill, 0.5, rtol=1e-12)
    np.testing.assert_array_equal(collapsed.ratio, np.zeros(5))
    # Two members at truth +- d: mean = truth (skill 0), spread sqrt(3/2 x 2 d^2) = sqrt(3) d; ratio inf.
    d = 0.25
    split = ensemble_spread_skill(np.stack([truth + d, truth - d]), truth)
    np.testing.assert_allclose(split.spread, np.sqrt(3) * d, rtol=1e-12)
    np.testing.assert_allclose(split.skill, 0.0, atol=1e-15)
    # Identical members equal to the truth: 0 / 0.
    assert np.all(np.isnan(ensemble_spread_skill(np.stack([truth, truth]), truth).ratio))


def test_spread_skill_shapes_and_errors():
    members = np.zeros((3, 4, 1, 8, 8))
    with pytest.raises(ValueError, match="truth must have the members' shape"):
        ensemble_spread_skill(members, np.zeros((3, 1, 8, 8)))
    with pytest.raises(ValueError, match="at least 2 members"):
        ensemble_spread_skill(members[:1], np.zeros((4, 1, 8, 8)))
    with pytest.raises(ValueError, match="member_axis must be one of the leading axes"):
        ensemble_spread_skill(members, np.zeros((3, 4, 1, 8)), member_axis=-1)
    with pytest.raises(ValueError, match="member_axis must be one of the leading axes"):
        ensemble_spread_skill(members, np.zeros((3, 4, 1, 8)), member_axis=5)
    with pytest.raises(ValueError, match="members must be"):
        ensemble_spread_skill(np.zeros((3, 8, 8)), np.zeros((8, 8)))
    assert ensemble_spread_skill(members[:, 0], np.zeros((1, 8, 8))).ratio.shape == ()
