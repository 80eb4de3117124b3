"""Rollout metrics: MSE per step, KE spectra, autocorrelation, stable horizon, spectral similarity.

Every function takes numpy arrays or torch tensors (tensors are copied to the host with
`.detach().cpu().numpy()`) and returns numpy arrays, computed in float64. Fields use emu's layout
`(..., channel, y, x)` with the channels as stored in the datasets: Kolmogorov 1 channel (vorticity),
two-layer QG 2 channels (PV upper, lower). Trajectories are `(batch, time, channel, y, x)`; index 0
on the time axis is the initial state and index t the state after t emulator steps.

Which units: `mse`, `autocorrelation` and `stable_horizon` work in whatever units they are given;
the papers report MSE in normalised units (per-channel division by the training-split scale), where
MSE ~ 1 means decorrelated from the reference but in distribution and MSE >> 1 means unstable.
`kinetic_energy_spectrum` needs physical fields (denormalise first), since it inverts the physics.

Reference: Pedersen, Zanna & Bruna (2025), "Thermalizer: Stable autoregressive neural emulation of
spatiotemporal chaos": Fig. 4 (MSE vs step), Fig. 5 (autocorrelation), Figs. 1, 3 and 6 (KE
spectra), App. on s_init/s_stop tuning (spectrum match); methods.md, "Metrics used
throughout".

This module is in the physics layer's orbit: it imports `emu.systems` and `emu.backends` (for the
spectra), never `torch.nn` models, and does not import torch itself.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import numpy as np

from emu.backends import get_backend
from emu.systems import config_from_dict, make_equation
from emu.systems.base import SystemConfig

FIELD_AXES = (-3, -2, -1)  # (channel, y, x)
REDUCTIONS = ("none", "mean")


def as_numpy(array: Any) -> np.ndarray:
    """A numpy view or copy of `array`; torch tensors go through `.detach().cpu().numpy()`.

    bfloat16 tensors (which numpy has no type for) are widened to float32 first.
    """
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # a torch tensor, without importing torch
        tensor = array.detach().cpu()
        try:
            return tensor.numpy()
        except TypeError:  # bfloat16
            return tensor.float().numpy()
    return np.asarray(array)


# -- MSE --------------------------------------------------------------------------------------------
def mse(prediction, reference, axis: int | tuple[int, ...] = FIELD_AXES) -> np.ndarray:
    """Mean squared error mean((prediction - reference)^2) over `axis`, in float64.

    Args:
        prediction, reference: arrays that broadcast against each other, layout (..., channel, y, x).
        axis: the axes averaged; the default (channel, y, x) gives one number per sample (per step
            for a trajectory).

    Returns:
        The MSE with `axis` removed, in the inputs' units squared. NaN or inf in a sample is not
        hidden: that sample's MSE is NaN or inf.
    """
    prediction, reference = as_numpy(prediction), as_numpy(reference)
    difference = prediction.astype(np.float64, copy=False) - reference.astype(np.float64, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.mean(np.square(difference), axis=axis)


def mse_per_step(rollout, reference, reduce: Literal["none", "mean"] = "none") -> np.ndarray:
    """MSE of a rollout against the reference trajectory at every step (Thermalizer Fig. 4).

    Args:
        rollout, reference: (batch, time, channel, y, x), the same shape; index 0 on the time axis is
            normally the shared initial state (MSE 0).
        reduce: "none" returns (batch, time); "mean" averages over the batch, returning (time,). A
            trajectory with NaN makes the batch mean NaN at those steps (by design: count failures
            with `stable_horizon` rather than averaging them away).

    Returns:
        float64 MSE, mean over (channel, y, x).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    rollout, reference = as_numpy(rollout), as_numpy(reference)
    if rollout.ndim != 5 or rollout.shape != reference.shape:
        raise ValueError("rollout and reference must both be (batch, time, channel, y, x) of the same shape, "
                         f"got {rollout.shape} and {reference.shape}")
    per_step = mse(rollout, reference)
    return per_step if reduce == "none" else per_step.mean(axis=0)


