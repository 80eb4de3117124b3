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

Backends. The torch code here is the reference implementation. The fused kernels run the same
arithmetic in one pass over memory (each input read once, the output written once):

    "torch"  the torch expressions below, on any device.
    "cupy"   kernels/ddpm.cu through emu.cuda (emu.diffusion.fused) for CUDA tensors, on torch's
             stream with no copies. Every operation is rounded as in torch's eager expression, so
             given the same noise the result is torch's, bit for bit.
    "julia"  the Julia package's fused step through emu.julia on CPU tensors (start Julia before
             importing torch: emu.julia.start); CUDA tensors run the "cupy" kernel (emu.julia.fused_ddpm_step).
    "auto"   "cupy" for CUDA tensors when CuPy can run, else "torch" (always "torch" on the CPU).

Noise of the fused backends. Unless `noise` is given, z is drawn inside the kernel by emu's
counter-based convention (Philox4x32-10 + Box-Muller, emu.diffusion.philox) from a key `seed` and a
call index `offset`. With seed=None (the default), each call draws the seed as one int64 from
`generator` (torch.randint(0, 2**63 - 1, (1,)) on the generator's device; torch's default CPU
generator when None) and uses offset 0, so a run is reproducible from the generator's seed; from a
CUDA generator that draw costs one host synchronisation per step, so prefer a CPU generator. The
torch backend keeps drawing z with torch.randn from `generator`: for the same generator the fused
and the torch backends give equally distributed but different noise. Passing `seed` (and `offset`)
makes every backend use the Philox noise (the torch backend computes it with the numpy twin
`philox_normal`, slowly), so all backends agree given (seed, offset).

References:
    Ho, Jain & Abbeel (2020), "Denoising diffusion probabilistic models", eqs. 4, 7, 11 and Alg. 2.
    Nichol & Dhariwal (2021), "Improved denoising diffusion probabilistic models" (cosine schedule).
    Pedersen, Zanna & Bruna (2025), "Thermalizer: stable autoregressive neural emulation of
    spatiotemporal chaos", Alg. 1 (per-sample levels).
    methods.md, "Diffusion core" and "Thermalizer".
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Literal

import numpy as np
import torch

from emu.backends import BackendUnavailable
from emu.diffusion.philox import check_uint64, philox_normal
from emu.diffusion.schedules import CosineSchedule

DiffusionBackend = Literal["auto", "torch", "cupy", "julia"]
DIFFUSION_BACKENDS: tuple[str, ...] = ("auto", "torch", "cupy", "julia")


def add_noise(schedule: CosineSchedule, clean: torch.Tensor, levels: int | torch.Tensor,
              noise: torch.Tensor, *, backend: DiffusionBackend = "auto") -> torch.Tensor:
    """A sample of q(x_t | x_clean): sqrt(alpha_bar_t) clean + sqrt(1 - alpha_bar_t) noise, per sample.

    Args:
        schedule: the noise schedule.
        clean: (batch, ...) clean samples, floating point.
        levels: each sample's level t in [0, T-1], shape (batch,), or an int for all.
        noise: standard normal noise of clean's shape (the caller draws it, so that training can
            reuse it as the regression target).
        backend: "auto", "torch" or "cupy" (the fused kernel, bit-identical to torch's result; see
            the module docstring). "julia" runs the torch code: the Julia package fuses the reverse
            step only.

    Returns:
        The noised samples, clean's shape, dtype and device.
    """
    implementation, signal_scale, noise_scale = _marginal_scales(schedule, levels, backend, "clean", clean,
                                                                 "noise", noise)
    if implementation == "cupy":
        from emu.diffusion.fused import fused_add_noise

        return fused_add_noise(clean, signal_scale, noise_scale, noise=noise)[0]
    return signal_scale * clean + noise_scale * noise.to(clean.dtype)


