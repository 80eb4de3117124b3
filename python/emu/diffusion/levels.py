"""Noise levels for training level classifiers: which levels a batch sees, and what target it learns.

The Thermalizer's (and SNS's) heads must tell clean states (level ~0) from slightly drifted ones
(levels 5-20, noise std 0.016-0.045 in normalised units). Trained as in the paper (levels uniform
over all T = 1000, a flat 1000-way cross-entropy), a small network on a CPU-sized dataset called
clean solver states levels 8-200: levels <= 20 get 2% of the samples, and a flat cross-entropy gives
no credit for being one level off, so the head learns slowly where it matters. Two options, each a
stated deviation from the paper, fix that:

- `sample_training_levels(..., low_fraction=f, low_max=m)`: a mixture, a fraction f of the batch
  uniform over [0, m) and the rest uniform over all levels. The paper warns only against training on
  low levels *alone*; the uniform part keeps every level seen.
- `gaussian_level_targets(schedule, width)`: the target of level s is a distribution over levels k,
  q(k | s) proportional to exp(-(lambda_k - lambda_s)^2 / (2 width^2)) with lambda = log SNR =
  log(alpha_bar / (1 - alpha_bar)). Neighbouring levels share credit in proportion to how alike
  their noise is: lambda changes by ~0.13 per level near s = 7 but ~0.03 per level near s = 100, so
  a fixed width in log SNR is a few levels wide at the bottom and tens of levels at the top. The
  loss is the cross-entropy against q (`soft_cross_entropy`); width -> 0 gives the paper's one-hot.
"""

from __future__ import annotations

import torch

from emu.diffusion.schedules import CosineSchedule


def log_snr(schedule: CosineSchedule) -> torch.Tensor:
    """lambda_s = log(alpha_bar_s / (1 - alpha_bar_s)) for every level s (float64, decreasing in s)."""
    alpha_bars = schedule.alpha_bars.double()
    return torch.log(alpha_bars) - torch.log1p(-alpha_bars)


def sample_training_levels(batch: int, num_levels: int, *, low_fraction: float = 0.0, low_max: int = 50,
                           generator: torch.Generator | None = None,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """`batch` levels (int64): each is drawn from [0, low_max) with probability `low_fraction`,
    otherwise uniformly from [0, num_levels); low_fraction 0 is the paper's uniform draw."""
    if not 0.0 <= low_fraction <= 1.0:
        raise ValueError(f"low_fraction must be in [0, 1], got {low_fraction!r}")
    if not (isinstance(low_max, int) and 1 <= low_max <= num_levels):
        raise ValueError(f"low_max must be an integer in [1, {num_levels}], got {low_max!r}")
    draw_device = generator.device if generator is not None else (device or "cpu")
    levels = torch.randint(0, num_levels, (batch,), generator=generator, device=draw_device)
    if low_fraction > 0:
        low = torch.randint(0, low_max, (batch,), generator=generator, device=draw_device)
        chosen = torch.rand(batch, generator=generator, device=draw_device) < low_fraction
        levels = torch.where(chosen, low, levels)
    return levels.to(device or "cpu")


def gaussian_level_targets(schedule: CosineSchedule, width: float) -> torch.Tensor:
    """(T, T) float32 matrix whose row s is q(. | s) of the module docstring (rows sum to 1)."""
    if not width > 0:
        raise ValueError(f"width must be > 0 (in log SNR), got {width!r}")
    lam = log_snr(schedule)
    logits = -((lam[None, :] - lam[:, None]) ** 2) / (2.0 * width**2)
    return torch.softmax(logits, dim=1).float()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k targets[b, k] log softmax(logits)[b, k]."""
    return -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()