def rms(fields, axis: int | tuple[int, ...] = FIELD_AXES) -> np.ndarray:
    """Root mean square sqrt(mean(fields^2)) over `axis` (default: channel, y, x), in float64.

    A state norm for `stable_horizon(..., norms=rms(rollout), norm_threshold=...)`; in normalised
    units an in-distribution state has rms ~ 1.
    """
    fields = as_numpy(fields).astype(np.float64, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.sqrt(np.mean(np.square(fields), axis=axis))


# -- kinetic energy spectrum ------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _equation(config: SystemConfig):
    return make_equation(config, get_backend("numpy", dtype="float64"))


def kinetic_energy_spectrum(fields, config: SystemConfig | dict, batch_size: int = 256, shell_width: float = 1.0):
    """Isotropic kinetic energy spectrum of a batch of fields, through the system's own physics.

    The fields are inverted with the system's equation (`emu.systems.make_equation`, numpy
    backend, float64) and its `kinetic_energy_spectrum` is called, so the physics is the solver's:

    - Kolmogorov: psi_hat = omega_hat / |k|^2, u = dpsi/dy, v = -dpsi/dx; E(k) is the shell sum of
      1/2 (|u_hat|^2 + |v_hat|^2) / n^4 (velocity^2; nondimensional units).
    - Two-layer QG: psi_m from the 2x2 PV inversion; E(k) = (H_1 E_1(k) + H_2 E_2(k)) / H with
      E_m(k) the shell sum of 1/2 |k|^2 |psi_hat_m|^2 / n^4 [m^2/s^2] (Thermalizer Figs. 3, 6).

    Shells are annuli of integer wavenumber index, |index| in [m - 1/2, m + 1/2) for m = 1..n/2,
    summed over the rfft half plane with the kx = 0 and Nyquist columns counted once
    (`emu.spectral.isotropic_spectrum`). E(k) is energy per shell (a shell sum, not a density): it
    sums to the domain-mean kinetic energy 1/2 <|u|^2>, less the corner modes beyond |index| = n/2.
    Divide by the shell width 2 pi / L for a spectral density. `shell_width=np.sqrt(2)` gives the
    reference code's wider bins (methods.md); the shells then hold |index| in [(m - 1/2) w, (m + 1/2) w).

    Args:
        fields: physical (not normalised) fields, (..., channel, n, n), channel 1 for Kolmogorov and
            2 for QG; numpy or torch.
        config: the system's config (or its `to_dict()`, as stored in emu files). Its grid size is
            replaced by the fields' n if they differ; the other parameters (domain size; for QG the
            deformation radius and layer depths) are what the spectrum depends on.
        batch_size: samples transformed at once (bounds memory for long trajectories).

    Returns:
        (k, spectrum): k the shell centres in angular wavenumber, shape (n//2,) (1, 2, ..., n/2 for
        Kolmogorov on [0, 2 pi); rad/m for QG), times the shell width; spectrum shape (..., shells),
        float64, with n//2 shells of width 1 (floor(n/2 / w) of width w).
    """
    if isinstance(config, dict):
        config = config_from_dict(config)
    fields = as_numpy(fields)
    channels = 1 if config.system == "kolmogorov" else 2
    if fields.ndim < 3 or fields.shape[-3] != channels or fields.shape[-1] != fields.shape[-2]:
        raise ValueError(f"fields must be (..., {channels}, n, n) for system {config.system!r}, got {fields.shape}")
    n = fields.shape[-1]
    if config.grid_size != n:
        config = config.replace(grid_size=n)
    equation = _equation(config)
    leading = fields.shape[:-3]
    flat = fields.reshape((-1,) + fields.shape[-3:]).astype(np.float64, copy=False)
    if flat.shape[0] == 0:
        raise ValueError(f"fields hold no samples, shape {fields.shape}")
    spectra = []
    for start in range(0, flat.shape[0], batch_size):
        chunk = flat[start:start + batch_size]
        k, spectrum = equation.kinetic_energy_spectrum(equation.to_state(chunk[:, 0] if channels == 1 else chunk),
                                                       shell_width=shell_width)
        spectra.append(spectrum)
    spectrum = np.concatenate(spectra, axis=0)
    return np.asarray(k), spectrum.reshape(leading + (spectrum.shape[-1],))


# -- autocorrelation --------------------------------------------------------------------------------
def _unit_anomalies(trajectory, per_channel: bool) -> np.ndarray:
    """(..., time, channel, y, x) -> (..., [channel,] time, d): each frame minus its spatial mean,
    divided by its norm, so that a dot product of two frames is their Pearson correlation."""
    x = as_numpy(trajectory)
    if x.ndim < 4:
        raise ValueError(f"trajectory must be (..., time, channel, y, x), got shape {x.shape}")
    x = x.astype(np.float64, copy=False)
    if per_channel:
        x = np.moveaxis(x, -3, -4)  # (..., channel, time, y, x)
        x = x.reshape(x.shape[:-2] + (-1,))
    else:
        x = x.reshape(x.shape[:-3] + (-1,))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        anomaly = x - x.mean(axis=-1, keepdims=True)
        return anomaly / np.sqrt(np.sum(np.square(anomaly), axis=-1, keepdims=True))


def _check_max_lag(max_lag: int | None, steps: int) -> int:
    if max_lag is None:
        return steps - 1
    if not (isinstance(max_lag, (int, np.integer)) and 0 <= max_lag < steps):
        raise ValueError(f"max_lag must be an integer in [0, {steps - 1}] (time axis has {steps} entries), "
                         f"got {max_lag!r}")
    return int(max_lag)


def autocorrelation(trajectory, max_lag: int | None = None, per_channel: bool = False) -> np.ndarray:
    """Pearson correlation of each trajectory's initial state with its state at step t.

        r(t) = sum_i (a_0,i - mean a_0)(a_t,i - mean a_t) / sqrt(sum_i (a_0,i - mean a_0)^2 sum_i (a_t,i - mean a_t)^2)

    with i running over (channel, y, x) (or (y, x) per channel), so r(0) = 1, r ~ 0 once the flow has
    decorrelated; dimensionless. As Thermalizer Fig. 5, where it is averaged over trajectories and
    compared with the solver's.

    Args:
        trajectory: (batch, time, channel, y, x) (any number of leading axes before time).
        max_lag: the last step t returned (default: all, time - 1).
        per_channel: correlate each channel separately (QG layers differ in scale, and pooling
            weights the upper layer more); adds a trailing channel axis.

    Returns:
        (batch, max_lag + 1) float64, or (batch, max_lag + 1, channel) with `per_channel`. A frame
        with zero variance (a constant field) or non-finite values gives NaN where it takes part.
    """
    units = _unit_anomalies(trajectory, per_channel)
    last = _check_max_lag(max_lag, units.shape[-2])
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.matmul(units[..., : last + 1, :], units[..., 0, :, np.newaxis])[..., 0]
    return np.moveaxis(r, -2, -1) if per_channel else r


def lagged_autocorrelation(trajectory, max_lag: int | None = None, per_channel: bool = False,
                           block_size: int = 256) -> np.ndarray:
    """Pearson correlation at lag L averaged over all start times: mean over t of r(x_t, x_{t+L}).

    The same correlation as `autocorrelation`, but every pair (t, t + L), t = 0..T-1-L, contributes
    (T - L pairs at lag L), which estimates the stationary lagged autocorrelation with far less noise
    than the single start t = 0 when the trajectory is statistically stationary.

    Args:
        trajectory: (batch, time, channel, y, x) (any number of leading axes before time).
        max_lag: largest lag returned (default: time - 1, where only one pair remains).
        per_channel: as in `autocorrelation`.
        block_size: start times per block of the banded Gram matrix (memory
            ~ block_size * (block_size + max_lag) floats per trajectory).

    Returns:
        (batch, max_lag + 1) float64 (lag 0 is 1), or (batch, max_lag + 1, channel). A non-finite or
        constant frame makes every lag it takes part in NaN.
    """
    units = _unit_anomalies(trajectory, per_channel)
    steps = units.shape[-2]
    last = _check_max_lag(max_lag, steps)
    leading = units.shape[:-2]
    flat = units.reshape((-1,) + units.shape[-2:])
    sums = np.zeros((flat.shape[0], last + 1))
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, steps, block_size):
            stop = min(start + block_size, steps)
            column_stop = min(stop + last, steps)
            # gram[b, i, j] = r(x_{start+i}, x_{start+j}); keep 0 <= j - i <= last.
            gram = np.matmul(flat[:, start:stop], np.swapaxes(flat[:, start:column_stop], -1, -2))
            lag = np.arange(column_stop - start)[np.newaxis, :] - np.arange(stop - start)[:, np.newaxis]
            band = (lag >= 0) & (lag <= last)
            for b in range(flat.shape[0]):
                sums[b] += np.bincount(lag[band], weights=gram[b][band], minlength=last + 1)
    pairs = steps - np.arange(last + 1)
    r = (sums / pairs).reshape(leading + (last + 1,))
    return np.moveaxis(r, -2, -1) if per_channel else r