def tweedie(schedule: CosineSchedule, noisy: torch.Tensor, levels: int | torch.Tensor,
            predicted_noise: torch.Tensor, *, backend: DiffusionBackend = "auto") -> torch.Tensor:
    """Tweedie's estimate E[x_clean | x_t] ~ (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t).

    Exact when `predicted_noise` is E[eps | x_t]; with the true noise of `add_noise` it inverts
    `add_noise` (up to round-off, which grows like 1/sqrt(alpha_bar_t) at high levels).

    Args:
        noisy: (batch, ...) samples x_t. levels: their levels, shape (batch,) or an int.
        predicted_noise: eps_hat, noisy's shape.
        backend: as in `add_noise`.
    """
    implementation, signal_scale, noise_scale = _marginal_scales(schedule, levels, backend, "noisy", noisy,
                                                                 "predicted_noise", predicted_noise)
    if implementation == "cupy":
        from emu.diffusion.fused import fused_tweedie

        return fused_tweedie(noisy, predicted_noise, signal_scale, noise_scale)
    return (noisy - noise_scale * predicted_noise.to(noisy.dtype)) / signal_scale


def posterior_std(schedule: CosineSchedule, levels: int | torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt(beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)), float64, shape (batch,).

    Exactly 0 at t = 0. On the levels' device (the CPU for an int, which gives shape (1,)).
    """
    levels = schedule.check_levels(levels)
    return schedule._cached("posterior_stds", levels.device, torch.float64)[levels].clone()


def ddpm_step(noisy: torch.Tensor, levels: int | torch.Tensor, predicted_noise: torch.Tensor,
              schedule: CosineSchedule, *, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None, backend: DiffusionBackend = "auto",
              seed: int | None = None, offset: int = 0) -> torch.Tensor:
    """One ancestral DDPM reverse step x_t -> x_{t-1} with epsilon-prediction (Ho et al. Alg. 2).

        x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t) + sigma_t z

    Args:
        noisy: (batch, ...) samples x_t, floating point.
        levels: each sample's current level t in [0, T-1], an int64 tensor of shape (batch,);
            samples may sit at different levels. A python int applies to every sample.
        predicted_noise: eps_hat(x_t), noisy's shape (cast to noisy's dtype).
        schedule: the noise schedule the network was trained with.
        noise: z, standard normal of noisy's shape; None draws it fresh (torch backend: from
            `generator` with torch.randn; fused backends: in the kernel, see the module docstring).
            For the torch backend a generator on another device than `noisy` (a CPU generator for
            CUDA samples) draws on its own device and the noise is moved, so its results do not
            depend on where they run. Noise is drawn for the whole batch even when some or all
            samples are at t = 0; their sigma_t is exactly 0, so they get the mean exactly.
        generator: random source for z (torch backend) or for the Philox seed (fused backends);
            torch's default one when None.
        backend: "auto", "torch", "cupy" or "julia" (module docstring).
        seed, offset: Philox key and call index in [0, 2**64 - 1] of emu's noise convention. A
            seed makes every backend draw z = philox_normal(noisy.shape, seed, offset); None
            draws the seed from `generator` for the fused backends (offset still applies). Not
            together with `noise`.

    Returns:
        x_{t-1}, noisy's shape, dtype and device. At t = 0 this is the denoised sample (no noise
        added, no clipping).

    Raises:
        ValueError: an unknown backend, a level outside [0, T-1], mismatched shapes, CPU tensors
            for "cupy", or `noise` together with `seed`.
        BackendUnavailable: "cupy" without a usable CuPy and GPU, "julia" without juliacall.
    """
    _check_sample("noisy", noisy)
    implementation = _resolve_backend(backend, noisy)
    _check_same_shape("predicted_noise", predicted_noise, "noisy", noisy)
    if noise is not None:
        _check_same_shape("noise", noise, "noisy", noisy)
        if seed is not None:
            raise ValueError("pass either noise or seed (the Philox key of in-kernel noise), not both")
    if seed is not None:
        check_uint64("seed", seed)
    check_uint64("offset", offset)
    levels = schedule.check_levels(levels, noisy.shape[0], noisy.device)

    # (1) Mean of the reverse step, Ho et al. eq. 11; the coefficients were computed in float64.
    reciprocal_sqrt_alpha = schedule._gather_checked("reciprocal_sqrt_alphas", levels, noisy)
    noise_coefficient = schedule._gather_checked("noise_coefficients", levels, noisy)
    std = schedule._gather_checked("posterior_stds", levels, noisy)
    if implementation != "torch":
        # (1)+(2) fused: one pass over memory, z drawn in the kernel unless given.
        if noise is None and seed is None:
            seed = _draw_seed(generator)
        if implementation == "cupy":
            from emu.diffusion.fused import fused_ddpm_step

            return fused_ddpm_step(noisy, predicted_noise, reciprocal_sqrt_alpha, noise_coefficient, std,
                                   noise=noise, seed=seed or 0, offset=offset)
        return _julia_ddpm_step(noisy, predicted_noise, reciprocal_sqrt_alpha, noise_coefficient, std,
                                noise=noise, seed=seed, offset=offset)
    mean = reciprocal_sqrt_alpha * (noisy - noise_coefficient * predicted_noise.to(noisy.dtype))
    # (2) Ancestral noise with the posterior std; sigma_0 = 0 exactly, so level-0 samples get the mean.
    if noise is None:
        noise = _standard_normal(noisy, generator) if seed is None else _philox_noise(noisy, seed, offset)
    return mean + std * noise.to(noisy.dtype)


class DDPMScheduler:
    """The DDPM reverse process as an object: a schedule plus the `step` contract of diffusers.

        scheduler = DDPMScheduler(CosineSchedule(1000))
        x = scheduler.add_noise(clean, levels, torch.randn_like(clean))
        for level in reversed(range(start + 1)):
            x = scheduler.step(model(x), level, x, generator=generator)

    Args:
        schedule: the noise schedule (default: the cosine schedule with 1000 levels).
        backend: passed to `ddpm_step`, `add_noise` and `tweedie` (see there).

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
             generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None,
             seed: int | None = None, offset: int = 0) -> torch.Tensor:
        """x_{t-1} from x_t = `sample` and eps_hat = `model_output` (see `ddpm_step`)."""
        return ddpm_step(sample, levels, model_output, self.schedule, noise=noise, generator=generator,
                         backend=self.backend, seed=seed, offset=offset)

    def add_noise(self, clean: torch.Tensor, levels: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_clean) (see `add_noise`)."""
        return add_noise(self.schedule, clean, levels, noise, backend=self.backend)

    def tweedie(self, noisy: torch.Tensor, levels: int | torch.Tensor, predicted_noise: torch.Tensor) -> torch.Tensor:
        """E[x_clean | x_t] from eps_hat (see `tweedie`)."""
        return tweedie(self.schedule, noisy, levels, predicted_noise, backend=self.backend)


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
def _resolve_backend(backend: str, like: torch.Tensor | None = None) -> str:
    """The implementation that runs for `backend` on tensors like `like`: "torch", "cupy" or "julia".

    Without `like` (a scheduler being built) only checks that the named backend can run here.
    """
    if backend not in DIFFUSION_BACKENDS:
        raise ValueError(f"backend must be one of {DIFFUSION_BACKENDS}, got {backend!r}")
    on_cuda = isinstance(like, torch.Tensor) and like.device.type == "cuda"
    if backend == "auto":  # the kernels exist for float32 and float64
        fused = on_cuda and like.dtype in (torch.float32, torch.float64) and _cupy_usable()
        return "cupy" if fused else "torch"
    if backend == "cupy":
        _require_cupy()
        if like is not None and not on_cuda:
            device = like.device if isinstance(like, torch.Tensor) else type(like).__name__
            raise ValueError(f'backend="cupy" runs on CUDA tensors, got one on {device}; use backend="torch" '
                             f'(or "auto") on the CPU')
    if backend == "julia":
        _require_julia()
    return backend


def _require_cupy() -> None:
    """BackendUnavailable (with what to do) unless CuPy can run a kernel on a GPU here."""
    from emu.cuda import require_cupy

    try:
        require_cupy()
    except BackendUnavailable as error:
        raise BackendUnavailable(f'backend "cupy": {error} Use backend="torch" (or "auto") instead.') from None


@functools.lru_cache(maxsize=None)
def _cupy_usable() -> bool:
    try:
        _require_cupy()
    except BackendUnavailable:
        return False
    return True


def _require_julia() -> None:
    """BackendUnavailable (with what to do) unless emu's Julia bridge can be imported (Julia starts later)."""
    # find_spec, not import: importing juliacall starts Julia (and may install it), which emu.julia
    # does only when the step runs.
    if importlib.util.find_spec("juliacall") is None:
        raise BackendUnavailable(
            'backend "julia": juliacall is not installed (pip install -e ".[julia]"). '
            'Use backend="torch" (or "auto") instead.')


