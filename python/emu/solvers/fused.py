"""Fused elementwise kernels for the solvers: launchers, per-equation operators and fused steppers.

Between its FFTs, a pseudospectral right-hand side is a chain of elementwise products; an eager
array library runs each product as its own pass over memory, and the time stepper adds more passes
to combine tendencies. On a GPU the FFTs and these passes alike are limited by memory bandwidth, so
each pass saved counts (and each launch saved, on small grids). The kernels of `kernels/spectral.cu`
(equations and references in `kernels/spectral.cuh`) do each chain in one pass:

    Kolmogorov, one CN-RK4 stage (5 per step)           QG, one AB3 step
      kolmogorov_gradients     omega_hat -> u, v,        qg_inversion_velocities  q_hat -> q, u, v
                               d(omega)/dx, d(omega)/dy                           (2x2 PV inversion)
      irfft2 (one batched call, unnormalised)             irfft2 (one batched call, unnormalised)
      advection_product        u w_x + v w_y              qg_fluxes                (u + U_m) q, v q
      rfft2                                               rfft2
      kolmogorov_cn_rk4_stage  -mask adv + F, then        qg_ab3_step              tendency, AB3
                               h and u stage updates                               combination, filter

The inverse FFTs run unnormalised (`norm="forward"`) and their input buffers may be overwritten,
which drops CuPy's separate scaling pass and input copy; the product kernels fold the 1/n^2 in.

How it hooks in: a backend whose `fused_kernels` flag is set (the cupy backend, unless
EMU_CUPY_FUSED=0) answers `backend.fused_operators(equation)` with a `KolmogorovFused` or `QGFused`;
the equation keeps it as `equation.fused` and routes `explicit_terms` through it, and `make_stepper`
picks the fused twin of the requested stepper when the operator lists one in `steppers`. Every other
method of the equation (diagnostics, state conversion) runs its generic array code. Numpy and torch
backends have no fused operators, so their path is untouched.

The operators are written against a small `KernelRuntime` (array module, FFT pair, kernel launch):
`CupyRuntime` on the GPU; the tests supply a host runtime that calls the same kernels compiled by g++
through ctypes with numpy FFTs, so the launch arguments, index arithmetic and steppers are checked
without a GPU.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Protocol

import numpy as np

from emu.solvers.time_stepping import AdamsBashforth3, CrankNicolsonRK4, StepperState

KERNEL_SOURCE = "spectral.cu"
THREADS_PER_BLOCK = 256


class KernelRuntime(Protocol):
    """What the fused operators need from where they run.

    Attributes:
        xp: the array module (cupy, or numpy for host tests): empty, empty_like, zeros, ones,
            ascontiguousarray.
        real: numpy scalar type of the working precision (np.float32 or np.float64); every real
            scalar argument of a kernel is passed as this type, counts as np.int64, sizes as np.int32.
    """

    xp: Any
    real: type

    def launch(self, name: str, count: int, *args) -> None:
        """Runs kernel `name` (without the _f32/_f64 suffix) over `count` work items."""

    def rfft2(self, field) -> Any:
        """Unnormalised forward real FFT over the last two axes."""

    def irfft2_unscaled(self, field_hat, shape: tuple[int, int]) -> Any:
        """Inverse real FFT over the last two axes *without* the 1/n^2 factor; may destroy its input."""


class CupyRuntime:
    """Kernels of `kernels/spectral.cu` on the current CUDA device, cuFFT through cupyx.scipy.fft.

    The module is compiled once per process by NVRTC (`emu.cuda.raw_module`, also cached on disk by
    CuPy); kernels launch on CuPy's current stream with a grid-stride loop, at most 32 blocks of 256
    threads per multiprocessor (enough to saturate memory bandwidth, and no launch is ever too big).
    """

    def __init__(self, dtype: str):
        from emu.cuda import raw_module, require_cupy

        self.cupy = require_cupy()
        import cupyx.scipy.fft as cufft

        self.xp = self.cupy
        self._fft = cufft
        self.real = np.float32 if dtype == "float32" else np.float64
        self._suffix = "f32" if dtype == "float32" else "f64"
        self._module = raw_module(KERNEL_SOURCE)
        self._functions: dict[str, Any] = {}
        sm_count = self.cupy.cuda.Device().attributes["MultiProcessorCount"]
        self._max_blocks = 32 * sm_count

    def launch(self, name: str, count: int, *args) -> None:
        function = self._functions.get(name)
        if function is None:
            function = self._functions[name] = self._module.get_function(f"{name}_{self._suffix}")
        blocks = max(1, min(math.ceil(count / THREADS_PER_BLOCK), self._max_blocks))
        function((blocks,), (THREADS_PER_BLOCK,), args)

    def rfft2(self, field):
        return self._fft.rfftn(field, axes=(-2, -1), overwrite_x=True)

    def irfft2_unscaled(self, field_hat, shape):
        return self._fft.irfftn(field_hat, s=shape, axes=(-2, -1), norm="forward", overwrite_x=True)


@functools.lru_cache(maxsize=None)
def cupy_runtime(dtype: str) -> CupyRuntime:
    """The process-wide `CupyRuntime` of one precision (the device current when first asked)."""
    return CupyRuntime(dtype)


# -- fused steppers ----------------------------------------------------------------------------------
class FusedCrankNicolsonRK4(CrankNicolsonRK4):
    """`CrankNicolsonRK4` with each stage's tail fused: after the FFTs of the advection term, one
    kernel applies mask, sign and forcing and updates h and u (see `KolmogorovFused.cn_rk4_stage`).

    Same coefficients, same `StepperState` (no history), so it can continue a generic run.
    """

    def __init__(self, equation, dt: float):
        super().__init__(equation, dt)
        self._stages = [(self.betas[k], 0.5 * self.dt * (self.alphas[k + 1] - self.alphas[k]), self.gammas[k] * self.dt)
                        for k in range(len(self.betas))]

    def step(self, state: StepperState) -> StepperState:
        fused = self.equation.fused
        u_start = fused.xp.ascontiguousarray(state.state_hat)
        # Fresh arrays: the caller may still hold the previous state (snapshots, restarts).
        u = fused.xp.empty_like(u_start)
        h = fused.xp.empty_like(u_start)
        for k, (beta, mu, gamma_dt) in enumerate(self._stages):
            fused.cn_rk4_stage(u_start if k == 0 else u, u, h, has_history=k > 0, beta=beta, mu=mu, gamma_dt=gamma_dt)
        return StepperState(u, {}, state.level + 1)


class FusedAdamsBashforth3(AdamsBashforth3):
    """`AdamsBashforth3` with tendency, AB3 combination and filter in one kernel after the FFTs
    (`QGFused.ab3_step`). Same start-up and history names, so restarts mix freely with the generic one."""

    def step(self, state: StepperState) -> StepperState:
        level = min(state.level, 2)
        previous = [state.history[name] for name in self.history_names[:level]]
        tendency, q_new = self.equation.fused.ab3_step(state.state_hat, previous, self.startup_coefficients[level],
                                                        self.dt)
        history = {"tendency_1": tendency}
        if "tendency_1" in state.history:
            history["tendency_2"] = state.history["tendency_1"]
        return StepperState(q_new, history, state.level + 1)


def ab3_operands(xp, q_hat, previous: list, coefficients: tuple[float, ...]):
    """What an AB3 kernel takes besides its tables, for the CUDA and CPU twins alike: (q_hat
    contiguous, the two history slots, the three coefficients zero-padded). Unused history slots get
    q_hat as a placeholder; the kernel's num_previous keeps them unread."""
    q_hat = xp.ascontiguousarray(q_hat)
    previous = [xp.ascontiguousarray(p) for p in previous]
    return q_hat, previous + [q_hat] * (2 - len(previous)), tuple(coefficients) + (0.0,) * (3 - len(coefficients))


