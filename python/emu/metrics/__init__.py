"""Metrics of emulator rollouts against the solver (numpy or torch in, numpy out).

    from emu.metrics import mse_per_step, kinetic_energy_spectrum, stable_horizon
    errors = mse_per_step(rollout, reference)              # (batch, time), normalised units
    horizon = stable_horizon(errors, threshold=4.0)        # (batch,) first failing step index
    k, spectrum = kinetic_energy_spectrum(fields, config)  # physical fields, (..., n//2)

Layer: imports the physics (`emu.systems`, `emu.backends`) and nothing from `emu.models`; the
definitions follow Pedersen, Zanna & Bruna (2025, Thermalizer) and methods.md.
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

__all__ = [
    "SpectralSimilarity",
    "as_numpy",
    "autocorrelation",
    "kinetic_energy_spectrum",
    "lagged_autocorrelation",
    "mse",
    "mse_per_step",
    "rms",
    "spectral_similarity",
    "stable_horizon",
]
