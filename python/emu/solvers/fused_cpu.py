"""Fused CPU operators: the twins of `emu.solvers.fused`'s CUDA operators, on numba and FFTW.

Same operator names, methods and steppers as `KolmogorovFused` / `QGFused` (the CN-RK4 and AB3
steppers of `emu.solvers.fused` drive these unchanged); what differs is where the data lives:

    CUDA (emu.solvers.fused)                      CPU (here)
    kernels compute wavenumbers per element       kernels read the equation's own tables
    fresh device arrays per call                  the FFTW plans' aligned buffers, reused
    cuFFT, inverse unnormalised                   FFTW `execute()`, inverse unnormalised

A step thus runs: kernel -> FFTW inverse in place of its buffers -> kernel -> FFTW forward -> kernel,
with no copy in or out of FFTW and no 1/n^2 pass (folded into the product kernel), and allocates
only the arrays that leave it (the new state and, for AB3, its tendency), because callers may keep
earlier states (snapshots, restarts). The kernels evaluate every product in the order the generic
numpy expressions do, so a fused run and a generic one agree to round-off.

Reference tables are taken from the equation, broadcast to (n, n//2+1) once, so whatever convention
the equation encodes in them (emu's, or jax-cfd's Nyquist handling) the kernels follow.
"""

from __future__ import annotations

import numpy as np

from emu.solvers.fused import FusedAdamsBashforth3, FusedCrankNicolsonRK4, ab3_operands


def _table(array, shape: tuple[int, int], dtype) -> np.ndarray:
    """A backend table (maybe broadcastable, e.g. (1, m) or (n, 1)) as a C-contiguous (n, m) array."""
    return np.ascontiguousarray(np.broadcast_to(np.asarray(array, dtype=dtype), shape))


def _imaginary_table(array, shape: tuple[int, int], dtype) -> np.ndarray:
    """The imaginary part, as a real (n, m) table, of a purely imaginary factor (i k, i k / |k|^2):
    the kernels multiply by it as (i s)(c + i d) = -(s d) + i (s c)."""
    table = np.broadcast_to(np.asarray(array), shape)
    if np.any(table.real != 0):
        raise ValueError("fused CPU kernels: a derivative factor has a nonzero real part")
    return np.ascontiguousarray(table.imag, dtype=dtype)


def _imaginary_vector(array, axis: int, length: int, dtype) -> np.ndarray:
    """The imaginary part of a purely imaginary factor that varies along one axis only ((1, m) for
    i kx, (n, 1) for i ky), as a 1D real vector: fewer bytes per mode than a full table."""
    array = np.asarray(array)
    if np.any(array.real != 0) or array.shape[axis] != length or array.size != length:
        raise ValueError(f"fused CPU kernels: expected a purely imaginary factor along axis {axis}, "
                         f"got shape {array.shape}")
    return np.ascontiguousarray(array.imag.reshape(length), dtype=dtype)


def _floats(array) -> np.ndarray:
    """A C-contiguous complex array seen as floats, (real, imaginary) pairs on the last axis."""
    array = np.ascontiguousarray(array)
    return array.view(array.real.dtype)


class _PlanPair:
    """The FFTW plans of one right-hand side: inverse (spectral_shape -> physical) and forward, both
    from the backend's plan cache, so the fused and generic paths run the very same transforms."""

    def __init__(self, fft, spectral_shape: tuple, physical_input_shape: tuple, complex_dtype, real_dtype, n: int):
        self.inverse = fft.plan("inverse", spectral_shape, complex_dtype, (n, n))
        self.forward = fft.plan("forward", physical_input_shape, real_dtype, (n, n))


