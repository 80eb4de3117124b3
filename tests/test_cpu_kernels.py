"""The numpy backend's fused CPU kernels (emu.cpu_kernels, emu.solvers.fused_cpu) against the
generic numpy step they replace.

Measured here (64^2, batch 2, 200 steps): Kolmogorov fused and generic are bit-identical in both
precisions; QG differs by 3e-16 relative in float64 and 1.6 float32 ulps (numpy's complex product
on AVX-512 contracts one multiply-add that the kernels round separately), which chaos has not grown
after 200 steps.
"""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

from emu.backends import get_backend
from emu.cpu_kernels import cpu_fused_status
from emu.solvers import make_stepper
from emu.solvers.fused import FusedAdamsBashforth3, FusedCrankNicolsonRK4
from emu.systems import make_config, make_equation

pytestmark = pytest.mark.skipif(not cpu_fused_status()[0], reason=f"fused CPU kernels unavailable: {cpu_fused_status()[1]}")

# Relative max difference allowed after the run: the float64 bound, and a few float32 ulps.
TOLERANCE = {"float64": 1e-15, "float32": 5e-7}


def equations(system: str, dtype: str, **overrides):
    """(fused, generic) equations of one config on the numpy backend."""
    backend = get_backend("numpy", dtype=dtype)
    config = make_config(system, **overrides)
    fused = make_equation(config, backend)
    generic = make_equation(config, dataclasses.replace(backend, fused_kernels=False))
    assert fused.fused is not None and generic.fused is None
    return fused, generic


def initial_state(equation, batch: int = 2, seed: int = 0):
    if equation.config.system == "qg":  # developed PV, not pyqg's tiny start: every term matters at once
        rng = np.random.default_rng(seed)
        return 1e-5 * rng.standard_normal((batch, 2) + equation.grid.shape)
    return equation.initial_condition(batch, seed)


def run(equation, steps: int, state=None) -> np.ndarray:
    stepper = make_stepper(equation, equation.config.dt)
    current = stepper.init(equation.to_state(initial_state(equation) if state is None else state))
    for _ in range(steps):
        current = stepper.step(current)
    return np.asarray(current.state_hat)


def relative_difference(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("system", ["kolmogorov", "qg"])
def test_fused_step_agrees_with_the_generic_step_after_200_steps(system, dtype):
    fused, generic = equations(system, dtype, grid_size=64)
    a, b = run(fused, 200), run(generic, 200)
    assert a.dtype == b.dtype == (np.complex128 if dtype == "float64" else np.complex64)
    assert np.isfinite(a).all()
    assert relative_difference(a, b) <= TOLERANCE[dtype]
    # A real run moved far from where it started (the comparison is not of two untouched states).
    assert relative_difference(a, fused.to_state(initial_state(fused))) > 1e-3


@pytest.mark.parametrize("overrides", [
    {"system": "kolmogorov", "forcing_wavenumber": 0},
    {"system": "kolmogorov", "dealias": "jax-cfd"},
    {"system": "qg", "filter": "sharp"},
    {"system": "qg", "filter": "none", "preset": "jet"},
])
def test_explicit_terms_agree_for_each_variant(overrides):
    overrides = dict(overrides)
    system = overrides.pop("system")
    fused, generic = equations(system, "float64", grid_size=32, **overrides)
    state = fused.to_state(initial_state(fused, batch=3, seed=4))
    a, b = fused.explicit_terms(state), generic.explicit_terms(state)
    assert a.shape == state.shape
    assert relative_difference(a, b) <= 1e-15
    # The returned tendency is the caller's: a second call must not overwrite it.
    again = fused.explicit_terms(fused.to_state(initial_state(fused, batch=3, seed=5)))
    assert not np.shares_memory(a, again)
    assert relative_difference(a, b) <= 1e-15


def test_the_fused_stepper_is_picked_and_continues_a_generic_run():
    for system, twin in (("kolmogorov", FusedCrankNicolsonRK4), ("qg", FusedAdamsBashforth3)):
        fused, generic = equations(system, "float64", grid_size=32)
        assert isinstance(make_stepper(fused, fused.config.dt), twin)
        # 3 generic AB3 steps (start-up history included) continued by 3 fused ones = 6 generic steps.
        generic_stepper = make_stepper(generic, generic.config.dt)
        state = generic_stepper.init(generic.to_state(initial_state(generic)))
        for _ in range(3):
            state = generic_stepper.step(state)
        mixed, reference = state, state
        fused_stepper = make_stepper(fused, fused.config.dt)
        for _ in range(3):
            mixed = fused_stepper.step(mixed)
            reference = generic_stepper.step(reference)
        assert relative_difference(mixed.state_hat, reference.state_hat) <= 1e-15


@pytest.mark.parametrize("system", ["kolmogorov", "qg"])
def test_a_fused_step_allocates_only_what_it_returns(system):
    fused, generic = equations(system, "float64", grid_size=64)

    def peak_bytes(equation) -> int:
        stepper = make_stepper(equation, equation.config.dt)
        state = stepper.init(equation.to_state(initial_state(equation, batch=1)))
        for _ in range(3):  # plans, tables and stage factors built
            state = stepper.step(state)
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            state = stepper.step(state)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        return peak

    state_bytes = np.asarray(fused.to_state(initial_state(fused, batch=1))).nbytes
    fused_peak, generic_peak = peak_bytes(fused), peak_bytes(generic)
    # Live at the peak: the state going in with its history (AB3: q, f_{n-1}, f_{n-2}) and the arrays
    # coming out (AB3: q_new, f_n; CN-RK4: u and its stage accumulator h); no temporaries beyond them.
    arrays = 5 if system == "qg" else 3
    assert fused_peak <= arrays * state_bytes + 64 * 1024, (fused_peak, state_bytes)
    assert fused_peak < generic_peak / 2, (fused_peak, generic_peak)


def test_the_switch_and_the_reason(monkeypatch):
    monkeypatch.setenv("EMU_CPU_FUSED", "0")
    available, reason = cpu_fused_status()
    assert not available and "EMU_CPU_FUSED=0" in reason
    backend = get_backend("numpy")
    assert not backend.fused_kernels
    assert make_equation(make_config("qg", grid_size=16), backend).fused is None
    monkeypatch.setenv("EMU_CPU_FUSED", "1")
    monkeypatch.setenv("EMU_FFT", "numpy")
    available, reason = cpu_fused_status()
    assert not available and "EMU_FFT=numpy" in reason
    assert get_backend("numpy").fused_kernels is False


def test_the_torch_backend_keeps_its_own_path():
    backend = get_backend("torch")
    assert not backend.fused_kernels
    assert make_equation(make_config("kolmogorov", grid_size=16), backend).fused is None
