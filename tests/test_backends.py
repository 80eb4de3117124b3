"""Array backends: construction errors, the FFT pair, and numpy vs torch (float64 and float32) runs.

Measured on the reference machine after 50 steps at 32^2 from the same initial state (relative max
difference of the fields):
  torch vs numpy, float64:   Kolmogorov 4.6e-15, QG 0 with FFTW (pyFFTW) under both; with EMU_FFT=numpy
                             (pocketfft vs torch.fft) 9.4e-15 and 3.8e-16
  float32 vs float64:        Kolmogorov 1.6e-5 (numpy) / 1.7e-5 (torch), QG 2.8e-7 / 2.8e-7
Tolerances: 1e-10 for float64 (physics.md: float64 runs agree to ~1e-9 over 1000-2000 steps), 2e-4
for float32 (physics.md: ~2e-4 after 1000 steps; over 50 steps we measure ~10x less).
"""

from __future__ import annotations

import numpy as np
import pytest

from emu.backends import BackendUnavailable, get_backend
from emu.solvers import make_stepper
from emu.systems import make_config, make_equation

torch = pytest.importorskip("torch", reason="the torch backend needs torch")

CASES = [("numpy", "float64"), ("numpy", "float32"), ("torch", "float64"), ("torch", "float32")]


# -- construction ----------------------------------------------------------------------------------
def test_unknown_backend_and_dtype_are_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("jax")
    with pytest.raises(ValueError, match="dtype"):
        get_backend("numpy", dtype="float16")
    with pytest.raises(ValueError, match="cpu"):
        get_backend("numpy", device="cuda")
    with pytest.raises(ValueError, match="device"):
        get_backend("torch", device="tpu")


# The julia backend's failure without a Julia runtime is tested in tests/test_julia_bridge.py.


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_torch_cuda_without_gpu_is_unavailable():
    with pytest.raises(BackendUnavailable, match="CUDA"):
        get_backend("torch", device="cuda")


@pytest.mark.parametrize("name,dtype", CASES)
def test_asarray_and_to_numpy_keep_the_working_precision(name, dtype):
    backend = get_backend(name, dtype=dtype)
    real = backend.asarray(np.arange(6.0).reshape(2, 3))
    complex_ = backend.asarray(np.arange(6.0).reshape(2, 3), complex_valued=True)
    assert backend.to_numpy(real).dtype == np.dtype(dtype)
    assert backend.to_numpy(complex_).dtype == np.dtype("complex64" if dtype == "float32" else "complex128")
    assert np.array_equal(backend.to_numpy(real), np.arange(6.0).reshape(2, 3))
    assert backend.max_abs(real) == 5.0
    assert backend.all_finite(real)
    assert not backend.all_finite(backend.asarray(np.array([1.0, np.nan])))


# -- the FFT pair ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fft", ["default", "numpy"])
@pytest.mark.parametrize("name,dtype", CASES)
def test_rfft2_matches_numpy_and_round_trips(monkeypatch, name, dtype, fft):
    """rfft2/irfft2 over the last two axes equal numpy's (unnormalised forward) to round-off, both with
    the default FFT library and with EMU_FFT=numpy; irfft2 leaves its input intact (complex-to-real
    transforms may destroy their input) and results never share memory between calls."""
    if fft == "numpy":
        monkeypatch.setenv("EMU_FFT", "numpy")
    backend = get_backend(name, dtype=dtype)
    rng = np.random.default_rng(0)
    field = rng.standard_normal((3, 2, 16, 16))
    tolerance = 1e-5 if dtype == "float32" else 1e-13

    field_hat = backend.rfft2(backend.asarray(field))
    expected = np.fft.rfft2(field)
    assert tuple(field_hat.shape) == (3, 2, 16, 9)
    assert np.abs(backend.to_numpy(field_hat) - expected).max() < tolerance * np.abs(expected).max()

    before = backend.to_numpy(backend.copy(field_hat)).copy()
    back = backend.irfft2(field_hat, (16, 16))
    assert np.array_equal(backend.to_numpy(field_hat), before)
    assert np.abs(backend.to_numpy(back) - field).max() < tolerance * np.abs(field).max()

    other_hat = backend.rfft2(backend.asarray(2 * field))
    assert np.abs(backend.to_numpy(field_hat) - expected).max() < tolerance * np.abs(expected).max()
    assert np.abs(backend.to_numpy(other_hat) - 2 * expected).max() < 2 * tolerance * np.abs(expected).max()


# -- whole runs ------------------------------------------------------------------------------------
def run_fields(system, preset, backend, initial, num_steps=50, **overrides):
    config = make_config(system, preset, **overrides)
    equation = make_equation(config, backend)
    stepper = make_stepper(equation, config.dt)
    state = stepper.init(equation.to_state(initial))
    for _ in range(num_steps):
        state = stepper.step(state)
    return backend.to_numpy(equation.fields(state.state_hat)).copy(), equation.energy(state.state_hat)


@pytest.fixture(scope="module")
def initial_states(helpers):
    config = make_config("kolmogorov", "re1000", grid_size=32)
    kolmogorov = make_equation(config, get_backend("numpy")).initial_condition(2, seed=1)
    # QG: a smooth random PV field of realistic size (max |q| = 2e-6 1/s) in both layers.
    qg = 2e-6 * helpers.band_limited_field((2, 2), 32, 6, seed=4)
    return {"kolmogorov": ("re1000", kolmogorov), "qg": ("eddy", qg)}


@pytest.fixture(scope="module")
def numpy64_runs(initial_states):
    backend = get_backend("numpy", dtype="float64")
    return {system: run_fields(system, preset, backend, initial, grid_size=32)
            for system, (preset, initial) in initial_states.items()}


@pytest.mark.parametrize("fft", ["default", "numpy"])
@pytest.mark.parametrize("system", ["kolmogorov", "qg"])
def test_torch_float64_matches_numpy_to_round_off(monkeypatch, initial_states, numpy64_runs, system, fft):
    """torch (FFTW or, with EMU_FFT=numpy, torch.fft) against the numpy backend with its default FFTs."""
    if fft == "numpy":
        monkeypatch.setenv("EMU_FFT", "numpy")
    preset, initial = initial_states[system]
    fields, energy = run_fields(system, preset, get_backend("torch", dtype="float64"), initial, grid_size=32)
    reference, reference_energy = numpy64_runs[system]
    assert fields.dtype == np.float64
    assert np.abs(fields - reference).max() < 1e-10 * np.abs(reference).max()
    assert np.allclose(energy, reference_energy, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["numpy", "torch"])
@pytest.mark.parametrize("system", ["kolmogorov", "qg"])
def test_float32_runs_stay_close_to_float64(initial_states, numpy64_runs, system, name):
    preset, initial = initial_states[system]
    fields, energy = run_fields(system, preset, get_backend(name, dtype="float32"), initial, grid_size=32)
    reference, reference_energy = numpy64_runs[system]
    assert fields.dtype == np.float32
    assert np.all(np.isfinite(fields))
    assert np.abs(fields - reference).max() < 2e-4 * np.abs(reference).max()
    assert np.allclose(energy, reference_energy, rtol=2e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("system", ["kolmogorov", "qg"])
def test_torch_cuda_float64_matches_numpy(initial_states, numpy64_runs, system):
    preset, initial = initial_states[system]
    fields, energy = run_fields(system, preset, get_backend("torch", device="cuda", dtype="float64"), initial,
                                grid_size=32)
    reference, _ = numpy64_runs[system]
    assert np.abs(fields - reference).max() < 1e-10 * np.abs(reference).max()
