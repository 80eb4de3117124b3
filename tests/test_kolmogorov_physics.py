"""Kolmogorov flow: exact solutions, invariants, the advection term and the CN-RK4 convergence order.

Measured on the reference machine (numpy backend, float64); every tolerance below is about 10x the
measured value unless stated otherwise:
  Taylor-Green decay, 200 steps, dt = 0.01 (nu = 0.05):  error vs exp(-(2 nu + alpha) t) 1.1e-9 (alpha = 0),
      9.1e-9 (alpha = 0.1); vs the discrete CN amplification factor 1.2e-14. Per step, the product of
      the five CN factors differs from exp(L dt) by 5.7e-12 (alpha = 0) and 4.5e-11 (alpha = 0.1).
  laminar Kolmogorov flow from rest, 300 steps:          8.9e-8
  energy budget dE/dt = <u.f> - 2 nu Z - 2 alpha E:      6.7e-9 relative
  Galerkin invariants sum psi* N, sum omega* N:          <= 7e-17 relative
  inviscid 32^2, 500 steps at CFL 0.24:                   energy drift 1.1e-6, enstrophy drift 5.3e-6;
      halving dt lowers both by 2^4.8
  advection vs the analytic -(u . grad omega):           3.9e-15 relative
  CN-RK4 order (T = 0.5, dt = T/10, T/20, T/40), nu = alpha = 0, forced: 4.013, 4.003;
      nu = alpha = 0.1: 1.984, 1.996
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from emu.solvers import BlowUpError, CrankNicolsonRK4, RungeKutta4, integrate, make_stepper
from emu.spectral import rfft_weights
from emu.systems import ConfigError, make_config, make_equation


def kolmogorov(backend, **overrides):
    config = make_config("kolmogorov", "re1000", **overrides)
    return config, make_equation(config, backend)


def run(stepper, state_hat, num_steps):
    state = stepper.init(state_hat)
    for _ in range(num_steps):
        state = stepper.step(state)
    return state.state_hat


def physical(equation, state_hat):
    return equation.backend.to_numpy(equation.fields(state_hat))


# -- exact solutions -------------------------------------------------------------------------------
@pytest.mark.parametrize("drag", [0.0, 0.1])
def test_taylor_green_decays_at_the_exact_viscous_rate(numpy64, helpers, drag):
    """omega = 2 cos x cos y is a steady Euler flow (u . grad omega = 0), so it decays as e^{-(2 nu + alpha) t}.

    With the advection zero, CN-RK4 reduces to five Crank-Nicolson sub-steps per step, whose
    amplification factor prod_k (1 + mu_k L)/(1 - mu_k L) (sum 2 mu_k = dt) the solver must reproduce
    to round-off; that factor differs from exp(L dt) by sum_k (2 mu_k L)^3/12 per step, i.e. 1e-9 relative
    after 200 steps of dt = 0.01 here.
    """
    nu, dt, num_steps = 0.05, 0.01, 200
    config, equation = kolmogorov(numpy64, grid_size=16, viscosity=nu, drag=drag, forcing_wavenumber=0, dt=dt)
    x, y = equation.grid.x[np.newaxis, :], equation.grid.y[:, np.newaxis]
    omega0 = 2.0 * np.cos(x) * np.cos(y)
    assert np.abs(physical(equation, equation.advection_hat(equation.to_state(omega0[None])))).max() < 1e-13

    stepper = CrankNicolsonRK4(equation, dt)
    omega = physical(equation, run(stepper, equation.to_state(omega0[None]), num_steps))[0]

    rate = -(2.0 * nu + drag)  # -(nu |k|^2 + alpha) with |k|^2 = 2
    exact = omega0 * math.exp(rate * dt * num_steps)
    mus = [0.5 * dt * (stepper.alphas[k + 1] - stepper.alphas[k]) for k in range(5)]
    factor = np.prod([(1 + mu * rate) / (1 - mu * rate) for mu in mus])
    discrete = omega0 * factor**num_steps
    assert helpers.relative_max_error(omega, discrete) < 1e-12
    assert helpers.relative_max_error(omega, exact) < 1e-7


def test_laminar_kolmogorov_flow_from_rest(numpy64, helpers):
    """From rest the forced flow stays a single shear mode: omega = -k_f A cos(k_f y) (1 - e^{-lambda t})/lambda,
    lambda = nu k_f^2 + alpha. Checks the forcing's sign, amplitude and sampling."""
    nu, drag, kf, dt, num_steps = 0.05, 0.1, 4, 0.01, 300
    config, equation = kolmogorov(numpy64, grid_size=16, viscosity=nu, drag=drag, forcing_wavenumber=kf, dt=dt)
    n = config.grid_size
    omega = physical(equation, run(CrankNicolsonRK4(equation, dt), equation.to_state(np.zeros((1, n, n))), num_steps))[0]
    y = equation.grid.y[:, np.newaxis] * np.ones((1, n))
    decay = nu * kf**2 + drag
    exact = -kf * config.forcing_amplitude * np.cos(kf * y) * (1 - math.exp(-decay * dt * num_steps)) / decay
    assert helpers.relative_max_error(omega, exact) < 1e-6


