"""Time steppers and the integration loop (physics layer: no torch.nn, no files)."""

from emu.solvers.integrate import BlowUpError, check_state, integrate
from emu.solvers.time_stepping import (
    STEPPERS,
    AdamsBashforth3,
    CrankNicolsonRK4,
    RungeKutta4,
    StepperState,
    make_stepper,
)

__all__ = ["STEPPERS", "AdamsBashforth3", "BlowUpError", "CrankNicolsonRK4", "RungeKutta4", "StepperState",
           "check_state", "integrate", "make_stepper"]