class KolmogorovFusedCPU:
    """Fused right-hand side and CN-RK4 stage of a `KolmogorovEquation` on the numpy backend.

    State omega_hat: (batch, n, n//2+1) complex. Tables: u and v from omega (`to_u`, `to_v`), the
    derivative factors, the negated dealiasing mask, the forcing, and per stage the CN-RK4 factors
    (computed exactly as `CrankNicolsonRK4` computes them).
    """

    steppers = {"cn_rk4": FusedCrankNicolsonRK4}

    def __init__(self, equation, kernels):
        self.kernels = kernels
        self.xp = np
        backend, grid = equation.backend, equation.grid
        self.fft = backend.fft
        self.n, self.m = grid.spectral_shape
        self.complex_dtype = np.dtype(backend.complex_dtype)
        self.real_dtype = np.dtype(backend.real_dtype)
        shape, complex_dtype = grid.spectral_shape, self.complex_dtype
        real_dtype = self.real_dtype
        # The imaginary parts of the equation's own factors, whatever convention they encode.
        self.to_u = _imaginary_table(equation.to_u, shape, real_dtype)
        self.to_v = _imaginary_table(equation.to_v, shape, real_dtype)
        self.derivative_x = _imaginary_table(equation.derivative_x, shape, real_dtype)
        self.derivative_y = _imaginary_table(equation.derivative_y, shape, real_dtype)
        self.negative_dealias = _table(-np.asarray(equation.dealias), shape, real_dtype)
        self.has_forcing = equation.forcing_hat is not None
        self.forcing = _floats(_table(equation.forcing_hat if self.has_forcing else np.zeros(shape), shape,
                                      complex_dtype))
        self.linear = equation.linear_operator
        self.scale = self.real_dtype.type(1.0 / grid.num_points**2)
        self._plans: dict[int, _PlanPair] = {}
        self._stage_factors: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}

    def _plans_for(self, batch: int) -> _PlanPair:
        plans = self._plans.get(batch)
        if plans is None:
            plans = self._plans[batch] = _PlanPair(self.fft, (4, batch, self.n, self.m), (batch, self.n, self.n),
                                                   self.complex_dtype, self.real_dtype, self.n)
        return plans

    def _advection_product_spectrum(self, omega_hat) -> np.ndarray:
        """rfft2(u d(omega)/dx + v d(omega)/dy), unmasked, in the forward plan's output buffer (valid
        until the next call)."""
        plans = self._plans_for(omega_hat.shape[0])
        self.kernels.kolmogorov_gradients(_floats(omega_hat), self.to_u, self.to_v, self.derivative_x,
                                          self.derivative_y, _floats(plans.inverse.input_array))
        plans.inverse.execute()
        self.kernels.advection_product(plans.inverse.output_array, self.scale, plans.forward.input_array)
        plans.forward.execute()
        return plans.forward.output_array

    def explicit_terms(self, omega_hat) -> np.ndarray:
        """N(omega_hat) = -mask rfft2(u . grad omega) + F_hat, as `KolmogorovEquation.explicit_terms`."""
        advection = self._advection_product_spectrum(omega_hat)
        out = np.empty_like(advection)
        # The stage kernel with the state update switched off: h <- N(omega_hat), same arithmetic;
        # decay, gain and u are then unread (any table of their shape stands in).
        placeholder = self.negative_dealias
        self.kernels.kolmogorov_cn_rk4_stage(_floats(advection), self.negative_dealias, self.forcing,
                                             self.has_forcing, placeholder, placeholder, _floats(out), _floats(out),
                                             _floats(out), False, self.real_dtype.type(0), False)
        return out

    def _factors(self, mu: float, gamma_dt: float) -> tuple[np.ndarray, np.ndarray]:
        key = (mu, gamma_dt)
        factors = self._stage_factors.get(key)
        if factors is None:
            # The expressions of CrankNicolsonRK4.__init__, so the stage rounds as the generic one does.
            linear = self.linear
            decay = (1 + mu * linear) / (1 - mu * linear)
            gain = gamma_dt / (1 - mu * linear)
            shape = (self.n, self.m)
            factors = self._stage_factors[key] = (_table(decay, shape, self.real_dtype),
                                                  _table(gain, shape, self.real_dtype))
        return factors

    def cn_rk4_stage(self, u_in, u_out, h, *, has_history: bool, beta: float, mu: float, gamma_dt: float) -> None:
        """One stage of `CrankNicolsonRK4` in place: h <- N(u_in) + beta h, u_out <- decay u_in + gain h.
        u_out may be u_in; h is read only when has_history."""
        advection = self._advection_product_spectrum(u_in)
        decay, gain = self._factors(mu, gamma_dt)
        self.kernels.kolmogorov_cn_rk4_stage(_floats(advection), self.negative_dealias, self.forcing,
                                             self.has_forcing, decay, gain, _floats(u_in), _floats(u_out),
                                             _floats(h), bool(has_history), self.real_dtype.type(beta), True)


