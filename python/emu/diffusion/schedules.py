"""Noise schedules: the cosine schedule of Nichol & Dhariwal (2021), computed once in float64.

The forward (noising) process of a DDPM with T levels i = 0 .. T-1 is

    q(x_i | x_{i-1}) = N(sqrt(alpha_i) x_{i-1}, beta_i I),     alpha_i = 1 - beta_i,
    q(x_i | x_clean) = N(sqrt(alpha_bar_i) x_clean, (1 - alpha_bar_i) I),
    alpha_bar_i = prod_{j <= i} alpha_j.

The cosine schedule (Improved DDPM, eq. 17) defines alpha_bar through

    f(u) = cos^2( (u + s) / (1 + s) * pi/2 ),      u in [0, 1], offset s = 0.008,
    beta_i = min(1 - f((i + 1)/T) / f(i/T), max_beta),     max_beta = 0.999,

so that, wherever the clip is inactive, alpha_bar_i = f((i + 1)/T) / f(0) exactly (the product
telescopes). This is the convention of diffusers' "squaredcos_cap_v2" and of the Thermalizer code:
level 0 already carries a little noise (beta_0 ~ 4e-5) and level T-1 is pure noise for all practical
purposes (alpha_bar_{T-1} ~ 2e-9 for T = 1000; its beta is the clipped 0.999). The clip keeps the
last steps from dividing by ~0; it is active only at the very end of the schedule (for T = 1000, the
last level alone).

Every table (betas, alphas, alpha_bars, the posterior coefficients) is computed in float64 on the
CPU when the schedule is built, and cast to a sample's dtype only when gathered: the nonlinear parts
(square roots, 1 - alpha_bar near alpha_bar ~ 1) are never evaluated in float32. Copies on other
devices are cached on first use, so a sampling loop does no host-to-device copies after its first
step.

References:
    Ho, Jain & Abbeel (2020), "Denoising diffusion probabilistic models" (DDPM; notation above).
    Nichol & Dhariwal (2021), "Improved denoising diffusion probabilistic models", eq. 17.
    methods.md, "Diffusion core".
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch

# The tables a schedule holds, each of shape (num_levels,), float64. Index i is level i.
TABLES: tuple[str, ...] = (
    "betas",                      # beta_i
    "alphas",                     # alpha_i = 1 - beta_i
    "alpha_bars",                 # alpha_bar_i = prod_{j<=i} alpha_j
    "alpha_bars_previous",        # alpha_bar_{i-1}, with alpha_bar_{-1} = 1 (clean data)
    "sqrt_alpha_bars",            # sqrt(alpha_bar_i): signal scale of q(x_i | x_clean)
    "sqrt_one_minus_alpha_bars",  # sqrt(1 - alpha_bar_i): noise scale of q(x_i | x_clean)
    "reciprocal_sqrt_alphas",     # 1 / sqrt(alpha_i): overall scale of the reverse mean
    "noise_coefficients",         # beta_i / sqrt(1 - alpha_bar_i): weight of eps_hat in the reverse mean
    "posterior_variances",        # beta_i (1 - alpha_bar_{i-1}) / (1 - alpha_bar_i), exactly 0 at i = 0
    "posterior_stds",             # its square root
)


@dataclass(frozen=True)
class CosineSchedule:
    """The cosine noise schedule with `num_levels` levels, as float64 tables.

    Args:
        num_levels: T, the number of noise levels (>= 2). The papers use 1000.
        offset: s in f(u) = cos^2((u + s)/(1 + s) pi/2), > 0. Keeps beta_0 away from 0 so that
            level 0 is not noise-free (Nichol & Dhariwal: 0.008, so that sqrt(beta_0) is a little
            smaller than one 8-bit pixel bin).
        max_beta: the upper clip of beta_i, in (0, 1). 0.999 as in Improved DDPM; without it the
            last beta is 1 and its alpha 0.

    Attributes (float64 CPU tensors of shape (num_levels,); fresh copies, changing them changes
    nothing): `betas`, `alphas`, `alpha_bars`, `alpha_bars_previous`. Every table in `TABLES` is
    available through `table(name, device, dtype)` and, per sample, `gather(name, levels, like)`.

    Two schedules are equal when their three parameters are equal; `config` is a JSON-able dict
    and `CosineSchedule.from_config(schedule.config)` rebuilds the same schedule.
    """

    num_levels: int = 1000
    offset: float = 0.008
    max_beta: float = 0.999
    _tables: dict = field(init=False, repr=False, compare=False)
    _device_cache: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.num_levels, int) and not isinstance(self.num_levels, bool) and self.num_levels >= 2):
            raise ValueError(f"num_levels must be an integer >= 2, got {self.num_levels!r}")
        if not (_is_real(self.offset) and math.isfinite(self.offset) and self.offset > 0):
            raise ValueError(f"offset must be a finite number > 0, got {self.offset!r}")
        if not (_is_real(self.max_beta) and 0 < self.max_beta < 1):
            raise ValueError(f"max_beta must be a number in the open interval (0, 1), got {self.max_beta!r}")
        # Frozen dataclass: the derived tables are set once here, through object.__setattr__.
        object.__setattr__(self, "_tables", _cosine_tables(self.num_levels, float(self.offset), float(self.max_beta)))
        object.__setattr__(self, "_device_cache", {})

    # -- the four primary tables, as copies -----------------------------------------------------
    @property
    def betas(self) -> torch.Tensor:
        return self._tables["betas"].clone()

    @property
    def alphas(self) -> torch.Tensor:
        return self._tables["alphas"].clone()

    @property
    def alpha_bars(self) -> torch.Tensor:
        return self._tables["alpha_bars"].clone()

    @property
    def alpha_bars_previous(self) -> torch.Tensor:
        return self._tables["alpha_bars_previous"].clone()

    # -- config ----------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """JSON-able parameters, with the schedule's kind: {"schedule": "cosine", "num_levels": ...}."""
        return {"schedule": "cosine", "num_levels": self.num_levels, "offset": self.offset, "max_beta": self.max_beta}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CosineSchedule:
        """Rebuilds a schedule from `config` (e.g. read from a checkpoint); unknown keys are an error."""
        values = dict(config)
        kind = values.pop("schedule", "cosine")
        if kind != "cosine":
            raise ValueError(f"schedule must be 'cosine' for CosineSchedule, got {kind!r}")
        allowed = ("num_levels", "offset", "max_beta")
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown schedule parameter(s) {unknown}; allowed: {list(allowed)}")
        return cls(**values)

    # -- tables on a device, per-sample gathers --------------------------------------------------
    def table(self, name: str, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A copy of table `name` (one of `TABLES`), shape (num_levels,), on `device` in `dtype`."""
        return self._cached(name, torch.device(device or "cpu"), dtype).clone()

    def check_levels(self, levels: int | torch.Tensor, batch_size: int | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """`levels` as an int64 tensor of shape (batch_size,) on `device`, after checking its range.

        Args:
            levels: a python int (the same level for every sample, broadcast to `batch_size`), a
                0-d integer tensor (likewise), or an integer tensor of shape (batch_size,).
            batch_size: the number of samples; None takes it from `levels` (1 for an int).
            device: where the result lives; None keeps the tensor's device (CPU for an int).

        Raises:
            ValueError: naming `levels`, when it is not integer, has the wrong shape, or holds a
                level outside [0, num_levels - 1].
        """
        top = self.num_levels - 1
        if not isinstance(levels, torch.Tensor):
            try:
                if isinstance(levels, bool):
                    raise TypeError
                level = operator.index(levels)  # python and numpy integers; not floats or arrays
            except TypeError:
                raise ValueError(f"levels must be an int or an integer tensor of shape (batch,), "
                                 f"got {type(levels).__name__}") from None
            if not 0 <= level <= top:
                raise ValueError(f"levels must lie in [0, {top}] (num_levels = {self.num_levels}), got {level}")
            return torch.full((1 if batch_size is None else batch_size,), level, dtype=torch.int64,
                              device=device or "cpu")
        if levels.dtype.is_floating_point or levels.dtype.is_complex or levels.dtype == torch.bool:
            raise ValueError(f"levels must be an integer tensor, got dtype {levels.dtype}")
        if levels.ndim == 0:
            levels = levels.reshape(1).expand(1 if batch_size is None else batch_size)
        if levels.ndim != 1 or (batch_size is not None and levels.shape[0] != batch_size):
            expected = "(batch,)" if batch_size is None else f"({batch_size},)"
            raise ValueError(f"levels must have shape {expected}, one level per sample, got {tuple(levels.shape)}")
        if levels.numel() > 0:
            # One host sync; without the check a bad level would wrap around (negative) or fail
            # with an opaque device-side assert on CUDA.
            smallest, largest = (int(v) for v in torch.aminmax(levels))
            if smallest < 0 or largest > top:
                raise ValueError(f"levels must lie in [0, {top}] (num_levels = {self.num_levels}), "
                                 f"got values from {smallest} to {largest}")
        return levels.to(device=device or levels.device, dtype=torch.int64)

    def gather(self, name: str, levels: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at each sample's level, shaped (batch, 1, ..., 1) to broadcast against `like`.

        Args:
            name: one of `TABLES`.
            levels: per-sample levels (see `check_levels`); batch = like.shape[0].
            like: a (batch, ...) tensor; the result takes its dtype and device.
        """
        checked = self.check_levels(levels, like.shape[0], like.device)
        return self._gather_checked(name, checked, like)

    def _gather_checked(self, name: str, levels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # For callers that have already run check_levels (one range check per reverse step, not
        # one per table).
        values = self._cached(name, like.device, like.dtype)[levels]
        return values.reshape(levels.shape[0], *([1] * (like.ndim - 1)))

    def _cached(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if name not in self._tables:
            raise ValueError(f"name must be one of {TABLES}, got {name!r}")
        key = (name, str(device), dtype)
        if key not in self._device_cache:
            self._device_cache[key] = self._tables[name].to(device=device, dtype=dtype)
        return self._device_cache[key]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cosine_tables(num_levels: int, offset: float, max_beta: float) -> dict[str, torch.Tensor]:
    """Every table of `TABLES` for the cosine schedule, float64 on the CPU."""
    u = torch.arange(num_levels + 1, dtype=torch.float64) / num_levels
    f = torch.cos((u + offset) / (1 + offset) * (math.pi / 2)) ** 2
    # methods.md: beta = clip(1 - f_{i+1}/f_i, 0, max_beta). f decreases strictly on [0, 1], so the
    # lower clip never acts; the upper one acts at the last level(s), where f -> 0.
    betas = (1 - f[1:] / f[:-1]).clamp(min=0.0, max=max_beta)
    alphas = 1 - betas
    alpha_bars = torch.cumprod(alphas, dim=0)
    alpha_bars_previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    one_minus_alpha_bars = 1 - alpha_bars
    # At level 0, 1 - alpha_bar_{-1} = 1 - 1 is exactly 0, so the posterior variance is exactly 0:
    # the last reverse step adds no noise.
    posterior_variances = betas * (1 - alpha_bars_previous) / one_minus_alpha_bars
    return {
        "betas": betas,
        "alphas": alphas,
        "alpha_bars": alpha_bars,
        "alpha_bars_previous": alpha_bars_previous,
        "sqrt_alpha_bars": alpha_bars.sqrt(),
        "sqrt_one_minus_alpha_bars": one_minus_alpha_bars.sqrt(),
        "reciprocal_sqrt_alphas": alphas.rsqrt(),
        "noise_coefficients": betas / one_minus_alpha_bars.sqrt(),
        "posterior_variances": posterior_variances,
        "posterior_stds": posterior_variances.sqrt(),
    }
