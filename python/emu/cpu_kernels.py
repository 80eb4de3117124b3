"""The one door to numba: the solvers' fused CPU kernels, twins of `kernels/spectral.cu`.

Why: on one CPU core a pseudospectral step is its FFTs plus chains of elementwise products. numpy
runs each product as its own pass over memory, and FFTW's plans add a copy in, a copy out and a
1/n^2 scaling pass; measured at 256^2 (QG, one thread) that elementwise traffic was 58% of the step.
The kernels here do each chain in one loop, reading the equation's own precomputed tables and
writing straight into the FFTW plans' aligned buffers (`emu.solvers.fused_cpu`), as the CUDA kernels
do on the GPU. Same names and the same chain boundaries as `kernels/spectral.cu`:

    Kolmogorov, one CN-RK4 stage (5 per step)           QG, one AB3 step
      kolmogorov_gradients     omega_hat -> u, v,        qg_inversion_velocities  q_hat -> q, u, v
                               d(omega)/dx, d(omega)/dy                           (2x2 PV inversion)
      FFTW inverse (plan buffers, unnormalised)           FFTW inverse (plan buffers, unnormalised)
      advection_product        u w_x + v w_y             qg_fluxes                (u + U_m) q, v q
      FFTW forward                                        FFTW forward
      kolmogorov_cn_rk4_stage  -mask adv + F, then       qg_ab3_step              tendency, AB3
                               h and u stage updates                              combination, filter

Where the CUDA kernels compute wavenumbers and the 2x2 inversion per element (bandwidth is free
there, division is not), these read tables: per-element 64-bit divisions made a host build of the
CUDA kernels only 1.35-1.57x pyqg. Each kernel evaluates the products in the order the generic numpy
expressions of `emu.systems` do (`a * b` then `+=`), so the fused and generic steps agree to
round-off (tests/test_cpu_kernels.py: <= 1e-15 relative after 200 steps, float64).

numba is an ordinary dependency; when it cannot be imported (or EMU_CPU_FUSED=0, or pyFFTW is
missing, since the kernels write into FFTW's buffers) the numpy backend runs the generic array code
and `cpu_fused_status()` says why. Kernels are compiled on first use per dtype and cached on disk
(numba's `cache=True`, in __pycache__ beside this file): the first run in a fresh checkout spends a
few seconds compiling. All kernels are single-threaded: emu's CPU default is one thread per process
(`emu.backends.set_cpu_threads`), and ensembles scale through processes.
"""

from __future__ import annotations

import os

try:  # numba is an ordinary dependency; without it the generic numpy path runs (cpu_fused_status says so)
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None


def cpu_fused_status() -> tuple[bool, str]:
    """(available, reason): whether the numpy backend can run the fused CPU kernels, and why not."""
    if os.environ.get("EMU_CPU_FUSED", "1") == "0":
        return False, "EMU_CPU_FUSED=0 in the environment"
    if os.environ.get("EMU_FFT", "fftw") == "numpy":
        return False, "EMU_FFT=numpy (the fused kernels write into FFTW plans' buffers)"
    try:
        import pyfftw  # noqa: F401
    except ImportError as error:
        return False, f"pyFFTW is not installed ({error}); pip install pyfftw"
    if numba is None:
        return False, "numba is not installed; pip install numba"
    return True, f"numba {numba.__version__}"


def _jit(function):
    """numba's njit with on-disk caching; without numba the plain Python function (never run by the
    solvers, which then take the generic path)."""
    if numba is None:
        return function
    # nogil: FFTW releases the GIL too, so threads of one process (a data loader) are not serialised.
    # No fastmath: the products must round exactly as the generic numpy expressions do.
    return numba.njit(cache=True, nogil=True)(function)


# Complex arrays arrive as float views with interleaved (real, imaginary) pairs on the last axis
# (`x.view(float)`): numba then vectorises the loops, which it does not do for complex structs
# (measured 1.6x faster at 256^2). Complex products are written out as numpy evaluates them:
#   (a + i b)(c + i d) = (a c - b d) + i (a d + b c)
# and for factors with a zero real part (derivatives: i k) or a zero imaginary part (masks, the PV
# inversion, the stepper's coefficients) the dropped products are exact zeros, so
#   (i s)(c + i d) = -(s d) + i (s c),      r (c + i d) = r c + i (r d)
# give the same bits as numpy's full complex product, up to the sign of a zero.


