"""DDPM with epsilon-prediction: forward noising, Tweedie's estimate, the ancestral reverse step.

Notation (Ho et al. 2020), with the tables of a schedule (emu.diffusion.schedules) at level t:

    q_sample (forward):  x_t = sqrt(alpha_bar_t) x_clean + sqrt(1 - alpha_bar_t) eps,  eps ~ N(0, I)
    Tweedie:             E[x_clean | x_t] ~ (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)
    p_sample (reverse):  x_{t-1} = mean_t + sigma_t z,  z ~ N(0, I),
        mean_t  = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t)      (Ho et al. eq. 11)
        sigma_t = sqrt(beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t))               (posterior std)

eps_hat is the network's estimate of the noise in x_t. mean_t is the mean of the forward posterior
q(x_{t-1} | x_t, x_clean) with x_clean replaced by Tweedie's estimate; because that posterior mean
is linear in x_clean, an exact eps_hat = E[eps | x_t] makes mean_t the exact E[x_{t-1} | x_t].
sigma_t is the posterior std ("beta tilde"), 0 at t = 0 since alpha_bar_{-1} = 1: the last step
returns the mean. No clipping of the clean estimate (the fields are unbounded physical data).

Levels are per sample: `levels` is an int64 tensor of shape (batch,), so one batch can hold samples
at different levels (the Thermalizer re-noises each sample to its own estimated level and lets it
join the descent there). A python int is accepted and broadcast to the batch.

Backends. The torch code here is the reference implementation. `backend="auto"` runs it on every
device today; once the fused CUDA kernels of the CuPy and Julia backends land (issues 6 and 7),
"auto" will dispatch CUDA tensors to them and keep the torch path for the CPU and as the reference
they are tested against. "cupy" and "julia" can be asked for by name and raise `BackendUnavailable`
until then.

References:
    Ho, Jain & Abbeel (2020), "Denoising diffusion probabilistic models", eqs. 4, 7, 11 and Alg. 2.
    Nichol & Dhariwal (2021), "Improved denoising diffusion probabilistic models" (cosine schedule).
    Pedersen, Zanna & Bruna (2025), "Thermalizer: stable autoregressive neural emulation of
    spatiotemporal chaos", Alg. 1 (per-sample levels).
    methods.md, "Diffusion core" and "Thermalizer".
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from emu.backends import BackendUnavailable
from emu.diffusion.schedules import CosineSchedule

DiffusionBackend = Literal["auto", "torch", "cupy", "julia"]
DIFFUSION_BACKENDS: tuple[str, ...] = ("auto", "torch", "cupy", "julia")


def add_noise(schedule: CosineSchedule, clean: torch.Tensor, levels: int | torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """A sample of q(x_t | x_clean): sqrt(alpha_bar_t) clean + sqrt(1 - alpha_bar_t) noise, per sample.

    Args:
        schedule: the noise schedule.
        clean: (batch, ...) clean samples, floating point.
        levels: each sample's level t in [0, T-1], shape (batch,), or an int for all.
        noise: standard normal noise of clean's shape (the caller draws it, so that training can
            reuse it as the regression target).

    Returns:
        The noised samples, clean's shape, dtype and device.
    """
    _check_sample("clean", clean)
    _check_same_shape("noise", noise, "clean", clean)
    levels = schedule.check_levels(levels, clean.shape[0], clean.device)
    signal_scale = schedule._gather_checked("sqrt_alpha_bars", levels, clean)
    noise_scale = schedule._gather_checked("sqrt_one_minus_alpha_bars", levels, clean)
    return signal_scale * clean + noise_scale * noise.to(clean.dtype)


def tweedie(schedule: CosineSchedule, noisy: torch.Tensor, levels: int | torch.Tensor,
            predicted_noise: torch.Tensor) -> torch.Tensor:
    """Tweedie's estimate E[x_clean | x_t] ~ (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t).

    Exact when `predicted_noise` is E[eps | x_t]; with the true noise of `add_noise` it inverts
    `add_noise` (up to round-off, which grows like 1/sqrt(alpha_bar_t) at high levels).

    Args:
        noisy: (batch, ...) samples x_t. levels: their levels, shape (batch,) or an int.
        predicted_noise: eps_hat, noisy's shape.
    """
    _check_sample("noisy", noisy)
    _check_same_shape("predicted_noise", predicted_noise, "noisy", noisy)
    levels = schedule.check_levels(levels, noisy.shape[0], noisy.device)
    signal_scale = schedule._gather_checked("sqrt_alpha_bars", levels, noisy)
    noise_scale = schedule._gather_checked("sqrt_one_minus_alpha_bars", levels, noisy)
    return (noisy - noise_scale * predicted_noise.to(noisy.dtype)) / signal_scale


def posterior_std(schedule: CosineSchedule, levels: int | torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt(beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)), float64, shape (batch,).

    Exactly 0 at t = 0. On the levels' device (the CPU for an int, which gives shape (1,)).
    """
    levels = schedule.check_levels(levels)
    return schedule._cached("posterior_stds", levels.device, torch.float64)[levels].clone()


