"""Predictor-corrector sampling of the VP SDE (emu.diffusion.vp) from a noise-prediction network.

The sampler runs t from 1 to 0 on the uniform grid t_k = 1 - k/N, k = 0 .. N (N = `steps`), from
x_1 ~ N(0, I). Each step t -> t' (t' < t) is one predictor step followed by `corrections` Langevin
corrector steps at t'; eps_hat(x, t) is the network's noise prediction, score = -eps_hat / sigma(t).

Predictor: the exponential integrator of the probability-flow ODE in the noise parametrisation with
eps_hat held constant over the step (Zhang & Chen 2023, DEIS order 0), which is DDIM (eta = 0):

    x0_hat = (x_t - sigma(t) eps_hat) / mu(t)                              (Tweedie)
    x_t'   = mu(t') x0_hat + sigma(t') eps_hat
           = r x_t + (sigma(t') - r sigma(t)) eps_hat,     r = mu(t') / mu(t),

the second form (the one evaluated, as in SDA's code) avoiding the division of x_t by mu(1) ~ 0.03.
At t' = 0 it returns x0_hat.

Corrector: one step of the unadjusted Langevin algorithm targeting p_t' (Song et al. 2021, Alg. 5),

    x <- x + delta s + sqrt(2 delta) z,     s = -eps_hat(x, t') / sigma(t'),  z ~ N(0, I),
    delta = tau / mean(s^2)                 (the mean over all non-batch axes of one sample),

which is SDA's rule (Rozet & Louppe 2023, code `VPSDE.sample`): the step is normalised by the
score's mean square, so a step moves x by about sqrt(tau) noise-scales per component whatever the
dimension and t. Written with eps_hat (no division by sigma; this is the form evaluated):

    delta s = -sigma(t') tau / mean(eps_hat^2) eps_hat,   sqrt(2 delta) = sigma(t') sqrt(2 tau / mean(eps_hat^2)).

It equals Song et al.'s PC rule with signal-to-noise ratio r, delta = 2 (r ||z|| / ||s||)^2, for
tau = 2 r^2 (||z||^2 ~ dimension). At t' = 0 (sigma = 0) the step is the identity, so the sampler
skips the corrector there (and its network evaluation): N (1 + corrections) - corrections
evaluations in all.

The corrector is unadjusted (no Metropolis test), so it is biased: at a fixed step h a Langevin
chain on N(0, lambda) has stationary variance lambda / (1 - h / (2 lambda)), and SDA's h is about tau
times the harmonic mean of the variances of p_t, so the smallest-variance directions are inflated
most. Measured with an exact Gaussian score (tests/test_vp_sampler.py; 4-d Gaussian, variances
0.32 .. 3.57, 64 iid copies per sample): tau = 0.02 reproduces the covariance within sampling error,
tau = 0.1 inflates it by up to 13%, tau = 0.5 (Cohesion's value) by up to 71%. The per-sample
normalisation also needs many dimensions: for one 4-d sample mean(s^2) is often ~0 and the step
huge (up to 17x variance at tau = 0.5). The predictor alone (corrections = 0) is unbiased up to its
discretisation error.

Contract (diffusers-like, per sample):

    sampler = PredictorCorrectorSampler(VPSchedule(), steps=256, corrections=1, tau=0.5)
    x = torch.randn(shape, generator=generator)
    times = sampler.timesteps()
    for t, t_next in zip(times[:-1], times[1:]):
        x = sampler.step(eps_fn(x, t), t, t_next, x, generator, eps_fn=eps_fn)   # predictor + correctors
    # or: x = sampler.sample(eps_fn, shape, generator, members=8)

`eps_fn(x, t)` takes x of shape (batch, ...) and t of shape (batch,) (x's dtype and device) and
returns eps_hat of x's shape; a network, a composition of window scores (emu.diffusion.windows) or a
guided noise (emu.diffusion.guidance). Sampling runs under torch.no_grad(); guidance turns gradients
back on where it needs them.

References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), "Score-based generative modeling
    through stochastic differential equations" (predictor-corrector samplers, Alg. 5).
    Song, Meng & Ermon (2021), "Denoising diffusion implicit models" (DDIM).
    Zhang & Chen (2023), "Fast sampling of diffusion models with exponential integrator" (DEIS).
    Rozet & Louppe (2023), "Score-based data assimilation" (SDA: this predictor, the corrector's
    step rule, tau).
    methods.md, "Cohesion" (tau ~ 0.5, ~256 steps).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from emu.diffusion.vp import TimeLike, VPSchedule, per_sample_times

EpsFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PredictorCorrectorSampler:
    """Exponential-integrator predictor + Langevin corrector for the VP SDE (module docstring).

    Args:
        schedule: the VPSchedule the network was trained with (default VPSchedule()).
        steps: N, the number of predictor steps from t = 1 to t = 0 (>= 1). Cohesion/SDA: ~256.
        corrections: Langevin steps after each predictor step (>= 0; 0 gives pure DDIM).
        tau: the corrector's step amplitude, delta = tau / mean(score^2) (> 0). Cohesion: ~0.5.
    """

    def __init__(self, schedule: VPSchedule | None = None, steps: int = 256, corrections: int = 1, tau: float = 0.5):
        if schedule is None:
            schedule = VPSchedule()
        if not isinstance(schedule, VPSchedule):
            raise ValueError(f"schedule must be a VPSchedule, got {type(schedule).__name__}")
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not (isinstance(corrections, int) and not isinstance(corrections, bool) and corrections >= 0):
            raise ValueError(f"corrections must be an integer >= 0, got {corrections!r}")
        if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau > 0):
            raise ValueError(f"tau must be a number > 0, got {tau!r}")
        self.schedule = schedule
        self.steps = steps
        self.corrections = corrections
        self.tau = float(tau)

    def __repr__(self) -> str:
        return (f"PredictorCorrectorSampler({self.schedule!r}, steps={self.steps}, "
                f"corrections={self.corrections}, tau={self.tau})")

    @property
    def config(self) -> dict[str, Any]:
        return {"schedule": self.schedule.config, "steps": self.steps, "corrections": self.corrections,
                "tau": self.tau}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PredictorCorrectorSampler:
        values = dict(config)
        schedule = VPSchedule.from_config(values.pop("schedule", {}))
        return cls(schedule, **values)

    @property
    def num_evaluations(self) -> int:
        """Network evaluations of `sample`: N predictor + (N - 1) corrections (none at t = 0)."""
        return self.steps + (self.steps - 1) * self.corrections

    def timesteps(self) -> torch.Tensor:
        """The grid t_k = 1 - k/N, k = 0 .. N, float64, from 1 down to exactly 0 (shape (N + 1,))."""
        grid = 1.0 - torch.arange(self.steps + 1, dtype=torch.float64) / self.steps
        grid[-1] = 0.0
        return grid

    # -- one step ----------------------------------------------------------------------------------
    def predict(self, denoiser_output: torch.Tensor, t: TimeLike, t_next: TimeLike, x: torch.Tensor) -> torch.Tensor:
        """The predictor alone: x_t' = r x_t + (sigma(t') - r sigma(t)) eps_hat, r = mu(t')/mu(t)."""
        _check_pair("denoiser_output", denoiser_output, x)
        mu, sigma = self._scales(t, x)
        mu_next, sigma_next = self._scales(t_next, x)
        ratio = mu_next / mu
        return _cast(ratio, x) * x + _cast(sigma_next - ratio * sigma, x) * denoiser_output.to(x.dtype)

    def correct(self, denoiser_output: torch.Tensor, t: TimeLike, x: torch.Tensor,
                generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One Langevin step at time t: x + delta s + sqrt(2 delta) z, delta = tau / mean(s^2) per sample.

        Args:
            denoiser_output: eps_hat(x, t), x's shape. t: scalar or (batch,) times.
            x: (batch, ...) samples at time t.
            generator: source of z (torch's default when None); a generator on another device draws
                there and the noise is moved. noise: z itself, x's shape, instead of drawing it.

        Returns x unchanged where sigma(t) = 0 (the step's limit).
        """
        _check_pair("denoiser_output", denoiser_output, x)
        if noise is None:
            noise = standard_normal(x, generator)
        _check_pair("noise", noise, x)
        eps = denoiser_output.to(x.dtype)
        _, sigma = self._scales(t, x)
        axes = tuple(range(1, x.ndim))
        mean_square = eps.to(torch.float64).square().mean(dim=axes, keepdim=True) if axes else eps.to(torch.float64).square()
        mean_square = mean_square.clamp(min=torch.finfo(torch.float64).tiny)
        drift = -sigma * self.tau / mean_square          # delta s = drift * eps_hat
        diffusion = sigma * torch.sqrt(2 * self.tau / mean_square)  # sqrt(2 delta)
        return x + _cast(drift, x) * eps + _cast(diffusion, x) * noise.to(x.dtype)

    def step(self, denoiser_output: torch.Tensor, t: TimeLike, t_next: TimeLike, x: torch.Tensor,
             generator: torch.Generator | None = None, *, eps_fn: EpsFunction | None = None) -> torch.Tensor:
        """x_t -> x_t': the predictor from eps_hat = `denoiser_output` = eps_fn(x, t), then, if
        `eps_fn` is given, `corrections` Langevin steps at t' (each evaluates eps_fn(x, t') once;
        none where t' = 0). Without eps_fn only the predictor runs (the corrector needs fresh network
        evaluations; see `correct`).

        Args:
            denoiser_output: eps_hat(x, t), x's shape.
            t, t_next: current and next time, 1 >= t > t_next >= 0; scalars or (batch,) tensors.
            x: (batch, ...) samples at time t.
            generator: the corrector's random source.
            eps_fn: the noise prediction, eps_fn(x, t) with t of shape (batch,).
        """
        x = self.predict(denoiser_output, t, t_next, x)
        if eps_fn is None or self.corrections == 0:
            return x
        times = per_sample_times(t_next, x)
        if bool((times > 0).all()):
            network_times = times.to(x.dtype)
            for _ in range(self.corrections):
                x = self.correct(eps_fn(x, network_times), t_next, x, generator)
        elif bool((times > 0).any()):
            raise ValueError("t_next must be 0 for all samples or for none (mixed final steps are not supported)")
        return x

    # -- the whole loop ----------------------------------------------------------------------------
    def sample(self, eps_fn: EpsFunction, shape: tuple[int, ...] | torch.Size,
               generator: torch.Generator | None = None, *, members: int | None = None,
               initial: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Samples of p_0 from x_1 ~ N(0, I) through all N steps.

        Args:
            eps_fn: eps_hat = eps_fn(x, t), x of shape (batch, ...), t of shape (batch,).
            shape: (batch, ...), the shape of one ensemble member's samples.
            generator: random source of x_1 and of the corrector noise.
            members: M, the ensemble size, or None. With M, the sampler runs one batch of M * batch
                samples, member-major (row m * batch + b is member m of sample b; a conditioning
                prior of batch `batch` repeated M times along axis 0 lines up with it, which
                emu.diffusion.guidance does), and returns shape (M, *shape).
            initial: x_1 itself (shape (M, *shape) with members, else `shape`) instead of N(0, I).
            dtype, device: of the samples when `initial` is None.

        Returns:
            x_0 of shape `shape`, or (M, *shape) with members.
        """
        shape = tuple(int(n) for n in shape)
        if len(shape) < 1:
            raise ValueError("shape must have a batch axis, (batch, ...)")
        if members is not None and not (isinstance(members, int) and not isinstance(members, bool) and members >= 1):
            raise ValueError(f"members must be None or an integer >= 1, got {members!r}")
        outer = shape if members is None else (members, *shape)
        flat = shape if members is None else (members * shape[0], *shape[1:])
        if initial is None:
            draw_device = generator.device if generator is not None else (device or "cpu")
            x = torch.randn(flat, generator=generator, dtype=dtype, device=draw_device).to(device or draw_device)
        else:
            if not isinstance(initial, torch.Tensor) or tuple(initial.shape) != outer or not initial.dtype.is_floating_point:
                got = tuple(initial.shape) if isinstance(initial, torch.Tensor) else type(initial).__name__
                raise ValueError(f"initial must be a floating tensor of shape {outer}, got {got}")
            x = initial.reshape(flat).clone()
        times = self.timesteps()
        with torch.no_grad():
            for k in range(self.steps):
                t, t_next = float(times[k]), float(times[k + 1])
                eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
                x = self.step(eps, t, t_next, x, generator, eps_fn=eps_fn)
        return x.reshape(outer)

    def _scales(self, t: TimeLike, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu(t), sigma(t)) per sample in float64, shaped (batch, 1, ..., 1)."""
        times = per_sample_times(t, x)
        angle = times.to(torch.float64) * self.schedule.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return torch.cos(angle).reshape(shape), torch.sin(angle).reshape(shape)


def standard_normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) of like's shape and dtype on like's device, drawn on the generator's device."""
    if generator is None or generator.device == like.device:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


def _cast(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coefficient.to(device=like.device, dtype=like.dtype)


def _check_pair(name: str, tensor: Any, x: Any) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.ndim < 1:
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor of shape (batch, ...), got {got}")
    if not isinstance(tensor, torch.Tensor) or tensor.shape != x.shape:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must have the shape of x, {tuple(x.shape)}, got {got}")
