"""Likelihood guidance of an unconditional noise prediction by a Gaussian observation (Tweedie/SDA).

Cohesion conditions an unconditional diffusion model on a coarse prior y (the reduced-order
model's trajectory) seen through an observation operator A, with the likelihood approximated at
Tweedie's estimate of the clean state (Rozet & Louppe 2023, eq. 13-14; Cohesion, section 4.1):

    x0_hat(x_t)  = (x_t - sigma(t) eps_hat(x_t, t)) / mu(t)
    log p(y | x_t) ~ -1/2 ||y - A(x0_hat)||^2 / (sigma_y^2 + gamma (sigma(t) / mu(t))^2)   (+ const)
    grad log p(x_t | y) = grad log p(x_t) + strength grad_{x_t} log p(y | x_t)

so, in the noise parametrisation eps = -sigma score,

    eps_guided = eps_hat - strength sigma(t) grad_{x_t} log p(y | x_t).

sigma_y (`observation_noise`) is the observation's noise (one number, or a tensor of A(x)'s shape
without its batch axis, or broadcastable to it, for an observation whose error differs from entry to
entry: a prior whose error grows with lead time), gamma (sigma/mu)^2 a stand-in for the
error of x0_hat, which grows with t (gamma = 1 is the natural scale, Var[x_0 | x_t] ~ (sigma/mu)^2
for unit-variance data at small t; SDA's code defaults to 1e-2). `strength` multiplies the gradient
term (0: the unconditional eps_hat, exactly; the network is evaluated once and nothing else runs).
In observation space the error of A(x0_hat) has covariance ~ (sigma/mu)^2 A A^T, so for f x f average
pooling (A A^T = I/f^2) gamma ~ 1/f^2 is the consistent value: measured with an exact Gaussian score
on a 4x4 field, 2x2 pooling, sigma_y = 0.05, strength 1 (tests/test_vp_sampler.py), the coarse RMS
of A(x) - y is 0.048 (Jacobian-free) / 0.094 (through the network) at gamma = 1/4, against 0.050
for the exact posterior, and 0.35 / 0.41 at gamma = 1 (under-conditioned).

The gradient, by autograd:
    through_network=True   through A, the Tweedie formula and the network (d x0_hat / d x_t =
                           (I - sigma d eps_hat/dx_t) / mu): SDA's `GaussianScore`. One backward
                           pass through the network per evaluation.
    through_network=False  Jacobian-free: eps_hat is treated as a constant, d x0_hat / d x_t ~ I/mu,
                           so grad = A^T (y - A(x0_hat)) / (mu var) (SDA's `detach=True`); no backward
                           pass through the network.

Observation operators are differentiable callables x -> A(x) on (batch, ...) tensors:
`IdentityOperator`, `CoarsenOperator(factor)` (average pooling over the last two, spatial, axes in
factor x factor blocks aligned with the periodic grid's origin) and `MaskOperator(mask)` (partial
priors: A(x) = mask * x, so unobserved entries of y do not matter). Any other differentiable
callable works too.

Ensembles: the prior y may have the batch of one member (B) while x holds M members member-major
(batch M B, as `PredictorCorrectorSampler.sample(..., members=M)` runs them); y is then repeated M
times along axis 0.

    guided = guided_eps_fn(network, schedule, prior, CoarsenOperator(4), strength=1.0,
                           observation_noise=0.1, gamma=1.0)
    samples = sampler.sample(guided, prior_shape, generator, members=8)

References:
    Rozet & Louppe (2023), "Score-based data assimilation", section 3.2 (the Tweedie-based
    Gaussian likelihood with variance sigma_y^2 + gamma (sigma/mu)^2) and code (`GaussianScore`).
    Chung, Kim, Mccann, Klasky & Ye (2023), "Diffusion posterior sampling for general noisy inverse
    problems" (likelihood gradients through Tweedie's estimate).
    Song et al. (2021), "Score-based generative modeling through SDEs" (conditional scores).
    Cohesion: "Generative emulation of chaotic dynamics with coherent prior" (arXiv 2504.14264),
    section 4.1. methods.md, "Cohesion".
"""

from __future__ import annotations

from typing import Callable

import torch

from emu.diffusion.vp import TimeLike, VPSchedule, per_sample_times

EpsFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Operator = Callable[[torch.Tensor], torch.Tensor]


