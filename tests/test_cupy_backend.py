"""The cupy backend and its fused solver kernels on a GPU (skipped with the reason when none can run).

On a GPU: the backend's array operations; every fused kernel of kernels/spectral.cu against the numpy
equations on fresh random inputs, with every output buffer poisoned (NaN) before the launch so that an
element left unwritten fails; grid-stride loops with fewer blocks than work; and cupy vs numpy solver
runs (fused and generic CuPy expressions) after 50 steps from the same state, both systems and dtypes.

Tolerances (relative max difference): single kernels and right-hand sides 1e-13 (float64) / 1e-5
(float32): NVRTC contracts a*b + c into FMAs and cuFFT's rounding differs from FFTW's, each a few ulp;
50 steps 1e-10 / 2e-4, the bounds tests/test_backends.py uses for torch vs numpy (physics.md: float64
runs agree to ~1e-9 over 1000-2000 steps, float32 vs float64 ~2e-4 after 1000 steps).

Without a GPU only the last test runs: asking for the backend fails at once and says what to install.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from emu.backends import BackendUnavailable, get_backend
from emu.solvers import make_stepper
from emu.systems import make_config, make_equation


def _cupy_reason() -> str | None:
    try:
        from emu.cuda import require_cupy

        require_cupy()
    except BackendUnavailable as error:
        return f"the cupy backend cannot run here: {error}"
    return None


REASON = _cupy_reason()


def gpu(test):
    """Marks a test `gpu` and skips it, with the reason, where the cupy backend cannot run."""
    return pytest.mark.gpu(pytest.mark.skipif(REASON is not None, reason=REASON or "")(test))

DTYPES = ["float64", "float32"]
KERNEL_TOLERANCE = {"float64": 1e-13, "float32": 1e-5}
RUN_TOLERANCE = {"float64": 1e-10, "float32": 2e-4}


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


class PoisonedCupy:
    """cupy for the fused operators, except that every new array starts NaN (CuPy's memory pool would
    hand back old, plausible values, hiding an element a kernel forgot to write)."""

    def __init__(self):
        import cupy

        self.cupy = cupy

    def empty(self, shape, dtype):
        return self.cupy.full(shape, np.nan, dtype=dtype)

    def empty_like(self, array):
        return self.empty(array.shape, array.dtype)

    def __getattr__(self, name):  # zeros, ones, ascontiguousarray
        return getattr(self.cupy, name)


def poisoned_runtime(dtype, max_blocks=None):
    from emu.solvers.fused import CupyRuntime

    runtime = CupyRuntime(dtype)
    runtime.xp = PoisonedCupy()
    if max_blocks is not None:
        runtime._max_blocks = max_blocks  # fewer threads than elements: each thread loops
    return runtime


def equations(system, dtype, **overrides):
    """(numpy equation, cupy equation) of one config."""
    if system == "kolmogorov":
        # emu's own dealiasing: in jax-cfd mode the cupy backend runs no fused kernels (they take
        # emu's Nyquist derivative convention; the mask's 0.5 entries are checked on the host).
        config = make_config("kolmogorov", grid_size=32, viscosity=1e-2, dealias="two_thirds", **overrides)
    else:
        config = make_config("qg", grid_size=32, lower_layer_velocity=-0.01, **overrides)
    return (make_equation(config, get_backend("numpy", dtype=dtype)),
            make_equation(config, get_backend("cupy", dtype=dtype)))


def random_state(equation, batch, seed):
    layers = (2,) if equation.config.system == "qg" else ()
    n = equation.grid.num_points
    amplitude = 1e-5 if equation.config.system == "qg" else 1.0
    field = amplitude * np.random.default_rng(seed).standard_normal((batch, *layers, n, n))
    return np.fft.rfft2(field)


# -- the backend --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@gpu
def test_cupy_backend_arrays_and_ffts(dtype):
    backend = get_backend("cupy", device="cuda", dtype=dtype)
    assert backend.device == "cuda:0" and backend.fused_kernels
    field = np.random.default_rng(0).standard_normal((2, 16, 16))
    on_device = backend.asarray(field)
    assert type(on_device).__module__.startswith("cupy") and on_device.dtype == np.dtype(dtype)
    spectral = backend.rfft2(on_device)
    assert spectral.dtype == backend.complex_dtype
    tolerance = 1e-14 if dtype == "float64" else 1e-6
    assert relative_error(backend.to_numpy(spectral), np.fft.rfft2(field)) < 1e3 * tolerance
    assert relative_error(backend.to_numpy(backend.irfft2(spectral, (16, 16))), field) < 10 * tolerance
    assert backend.to_numpy(backend.empty((3, 4), complex_valued=True)).dtype == backend.complex_dtype
    copy = backend.copy(on_device)
    copy[0] = 0
    assert backend.max_abs(on_device[0]) > 0 and not backend.all_finite(backend.asarray(np.array([np.nan])))


# -- single fused kernels, poisoned outputs --------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_blocks", [None, 3])
@gpu
def test_kolmogorov_kernels_on_gpu(dtype, max_blocks):
    import cupy

    from emu.solvers.fused import KolmogorovFused

    reference, on_gpu = equations("kolmogorov", dtype)
    fused = KolmogorovFused(on_gpu, poisoned_runtime(dtype, max_blocks))
    state = random_state(reference, 3, seed=1)
    omega_reference = reference.backend.asarray(state, complex_valued=True)
    omega = on_gpu.backend.asarray(state, complex_valued=True)

    terms = fused.explicit_terms(omega)
    assert bool(cupy.isfinite(terms).all()), "an element of the right-hand side was never written"
    assert relative_error(terms.get(), reference.explicit_terms(omega_reference)) < KERNEL_TOLERANCE[dtype]

    generic = make_stepper(reference, 0.01)
    stage = 2
    h_start = random_state(reference, 3, seed=2)
    decay, gain = generic._coefficients[stage]
    h_expected = reference.explicit_terms(omega_reference) + generic.betas[stage] * reference.backend.asarray(h_start)
    u_expected = decay * omega_reference + gain * h_expected
    h = on_gpu.backend.asarray(h_start, complex_valued=True)
    u_out = fused.xp.empty(omega.shape, omega.dtype)
    mu = 0.5 * generic.dt * (generic.alphas[stage + 1] - generic.alphas[stage])
    fused.cn_rk4_stage(omega, u_out, h, has_history=True, beta=generic.betas[stage], mu=mu,
                       gamma_dt=generic.gammas[stage] * generic.dt)
    assert bool(cupy.isfinite(u_out).all())
    assert relative_error(h.get(), h_expected) < KERNEL_TOLERANCE[dtype]
    assert relative_error(u_out.get(), u_expected) < KERNEL_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_blocks", [None, 3])
@gpu
def test_qg_kernels_on_gpu(dtype, max_blocks):
    import cupy

    from emu.solvers.fused import FusedAdamsBashforth3, QGFused

    reference, on_gpu = equations("qg", dtype)
    fused = QGFused(on_gpu, poisoned_runtime(dtype, max_blocks))
    state = random_state(reference, 3, seed=3)
    q_reference = reference.backend.asarray(state, complex_valued=True)
    q = on_gpu.backend.asarray(state, complex_valued=True)

    terms = fused.explicit_terms(q)
    assert bool(cupy.isfinite(terms).all()), "an element of the right-hand side was never written"
    expected_terms = reference.explicit_terms(q_reference)
    assert relative_error(terms.get(), expected_terms) < KERNEL_TOLERANCE[dtype]

    history = [1e-10 * random_state(reference, 3, seed=4 + j) for j in range(2)]
    coefficients = FusedAdamsBashforth3.startup_coefficients[2]
    tendency, q_new = fused.ab3_step(q, [on_gpu.backend.asarray(f, complex_valued=True) for f in history],
                                     coefficients, 3600.0)
    assert bool(cupy.isfinite(tendency).all()) and bool(cupy.isfinite(q_new).all())
    history = [reference.backend.asarray(f, complex_valued=True) for f in history]
    combination = sum(c * f for c, f in zip(coefficients, [expected_terms, *history]))
    expected = reference.step_filter * (q_reference + 3600.0 * combination)
    assert relative_error(tendency.get(), expected_terms) < KERNEL_TOLERANCE[dtype]
    assert relative_error(q_new.get(), expected) < KERNEL_TOLERANCE[dtype]


# -- whole runs: cupy vs numpy -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("system", ["kolmogorov", "qg"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
@gpu
def test_cupy_solver_agrees_with_numpy(dtype, system, fused):
    from emu.solvers.fused import FusedAdamsBashforth3, FusedCrankNicolsonRK4

    reference, on_gpu = equations(system, dtype)
    if not fused:  # CuPy's generic array expressions (EMU_CUPY_FUSED=0)
        on_gpu = make_equation(on_gpu.config, dataclasses.replace(on_gpu.backend, fused_kernels=False))
    assert (on_gpu.fused is not None) == fused
    if system == "kolmogorov":
        start = reference.initial_condition(2, seed=5)
    else:
        start = np.fft.irfft2(random_state(reference, 2, seed=6), s=reference.grid.shape)
    steppers = [make_stepper(equation, equation.config.dt) for equation in (reference, on_gpu)]
    fused_class = FusedCrankNicolsonRK4 if system == "kolmogorov" else FusedAdamsBashforth3
    assert isinstance(steppers[1], fused_class) == fused
    states = [stepper.init(equation.to_state(start)) for stepper, equation in zip(steppers, (reference, on_gpu))]
    for _ in range(50):
        states = [stepper.step(state) for stepper, state in zip(steppers, states)]
    fields = [equation.backend.to_numpy(equation.fields(state.state_hat))
              for equation, state in zip((reference, on_gpu), states)]
    assert np.isfinite(fields[1]).all()
    assert relative_error(fields[1], fields[0]) < RUN_TOLERANCE[dtype]
    energies = [equation.energy(state.state_hat) for equation, state in zip((reference, on_gpu), states)]
    assert np.allclose(energies[1], energies[0], rtol=RUN_TOLERANCE[dtype])


@gpu
def test_cupy_simulate_writes_a_run(tmp_path):
    from emu.runs import simulate

    result = simulate(make_config("qg", grid_size=32), out=tmp_path / "q.h5", backend="cupy", dtype="float32",
                      steps=20, save_every=10, batch=2, progress=False)
    assert result.status == "complete" and result.snapshots == 3 and np.all(np.isfinite(result.energy))


# -- without a GPU ------------------------------------------------------------------------------------------
@pytest.mark.skipif(REASON is None, reason="CuPy runs on this machine's GPU")
def test_cupy_backend_unavailable_says_what_to_do():
    with pytest.raises(BackendUnavailable) as caught:
        get_backend("cupy", dtype="float32")
    message = str(caught.value)
    assert "CuPy is not installed" in message and 'pip install -e ".[gpu]"' in message \
        or "CuPy is installed but finds no usable CUDA device" in message, message
    with pytest.raises(ValueError, match="the cupy backend runs on 'cuda' or 'cuda:N'"):
        get_backend("cupy", device="cpu")
