"""Diffusion core (the schedules-and-samplers layer): noise schedules, the DDPM step, the VP SDE and
its predictor-corrector sampler, window-score composition and likelihood guidance; no networks.

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

Continuous time (Cohesion, on top of score-based data assimilation, SDA), t in [0, 1]:

    from emu.diffusion import (VPSchedule, PredictorCorrectorSampler, compose_window_scores,
                               guided_eps_fn, CoarsenOperator)
    schedule = VPSchedule(eta=1e-3)
    loss = mse(model(schedule.add_noise(clean, t, noise), t), noise)          # t ~ U(0, 1) per sample
    eps_fn = lambda x, t: compose_window_scores(model, x, t, window=5)       # (B, T, C, y, x) sequences
    guided = guided_eps_fn(eps_fn, schedule, prior, CoarsenOperator(4), strength=1.0)
    x = PredictorCorrectorSampler(schedule, steps=256, corrections=1, tau=0.5).sample(
        guided, shape, generator, members=8)

    VP SDE            alpha(t) = cos(a t)^2, a = acos(sqrt(eta)), mu = sqrt(alpha), sigma = sqrt(1 - alpha),
                      x_t = mu(t) x_0 + sigma(t) eps                                        (vp.py)
    predictor         x_t' = mu(t') x0_hat + sigma(t') eps_hat, x0_hat = (x_t - sigma eps_hat)/mu   (DDIM /
                      exponential integrator)                                               (sampler.py)
    corrector         x <- x + delta s + sqrt(2 delta) z, s = -eps_hat/sigma, delta = tau / mean(s^2)
    windows           frame i scored in the window of W frames starting at max(0, min(i - W//2, T - W));
                      stride s: windows at 0, s, 2s, .. (and T - W), each frame from the one it is
                      most central in                                                       (windows.py)
    guidance          eps_hat - strength sigma grad_x [-1/2 ||y - A(x0_hat)||^2 / (sigma_y^2 + gamma (sigma/mu)^2)],
                      sigma_y a number or one per observed entry                            (guidance.py)

DDPM levels are per sample (an int64 tensor of shape (batch,)), as the Thermalizer needs: each sample is
re-noised to, and descends from, its own estimated level. Level sampling and level targets for
training level classifiers are in levels.py. The stabilisers built on this core (the Thermalizer's
Algorithm 1, ...) live in `emu.stabilizers`.

Layering: this package imports torch, numpy, math and `emu.backends` only; it never imports a
network (`emu.models`), the training code or the CLI. Networks are passed in by the caller.

References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), "Score-based generative modeling
    through stochastic differential equations".
    Zhang & Chen (2023), "Fast sampling of diffusion models with exponential integrator".
    Rozet & Louppe (2023), "Score-based data assimilation".
    Cohesion, "Generative emulation of chaotic dynamics with coherent prior" (arXiv 2504.14264).
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
from emu.diffusion.guidance import (
    CoarsenOperator,
    IdentityOperator,
    MaskOperator,
    guided_eps_fn,
    guided_noise,
    observation_variance,
)
from emu.diffusion.levels import (
    gaussian_level_targets,
    log_snr,
    sample_training_levels,
    soft_cross_entropy,
)
from emu.diffusion.sampler import PredictorCorrectorSampler
from emu.diffusion.schedules import TABLES, CosineSchedule
from emu.diffusion.vp import VPSchedule
from emu.diffusion.windows import compose_window_scores, strided_starts, window_starts

__all__ = [
    "DIFFUSION_BACKENDS",
    "TABLES",
    "CoarsenOperator",
    "CosineSchedule",
    "DDPMScheduler",
    "IdentityOperator",
    "MaskOperator",
    "PredictorCorrectorSampler",
    "VPSchedule",
    "add_noise",
    "compose_window_scores",
    "ddpm_step",
    "gaussian_level_targets",
    "guided_eps_fn",
    "guided_noise",
    "log_snr",
    "observation_variance",
    "sample_training_levels",
    "soft_cross_entropy",
    "posterior_std",
    "sample_levels",
    "tweedie",
    "strided_starts",
    "window_starts",
]