# -- per-equation fused operators --------------------------------------------------------------------
class KolmogorovFused:
    """Fused right-hand side and CN-RK4 stage of a `KolmogorovEquation` (tables taken from it).

    State omega_hat: (batch, n, n//2+1) complex, C-contiguous. Wavenumbers are computed in the kernels
    from 2 pi / L; mask, forcing and linear operator are the equation's own (n, n//2+1) tables.
    """

    steppers = {"cn_rk4": FusedCrankNicolsonRK4}

    def __init__(self, equation, runtime: KernelRuntime):
        self.runtime = runtime
        self.xp = xp = runtime.xp
        real = runtime.real
        grid = equation.grid
        self.n, self.m = grid.spectral_shape
        self.plane = np.int64(self.n * self.m)
        self.fundamental = real(2.0 * math.pi / grid.domain_extent)
        self.scale = real(1.0 / grid.num_points**2)  # undoes the unnormalised inverse FFT
        self.mask = xp.ascontiguousarray(equation.dealias)
        self.linear = xp.ascontiguousarray(equation.linear_operator)
        forcing = equation.forcing_hat
        # No forcing: a zero table keeps one kernel signature (an (n, m) read, shared by the batch).
        self.forcing = xp.zeros(grid.spectral_shape, dtype=equation.backend.complex_dtype) if forcing is None \
            else xp.ascontiguousarray(forcing)

    def advection_product_hat(self, omega_hat):
        """rfft2(u d(omega)/dx + v d(omega)/dy): the advection before mask and sign, (batch, n, m)."""
        runtime, xp = self.runtime, self.xp
        omega_hat = xp.ascontiguousarray(omega_hat)
        count = omega_hat.size
        spectral = xp.empty((4,) + tuple(omega_hat.shape), dtype=omega_hat.dtype)
        runtime.launch("kolmogorov_gradients", count, omega_hat, spectral, np.int64(count), np.int32(self.n),
                       np.int32(self.m), self.fundamental)
        physical = runtime.irfft2_unscaled(spectral, (self.n, self.n))
        product = xp.empty(physical.shape[1:], dtype=physical.dtype)
        runtime.launch("advection_product", product.size, physical, product, np.int64(product.size), self.scale)
        return runtime.rfft2(product)

    def explicit_terms(self, omega_hat):
        """N(omega_hat) = -mask rfft2(u . grad omega) + F_hat, as `KolmogorovEquation.explicit_terms`."""
        advection = self.advection_product_hat(omega_hat)
        out = self.xp.empty_like(advection)
        self.runtime.launch("kolmogorov_tendency", advection.size, advection, self.mask, self.forcing, out,
                            np.int64(advection.size), self.plane)
        return out

    def cn_rk4_stage(self, u_in, u_out, h, *, has_history: bool, beta: float, mu: float, gamma_dt: float) -> None:
        """One stage of `CrankNicolsonRK4` in place: h <- N(u_in) + beta h, u_out <- ((1 + mu L) u_in +
        gamma_dt h)/(1 - mu L). u_out may be u_in; h is read only when has_history."""
        advection = self.advection_product_hat(u_in)
        real = self.runtime.real
        self.runtime.launch("kolmogorov_cn_rk4_stage", advection.size, advection, self.mask, self.forcing,
                            self.linear, u_in, u_out, h, np.int32(has_history), real(beta), real(mu), real(gamma_dt),
                            np.int64(advection.size), self.plane)


