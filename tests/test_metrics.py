"""emu.metrics: each metric against a case whose answer is known by hand (all fast, numpy float64)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from emu.metrics import (
    autocorrelation,
    kinetic_energy_spectrum,
    lagged_autocorrelation,
    mse,
    mse_per_step,
    rms,
    spectral_similarity,
    stable_horizon,
)
from emu.systems import make_config


def grid_points(num_points: int, extent: float):
    """Physical coordinates (y, x), each (n, n), of emu's grid x_j = j L / n."""
    x = np.arange(num_points) * extent / num_points
    return np.meshgrid(x, x, indexing="ij")


# -- MSE ----------------------------------------------------------------------------------------------
def test_mse_of_identical_arrays_is_zero_and_of_an_offset_is_its_square():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 8, 8))
    assert np.array_equal(mse(x, x), np.zeros(3))
    offsets = np.array([0.5, -2.0, 3.0]).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(mse(x + offsets, x), [0.25, 4.0, 9.0], rtol=1e-12)
    assert mse(x + 1.5, x, axis=None) == pytest.approx(2.25, rel=1e-12)


def test_mse_per_step_shapes_reduction_and_nan():
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((4, 6, 1, 8, 8))
    offsets = np.arange(6, dtype=float).reshape(1, 6, 1, 1, 1)  # offset t at step t
    rollout = reference + offsets
    per_step = mse_per_step(rollout, reference)
    assert per_step.shape == (4, 6)
    np.testing.assert_allclose(per_step, np.broadcast_to(np.arange(6.0) ** 2, (4, 6)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mse_per_step(rollout, reference, reduce="mean"), np.arange(6.0) ** 2,
                               rtol=1e-12, atol=1e-12)
    rollout[2, 3, 0, 1, 1] = np.nan
    per_step = mse_per_step(rollout, reference)
    assert np.isnan(per_step[2, 3]) and np.isfinite(np.delete(per_step.ravel(), 2 * 6 + 3)).all()
    with pytest.raises(ValueError, match="reduce must be one of"):
        mse_per_step(rollout, reference, reduce="sum")
    with pytest.raises(ValueError, match="same shape"):
        mse_per_step(rollout[:, :3], reference)


# -- KE spectrum: a single Fourier mode ---------------------------------------------------------------
def test_kolmogorov_spectrum_of_a_single_mode_is_one_shell_with_the_hand_energy():
    """omega = A cos(3x + 4y) on [0, 2 pi)^2: psi = omega / 25, u = dpsi/dy, v = -dpsi/dx written out,
    KE = 1/2 <u^2 + v^2> on the grid; all of it lands in shell |k| = 5."""
    n, amplitude = 32, 2.5
    config = make_config("kolmogorov", grid_size=64)  # a different grid size: replaced by the fields' n
    y, x = grid_points(n, 2 * np.pi)
    phase = 3 * x + 4 * y
    vorticity = amplitude * np.cos(phase)
    u = -4 * amplitude / 25 * np.sin(phase)  # d/dy of (A/25) cos(3x + 4y)
    v = 3 * amplitude / 25 * np.sin(phase)   # -d/dx of it
    energy = 0.5 * np.mean(u**2 + v**2)
    assert energy == pytest.approx(amplitude**2 / 100, rel=1e-12)  # the hand calculation itself

    fields = np.stack([vorticity, -vorticity])[:, np.newaxis]  # (2, 1, n, n): a batch of two
    k, spectrum = kinetic_energy_spectrum(fields, config)
    assert k.shape == (n // 2,) and spectrum.shape == (2, n // 2)
    np.testing.assert_allclose(k, np.arange(1, n // 2 + 1), rtol=1e-12)
    shell = int(np.argmin(np.abs(k - 5.0)))
    np.testing.assert_allclose(spectrum[:, shell], [energy, energy], rtol=1e-12)
    assert np.abs(np.delete(spectrum, shell, axis=1)).max() < 1e-12 * energy
    # Leading axes are kept: (batch, time, channel, y, x) -> (batch, time, shells).
    _, trajectory_spectra = kinetic_energy_spectrum(np.broadcast_to(fields, (3, 2, 1, n, n)), config)
    assert trajectory_spectra.shape == (3, 2, n // 2)
    np.testing.assert_allclose(trajectory_spectra[1], spectrum, rtol=1e-12)


def qg_single_mode(config, psi_upper_amplitude: float, psi_lower_amplitude: float, n: int):
    """PV of psi_m = a_m cos(3 kx0 x + 4 kx0 y) from the layer equations written out here, with
    F_1 = 1/(rd^2 (1 + delta)), F_2 = delta F_1, and the hand kinetic energy of each layer."""
    extent = config.domain_length
    fundamental = 2 * np.pi / extent
    k2 = (3 * fundamental) ** 2 + (4 * fundamental) ** 2
    f1 = 1 / (config.deformation_radius**2 * (1 + config.layer_depth_ratio))
    f2 = config.layer_depth_ratio * f1
    y, x = grid_points(n, extent)
    phase = 3 * fundamental * x + 4 * fundamental * y
    psi1, psi2 = psi_upper_amplitude * np.cos(phase), psi_lower_amplitude * np.cos(phase)
    q1 = -k2 * psi1 - f1 * (psi1 - psi2)
    q2 = -k2 * psi2 + f2 * (psi1 - psi2)
    layer_energy = []
    for a in (psi_upper_amplitude, psi_lower_amplitude):
        u = 4 * fundamental * a * np.sin(phase)   # u = -dpsi/dy
        v = -3 * fundamental * a * np.sin(phase)  # v = dpsi/dx
        layer_energy.append(0.5 * np.mean(u**2 + v**2))
    return np.stack([q1, q2])[np.newaxis], layer_energy


@pytest.mark.parametrize("lower_amplitude", [1.0e4, 2.5e3], ids=["barotropic", "sheared"])
def test_qg_spectrum_of_a_single_mode_is_the_thickness_weighted_hand_energy(lower_amplitude):
    n = 32
    config = make_config("qg", preset="eddy", grid_size=n)
    pv, (energy_upper, energy_lower) = qg_single_mode(config, 1.0e4, lower_amplitude, n)
    depth_upper = config.upper_layer_depth
    depth_lower = depth_upper / config.layer_depth_ratio  # 500 m and 2000 m
    expected = (depth_upper * energy_upper + depth_lower * energy_lower) / (depth_upper + depth_lower)
    k, spectrum = kinetic_energy_spectrum(pv, config)
    shell = int(np.argmin(np.abs(k - 5 * 2 * np.pi / config.domain_length)))
    assert spectrum.shape == (1, n // 2)
    assert spectrum[0, shell] == pytest.approx(expected, rel=1e-12)
    assert np.abs(np.delete(spectrum[0], shell)).max() < 1e-12 * expected


def test_spectrum_rejects_the_wrong_channel_count_and_accepts_a_config_dict():
    config = make_config("qg", grid_size=16)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, n, n\)"):
        kinetic_energy_spectrum(np.zeros((3, 1, 16, 16)), config)
    pv, _ = qg_single_mode(config, 1.0e4, 1.0e4, 16)
    np.testing.assert_array_equal(kinetic_energy_spectrum(pv, config.to_dict())[1],
                                  kinetic_energy_spectrum(pv, config)[1])


# -- autocorrelation ----------------------------------------------------------------------------------
def test_autocorrelation_of_constant_sign_flipping_and_noise_trajectories():
    rng = np.random.default_rng(2)
    frame = rng.standard_normal((1, 16, 16))
    constant = np.broadcast_to(frame, (2, 10, 1, 16, 16))
    np.testing.assert_allclose(autocorrelation(constant), np.ones((2, 10)), rtol=1e-12)
    np.testing.assert_allclose(lagged_autocorrelation(constant), np.ones((2, 10)), rtol=1e-12)

    signs = (-1.0) ** np.arange(10)
    flipping = signs.reshape(1, 10, 1, 1, 1) * frame
    np.testing.assert_allclose(autocorrelation(flipping), signs[np.newaxis], rtol=1e-12)
    np.testing.assert_allclose(lagged_autocorrelation(flipping, max_lag=5), signs[np.newaxis, :6], rtol=1e-12)

    noise = rng.standard_normal((2, 8, 2, 64, 64))
    r = autocorrelation(noise)
    assert r[:, 0] == pytest.approx(1.0) and np.abs(r[:, 1:]).max() < 0.1
    lagged = lagged_autocorrelation(noise, max_lag=4, block_size=3)  # blocks smaller than the band
    assert lagged.shape == (2, 5) and np.abs(lagged[:, 1:]).max() < 0.1
    per_channel = autocorrelation(noise, max_lag=3, per_channel=True)
    assert per_channel.shape == (2, 4, 2) and np.abs(per_channel[:, 1:]).max() < 0.1


def test_lagged_autocorrelation_is_the_mean_over_start_times():
    """Checked against a direct double loop with np.corrcoef, over several block sizes."""
    rng = np.random.default_rng(3)
    trajectory = np.cumsum(rng.standard_normal((2, 12, 1, 6, 6)), axis=1)  # correlated in time
    direct = np.array([[np.mean([np.corrcoef(trajectory[b, t].ravel(), trajectory[b, t + lag].ravel())[0, 1]
                                 for t in range(12 - lag)]) for lag in range(8)] for b in range(2)])
    for block in (1, 5, 256):
        np.testing.assert_allclose(lagged_autocorrelation(trajectory, max_lag=7, block_size=block), direct, rtol=1e-10)
    start = np.array([[np.corrcoef(trajectory[b, 0].ravel(), trajectory[b, t].ravel())[0, 1] for t in range(12)]
                      for b in range(2)])
    np.testing.assert_allclose(autocorrelation(trajectory), start, rtol=1e-10)
    with pytest.raises(ValueError, match="max_lag"):
        autocorrelation(trajectory, max_lag=12)


# -- stable horizon -----------------------------------------------------------------------------------
def test_stable_horizon_on_crafted_curves():
    steps = 20
    curves = np.full((4, steps), 0.5)
    curves[1, 7:] = 10.0       # exceeds the threshold from step 7 on
    curves[2, 3] = np.nan      # NaN at step 3 (and back to normal after: the first failure counts)
    curves[3, 12] = np.inf
    np.testing.assert_array_equal(stable_horizon(curves, threshold=2.0), [steps, 7, 3, 12])
    assert stable_horizon(curves[0], threshold=2.0) == steps
    assert stable_horizon(np.full(5, 2.0), threshold=2.0) == 5  # "exceeds" is strict


def test_stable_horizon_with_state_norms():
    curves = np.full((3, 10), 0.5)
    norms = np.ones((3, 10))
    norms[1, 4] = np.nan
    norms[2, 6] = 50.0
    np.testing.assert_array_equal(stable_horizon(curves, 2.0, norms=norms), [10, 4, 10])
    np.testing.assert_array_equal(stable_horizon(curves, 2.0, norms=norms, norm_threshold=10.0), [10, 4, 6])
    with pytest.raises(ValueError, match="norm_threshold needs norms"):
        stable_horizon(curves, 2.0, norm_threshold=10.0)
    rollout = np.ones((2, 5, 1, 4, 4))
    rollout[1, 2:] = 1e3
    horizon = stable_horizon(np.zeros((2, 5)), 1.0, norms=rms(rollout), norm_threshold=10.0)
    np.testing.assert_array_equal(horizon, [5, 2])


# -- spectral similarity ------------------------------------------------------------------------------
def test_spectral_similarity_zero_for_identical_spectra_and_counts_nan_samples():
    rng = np.random.default_rng(4)
    reference = rng.uniform(0.5, 2.0, size=16)
    predicted = np.stack([reference, 1.5 * reference, reference, reference])
    predicted[2, 5] = np.nan
    predicted[3, 0] = np.inf
    result = spectral_similarity(predicted, reference)
    assert result.values.shape == (4,)
    assert result.values[0] == 0.0
    assert result.values[1] == pytest.approx(16 * 0.5, rel=1e-12)  # sum over 16 shells of |1 - 1.5|
    assert np.isnan(result.values[2]) and np.isnan(result.values[3])
    assert result.num_nan == 2
    assert result.mean == pytest.approx(4.0, rel=1e-12)  # mean of the two finite samples
    values, num_nan, mean = spectral_similarity(reference[np.newaxis], reference)  # unpacks as a tuple
    assert values[0] == 0.0 and num_nan == 0 and mean == 0.0
    all_bad = spectral_similarity(np.full((2, 16), np.nan), reference)
    assert all_bad.num_nan == 2 and np.isnan(all_bad.mean)
    with pytest.raises(ValueError, match="finite and nonnegative"):
        spectral_similarity(predicted, np.full(16, np.nan))


def test_spectral_similarity_where_the_reference_is_zero():
    reference = np.zeros(16)
    reference[4] = 0.01  # a single-mode spectrum, written exactly
    assert spectral_similarity(reference[np.newaxis], reference).values[0] == 0.0
    doubled = spectral_similarity(2 * reference[np.newaxis], reference)
    assert doubled.values[0] == pytest.approx(1.0, rel=1e-12) and doubled.num_nan == 0
    leaked = reference.copy()
    leaked[9] = 5.0  # energy where the reference has none: an infinite relative error, not a NaN sample
    result = spectral_similarity(np.stack([reference, leaked]), reference)
    assert result.values[0] == 0.0 and result.values[1] == np.inf and result.num_nan == 0 and result.mean == np.inf
    leaked[9] = np.nan  # a NaN prediction in any shell marks the sample
    assert spectral_similarity(leaked[np.newaxis], reference).num_nan == 1


# -- torch in, same numbers out -------------------------------------------------------------------------
def test_torch_inputs_give_the_numpy_results():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    reference = rng.standard_normal((2, 5, 1, 16, 16))
    rollout = reference + 0.1 * rng.standard_normal(reference.shape)
    as_torch = [torch.from_numpy(a).requires_grad_(True) for a in (rollout, reference)]  # detach is needed
    np.testing.assert_array_equal(mse_per_step(*as_torch), mse_per_step(rollout, reference))
    np.testing.assert_array_equal(mse(as_torch[0][:, 0], as_torch[1][:, 0]), mse(rollout[:, 0], reference[:, 0]))
    np.testing.assert_array_equal(autocorrelation(as_torch[0]), autocorrelation(rollout))
    np.testing.assert_array_equal(lagged_autocorrelation(as_torch[0]), lagged_autocorrelation(rollout))
    config = make_config("kolmogorov", grid_size=16)
    k, spectra = kinetic_energy_spectrum(rollout, config)
    k_torch, spectra_torch = kinetic_energy_spectrum(as_torch[0], config)
    np.testing.assert_array_equal(k_torch, k)
    np.testing.assert_allclose(spectra_torch, spectra, rtol=1e-13, atol=0)
    assert isinstance(spectra_torch, np.ndarray)
    errors = mse_per_step(rollout, reference)
    np.testing.assert_array_equal(stable_horizon(torch.from_numpy(errors), 0.011), stable_horizon(errors, 0.011))
    similarity = spectral_similarity(torch.from_numpy(spectra[0]), torch.from_numpy(spectra[1, 0]))
    expected = spectral_similarity(spectra[0], spectra[1, 0])
    np.testing.assert_array_equal(similarity.values, expected.values)
    assert similarity.num_nan == expected.num_nan
    # float32 and bfloat16 tensors (as an emulator on a GPU returns them) are widened, not refused.
    single = torch.from_numpy(rollout).float()
    half = single.to(torch.bfloat16)
    np.testing.assert_allclose(mse(single, half), mse(single.numpy(), half.float().numpy()))


def test_metrics_import_no_models_and_no_torch_at_module_level():
    """The metrics layer sits on the physics layer (style.md, bullet 1): no emu.models, emu.training,
    emu.data, and torch only ever arrives as an argument."""
    package = Path(__file__).resolve().parents[1] / "python" / "emu" / "metrics"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                forbidden = ("emu.models", "emu.training", "emu.data", "torch")
                assert not name.startswith(forbidden), f"{path.name} imports {name}"