def test_energy_budget_matches_injection_minus_dissipation(numpy64):
    """dE/dt (central difference over two small CN-RK4 steps) = <u . f> - 2 nu Z - 2 alpha E, with the
    injection <u . f> computed in physical space from f = (A sin(k_f y), 0), independently of emu's curl."""
    config, equation = kolmogorov(numpy64, grid_size=32, viscosity=0.01, drag=0.1, dt=1e-4, max_velocity=2.0)
    stepper = CrankNicolsonRK4(equation, config.dt)
    s0 = stepper.init(equation.to_state(equation.initial_condition(2, seed=11)))
    s1 = stepper.step(s0)
    s2 = stepper.step(s1)
    energy_rate = (equation.energy(s2.state_hat) - equation.energy(s0.state_hat)) / (2 * config.dt)
    u_hat, _ = equation.velocity_hat(s1.state_hat)
    u = numpy64.to_numpy(equation.grid.to_physical(u_hat))
    y = equation.grid.y[np.newaxis, :, np.newaxis]
    injection = np.mean(u * config.forcing_amplitude * np.sin(config.forcing_wavenumber * y), axis=(-2, -1))
    dissipation = 2 * config.viscosity * equation.enstrophy(s1.state_hat) + 2 * config.drag * equation.energy(s1.state_hat)
    assert np.all(np.abs(injection) > 0.01)  # the forcing does work on this field
    assert np.all(np.abs(energy_rate - (injection - dissipation)) < 1e-7 * dissipation)


# -- conservation ----------------------------------------------------------------------------------
def inviscid(backend, grid_size=32, max_velocity=2.0, dt=0.02):
    return kolmogorov(backend, grid_size=grid_size, viscosity=0.0, drag=0.0, forcing_wavenumber=0,
                      peak_wavenumber=3.0, max_velocity=max_velocity, dt=dt)


def test_dealiased_advection_conserves_energy_and_enstrophy_exactly(numpy64):
    """Galerkin property of the 2/3 rule: sum_k conj(psi_hat) N_hat = sum_k conj(omega_hat) N_hat = 0
    (energy and enstrophy tendencies of the advection) to round-off, for a field inside the 2/3 band."""
    config, equation = inviscid(numpy64)
    omega_hat = equation.to_state(equation.initial_condition(3, seed=7))
    tendency = equation.explicit_terms(omega_hat)  # forcing is off: the advection alone
    weights = rfft_weights(config.grid_size)
    psi_hat = omega_hat * equation.grid.inverse_wavenumber_squared
    for field_hat in (psi_hat, omega_hat):
        production = np.sum(weights * np.real(np.conj(field_hat) * tendency), axis=(-2, -1))
        scale = np.sum(weights * np.abs(field_hat) * np.abs(tendency), axis=(-2, -1))
        assert np.all(scale > 0)
        assert np.all(np.abs(production) < 1e-12 * scale)