class QGFused:
    """Fused right-hand side and AB3 step of a `QGEquation` (parameters taken from its config).

    State q_hat: (batch, 2, n, n//2+1) complex, C-contiguous. The PV inversion, beta and drag factors
    are computed in the kernels from the wavenumbers; the step filter is the equation's (n, m) table
    (ones for filter="none").
    """

    steppers = {"ab3": FusedAdamsBashforth3}

    def __init__(self, equation, runtime: KernelRuntime):
        self.runtime = runtime
        self.xp = xp = runtime.xp
        real = runtime.real
        config, grid = equation.config, equation.grid
        self.n, self.m = grid.spectral_shape
        self.fundamental = real(2.0 * math.pi / grid.domain_extent)
        self.scale = real(1.0 / grid.num_points**2)
        f1, f2 = config.coupling
        beta1, beta2 = config.mean_pv_gradients
        self.physics = (real(f1), real(f2), real(beta1), real(beta2), real(config.bottom_drag))
        self.velocities = (real(config.upper_layer_velocity), real(config.lower_layer_velocity))
        step_filter = equation.step_filter
        self.filter = xp.ones(grid.spectral_shape, dtype=equation.backend.real_dtype) if step_filter is None \
            else xp.ascontiguousarray(step_filter)

    def _geometry(self, pairs: int) -> tuple:
        return np.int64(pairs), np.int32(self.n), np.int32(self.m), self.fundamental

    def fluxes_hat(self, q_hat):
        """rfft2 of the fluxes ((u_m + U_m) q_m, v_m q_m): shape (2, batch, 2, n, m)."""
        runtime, xp = self.runtime, self.xp
        pairs = q_hat.size // 2
        spectral = xp.empty((3,) + tuple(q_hat.shape), dtype=q_hat.dtype)
        runtime.launch("qg_inversion_velocities", pairs, q_hat, spectral, *self._geometry(pairs), *self.physics[:2])
        physical = runtime.irfft2_unscaled(spectral, (self.n, self.n))
        fluxes = xp.empty((2,) + tuple(physical.shape[1:]), dtype=physical.dtype)
        count = physical[0].size
        runtime.launch("qg_fluxes", count, physical, fluxes, np.int64(count), np.int64(self.n * self.n),
                       *self.velocities, self.scale)
        return runtime.rfft2(fluxes)

    def explicit_terms(self, q_hat):
        """dq_hat/dt, as `QGEquation.explicit_terms`."""
        q_hat = self.xp.ascontiguousarray(q_hat)
        fluxes_hat = self.fluxes_hat(q_hat)
        out = self.xp.empty_like(q_hat)
        pairs = q_hat.size // 2
        self.runtime.launch("qg_tendency", pairs, fluxes_hat, q_hat, out, *self._geometry(pairs), *self.physics)
        return out

    def ab3_step(self, q_hat, previous: list, coefficients: tuple[float, ...], dt: float):
        """(f_n, q_{n+1}) with q_{n+1} = filter (q_n + dt sum_j c_j f_{n-j}); `previous` holds f_{n-1}
        [, f_{n-2}] and `coefficients` one more number than `previous`."""
        xp, real = self.xp, self.runtime.real
        q_hat, slots, c = ab3_operands(xp, q_hat, previous, coefficients)
        fluxes_hat = self.fluxes_hat(q_hat)
        tendency = xp.empty_like(q_hat)
        q_new = xp.empty_like(q_hat)
        pairs = q_hat.size // 2
        self.runtime.launch("qg_ab3_step", pairs, fluxes_hat, q_hat, slots[0], slots[1], np.int32(len(previous)),
                            self.filter, tendency, q_new, *self._geometry(pairs), *self.physics,
                            real(c[0]), real(c[1]), real(c[2]), real(dt))
        return tendency, q_new


FUSED_OPERATORS = {"kolmogorov": KolmogorovFused, "qg": QGFused}


def fused_operators(equation, runtime: KernelRuntime | None = None):
    """The fused operator of `equation`'s system on `runtime` (default: the cupy runtime of the
    equation's precision), or None for a system without fused kernels."""
    operator = FUSED_OPERATORS.get(getattr(equation.config, "system", None))
    if operator is None:
        return None
    return operator(equation, runtime or cupy_runtime(equation.backend.dtype))