# -- stable horizon ---------------------------------------------------------------------------------
def stable_horizon(mse_per_step, threshold: float, norms=None, norm_threshold: float | None = None) -> np.ndarray:
    """Index of the first failing step of each trajectory, or the record length if none fails.

    A step t fails when any of these holds:
      - mse_per_step[..., t] > threshold (strictly), or is not finite (NaN, inf);
      - norms is given and norms[..., t] is not finite;
      - norms and norm_threshold are given and norms[..., t] > norm_threshold.

    Convention: with index 0 the initial state and index t the state after t emulator steps (as
    `mse_per_step` and emu's rollouts store them), the horizon h is the number of leading entries
    that pass: entries 0..h-1 are all good and entry h is the first bad one, so the emulator ran
    h - 1 good steps and failed on step h. h == time (the length of the record) means that no
    step failed within the record; it is a lower bound on the true horizon, not a failure.
    Thermalizer (Fig. 4) calls a state unstable when MSE >> 1 in normalised units; a threshold of
    a few (e.g. 2-5) separates "decorrelated but in distribution" (MSE ~ 1) from unstable.

    Args:
        mse_per_step: (..., time) MSE per step, e.g. `mse_per_step(rollout, reference)`.
        threshold: the MSE above which a step fails.
        norms: optional (..., time) state norms (e.g. `rms(rollout)`), same shape.
        norm_threshold: optional bound on the norm; without it only non-finite norms fail.

    Returns:
        int64 array of shape (...) (a 0-d array for a single 1-D curve).
    """
    errors = as_numpy(mse_per_step).astype(np.float64, copy=False)
    if errors.ndim < 1:
        raise ValueError("mse_per_step must have a time axis (last), got a scalar")
    with np.errstate(invalid="ignore"):
        failed = ~np.isfinite(errors) | (errors > threshold)
        if norms is not None:
            norms = as_numpy(norms).astype(np.float64, copy=False)
            if norms.shape != errors.shape:
                raise ValueError(f"norms must have the shape of mse_per_step {errors.shape}, got {norms.shape}")
            failed |= ~np.isfinite(norms)
            if norm_threshold is not None:
                failed |= norms > norm_threshold
        elif norm_threshold is not None:
            raise ValueError("norm_threshold needs norms")
    steps = errors.shape[-1]
    return np.where(failed.any(axis=-1), np.argmax(failed, axis=-1), steps).astype(np.int64)