# -- observation operators -----------------------------------------------------------------------------
class IdentityOperator:
    """A(x) = x: the prior observes the full state."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __repr__(self) -> str:
        return "IdentityOperator()"


class CoarsenOperator:
    """A(x) = the mean of x over factor x factor blocks of its last two (spatial) axes.

    The grid is periodic and the blocks are aligned with its origin: coarse cell (I, J) averages the
    fine points (factor I + a, factor J + b), 0 <= a, b < factor. Both spatial sizes must be
    multiples of `factor`. factor = 1 is the identity.
    """

    def __init__(self, factor: int):
        if not (isinstance(factor, int) and not isinstance(factor, bool) and factor >= 1):
            raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2:
            raise ValueError(f"coarsening needs two spatial axes (..., y, x), got shape {tuple(x.shape)}")
        ny, nx = x.shape[-2], x.shape[-1]
        f = self.factor
        if ny % f or nx % f:
            raise ValueError(f"the spatial sizes ({ny}, {nx}) must be multiples of the factor {f}")
        return x.reshape(*x.shape[:-2], ny // f, f, nx // f, f).mean(dim=(-3, -1))

    def __repr__(self) -> str:
        return f"CoarsenOperator({self.factor})"


class MaskOperator:
    """A(x) = mask * x: a partial prior that observes only where mask is 1 (or True).

    `mask` broadcasts against x (e.g. (T, 1, 1, 1) for observed frames of (B, T, C, y, x) sequences,
    or the full (B, T, C, y, x)). Entries of y where mask is 0 do not affect the guidance (their
    gradient is multiplied by 0).
    """

    def __init__(self, mask: torch.Tensor):
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
        self.mask = mask

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"MaskOperator(mask of shape {tuple(self.mask.shape)})"


# -- the guided noise --------------------------------------------------------------------------------
NoiseLike = float | torch.Tensor


def observation_variance(schedule: VPSchedule, t: TimeLike, like: torch.Tensor, observation_noise: NoiseLike = 0.1,
                         gamma: float = 1.0) -> torch.Tensor:
    """sigma_y^2 + gamma (sigma(t)/mu(t))^2: per sample, shaped (batch, 1, ..., 1) like `like`, for a
    scalar sigma_y; broadcast with it (batch, *sigma_y's shape) for a tensor sigma_y."""
    mu, sigma = schedule.coefficients(t, like)
    if isinstance(observation_noise, torch.Tensor):
        mu, sigma = (value.reshape(like.shape[0], *([1] * observation_noise.ndim)) for value in (mu, sigma))
    return _noise_plus_ratio(observation_noise, (sigma / mu) ** 2, gamma)


def guided_noise(eps_fn: EpsFunction, x: torch.Tensor, t: TimeLike, schedule: VPSchedule, prior: torch.Tensor,
                 operator: Operator | None = None, *, strength: float = 1.0, observation_noise: NoiseLike = 0.1,
                 gamma: float = 1.0, through_network: bool = True) -> torch.Tensor:
    """eps_hat(x, t) - strength sigma(t) grad_x log p(y | x), the Tweedie Gaussian likelihood (module docstring).

    Args:
        eps_fn: the unconditional noise prediction eps_fn(x, t), t of shape (batch,).
        x: (batch, ...) samples at time t. t: scalar or (batch,) times in [0, 1].
        schedule: the VPSchedule of eps_fn.
        prior: y, the observation, of A(x)'s shape, or with batch batch/M (repeated M times along
            axis 0 for M member-major ensemble members).
        operator: A, a differentiable callable (default IdentityOperator()).
        strength: the multiplier of the likelihood gradient, >= 0 (0 returns eps_fn(x, t) as is).
        observation_noise: sigma_y > 0 (or >= 0 with gamma > 0): a number, or a tensor broadcastable to
            A(x)'s shape without the batch axis (per observed entry).
        gamma: the weight of (sigma/mu)^2 in the likelihood's variance, >= 0.
        through_network: differentiate through eps_fn (True) or treat d x0_hat/dx as I/mu (False).

    Returns:
        The guided eps, x's shape and dtype, detached from any graph.
    """
    _check_arguments(strength, observation_noise, gamma)
    times = per_sample_times(t, x).to(x.dtype)  # eps_fn always gets t of shape (batch,)
    if strength == 0:
        return eps_fn(x, times)
    if operator is None:
        operator = IdentityOperator()
    mu, sigma = schedule.coefficients(t, x)
    with torch.enable_grad():
        inputs = x.detach().requires_grad_(True)
        if through_network:
            eps = eps_fn(inputs, times)
        else:
            with torch.no_grad():
                eps = eps_fn(x.detach(), times)
        if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"eps_fn must return x's shape, {tuple(x.shape)}, got {got}")
        clean = (inputs - sigma * eps) / mu
        observed = operator(clean)
        target = _match_batch(prior, observed)
        residual = target - observed
        variance = _likelihood_variance(mu, sigma, residual, observation_noise, gamma)
        log_likelihood = -0.5 * (residual.square() / variance).sum()
        (gradient,) = torch.autograd.grad(log_likelihood, inputs)
    return (eps.detach() - strength * sigma * gradient).to(x.dtype)


