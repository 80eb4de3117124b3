"""The integration loop: step, watch for blow-up, hand snapshots to a callback."""

from __future__ import annotations

import math
from typing import Callable

from emu.solvers.time_stepping import StepperState


class BlowUpError(RuntimeError):
    """The solution became non-finite or the Courant number passed the config's `max_cfl`.

    Attributes:
        step: the step count (since the run started) at which it was detected.
        reason: "non-finite" or "cfl".
        cfl: the Courant number at detection (nan when non-finite).
    """

    def __init__(self, message: str, step: int, reason: str, cfl: float):
        super().__init__(message)
        self.step = step
        self.reason = reason
        self.cfl = cfl


def check_state(equation, state_hat, step: int) -> float:
    """Returns the Courant number, or raises `BlowUpError` for NaN/inf or CFL > config.max_cfl."""
    backend = equation.backend
    if not backend.all_finite(state_hat):
        raise BlowUpError(f"blow-up at step {step}: the state holds NaN or inf", step, "non-finite", math.nan)
    cfl = equation.cfl(state_hat)
    if not math.isfinite(cfl) or cfl > equation.config.max_cfl:
        raise BlowUpError(
            f"blow-up at step {step}: CFL number {cfl:.3g} exceeds max_cfl = {equation.config.max_cfl} "
            f"(dt = {equation.config.dt:g}); lower dt or raise max_cfl", step, "cfl", cfl)
    return cfl


def integrate(
    stepper,
    state: StepperState,
    num_steps: int,
    save_every: int,
    on_save: Callable[[StepperState, int], None] | None = None,
    check_every: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> StepperState:
    """Advances `state` by `num_steps` steps of `stepper`.

    Every `save_every` steps, the state is checked (`check_state`) and `on_save(state, steps_done)` is
    called; in between, the state is checked every `check_every` steps (default: min(save_every, 100)),
    so a blow-up is caught within that many steps. `progress(n)` reports n more steps done.

    Raises:
        BlowUpError: from `check_state`; the caller still holds everything saved before.
    """
    if num_steps < 0 or save_every < 1:
        raise ValueError(f"num_steps must be >= 0 and save_every >= 1, got {num_steps}, {save_every}")
    check_every = check_every or min(save_every, 100)
    equation = stepper.equation
    # A stepper with `advance(state, n)` (the julia backend's) takes the steps up to the next check at once.
    advance = getattr(stepper, "advance", None)
    done = 0
    since_progress = 0
    while done < num_steps:
        if advance is None:
            state = stepper.step(state)
            chunk = 1
        else:
            chunk = min(num_steps - done, check_every - done % check_every, save_every - done % save_every)
            state = advance(state, chunk)
        done += chunk
        since_progress += chunk
        if done % save_every == 0 or done % check_every == 0:
            check_state(equation, state.state_hat, done)
            if progress is not None:
                progress(since_progress)
                since_progress = 0
            if done % save_every == 0 and on_save is not None:
                on_save(state, done)
    if progress is not None and since_progress:
        progress(since_progress)
    return state