# -- spectral similarity ----------------------------------------------------------------------------
class SpectralSimilarity(NamedTuple):
    """Result of `spectral_similarity`.

    Attributes:
        values: per-sample score, shape pred_spectra.shape[:-1]; NaN for a sample whose predicted
            spectrum holds NaN or inf.
        num_nan: how many samples are NaN (blown-up states); they are left out of `mean` and counted
            here instead of being hidden or replaced.
        mean: mean of the other samples (NaN when every sample is NaN).
    """

    values: np.ndarray
    num_nan: int
    mean: float


def spectral_similarity(pred_spectra, ref_spectra) -> SpectralSimilarity:
    """Per-sample relative spectrum error D = sum_k |S_ref(k) - S_pred(k)| / S_ref(k).

    The score used to tune the thermalizer's (s_init, s_stop) by matching the solver's KE spectrum
    (Thermalizer appendix; methods.md "Spectral similarity for tuning"); 0 for identical spectra,
    dimensionless, summed (not averaged) over shells.

    Args:
        pred_spectra: (..., n_shells) spectra of the emulated samples, e.g. from
            `kinetic_energy_spectrum`.
        ref_spectra: (n_shells,) or any shape broadcasting against `pred_spectra`, e.g. the solver's
            time- and ensemble-mean spectrum, or one reference spectrum per sample. Must be finite and
            >= 0. Where the reference shell is exactly 0 (idealised fields only) the term is 0 if
            the prediction is 0 there too, else inf (an infinite relative error, kept visible: such
            a sample has value inf, is not a NaN sample, and makes `mean` inf). Shells with
            round-off-level reference energy (e.g. the empty shells of a single-mode field,
            ~1e-35) dominate the sum: slice the shell axis of both arguments to the band you trust.

    Returns:
        `SpectralSimilarity(values, num_nan, mean)`, values of shape `pred_spectra.shape[:-1]`
        (broadcast with the reference's leading axes).
    """
    pred = as_numpy(pred_spectra).astype(np.float64, copy=False)
    ref = as_numpy(ref_spectra).astype(np.float64, copy=False)
    if not np.all(np.isfinite(ref)) or np.any(ref < 0):
        raise ValueError("ref_spectra must be finite and nonnegative "
                         "(a reference with NaN is a bug, not a sample failure)")
    if pred.ndim < 1 or ref.ndim < 1 or pred.shape[-1] != ref.shape[-1]:
        raise ValueError(f"spectra must share the last (shell) axis, got {pred.shape} and {ref.shape}")
    filled = ref > 0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # 0/0 := 0 (both spectra empty in that shell); energy where the reference has none is inf.
        relative = np.where(filled, np.abs(ref - pred) / np.where(filled, ref, 1.0),
                            np.where(pred == 0, 0.0, np.inf))
        values = relative.sum(axis=-1)
    # A sample whose prediction is not finite anywhere is a NaN sample (a blown-up state).
    finite = np.broadcast_to(np.all(np.isfinite(pred), axis=-1), values.shape)
    values = np.where(finite, values, np.nan)
    num_nan = int(np.size(values) - np.count_nonzero(finite))
    mean = float(values[finite].mean()) if np.any(finite) else float("nan")
    return SpectralSimilarity(values=values, num_nan=num_nan, mean=mean)