def ddpm_step(noisy: torch.Tensor, levels: int | torch.Tensor, predicted_noise: torch.Tensor,
              schedule: CosineSchedule, *, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None, backend: DiffusionBackend = "auto") -> torch.Tensor:
    """One ancestral DDPM reverse step x_t -> x_{t-1} with epsilon-prediction (Ho et al. Alg. 2).

        x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t) + sigma_t z

    Args:
        noisy: (batch, ...) samples x_t, floating point.
        levels: each sample's current level t in [0, T-1], an int64 tensor of shape (batch,);
            samples may sit at different levels. A python int applies to every sample.
        predicted_noise: eps_hat(x_t), noisy's shape (cast to noisy's dtype).
        schedule: the noise schedule the network was trained with.
        noise: z, standard normal of noisy's shape; None draws it fresh from `generator`. A
            generator on another device than `noisy` (a CPU generator for CUDA samples) draws on
            its own device and the noise is moved, so results do not depend on where they run.
            Noise is drawn for the whole batch even when some or all samples are at t = 0; their
            sigma_t is exactly 0, so they get the mean exactly.
        generator: random source for z (torch's global one when None).
        backend: "auto" or "torch" run the torch reference (see the module docstring for the
            planned dispatch of "auto" to fused CUDA kernels); "cupy" and "julia" raise
            `BackendUnavailable` until those kernels land.

    Returns:
        x_{t-1}, noisy's shape, dtype and device. At t = 0 this is the denoised sample (no noise
        added, no clipping).

    Raises:
        ValueError: an unknown backend, a level outside [0, T-1], or mismatched shapes.
        BackendUnavailable: backend "cupy" or "julia".
    """
    _resolve_backend(backend)
    _check_sample("noisy", noisy)
    _check_same_shape("predicted_noise", predicted_noise, "noisy", noisy)
    if noise is not None:
        _check_same_shape("noise", noise, "noisy", noisy)
    levels = schedule.check_levels(levels, noisy.shape[0], noisy.device)

    # (1) Mean of the reverse step, Ho et al. eq. 11; the coefficients were computed in float64.
    reciprocal_sqrt_alpha = schedule._gather_checked("reciprocal_sqrt_alphas", levels, noisy)
    noise_coefficient = schedule._gather_checked("noise_coefficients", levels, noisy)
    mean = reciprocal_sqrt_alpha * (noisy - noise_coefficient * predicted_noise.to(noisy.dtype))
    # (2) Ancestral noise with the posterior std; sigma_0 = 0 exactly, so level-0 samples get the mean.
    if noise is None:
        noise = _standard_normal(noisy, generator)
    std = schedule._gather_checked("posterior_stds", levels, noisy)
    return mean + std * noise.to(noisy.dtype)


