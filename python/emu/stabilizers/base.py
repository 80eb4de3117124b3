"""What every stabiliser gives the rollout engine, and what the engine gives it.

A stabiliser corrects an emulator's state after each step so a long rollout stays on the attractor
(the Thermalizer, SNS, Cohesion's refinement). The rollout engine (`emu.training.emulator.rollout`)
knows none of them by name; it calls

    state, record = stabilizer.correct(state, history)

after every emulator step, where `history` (`RolloutHistory`) holds what a method may condition on
(the trajectory's initial state, used as SNS's anchor; the corrected state before this step, SNS's
x_{t-1}; the step number), and `record` maps names to per-sample tensors of this step (predicted
levels, denoising steps, flags). `StepRecords` stacks them into (trajectories, steps + 1) arrays
with the fill values the stabiliser declares in `record_fields` (entry 0 is the initial state,
which nothing corrected). `attributes` (JSON-able) is written into every rollout file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class RolloutHistory:
    """What the engine passes to `correct` at emulator step `step` (1-based), all (batch, C, y, x)."""

    initial: torch.Tensor
    previous: torch.Tensor
    step: int


@runtime_checkable
class Stabilizer(Protocol):
    name: str
    attributes: dict
    record_fields: dict  # name -> (fill value, numpy dtype) of the per-step record

    def correct(self, state: torch.Tensor, history: RolloutHistory) -> tuple[torch.Tensor, dict]:
        ...


class StepRecords:
    """Collects the per-step records of a stabiliser into (trajectories, steps + 1) numpy arrays."""

    def __init__(self, record_fields: dict):
        self.fields = dict(record_fields)
        self.values: dict[str, list] = {name: [] for name in self.fields}

    def add(self, record: dict) -> None:
        for name in self.fields:
            self.values[name].append(record[name].detach().cpu())

    def arrays(self, trajectories: int, steps: int) -> dict[str, np.ndarray]:
        out = {}
        for name, (fill, dtype) in self.fields.items():
            array = np.full((trajectories, steps + 1), fill, dtype=dtype)
            if self.values[name]:
                stacked = torch.stack(self.values[name], dim=1).numpy()
                array[:, 1:stacked.shape[1] + 1] = stacked
            out[name] = array
        return out