def guided_eps_fn(eps_fn: EpsFunction, schedule: VPSchedule, prior: torch.Tensor, operator: Operator | None = None,
                  *, strength: float = 1.0, observation_noise: NoiseLike = 0.1, gamma: float = 1.0,
                  through_network: bool = True) -> EpsFunction:
    """`guided_noise` as an eps_fn(x, t) for PredictorCorrectorSampler (the same arguments)."""
    _check_arguments(strength, observation_noise, gamma)  # once, here, rather than at the first step

    def guided(x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        return guided_noise(eps_fn, x, t, schedule, prior, operator, strength=strength,
                            observation_noise=observation_noise, gamma=gamma, through_network=through_network)

    return guided


def _likelihood_variance(mu: torch.Tensor, sigma: torch.Tensor, residual: torch.Tensor, observation_noise: NoiseLike,
                         gamma: float) -> torch.Tensor:
    """sigma_y^2 + gamma (sigma/mu)^2 broadcast against the residual (batch, ...): the diffusion term per
    sample, sigma_y per entry when it is a tensor."""
    ratio = ((sigma / mu) ** 2).reshape(residual.shape[0], *([1] * (residual.ndim - 1)))
    if isinstance(observation_noise, torch.Tensor):
        try:
            torch.broadcast_shapes(observation_noise.shape, residual.shape[1:])
        except RuntimeError:
            raise ValueError(f"observation_noise of shape {tuple(observation_noise.shape)} does not broadcast "
                             f"against A(x) without its batch axis, {tuple(residual.shape[1:])}") from None
    return _noise_plus_ratio(observation_noise, ratio, gamma)


def _noise_plus_ratio(observation_noise: NoiseLike, ratio: torch.Tensor, gamma: float) -> torch.Tensor:
    """sigma_y^2 + gamma (sigma/mu)^2 with `ratio` = (sigma/mu)^2 already shaped to broadcast."""
    if isinstance(observation_noise, torch.Tensor):
        observation_noise = observation_noise.to(device=ratio.device, dtype=ratio.dtype)
    return observation_noise ** 2 + gamma * ratio


def _check_arguments(strength: float, observation_noise: NoiseLike, gamma: float) -> None:
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or strength < 0:
        raise ValueError(f"strength must be a number >= 0, got {strength!r}")
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma < 0:
        raise ValueError(f"gamma must be a number >= 0, got {gamma!r}")
    if isinstance(observation_noise, torch.Tensor):
        if not observation_noise.dtype.is_floating_point or not bool(torch.isfinite(observation_noise).all()):
            raise ValueError("observation_noise as a tensor must hold finite floating-point values")
        smallest = float(observation_noise.min()) if observation_noise.numel() else 0.0
        if smallest < 0:
            raise ValueError(f"observation_noise must be >= 0 everywhere, got a minimum of {smallest!r}")
        if smallest == 0 and gamma == 0:
            raise ValueError("observation_noise and gamma cannot both be 0 (the likelihood's variance would be 0)")
        return
    if not isinstance(observation_noise, (int, float)) or isinstance(observation_noise, bool) or observation_noise < 0:
        raise ValueError(f"observation_noise must be a number >= 0 or a tensor, got {observation_noise!r}")
    if observation_noise == 0 and gamma == 0:
        raise ValueError("observation_noise and gamma cannot both be 0 (the likelihood's variance would be 0)")


def _match_batch(prior: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """The prior with observed's shape: as is, or repeated along axis 0 for member-major ensembles."""
    if not isinstance(prior, torch.Tensor):
        raise ValueError(f"prior must be a tensor, got {type(prior).__name__}")
    prior = prior.to(device=observed.device, dtype=observed.dtype)
    if prior.shape == observed.shape:
        return prior
    if (prior.ndim == observed.ndim and prior.shape[1:] == observed.shape[1:] and prior.shape[0] >= 1
            and observed.shape[0] % prior.shape[0] == 0):
        return prior.repeat(observed.shape[0] // prior.shape[0], *([1] * (prior.ndim - 1)))
    raise ValueError(f"prior must have the shape of A(x), {tuple(observed.shape)}, or that shape with a batch "
                     f"that divides {observed.shape[0]} (ensemble members), got {tuple(prior.shape)}")
