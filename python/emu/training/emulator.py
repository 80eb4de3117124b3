"""Autoregressive emulators: residual steps, the unrolled multistep loss, batched rollouts.

The emulator advances normalised states by a learned residual (Pedersen, Zanna & Bruna 2025,
"Thermalizer", eq. 14 and Sec. 4):

    x_{t+1} = x_t + Phi(x_t + tau n_t),    n_t ~ N(0, I)

trained with the loss unrolled over L steps and backpropagated through the unroll,

    loss = sum_{a=0}^{L-1} MSE(Phi(x^_a + tau n_a), x_{a+1} - x_a),   x^_0 = x_0,  x^_{a+1} = x^_a + Phi(...)

(the target is the true increment; the input is the model's own unrolled state). tau = 1e-5 (DRN)
or 1e-4 (UNet) in the reference; the same noise level is used at rollout.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualEmulator(nn.Module):
    """x -> x + network(x + noise * n): one emulator step on normalised fields (batch, C, y, x).

    Args:
        network: maps (batch, C, y, x) to the increment, same shape.
        noise: standard deviation tau of the Gaussian noise added to the input (training and rollout).
    """

    def __init__(self, network: nn.Module, noise: float = 0.0):
        super().__init__()
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.network = network
        self.noise = float(noise)

    def increment(self, state: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.noise > 0:
            perturbation = torch.randn(state.shape, generator=generator, device=state.device, dtype=state.dtype)
            state = state + self.noise * perturbation
        return self.network(state)

    def forward(self, state: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return state + self.increment(state, generator)


def unrolled_loss(emulator: ResidualEmulator, window: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[float]]:
    """The multistep loss of one batch of windows (batch, L + 1, C, y, x); returns (loss, per-step MSEs).

    Gradients flow through the whole unroll (no detach between steps).
    """
    if window.ndim != 5 or window.shape[1] < 2:
        raise ValueError(f"window must be (batch, unroll + 1, channel, y, x) with unroll >= 1, got {tuple(window.shape)}")
    state = window[:, 0]
    total = window.new_zeros(())
    per_step = []
    for step in range(window.shape[1] - 1):
        increment = emulator.increment(state, generator)
        target = window[:, step + 1] - window[:, step]
        step_loss = torch.mean((increment - target) ** 2)
        total = total + step_loss
        per_step.append(float(step_loss.detach()))
        state = state + increment
    return total, per_step


@torch.no_grad()
def rollout(emulator: ResidualEmulator, initial: torch.Tensor, steps: int,
            generator: torch.Generator | None = None, on_step=None, stabilizer=None, on_record=None) -> torch.Tensor | None:
    """Autoregressive rollout from `initial` (batch, C, y, x) for `steps` steps.

    `stabilizer` (an `emu.stabilizers.Stabilizer`), when given, corrects the state after every
    emulator step: `state, record = stabilizer.correct(state, RolloutHistory(initial, previous,
    step))`; `on_record(record)` receives each step's record (per-sample tensors).

    With `on_step(step, state)` the states are streamed to the callback (memory stays flat) and None
    is returned; without it the whole trajectory (batch, steps + 1, C, y, x) is returned.
    """
    from emu.stabilizers.base import RolloutHistory

    state = initial
    frames = None if on_step is not None else [initial]
    if on_step is not None:
        on_step(0, state)
    for step in range(1, steps + 1):
        previous = state
        state = emulator(state, generator)
        if stabilizer is not None:
            state, record = stabilizer.correct(state, RolloutHistory(initial, previous, step))
            if on_record is not None:
                on_record(record)
        if on_step is not None:
            on_step(step, state)
        else:
            frames.append(state)
    return None if frames is None else torch.stack(frames, dim=1)