def energy_and_enstrophy_drift(equation, omega_hat, dt, num_steps):
    stepper = CrankNicolsonRK4(equation, dt)
    final = run(stepper, omega_hat, num_steps)
    energy = np.abs(equation.energy(final) / equation.energy(omega_hat) - 1).max()
    enstrophy = np.abs(equation.enstrophy(final) / equation.enstrophy(omega_hat) - 1).max()
    return energy, enstrophy


def test_inviscid_run_conserves_energy_and_enstrophy_to_rk4_accuracy(numpy64):
    """500 CN-RK4 steps (10 time units, CFL 0.24) of unforced, inviscid flow: RK4 is not exactly
    conservative, so the invariants drift by O(dt^4); measured 1.1e-6 (E) and 5.3e-6 (Z), and half the
    step lowers the drift by 2^4.8."""
    config, equation = inviscid(numpy64)
    omega_hat = equation.to_state(equation.initial_condition(2, seed=7))
    assert equation.cfl(omega_hat) < 0.25
    energy, enstrophy = energy_and_enstrophy_drift(equation, omega_hat, config.dt, 500)
    assert energy < 1e-5 and enstrophy < 5e-5
    energy_half, enstrophy_half = energy_and_enstrophy_drift(equation, omega_hat, config.dt / 2, 1000)
    assert math.log2(energy / energy_half) > 3.5
    assert math.log2(enstrophy / enstrophy_half) > 3.5


# -- the nonlinear term ----------------------------------------------------------------------------
@pytest.mark.parametrize("domain_extent", [2 * math.pi, 3.0])
def test_advection_matches_manufactured_solution(numpy64, helpers, domain_extent):
    """advection_hat of omega = sum_j a_j cos(k_j . x + phi_j) against -(u . grad omega) written out by hand:
    psi = sum a_j cos(.)/|k_j|^2, u = dpsi/dy, v = -dpsi/dx. All modes have |index| <= 5 so the product
    (|index| <= 10) lies inside the 2/3 band of the 32^2 grid and is exact."""
    config, equation = kolmogorov(numpy64, grid_size=32, domain_extent=domain_extent, forcing_wavenumber=0)
    modes = [(1.0, 1, 2, 0.3), (0.7, 3, -1, 1.1), (-0.5, 2, 0, 0.0), (0.4, 0, 4, -0.4), (0.25, -5, 3, 2.0)]
    fundamental = 2 * math.pi / domain_extent
    x, y = equation.grid.x[np.newaxis, :], equation.grid.y[:, np.newaxis]
    omega = omega_x = omega_y = u = v = 0.0
    for amplitude, index_x, index_y, phase in modes:
        kx, ky = fundamental * index_x, fundamental * index_y
        k2 = kx**2 + ky**2
        theta = kx * x + ky * y + phase
        omega = omega + amplitude * np.cos(theta)
        omega_x = omega_x - amplitude * kx * np.sin(theta)
        omega_y = omega_y - amplitude * ky * np.sin(theta)
        u = u - amplitude * ky / k2 * np.sin(theta)
        v = v + amplitude * kx / k2 * np.sin(theta)
    exact = -(u * omega_x + v * omega_y)
    advection = physical(equation, equation.advection_hat(equation.to_state(omega[None])))[0]
    assert helpers.relative_max_error(advection, exact) < 1e-12
    # velocity_hat agrees with the hand-written velocity, too
    u_hat, v_hat = equation.velocity_hat(equation.to_state(omega[None]))
    assert helpers.relative_max_error(physical(equation, u_hat)[0], u) < 1e-12
    assert helpers.relative_max_error(physical(equation, v_hat)[0], v) < 1e-12


