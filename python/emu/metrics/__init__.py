"""Metrics of emulator rollouts against the solver (numpy or torch in, numpy out).

    from emu.metrics import mse_per_step, kinetic_energy_spectrum, stable_horizon
    errors = mse_per_step(rollout, reference)              # (batch, time), normalised units
    horizon = stable_horizon(errors, threshold=4.0)        # (batch,) first failing step index
    k, spectrum = kinetic_energy_spectrum(fields, config)  # physical fields, (..., n//2)

    from emu.metrics import rmse, ms_ssim, spectral_divergence, ensemble_spread_skill
    errors = rmse(prediction, truth)                       # (member, time) for (member, time, c, y, x)
    scores = ms_ssim(prediction, truth)                    # (member, time), 1 for identical fields
    divergence = spectral_divergence(prediction, truth)    # (member, time), KL over the top 10% shells
    spread, skill, ratio = ensemble_spread_skill(prediction, truth)  # (time,) each, ratio ~1 if reliable

Layer: imports the physics (`emu.systems`, `emu.backends`) and nothing from `emu.models`; the
definitions follow Pedersen, Zanna & Bruna (2025, Thermalizer) and methods.md; the forecast scores
(`emu.metrics.forecast`) those of the Cohesion paper (methods.md, "Cohesion").
"""

from emu.metrics.core import (
    SpectralSimilarity,
    as_numpy,
    autocorrelation,
    kinetic_energy_spectrum,
    lagged_autocorrelation,
    mse,
    mse_per_step,
    rms,
    spectral_similarity,
    stable_horizon,
)
from emu.metrics.forecast import (
    SpreadSkill,
    ensemble_spread_skill,
    gaussian_window,
    mae,
    ms_ssim,
    ms_ssim_scales,
    power_spectrum,
    rmse,
    spectral_divergence,
)

__all__ = [
    "SpectralSimilarity",
    "SpreadSkill",
    "as_numpy",
    "autocorrelation",
    "ensemble_spread_skill",
    "gaussian_window",
    "kinetic_energy_spectrum",
    "lagged_autocorrelation",
    "mae",
    "ms_ssim",
    "ms_ssim_scales",
    "mse",
    "mse_per_step",
    "power_spectrum",
    "rms",
    "rmse",
    "spectral_divergence",
    "spectral_similarity",
    "stable_horizon",
]
