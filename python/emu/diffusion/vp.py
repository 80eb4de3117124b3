"""The variance-preserving SDE in continuous time t in [0, 1], with the cosine schedule of SDA.

Forward (noising) process, Song et al. (2021) VP SDE written through its perturbation kernel:

    x_t = mu(t) x_0 + sigma(t) eps,        eps ~ N(0, I),       mu(t)^2 + sigma(t)^2 = 1,
    alpha(t) = cos(a t)^2,   a = acos(sqrt(eta)),
    mu(t)    = sqrt(alpha(t))     = cos(a t),
    sigma(t) = sqrt(1 - alpha(t)) = sin(a t),

so mu(0) = 1, sigma(0) = 0 (clean data) and mu(1)^2 = eta (default 1e-3: x_1 is N(0, I) up to a
signal of relative variance eta). Since a t lies in [0, pi/2), mu and sigma are evaluated as the
cosine and sine of a t directly, never as sqrt(1 - alpha): sigma keeps full relative precision near
t = 0, where 1 - alpha(t) would cancel.

Relation to the network. A noise-prediction network eps_hat(x_t, t) ~ E[eps | x_t] gives

    score        grad log p_t(x_t) = -eps_hat / sigma(t),
    Tweedie      E[x_0 | x_t]      = (x_t - sigma(t) eps_hat) / mu(t),

which the sampler (emu.diffusion.sampler) and the likelihood guidance (emu.diffusion.guidance) use.

This is the schedule of Rozet & Louppe's SDA code (alpha = cos(acos(sqrt(eta)) t)^2) with one
difference in convention: SDA takes mu = alpha and sigma^2 = 1 - alpha^2 + eta^2, here mu = sqrt(alpha)
and sigma^2 = 1 - alpha (methods.md, "Cohesion"), so sigma(0) = 0 exactly and mu^2 + sigma^2 = 1.

Times are per sample: `add_noise(x, t, noise)` takes t of shape (batch,) (or a scalar for all) and
broadcasts it over the other axes. The coefficients are computed in float64 and cast to the sample's
dtype.

References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), "Score-based generative modeling
    through stochastic differential equations" (VP SDE, perturbation kernel, eq. 29).
    Nichol & Dhariwal (2021), "Improved denoising diffusion probabilistic models" (cosine schedule).
    Rozet & Louppe (2023), "Score-based data assimilation" (SDA; this cosine alpha(t) and eta).
    methods.md, "Cohesion".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

TimeLike = float | torch.Tensor


@dataclass(frozen=True)
class VPSchedule:
    """The continuous VP schedule alpha(t) = cos(acos(sqrt(eta)) t)^2 on t in [0, 1].

    Args:
        eta: alpha(1) = mu(1)^2, in (0, 1). The signal variance left at t = 1; SDA uses 1e-3.

    Methods `alpha(t)`, `mu(t)`, `sigma(t)` take a python float (returning a 0-d float64 tensor)
    or a floating tensor of any shape (returning the same shape and dtype); `add_noise`, `tweedie`
    and `score` work per sample. Two schedules are equal when their eta are equal; `config` is a
    JSON-able dict and `VPSchedule.from_config(schedule.config)` rebuilds the schedule.
    """

    eta: float = 1e-3

    def __post_init__(self) -> None:
        if not (isinstance(self.eta, (int, float)) and not isinstance(self.eta, bool) and 0 < self.eta < 1):
            raise ValueError(f"eta must be a number in the open interval (0, 1), got {self.eta!r}")

    @property
    def rate(self) -> float:
        """a = acos(sqrt(eta)), so that mu(t) = cos(a t) and sigma(t) = sin(a t)."""
        return math.acos(math.sqrt(self.eta))

    # -- the schedule ------------------------------------------------------------------------------
    def alpha(self, t: TimeLike) -> torch.Tensor:
        """alpha(t) = cos(a t)^2 = mu(t)^2."""
        return self._apply(t, lambda angle: torch.cos(angle) ** 2)

    def mu(self, t: TimeLike) -> torch.Tensor:
        """mu(t) = sqrt(alpha(t)) = cos(a t): the signal scale of p(x_t | x_0)."""
        return self._apply(t, torch.cos)

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """sigma(t) = sqrt(1 - alpha(t)) = sin(a t): the noise scale of p(x_t | x_0), 0 at t = 0."""
        return self._apply(t, torch.sin)

    def _apply(self, t: TimeLike, function) -> torch.Tensor:
        times = _as_times(t)
        return function(times.double() * self.rate).to(times.dtype)

    # -- per-sample operations ---------------------------------------------------------------------
    def coefficients(self, t: TimeLike, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu(t), sigma(t)) per sample, shaped (batch, 1, ..., 1) in like's dtype and device.

        Args:
            t: a scalar (every sample) or a tensor of shape (batch,) with batch = like.shape[0];
                values in [0, 1].
            like: a (batch, ...) floating tensor.
        """
        if not isinstance(like, torch.Tensor) or not like.dtype.is_floating_point or like.ndim < 1:
            raise ValueError(f"expected a floating-point tensor of shape (batch, ...), got "
                             f"{tuple(like.shape) if isinstance(like, torch.Tensor) else type(like).__name__}")
        times = per_sample_times(t, like)
        angle = times.to(torch.float64) * self.rate
        shape = (like.shape[0],) + (1,) * (like.ndim - 1)
        return (torch.cos(angle).reshape(shape).to(like.dtype), torch.sin(angle).reshape(shape).to(like.dtype))

    def add_noise(self, x: torch.Tensor, t: TimeLike, noise: torch.Tensor) -> torch.Tensor:
        """x_t = mu(t) x + sigma(t) noise, a sample of p(x_t | x_0 = x), per sample.

        Args:
            x: (batch, ...) clean samples. t: (batch,) times in [0, 1], or a scalar for all.
            noise: standard normal noise of x's shape (drawn by the caller, the regression target).
        """
        if not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of x, {tuple(x.shape)}, got "
                             f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
        mu, sigma = self.coefficients(t, x)
        return mu * x + sigma * noise.to(x.dtype)

    def tweedie(self, x: torch.Tensor, t: TimeLike, eps_hat: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] ~ (x_t - sigma(t) eps_hat) / mu(t), per sample (exact for eps_hat = E[eps | x_t])."""
        mu, sigma = self.coefficients(t, x)
        return (x - sigma * eps_hat.to(x.dtype)) / mu

    def score(self, x: torch.Tensor, t: TimeLike, eps_hat: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x_t) ~ -eps_hat / sigma(t), per sample (infinite at t = 0)."""
        _, sigma = self.coefficients(t, x)
        return -eps_hat.to(x.dtype) / sigma

    # -- config ------------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """JSON-able parameters with the schedule's kind: {"schedule": "vp_cosine", "eta": ...}."""
        return {"schedule": "vp_cosine", "eta": self.eta}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VPSchedule:
        """Rebuilds a schedule from `config` (e.g. read from a checkpoint); unknown keys are an error."""
        values = dict(config)
        kind = values.pop("schedule", "vp_cosine")
        if kind != "vp_cosine":
            raise ValueError(f"schedule must be 'vp_cosine' for VPSchedule, got {kind!r}")
        unknown = sorted(set(values) - {"eta"})
        if unknown:
            raise ValueError(f"unknown schedule parameter(s) {unknown}; allowed: ['eta']")
        return cls(**values)


