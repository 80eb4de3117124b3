"""Diffusion core (the schedules-and-samplers layer): noise schedules and the DDPM step, no networks.

    from emu.diffusion import CosineSchedule, DDPMScheduler, add_noise, sample_levels
    schedule = CosineSchedule(num_levels=1000)
    levels = sample_levels(batch, schedule.num_levels, generator)          # training: uniform levels
    noise = torch.randn_like(clean)
    loss = mse(model(add_noise(schedule, clean, levels, noise)), noise)    # epsilon-prediction
    x = DDPMScheduler(schedule).step(model(x), levels, x, generator)       # sampling: x_t -> x_{t-1}

The equations (T levels i = 0 .. T-1; details and references in the two modules):

    cosine schedule   f(u) = cos^2((u + s)/(1 + s) pi/2),  beta_i = min(1 - f((i+1)/T)/f(i/T), 0.999),
                      alpha_i = 1 - beta_i,  alpha_bar_i = prod_{j<=i} alpha_j       (schedules.py)
    forward           x_t = sqrt(alpha_bar_t) x_clean + sqrt(1 - alpha_bar_t) eps
    Tweedie           E[x_clean | x_t] ~ (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)
    reverse step      x_{t-1} = (x_t - beta_t/sqrt(1 - alpha_bar_t) eps_hat)/sqrt(alpha_t) + sigma_t z,
                      sigma_t^2 = beta_t (1 - alpha_bar_{t-1})/(1 - alpha_bar_t), sigma_0 = 0   (ddpm.py)

Levels are per sample (an int64 tensor of shape (batch,)), as the Thermalizer needs: each sample is
re-noised to, and descends from, its own estimated level. Level sampling and level targets for
training level classifiers are in levels.py. The stabilisers built on this core (the Thermalizer's
Algorithm 1, ...) live in `emu.stabilizers`.

Layering: this package imports torch, numpy, math and `emu.backends` only; it never imports a
network (`emu.models`), the training code or the CLI. Networks are passed in by the caller.

References:
    Ho, Jain & Abbeel (2020), "Denoising diffusion probabilistic models".
    Nichol & Dhariwal (2021), "Improved denoising diffusion probabilistic models".
    Pedersen, Zanna & Bruna (2025), "Thermalizer: stable autoregressive neural emulation of
    spatiotemporal chaos".
"""

from emu.diffusion.ddpm import (
    DIFFUSION_BACKENDS,
    DDPMScheduler,
    add_noise,
    ddpm_step,
    posterior_std,
    sample_levels,
    tweedie,
)
from emu.diffusion.levels import gaussian_level_targets, log_snr, sample_training_levels, soft_cross_entropy
from emu.diffusion.schedules import TABLES, CosineSchedule

__all__ = [
    "DIFFUSION_BACKENDS",
    "TABLES",
    "CosineSchedule",
    "DDPMScheduler",
    "add_noise",
    "ddpm_step",
    "gaussian_level_targets",
    "log_snr",
    "sample_training_levels",
    "soft_cross_entropy",
    "posterior_std",
    "sample_levels",
    "tweedie",
]
