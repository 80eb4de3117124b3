"""The evaluation harness's metrics on crafted cases (emu.evaluation)."""

import math

import numpy as np
import pytest

from emu.evaluation import (
    SHELL_WIDTHS,
    decorrelated_mse,
    results_table,
    spectrum_factor,
    summarise,
    trajectory_metrics,
)
from emu.metrics import kinetic_energy_spectrum, lagged_autocorrelation
from emu.systems import make_config

CONFIG = make_config("kolmogorov", grid_size=16).to_dict()


def _solver_trajectories(count=2, steps=40, seed=0, span=3.0):
    """Smooth random fields drifting in time (a rotation by `span` radians): (trajectory, time, 1, 16, 16)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, 1, 1, 16, 16))
    drift = rng.standard_normal((count, 1, 1, 16, 16))
    t = np.linspace(0, span, steps + 1)[None, :, None, None, None]
    return np.cos(t) * base + np.sin(t) * drift


def _references(fields, max_lag=5):
    spectra = {}
    flat = fields.reshape(-1, *fields.shape[2:])
    for name, width in SHELL_WIDTHS.items():
        k, spectrum = kinetic_energy_spectrum(flat, CONFIG, shell_width=width)
        spectra[name] = (k, spectrum.mean(axis=0))
    return spectra, lagged_autocorrelation(fields, max_lag=max_lag).mean(axis=0)


def test_decorrelated_mse_of_independent_unit_fields_is_two():
    rng = np.random.default_rng(1)
    fields = rng.standard_normal((4, 200, 1, 16, 16))
    assert decorrelated_mse(fields) == pytest.approx(2.0, rel=0.02)
    with pytest.raises(ValueError, match="at least 2"):
        decorrelated_mse(fields[:1])


def test_spectrum_factor_is_the_worst_ratio_either_way():
    reference = np.array([1.0, 2.0, 4.0, 8.0])
    spectrum = np.array([1.0, 4.0, 2.0, 8.0])  # x2 in shell 1, /2 in shell 2
    assert spectrum_factor(spectrum, reference, np.arange(4)) == pytest.approx(2.0)
    assert spectrum_factor(spectrum, reference, np.array([0, 3])) == pytest.approx(1.0)
    assert spectrum_factor(np.array([1.0, np.nan, 4.0, 8.0]), reference, np.arange(4)) == math.inf


def test_a_perfect_rollout_never_fails_and_matches_every_statistic():
    solver = _solver_trajectories()
    spectra, autocorrelation = _references(solver)
    rows = trajectory_metrics(solver, solver, solver, CONFIG, spectra, autocorrelation, threshold=1.0,
                              denoising_steps=np.zeros(solver.shape[:2], dtype=np.int64), max_lag=5)
    for row in rows:
        assert row["stable_horizon"] == solver.shape[1] and row["never_failed"]
        assert row["final_mse"] == 0.0
        assert row["denoising_steps_per_step"] == 0.0
    # Per trajectory the spectrum differs from the pooled solver mean, but by a finite factor.
    assert all(math.isfinite(row["spectrum_factor_last_half_wsqrt2"]) for row in rows)
    summary = summarise(rows)
    assert summary["stable_horizon"] == solver.shape[1] and summary["never_failed"] == 2


def test_a_rollout_that_blows_up_fails_at_the_first_bad_step():
    solver = _solver_trajectories()
    spectra, autocorrelation = _references(solver)
    rollout = solver.copy()
    rollout[0, 5:] *= 50.0  # leaves the attractor at step 5
    rollout[1, 30:] = np.nan  # blows up at step 30
    steps = np.ones(solver.shape[:2], dtype=np.int64) * 3
    rows = trajectory_metrics(rollout, rollout, solver, CONFIG, spectra, autocorrelation, threshold=4.0,
                              denoising_steps=steps, max_lag=5)
    assert rows[0]["stable_horizon"] == 5 and not rows[0]["never_failed"]
    assert rows[1]["stable_horizon"] == 30
    assert rows[1]["spectrum_factor_last_half_w1"] == math.inf  # non-finite states in the last half
    assert rows[0]["spectrum_factor_last_half_w1"] > 100  # 50x amplitude = 2500x energy
    assert math.isfinite(rows[1]["spectrum_factor_stable_w1"])  # the stable part is finite
    assert rows[1]["denoising_steps_per_step"] == 3.0
    assert math.isinf(rows[1]["final_mse"])


def test_autocorrelation_error_sees_a_frozen_rollout():
    solver = _solver_trajectories(steps=60, span=12.0)
    spectra, autocorrelation = _references(solver, max_lag=10)
    frozen = np.repeat(solver[:, :1], solver.shape[1], axis=1)  # never decorrelates: r = 1 at every lag
    rows = trajectory_metrics(frozen, frozen, solver, CONFIG, spectra, autocorrelation, threshold=1e9, max_lag=10)
    expected = np.mean(np.abs(1.0 - autocorrelation[1:]))
    assert rows[0]["autocorrelation_error"] == pytest.approx(expected, rel=1e-6)
    assert rows[0]["autocorrelation_error"] > 0.3
    same = trajectory_metrics(solver, solver, solver, CONFIG, spectra, autocorrelation, threshold=1e9, max_lag=10)
    assert np.mean([row["autocorrelation_error"] for row in same]) < rows[0]["autocorrelation_error"]


def test_results_table_has_a_row_per_method_and_the_ratio():
    row = {"stable_horizon": 10, "never_failed": False, "final_mse": 1.0, "autocorrelation_error": 0.1,
           **{f"spectrum_factor_{part}_w{w}": 1.2 for part in ("stable", "last_half") for w in SHELL_WIDTHS}}
    better = dict(row, stable_horizon=100, denoising_steps_per_step=4.0)
    results = {"methods": {"emulator": {"trajectories": [row], "summary": summarise([row]), "seconds_per_step": 0.01},
                           "thermalized": {"trajectories": [better], "summary": summarise([better]),
                                           "seconds_per_step": 0.05}}}
    table = results_table(results)
    assert "| emulator | [10] | 10.0 | 1 |" in table
    assert "| thermalized | [100] | 100.0 | 10 |" in table and "| 4 | 50.0 |" in table