# -- convergence order -----------------------------------------------------------------------------
def observed_orders(equation, omega_hat, final_time, coarse_steps=(10, 20, 40), reference_steps=400):
    """Errors of CN-RK4 at dt = T/10, T/20, T/40 against classical RK4 at T/400 (max norm of the vorticity
    relative to its maximum), and log2 of their ratios."""
    reference = run(RungeKutta4(equation, final_time / reference_steps), omega_hat, reference_steps)
    errors = [relative_max_error_spectral(equation, run(CrankNicolsonRK4(equation, final_time / m), omega_hat, m), reference)
              for m in coarse_steps]
    return np.array(errors), np.log2(np.array(errors[:-1]) / np.array(errors[1:]))


def relative_max_error_spectral(equation, state_hat, reference_hat):
    a, b = physical(equation, state_hat), physical(equation, reference_hat)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_cn_rk4_is_fourth_order_without_linear_terms(numpy64):
    """nu = alpha = 0, forcing on, a smooth low-mode field at 32^2, T = 0.5 (CFL 0.49 at the coarsest dt):
    L = 0 leaves the Carpenter-Kennedy RK4, order 4 (measured 4.013, 4.003; errors 1.6e-4, 1.0e-5, 6.2e-7).
    At T = 1 (CFL 0.98) the first ratio is still pre-asymptotic (3.74)."""
    config, equation = kolmogorov(numpy64, grid_size=32, viscosity=0.0, drag=0.0, forcing_wavenumber=4,
                                  peak_wavenumber=2.0, max_velocity=2.0)
    omega_hat = equation.to_state(equation.initial_condition(1, seed=3))
    errors, orders = observed_orders(equation, omega_hat, 0.5)
    assert errors[-1] > 1e-7  # well above the reference's own error (< 1e-10)
    assert np.all(np.abs(orders - 4.0) < 0.3), orders


def test_cn_rk4_is_second_order_with_stiff_linear_terms(numpy64):
    """nu = alpha = 0.1: the Crank-Nicolson sub-steps on L = -nu |k|^2 - alpha are second order and
    dominate the error (measured 1.984, 1.996; errors 3.0e-5, 7.7e-6, 1.9e-6)."""
    config, equation = kolmogorov(numpy64, grid_size=32, viscosity=0.1, drag=0.1, forcing_wavenumber=4,
                                  peak_wavenumber=2.0, max_velocity=2.0)
    omega_hat = equation.to_state(equation.initial_condition(1, seed=3))
    errors, orders = observed_orders(equation, omega_hat, 0.5)
    assert np.all(np.abs(orders - 2.0) < 0.3), orders


# -- configuration and the run loop ----------------------------------------------------------------
def test_default_dt_follows_cfl_safety():
    config = make_config("kolmogorov", "re1000", grid_size=64)
    assert config.dt == pytest.approx(0.5 * (2 * math.pi / 64) / 7.0, rel=1e-15)
    assert make_config("kolmogorov", "re10000").viscosity == 1e-4


@pytest.mark.parametrize("overrides", [{"forcing_wavenumber": 11, "grid_size": 32}, {"viscosity": -1.0},
                                       {"grid_size": 48}, {"dt": 0.0}])
def test_invalid_config_is_rejected(overrides):
    with pytest.raises(ConfigError):
        make_config("kolmogorov", "re1000", **overrides)


def test_integrate_stops_on_cfl_blow_up(numpy64):
    """A step far above the stability limit: integrate raises BlowUpError (CFL or non-finite) early."""
    config, equation = kolmogorov(numpy64, grid_size=16, dt=2.0, max_cfl=1.0)
    stepper = make_stepper(equation, config.dt)
    state = stepper.init(equation.to_state(equation.initial_condition(1, seed=0)))
    with pytest.raises(BlowUpError) as error:
        integrate(stepper, state, num_steps=50, save_every=1)
    assert error.value.step == 1 and error.value.reason in ("cfl", "non-finite")