@_jit
def kolmogorov_gradients(omega_hat, to_u, to_v, derivative_x, derivative_y, spectral):
    """spectral[0..3] = i (to_u, to_v, derivative_x, derivative_y) * omega_hat: u_hat, v_hat,
    (d omega/dx)_hat, (d omega/dy)_hat (`KolmogorovEquation.advection_hat`).

    omega_hat (batch, n, 2m) float view; the four tables (n, m) real: the imaginary parts of the
    equation's purely imaginary factors; spectral (4, batch, n, 2m): the inverse plan's input buffer.
    """
    batch, n, pairs = omega_hat.shape
    for b in range(batch):
        for i in range(n):
            for j in range(pairs // 2):
                real = omega_hat[b, i, 2 * j]
                imaginary = omega_hat[b, i, 2 * j + 1]
                spectral[0, b, i, 2 * j] = -(to_u[i, j] * imaginary)
                spectral[0, b, i, 2 * j + 1] = to_u[i, j] * real
                spectral[1, b, i, 2 * j] = -(to_v[i, j] * imaginary)
                spectral[1, b, i, 2 * j + 1] = to_v[i, j] * real
                spectral[2, b, i, 2 * j] = -(derivative_x[i, j] * imaginary)
                spectral[2, b, i, 2 * j + 1] = derivative_x[i, j] * real
                spectral[3, b, i, 2 * j] = -(derivative_y[i, j] * imaginary)
                spectral[3, b, i, 2 * j + 1] = derivative_y[i, j] * real


@_jit
def advection_product(physical, scale, product):
    """product = (s u)(s w_x) + (s v)(s w_y), s = 1/n^2 undoing the unnormalised inverse FFT.

    physical (4, batch, n, n): the inverse plan's output; product (batch, n, n): the forward plan's
    input buffer.
    """
    _, batch, n, nx = physical.shape
    for b in range(batch):
        for i in range(n):
            for j in range(nx):
                u = physical[0, b, i, j] * scale
                v = physical[1, b, i, j] * scale
                omega_x = physical[2, b, i, j] * scale
                omega_y = physical[3, b, i, j] * scale
                product[b, i, j] = u * omega_x + v * omega_y


@_jit
def kolmogorov_cn_rk4_stage(advection_hat, negative_dealias, forcing, has_forcing, decay, gain,
                            u_in, u_out, h, has_history, beta, update_state):
    """One CN-RK4 stage after the forward FFT (`CrankNicolsonRK4.step`, same order of operations):
        h     <- N(u_in) [+ beta h]          N = -mask advection_hat [+ F_hat]
        u_out <- decay u_in + gain h         (decay = (1 + mu L)/(1 - mu L), gain = gamma dt/(1 - mu L))
    u_out may be u_in (each element is read before it is written). With update_state False only
    h <- N(u_in) is written: `explicit_terms`.

    Complex arrays as float views (batch, n, 2m); negative_dealias, decay, gain (n, m) real;
    forcing (n, 2m) float view.
    """
    batch, n, pairs = advection_hat.shape
    for b in range(batch):
        for i in range(n):
            for j in range(pairs // 2):
                mask = negative_dealias[i, j]
                term_real = advection_hat[b, i, 2 * j] * mask
                term_imaginary = advection_hat[b, i, 2 * j + 1] * mask
                if has_forcing:
                    term_real = term_real + forcing[i, 2 * j]
                    term_imaginary = term_imaginary + forcing[i, 2 * j + 1]
                if has_history:
                    term_real = term_real + beta * h[b, i, 2 * j]
                    term_imaginary = term_imaginary + beta * h[b, i, 2 * j + 1]
                h[b, i, 2 * j] = term_real
                h[b, i, 2 * j + 1] = term_imaginary
                if update_state:
                    u_out[b, i, 2 * j] = decay[i, j] * u_in[b, i, 2 * j] + gain[i, j] * term_real
                    u_out[b, i, 2 * j + 1] = decay[i, j] * u_in[b, i, 2 * j + 1] + gain[i, j] * term_imaginary


@_jit
def qg_inversion_velocities(q_hat, a00, a01, a10, a11, minus_ky, kx, spectral):
    """spectral[0] = q_hat, spectral[1] = -i ky psi_hat, spectral[2] = i kx psi_hat with
    psi_hat_m = A_m1 q_hat_1 + A_m2 q_hat_2 (`QGEquation.streamfunction_hat`, `explicit_terms`).

    q_hat (batch, 2, n, 2m) float view; A tables (n, m) real; minus_ky (n,), kx (m,): the imaginary
    parts of -i ky and i kx; spectral (3, batch, 2, n, 2m): the inverse plan's input buffer.
    """
    batch, _, n, pairs = q_hat.shape
    for b in range(batch):
        for i in range(n):
            factor_y = minus_ky[i]
            for j in range(pairs // 2):
                factor_x = kx[j]
                for part in range(2):  # real, imaginary
                    spectral[0, b, 0, i, 2 * j + part] = q_hat[b, 0, i, 2 * j + part]
                    spectral[0, b, 1, i, 2 * j + part] = q_hat[b, 1, i, 2 * j + part]
                for layer in range(2):
                    first = a00[i, j] if layer == 0 else a10[i, j]
                    second = a01[i, j] if layer == 0 else a11[i, j]
                    psi_real = first * q_hat[b, 0, i, 2 * j] + second * q_hat[b, 1, i, 2 * j]
                    psi_imaginary = first * q_hat[b, 0, i, 2 * j + 1] + second * q_hat[b, 1, i, 2 * j + 1]
                    spectral[1, b, layer, i, 2 * j] = -(factor_y * psi_imaginary)
                    spectral[1, b, layer, i, 2 * j + 1] = factor_y * psi_real
                    spectral[2, b, layer, i, 2 * j] = -(factor_x * psi_imaginary)
                    spectral[2, b, layer, i, 2 * j + 1] = factor_x * psi_real


@_jit
def qg_fluxes(physical, scale, velocity_1, velocity_2, fluxes):
    """fluxes[0] = (s u_m + U_m)(s q_m), fluxes[1] = (s v_m)(s q_m), s = 1/n^2.

    physical (3, batch, 2, n, n): the inverse plan's output (q, u, v); fluxes (2, batch, 2, n, n):
    the forward plan's input buffer. pyqg advects with the total zonal velocity u_m + U_m.
    """
    _, batch, _, n, nx = physical.shape
    for b in range(batch):
        for layer in range(2):
            background = velocity_1 if layer == 0 else velocity_2
            for i in range(n):
                for j in range(nx):
                    q = physical[0, b, layer, i, j] * scale
                    u = physical[1, b, layer, i, j] * scale + background
                    v = physical[2, b, layer, i, j] * scale
                    fluxes[0, b, layer, i, j] = u * q
                    fluxes[1, b, layer, i, j] = v * q


@_jit
def qg_ab3_step(fluxes_hat, q_hat, a00, a01, a10, a11, minus_kx, minus_ky, psi_to_tendency,
                previous_1, previous_2, num_previous, c0, c1, c2, dt, step_filter, has_filter,
                tendency, q_new, update_state):
    """tendency = f_n = dq_hat/dt (`QGEquation.explicit_terms`, same order of operations:
    -(i k F_u + i l F_v) + (beta, drag factors) psi_m); then, when `update_state`,
    q_new = filter (q_n + dt (c0 f_n + c1 f_{n-1} + c2 f_{n-2})), the terms past `num_previous`
    left out (`AdamsBashforth3.step`, start-up levels included).

    Complex arrays as float views: fluxes_hat (2, batch, 2, n, 2m), q_hat, previous_*, tendency,
    q_new (batch, 2, n, 2m), psi_to_tendency (2, n, 2m); minus_kx (m,), minus_ky (n,): the imaginary
    parts of -i kx and -i ky; A tables and step_filter (n, m) real.
    """
    batch, _, n, pairs = q_hat.shape
    for b in range(batch):
        for i in range(n):
            factor_y = minus_ky[i]
            for j in range(pairs // 2):
                re, im = 2 * j, 2 * j + 1
                factor_x = minus_kx[j]
                # Both layers per mode: q_hat is read once for the two streamfunctions.
                q1_real, q1_imaginary = q_hat[b, 0, i, re], q_hat[b, 0, i, im]
                q2_real, q2_imaginary = q_hat[b, 1, i, re], q_hat[b, 1, i, im]
                for layer in range(2):
                    first = a00[i, j] if layer == 0 else a10[i, j]
                    second = a01[i, j] if layer == 0 else a11[i, j]
                    psi_real = first * q1_real + second * q2_real
                    psi_imaginary = first * q1_imaginary + second * q2_imaginary
                    term_real = -(factor_x * fluxes_hat[0, b, layer, i, im])
                    term_imaginary = factor_x * fluxes_hat[0, b, layer, i, re]
                    term_real = term_real + -(factor_y * fluxes_hat[1, b, layer, i, im])
                    term_imaginary = term_imaginary + factor_y * fluxes_hat[1, b, layer, i, re]
                    p_real = psi_to_tendency[layer, i, re]
                    p_imaginary = psi_to_tendency[layer, i, im]
                    term_real = term_real + (p_real * psi_real - p_imaginary * psi_imaginary)
                    term_imaginary = term_imaginary + (p_real * psi_imaginary + p_imaginary * psi_real)
                    tendency[b, layer, i, re] = term_real
                    tendency[b, layer, i, im] = term_imaginary
                    if update_state:
                        combination_real = c0 * term_real
                        combination_imaginary = c0 * term_imaginary
                        if num_previous >= 1:
                            combination_real = combination_real + c1 * previous_1[b, layer, i, re]
                            combination_imaginary = combination_imaginary + c1 * previous_1[b, layer, i, im]
                        if num_previous >= 2:
                            combination_real = combination_real + c2 * previous_2[b, layer, i, re]
                            combination_imaginary = combination_imaginary + c2 * previous_2[b, layer, i, im]
                        value_real = (q1_real if layer == 0 else q2_real) + dt * combination_real
                        value_imaginary = (q1_imaginary if layer == 0 else q2_imaginary) + dt * combination_imaginary
                        if has_filter:
                            value_real = step_filter[i, j] * value_real
                            value_imaginary = step_filter[i, j] * value_imaginary
                        q_new[b, layer, i, re] = value_real
                        q_new[b, layer, i, im] = value_imaginary
