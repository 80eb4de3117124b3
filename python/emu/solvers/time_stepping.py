"""Time steppers, apart from the equations they step.

An equation offers `explicit_terms(state_hat)` and, for implicit-explicit schemes, a diagonal
`linear_operator` L (an array broadcastable against the state, or None). A stepper turns it into
`step(StepperState) -> StepperState`. `StepperState` carries what a multistep method needs to
continue exactly (previous tendencies, start-up level), so a run saved to a file restarts bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepperState:
    """The spectral state plus the stepper's memory.

    Attributes:
        state_hat: the solver state in spectral space.
        history: named arrays the stepper needs from earlier steps (e.g. AB3's previous tendencies).
        level: number of steps taken since the stepper started (multistep start-up uses it).
    """

    state_hat: Any
    history: dict = field(default_factory=dict)
    level: int = 0


class CrankNicolsonRK4:
    """jax-cfd's `crank_nicolson_rk4`: low-storage IMEX Runge-Kutta, Carpenter-Kennedy coefficients.

    For du/dt = N(u) + L u, five stages k = 0..4 (Canuto et al. 2007, Spectral Methods, App. D.3):
        h   <- N(u) + beta_k h
        mu  =  dt (alpha_{k+1} - alpha_k) / 2
        u   <- (u + gamma_k dt h + mu L u) / (1 - mu L)       (Crank-Nicolson on L)
    Fourth order for N alone (L = 0), second order in L. Five evaluations of N per step.
    """

    name = "cn_rk4"
    alphas = (0.0, 0.1496590219993, 0.3704009573644, 0.6222557631345, 0.9582821306748, 1.0)
    betas = (0.0, -0.4178904745, -1.192151694643, -1.697784692471, -1.514183444257)
    gammas = (0.1496590219993, 0.3792103129999, 0.8229550293869, 0.6994504559488, 0.1530572479681)

    def __init__(self, equation, dt: float):
        self.equation = equation
        self.dt = float(dt)
        linear = equation.linear_operator
        # Per stage, u_new = a_k u + b_k h with a_k = (1 + mu L)/(1 - mu L), b_k = gamma dt/(1 - mu L):
        # the same update as above with the divisions done once, up front.
        self._coefficients = []
        for k in range(len(self.betas)):
            mu = 0.5 * self.dt * (self.alphas[k + 1] - self.alphas[k])
            gamma_dt = self.gammas[k] * self.dt
            if linear is None:
                self._coefficients.append((None, gamma_dt))
            else:
                self._coefficients.append(((1 + mu * linear) / (1 - mu * linear), gamma_dt / (1 - mu * linear)))

    def init(self, state_hat) -> StepperState:
        return StepperState(state_hat)

    def step(self, state: StepperState) -> StepperState:
        u = state.state_hat
        h = None
        for k, (decay, gain) in enumerate(self._coefficients):
            tendency = self.equation.explicit_terms(u)
            h = tendency if h is None else tendency + self.betas[k] * h
            u = u + gain * h if decay is None else decay * u + gain * h
        return StepperState(u, {}, state.level + 1)


class AdamsBashforth3:
    """pyqg's third-order Adams-Bashforth with forward-Euler and AB2 start-up, then a spectral filter.

        q <- filter * (q + dt (23/12 f_n - 16/12 f_{n-1} + 5/12 f_{n-2}))
    The first step is forward Euler, the second AB2 (3/2, -1/2), as pyqg's `_forward_timestep`.
    With that start-up the global error is second order from the first step; the AB3 steps themselves
    are third order (restart from a file keeps the history, so a continued run stays third order).
    """

    name = "ab3"
    history_names = ("tendency_1", "tendency_2")
    # (c0, c1, c2) of f_n, f_{n-1}, f_{n-2} at levels 0, 1, >= 2, as `step` spells them out (the fused
    # twin in emu.solvers.fused reads them from here).
    startup_coefficients = ((1.0,), (1.5, -0.5), (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0))

    def __init__(self, equation, dt: float):
        if equation.linear_operator is not None:
            raise ValueError("AdamsBashforth3 is explicit: the equation must have linear_operator=None")
        self.equation = equation
        self.dt = float(dt)
        self.step_filter = getattr(equation, "step_filter", None)

    def init(self, state_hat) -> StepperState:
        return StepperState(state_hat)

    def step(self, state: StepperState) -> StepperState:
        dt = self.dt
        q = state.state_hat
        f0 = self.equation.explicit_terms(q)
        if state.level == 0:
            q_new = q + dt * f0
        elif state.level == 1:
            q_new = q + dt * (1.5 * f0 - 0.5 * state.history["tendency_1"])
        else:
            q_new = q + dt * ((23.0 / 12.0) * f0 - (16.0 / 12.0) * state.history["tendency_1"]
                              + (5.0 / 12.0) * state.history["tendency_2"])
        if self.step_filter is not None:
            q_new = self.step_filter * q_new
        history = {"tendency_1": f0}
        if "tendency_1" in state.history:
            history["tendency_2"] = state.history["tendency_1"]
        return StepperState(q_new, history, state.level + 1)


class RungeKutta4:
    """The classical explicit RK4 on N(u) + L u; a reference integrator for tests and checks."""

    name = "rk4"

    def __init__(self, equation, dt: float):
        self.equation = equation
        self.dt = float(dt)

    def _rate(self, u):
        rate = self.equation.explicit_terms(u)
        if self.equation.linear_operator is not None:
            rate = rate + self.equation.linear_operator * u
        return rate

    def init(self, state_hat) -> StepperState:
        return StepperState(state_hat)

    def step(self, state: StepperState) -> StepperState:
        dt, u = self.dt, state.state_hat
        k1 = self._rate(u)
        k2 = self._rate(u + 0.5 * dt * k1)
        k3 = self._rate(u + 0.5 * dt * k2)
        k4 = self._rate(u + dt * k3)
        return StepperState(u + (dt / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4), {}, state.level + 1)


STEPPERS = {stepper.name: stepper for stepper in (CrankNicolsonRK4, AdamsBashforth3, RungeKutta4)}


def make_stepper(equation, dt: float, name: str | None = None):
    """The equation's default stepper (or `name`: 'cn_rk4', 'ab3', 'rk4') with step size dt."""
    if isinstance(getattr(getattr(equation, "backend", None), "solver_device", None), str):  # julia: steps in Julia
        from emu.julia import JuliaStepper

        return JuliaStepper(equation, dt, name)
    name = name or equation.default_stepper
    if name not in STEPPERS:
        raise ValueError(f"stepper must be one of {tuple(STEPPERS)}, got {name!r}")
    # Fused kernels (`equation.fused`, the cupy backend) may bring a fused twin of this stepper: same
    # scheme, coefficients and StepperState (emu.solvers.fused).
    fused = getattr(equation, "fused", None)
    return getattr(fused, "steppers", {}).get(name, STEPPERS[name])(equation, dt)