def _julia_ddpm_step(noisy: torch.Tensor, predicted_noise: torch.Tensor, reciprocal_sqrt_alpha: torch.Tensor,
                     noise_coefficient: torch.Tensor, posterior_std: torch.Tensor, *, noise: torch.Tensor | None,
                     seed: int | None, offset: int) -> torch.Tensor:
    """The Julia package's fused step through emu.julia, per-sample coefficients as (batch,) tensors:
    `fused_ddpm_step(..., seed, offset)` (noise drawn in the kernel) or `fused_ddpm_step_with_noise(..., noise)`."""
    try:
        import emu.julia as julia
    except ImportError as error:
        raise BackendUnavailable(f'backend "julia": emu.julia cannot be imported ({error}). '
                                 'Use backend="torch" (or "auto") instead.') from None
    batch = noisy.shape[0]
    arrays = (noisy.contiguous(), predicted_noise.to(noisy.dtype).contiguous(),
              reciprocal_sqrt_alpha.reshape(batch).contiguous(), noise_coefficient.reshape(batch).contiguous(),
              posterior_std.reshape(batch).contiguous())
    if noise is None:
        result = julia.fused_ddpm_step(*arrays, int(seed), int(offset))
    else:
        result = julia.fused_ddpm_step_with_noise(*arrays, noise.to(noisy.dtype).contiguous())
    return torch.as_tensor(result, device=noisy.device).reshape(noisy.shape)