class QGFusedCPU:
    """Fused right-hand side and AB3 step of a `QGEquation` on the numpy backend.

    State q_hat: (batch, 2, n, n//2+1) complex. Tables: the 2x2 inversion (real), the derivative
    factors, the beta/drag factors on psi and the step filter, all the equation's own.
    """

    steppers = {"ab3": FusedAdamsBashforth3}

    def __init__(self, equation, kernels):
        self.kernels = kernels
        self.xp = np
        backend, grid, config = equation.backend, equation.grid, equation.config
        self.fft = backend.fft
        self.n, self.m = grid.spectral_shape
        self.complex_dtype = np.dtype(backend.complex_dtype)
        self.real_dtype = np.dtype(backend.real_dtype)
        shape, complex_dtype, real_dtype = grid.spectral_shape, self.complex_dtype, self.real_dtype
        self.inversion = tuple(_table(equation.inversion[i][j], shape, real_dtype) for i in range(2) for j in range(2))
        n, m = shape
        self.minus_kx = _imaginary_vector(equation._minus_ikx, 1, m, real_dtype)
        self.minus_ky = _imaginary_vector(equation._minus_iky, 0, n, real_dtype)
        self.kx = _imaginary_vector(grid.ikx, 1, m, real_dtype)
        self.psi_to_tendency = _floats(np.broadcast_to(np.asarray(equation._psi_to_tendency, dtype=complex_dtype)[0],
                                                       (2,) + shape))
        self.has_filter = equation.step_filter is not None
        self.filter = _table(equation.step_filter if self.has_filter else np.ones(shape), shape, real_dtype)
        self.velocities = tuple(real_dtype.type(v) for v in (config.upper_layer_velocity, config.lower_layer_velocity))
        self.scale = real_dtype.type(1.0 / grid.num_points**2)
        self._plans: dict[int, _PlanPair] = {}

    def _plans_for(self, batch: int) -> _PlanPair:
        plans = self._plans.get(batch)
        if plans is None:
            plans = self._plans[batch] = _PlanPair(self.fft, (3, batch, 2, self.n, self.m),
                                                   (2, batch, 2, self.n, self.n), self.complex_dtype,
                                                   self.real_dtype, self.n)
        return plans

    def _fluxes_spectrum(self, q_hat) -> np.ndarray:
        """rfft2 of ((u_m + U_m) q_m, v_m q_m), (2, batch, 2, n, m), in the forward plan's output
        buffer (valid until the next call)."""
        plans = self._plans_for(q_hat.shape[0])
        self.kernels.qg_inversion_velocities(_floats(q_hat), *self.inversion, self.minus_ky, self.kx,
                                             _floats(plans.inverse.input_array))
        plans.inverse.execute()
        self.kernels.qg_fluxes(plans.inverse.output_array, self.scale, *self.velocities, plans.forward.input_array)
        plans.forward.execute()
        return plans.forward.output_array

    def explicit_terms(self, q_hat) -> np.ndarray:
        """dq_hat/dt, as `QGEquation.explicit_terms`."""
        q_hat = np.ascontiguousarray(q_hat)
        fluxes_hat = self._fluxes_spectrum(q_hat)
        out = np.empty_like(q_hat)
        real = self.real_dtype.type
        # The AB3 kernel with the state update switched off: the tendency alone, same arithmetic.
        self.kernels.qg_ab3_step(_floats(fluxes_hat), _floats(q_hat), *self.inversion, self.minus_kx, self.minus_ky,
                                 self.psi_to_tendency, _floats(q_hat), _floats(q_hat), 0, real(0), real(0), real(0),
                                 real(0), self.filter, self.has_filter, _floats(out), _floats(out), False)
        return out

    def ab3_step(self, q_hat, previous: list, coefficients: tuple[float, ...], dt: float):
        """(f_n, q_{n+1}) with q_{n+1} = filter (q_n + dt sum_j c_j f_{n-j}); `previous` holds f_{n-1}
        [, f_{n-2}] and `coefficients` one more number than `previous`."""
        real = self.real_dtype.type
        q_hat, slots, c = ab3_operands(np, q_hat, previous, coefficients)
        fluxes_hat = self._fluxes_spectrum(q_hat)
        tendency = np.empty_like(q_hat)
        q_new = np.empty_like(q_hat)
        self.kernels.qg_ab3_step(_floats(fluxes_hat), _floats(q_hat), *self.inversion, self.minus_kx, self.minus_ky,
                                 self.psi_to_tendency, _floats(slots[0]), _floats(slots[1]), len(previous),
                                 real(c[0]), real(c[1]), real(c[2]), real(dt), self.filter, self.has_filter,
                                 _floats(tendency), _floats(q_new), True)
        return tendency, q_new


FUSED_CPU_OPERATORS = {"kolmogorov": KolmogorovFusedCPU, "qg": QGFusedCPU}


def fused_cpu_operators(equation):
    """The fused CPU operator of `equation`'s system (kernels from `emu.cpu_kernels`), or None for a
    system without one."""
    from emu import cpu_kernels

    operator = FUSED_CPU_OPERATORS.get(getattr(equation.config, "system", None))
    return None if operator is None else operator(equation, cpu_kernels)