class DDPMScheduler:
    """The DDPM reverse process as an object: a schedule plus the `step` contract of diffusers.

        scheduler = DDPMScheduler(CosineSchedule(1000))
        x = scheduler.add_noise(clean, levels, torch.randn_like(clean))
        for level in reversed(range(start + 1)):
            x = scheduler.step(model(x), level, x, generator=generator)

    Args:
        schedule: the noise schedule (default: the cosine schedule with 1000 levels).
        backend: passed to `ddpm_step` by `step` (see there).

    `config` is the schedule's JSON-able config (the backend is a run-time choice, not part of the
    model); `DDPMScheduler.from_config(config)` rebuilds the scheduler.
    """

    def __init__(self, schedule: CosineSchedule | None = None, *, backend: DiffusionBackend = "auto"):
        if schedule is None:
            schedule = CosineSchedule()
        if not isinstance(schedule, CosineSchedule):
            raise ValueError(f"schedule must be a CosineSchedule, got {type(schedule).__name__}")
        _resolve_backend(backend)
        self.schedule = schedule
        self.backend = backend

    def __repr__(self) -> str:
        return f"DDPMScheduler({self.schedule!r}, backend={self.backend!r})"

    @property
    def num_levels(self) -> int:
        return self.schedule.num_levels

    @property
    def config(self) -> dict[str, Any]:
        return self.schedule.config

    @classmethod
    def from_config(cls, config: dict[str, Any], *, backend: DiffusionBackend = "auto") -> DDPMScheduler:
        return cls(CosineSchedule.from_config(config), backend=backend)

    def step(self, model_output: torch.Tensor, levels: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_{t-1} from x_t = `sample` and eps_hat = `model_output` (see `ddpm_step`)."""
        return ddpm_step(sample, levels, model_output, self.schedule, noise=noise, generator=generator,
                         backend=self.backend)

    def add_noise(self, clean: torch.Tensor, levels: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_clean) (see `add_noise`)."""
        return add_noise(self.schedule, clean, levels, noise)

    def tweedie(self, noisy: torch.Tensor, levels: int | torch.Tensor, predicted_noise: torch.Tensor) -> torch.Tensor:
        """E[x_clean | x_t] from eps_hat (see `tweedie`)."""
        return tweedie(self.schedule, noisy, levels, predicted_noise)


def sample_levels(batch: int, num_levels: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Training levels: `batch` integers uniform over all of [0, num_levels - 1], int64, on `device`.

    The Thermalizer trains on every level (training only on low levels hurt; methods.md). Drawn on
    the generator's device and moved, so a CPU generator gives the same levels for any `device`.
    """
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 0):
        raise ValueError(f"batch must be an integer >= 0, got {batch!r}")
    if not (isinstance(num_levels, int) and not isinstance(num_levels, bool) and num_levels >= 1):
        raise ValueError(f"num_levels must be an integer >= 1, got {num_levels!r}")
    draw_device = generator.device if generator is not None else (device or "cpu")
    levels = torch.randint(0, num_levels, (batch,), generator=generator, device=draw_device)
    return levels.to(device or "cpu")


# -- checks and helpers ------------------------------------------------------------------------------
def _resolve_backend(backend: str) -> str:
    """The implementation that runs for `backend`: "torch" today (see the module docstring)."""
    if backend not in DIFFUSION_BACKENDS:
        raise ValueError(f"backend must be one of {DIFFUSION_BACKENDS}, got {backend!r}")
    if backend in ("cupy", "julia"):
        raise BackendUnavailable(
            f"backend {backend!r}: the fused DDPM-step kernel is not available yet (it lands with the "
            f"{'CuPy' if backend == 'cupy' else 'Julia'} backend). Use backend=\"torch\" (or \"auto\") today."
        )
    return "torch"


def _check_sample(name: str, tensor: Any) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point or tensor.ndim < 1:
        got = (f"dtype {tensor.dtype}, shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor)
               else type(tensor).__name__)
        raise ValueError(f"{name} must be a floating-point tensor of shape (batch, ...), got {got}")


def _check_same_shape(name: str, tensor: Any, reference_name: str, reference: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.shape != reference.shape:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must have the shape of {reference_name}, {tuple(reference.shape)}, got {got}")


def _standard_normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None or generator.device == like.device:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)