def _draw_seed(generator: torch.Generator | None) -> int:
    """One Philox seed per call: an int64 in [0, 2**63 - 2] from `generator` (torch's default CPU one if None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=device))


def _philox_noise(like: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """emu's Philox noise of like's shape and dtype (numpy reference), on like's device."""
    dtype = np.float64 if like.dtype == torch.float64 else np.float32
    noise = torch.from_numpy(philox_normal(tuple(like.shape), seed, offset, dtype=dtype))
    return noise.to(device=like.device, dtype=like.dtype)


def _marginal_scales(schedule: CosineSchedule, levels, backend: str, sample_name: str, sample: Any,
                     partner_name: str, partner: Any) -> tuple[str, torch.Tensor, torch.Tensor]:
    """Checks a sample, its same-shaped partner (noise or eps_hat), the levels and the backend; returns
    the implementation to run and sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) per sample, broadcastable."""
    _check_sample(sample_name, sample)
    implementation = _resolve_backend(backend, sample)
    _check_same_shape(partner_name, partner, sample_name, sample)
    levels = schedule.check_levels(levels, sample.shape[0], sample.device)
    return (implementation, schedule._gather_checked("sqrt_alpha_bars", levels, sample),
            schedule._gather_checked("sqrt_one_minus_alpha_bars", levels, sample))


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