def _as_times(t: TimeLike) -> torch.Tensor:
    """t as a floating tensor (a python number becomes a 0-d float64 tensor), checked to lie in [0, 1]."""
    if isinstance(t, torch.Tensor):
        if not t.dtype.is_floating_point:
            raise ValueError(f"t must be a floating-point tensor, got dtype {t.dtype}")
        times = t
    elif isinstance(t, (int, float)) and not isinstance(t, bool):
        times = torch.tensor(float(t), dtype=torch.float64)
    else:
        raise ValueError(f"t must be a number or a floating-point tensor, got {type(t).__name__}")
    if times.numel() > 0:
        # One host sync per call; a time outside [0, 1] would silently give a wrong (periodic) schedule.
        smallest, largest = (float(v) for v in torch.aminmax(times.detach()))
        if not (0.0 <= smallest and largest <= 1.0):
            raise ValueError(f"t must lie in [0, 1], got values from {smallest} to {largest}")
    return times


def per_sample_times(t: TimeLike, like: torch.Tensor) -> torch.Tensor:
    """t as a tensor of shape (batch,) on like's device, batch = like.shape[0] (a scalar is broadcast)."""
    times = _as_times(t)
    batch = like.shape[0]
    if times.ndim == 0:
        times = times.reshape(1).expand(batch)
    if times.ndim != 1 or times.shape[0] != batch:
        raise ValueError(f"t must be a scalar or have shape ({batch},), one time per sample, got {tuple(times.shape)}")
    return times.to(like.device)
