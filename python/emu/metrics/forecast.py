"""Forecast metrics: RMSE, MAE, multi-scale SSIM, spectral divergence, ensemble spread-skill.

The scores the Cohesion paper reports for its rollouts (methods.md, "Cohesion": RMSE, MAE, MS-SSIM
with 5 scales and an 11-point Gaussian window of sigma 1.5, and SpecDiv, the KL divergence between
the normalised radially binned power spectra over the top 10% of wavenumbers), plus the
spread-skill ratio of an ensemble forecast.

Conventions as in `emu.metrics.core`: numpy arrays or torch tensors in, float64 numpy out; fields
`(..., channel, y, x)` and every function returns one value per leading index (e.g. (member, time)
or (time,)). `prediction` and `truth` may differ in their leading axes as long as those broadcast
(prediction (member, time, ...) against truth (time, ...)); the field axes must agree. NaN or inf in
a sample is never hidden: that sample's score is NaN (or inf where stated).

emu's fields are doubly periodic, so every spatial operation here is periodic: MS-SSIM filters with
circular padding and `spectral_divergence` uses the FFT, so a metric never sees an artificial edge.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from emu.metrics.core import FIELD_AXES, as_numpy, kinetic_energy_spectrum
from emu.spectral import isotropic_spectrum
from emu.systems.base import SystemConfig

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik (2003), Table 1
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilising constants C1 = (K1 L)^2, C2 = (K2 L)^2 (Wang et al. 2004)


def _as_float64(array) -> np.ndarray:
    return as_numpy(array).astype(np.float64, copy=False)


def _leading_shape(prediction: np.ndarray, truth: np.ndarray, core_ndim: int) -> tuple[int, ...]:
    """The broadcast leading shape of two (..., <core_ndim axes>) arrays whose core axes agree."""
    if prediction.ndim < core_ndim or truth.ndim < core_ndim:
        raise ValueError(f"prediction and truth must have at least {core_ndim} axes (..., channel, y, x), "
                         f"got shapes {prediction.shape} and {truth.shape}")
    if prediction.shape[-core_ndim:] != truth.shape[-core_ndim:]:
        raise ValueError(f"prediction and truth must have the same (channel, y, x) axes, "
                         f"got shapes {prediction.shape} and {truth.shape}")
    try:
        return np.broadcast_shapes(prediction.shape[:-core_ndim], truth.shape[:-core_ndim])
    except ValueError:
        raise ValueError(f"the leading axes of prediction and truth must broadcast against each other, "
                         f"got shapes {prediction.shape} and {truth.shape}") from None


# -- RMSE, MAE --------------------------------------------------------------------------------------
def _difference(prediction, truth) -> np.ndarray:
    prediction, truth = _as_float64(prediction), _as_float64(truth)
    try:
        np.broadcast_shapes(prediction.shape, truth.shape)
    except ValueError:
        raise ValueError(f"prediction and truth must have the same shape or broadcast against each other, "
                         f"got {prediction.shape} and {truth.shape}") from None
    with np.errstate(invalid="ignore", over="ignore"):
        return prediction - truth


def rmse(prediction, truth, axes: int | tuple[int, ...] = FIELD_AXES) -> np.ndarray:
    """Root mean squared error sqrt(mean((prediction - truth)^2)) over `axes`, in float64.

    Args:
        prediction, truth: arrays of the same shape or shapes that broadcast, layout (..., channel, y, x).
        axes: the axes averaged; the default (channel, y, x) gives one number per leading index.

    Returns:
        The RMSE with `axes` removed, in the fields' units. NaN in a sample makes its RMSE NaN; inf
        makes it inf (or NaN where inf meets inf of the same sign).
    """
    difference = _difference(prediction, truth)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sqrt(np.mean(np.square(difference), axis=axes))


def mae(prediction, truth, axes: int | tuple[int, ...] = FIELD_AXES) -> np.ndarray:
    """Mean absolute error mean(|prediction - truth|) over `axes`, in float64.

    Same arguments, shapes and NaN/inf behaviour as `rmse`; in the fields' units.
    """
    difference = _difference(prediction, truth)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.mean(np.abs(difference), axis=axes)


# -- MS-SSIM ----------------------------------------------------------------------------------------
def gaussian_window(window: int, sigma: float) -> np.ndarray:
    """The 1-D Gaussian taps g_j = exp(-j^2 / (2 sigma^2)) / sum, j = -(window-1)/2 .. (window-1)/2."""
    offsets = np.arange(window, dtype=np.float64) - (window - 1) / 2
    taps = np.exp(-offsets**2 / (2.0 * sigma**2))
    return taps / taps.sum()


def _circular_blur(fields: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable circular convolution of (..., y, x) with the symmetric taps along y and x.

    np.roll rather than an FFT: every output point sums its neighbours in the same order, so the
    blur of a periodically shifted field is exactly the shifted blur (no round-off difference).
    """
    radius = (len(taps) - 1) // 2
    for axis in (-2, -1):
        blurred = taps[radius] * fields
        for offset in range(1, radius + 1):
            blurred = blurred + taps[radius + offset] * (np.roll(fields, offset, axis=axis)
                                                         + np.roll(fields, -offset, axis=axis))
        fields = blurred
    return fields


def _average_pool(fields: np.ndarray) -> np.ndarray:
    """(..., y, x) -> (..., y/2, x/2), the mean of each 2x2 block (both sides even)."""
    height, width = fields.shape[-2:]
    return fields.reshape(fields.shape[:-2] + (height // 2, 2, width // 2, 2)).mean(axis=(-3, -1))


def ms_ssim_scales(grid_shape: tuple[int, int], scales: int = 5, window: int = 11) -> int:
    """How many scales `ms_ssim` uses on a (y, x) grid: at most `scales`.

    Scale 0 is the grid itself. The next scale, the 2x2 average, is added while both sides of the
    current scale are even (a periodic grid of odd side has no 2x2 tiling) and the halved smaller
    side is still >= `window` (a window wider than the grid would wrap onto itself and stop being
    local). 64 x 64 with window 11: 64, 32, 16 -> 3 scales; 32 x 32: 2 scales; 48 x 48: 3 (48, 24, 12).
    """
    height, width = grid_shape
    used = 1
    while used < scales and height % 2 == 0 and width % 2 == 0 and min(height, width) // 2 >= window:
        height, width = height // 2, width // 2
        used += 1
    return used


def ms_ssim(prediction, truth, *, data_range=None, scales: int = 5, window: int = 11, sigma: float = 1.5,
            weights=MS_SSIM_WEIGHTS) -> np.ndarray:
    """Multi-scale structural similarity (Wang, Simoncelli & Bovik 2003) on doubly periodic fields.

    At scale j the local statistics are Gaussian-weighted over an 11 x 11 window (mu, sigma^2 and
    the covariance sigma_xy of prediction x and truth y), and

        l_j  = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)                      (luminance)
        cs_j = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2)                 (contrast-structure)
        C1 = (0.01 L)^2,  C2 = (0.03 L)^2,  L = data_range.

    With S scales used and weights w_j renormalised to sum 1 over them,

        MS-SSIM = [mean(l_{S-1} cs_{S-1})]_+^{w_{S-1}}  prod_{j < S-1} [mean(cs_j)]_+^{w_j}

    where mean is over the scale's grid and [.]_+ = max(., 0): a negative mean (anti-correlated
    structure) is clipped at 0, as pytorch_msssim does, since a negative number to a fractional
    power is undefined. The coarsest factor uses the full SSIM map mean(l cs), as pytorch_msssim
    and torchmetrics do (Wang et al. write l_M^alpha_M cs_M^beta_M). The value is computed per
    channel and then averaged over channels. Dimensionless, <= 1, and 1 exactly (to round-off) for
    identical fields.

    Periodicity: the Gaussian is applied by circular convolution and scales are 2x2 block means,
    so nothing is padded or cropped. pytorch_msssim convolves 'valid' (drops a 5-point border per
    scale) and torchmetrics pads by reflection and crops, neither of which is right for a periodic
    field, and both refuse small grids at 5 scales: pytorch_msssim needs a smaller side
    > (window - 1) 2^4 = 160 points, torchmetrics >= 176; emu's grids are 32-64, hence this
    implementation. The score is
    exactly invariant to a periodic shift of both fields by a multiple of 2^(S-1) points on each
    axis; other shifts move the 2x2 blocks relative to the field, so the coarse scales (and the
    score, slightly) change.

    Scale reduction: scales are used while both sides are even and the halved smaller side is
    still >= `window` (see `ms_ssim_scales`), at most `scales`; the weights of the scales used,
    weights[:S], are renormalised to sum 1. At 64 x 64, 5 requested scales give 3 (64, 32, 16);
    at 32 x 32, 2.

    Args:
        prediction, truth: (..., channel, y, x) with the same (channel, y, x); leading axes broadcast.
        data_range: L, the dynamic range in the fields' units; a number or an array broadcasting
            against the leading axes, > 0. Default: per sample, truth.max() - truth.min() over
            (channel, y, x); a constant truth (range 0) gives NaN, so pass data_range for it.
        scales: requested number of scales, >= 1.
        window: odd window length, 1 <= window <= the grid's smaller side.
        sigma: the Gaussian's standard deviation in grid points, > 0.
        weights: positive per-scale exponents, at least `scales` of them (Wang et al.'s five by default).

    Returns:
        float64 of the broadcast leading shape. NaN or inf in a sample gives NaN.
    """
    prediction, truth = _as_float64(prediction), _as_float64(truth)
    leading = _leading_shape(prediction, truth, core_ndim=3)
    if not (isinstance(scales, (int, np.integer)) and scales >= 1):
        raise ValueError(f"scales must be an integer >= 1, got {scales!r}")
    height, width = truth.shape[-2:]
    if not (isinstance(window, (int, np.integer)) and window >= 1 and window % 2 == 1):
        raise ValueError(f"window must be an odd integer >= 1, got {window!r}")
    if window > min(height, width):
        raise ValueError(f"window must be <= the grid's smaller side {min(height, width)} "
                         f"(grid {height} x {width}), got {window}")
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) < scales or not np.all(np.isfinite(weights) & (weights > 0)):
        raise ValueError(f"weights must be at least scales={scales} finite numbers > 0, got {weights.tolist()}")

    used = ms_ssim_scales((height, width), int(scales), int(window))
    exponents = weights[:used] / weights[:used].sum()

    if data_range is None:
        data_range = truth.max(axis=FIELD_AXES) - truth.min(axis=FIELD_AXES)
        # A constant truth has no range: C1 = C2 = 0 would leave a ratio of round-off residues.
        data_range = np.where(data_range > 0, data_range, np.nan)
    else:
        data_range = _as_float64(data_range)
        if not np.all(np.isfinite(data_range) & (data_range > 0)):
            raise ValueError("data_range must be finite and > 0 (or None for truth's max - min per sample)")
        try:
            np.broadcast_shapes(data_range.shape, leading)
        except ValueError:
            raise ValueError(f"data_range of shape {data_range.shape} must broadcast against the leading axes "
                             f"{leading}") from None
    range_per_map = np.asarray(data_range)[..., np.newaxis, np.newaxis, np.newaxis]  # against (channel, y, x)
    c1 = (SSIM_K1 * range_per_map) ** 2
    c2 = (SSIM_K2 * range_per_map) ** 2

    taps = gaussian_window(int(window), float(sigma))
    score = np.ones(leading + (truth.shape[-3],))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for scale in range(used):
            mean_x, mean_y = _circular_blur(prediction, taps), _circular_blur(truth, taps)
            variance_x = _circular_blur(prediction * prediction, taps) - mean_x * mean_x
            variance_y = _circular_blur(truth * truth, taps) - mean_y * mean_y
            covariance = _circular_blur(prediction * truth, taps) - mean_x * mean_y
            contrast_structure = (2.0 * covariance + c2) / (variance_x + variance_y + c2)
            if scale < used - 1:
                factor = contrast_structure.mean(axis=(-2, -1))
                prediction, truth = _average_pool(prediction), _average_pool(truth)
            else:
                luminance = (2.0 * mean_x * mean_y + c1) / (mean_x * mean_x + mean_y * mean_y + c1)
                factor = (luminance * contrast_structure).mean(axis=(-2, -1))
            # np.maximum keeps NaN, so a blown-up sample stays NaN instead of clipping to 0.
            score = score * np.maximum(factor, 0.0) ** exponents[scale]
    return score.mean(axis=-1)


# -- spectral divergence ----------------------------------------------------------------------------
def power_spectrum(fields) -> np.ndarray:
    """Isotropic power spectrum of (..., channel, n, n) periodic fields, averaged over channels.

    P(m) = sum over shell m of |f_hat|^2 / n^4 (rfft half plane, kx = 0 and Nyquist columns once;
    `emu.spectral.isotropic_spectrum` with integer shells m = 1..n/2), so sum_m P(m) is the
    domain mean of f^2 less the mean's own contribution and the corner modes beyond n/2. Units:
    the fields' units squared; shape (..., n//2).
    """
    fields = _as_float64(fields)
    if fields.ndim < 3 or fields.shape[-1] != fields.shape[-2]:
        raise ValueError(f"fields must be (..., channel, n, n) on a square grid, got shape {fields.shape}")
    n = fields.shape[-1]
    with np.errstate(invalid="ignore", over="ignore"):
        density = np.abs(np.fft.rfft2(fields)) ** 2 / float(n) ** 4
        _, spectrum = isotropic_spectrum(density, n, 2.0 * np.pi)
    return spectrum.mean(axis=-2)


def spectral_divergence(prediction, truth, config: SystemConfig | dict | None = None, *,
                        fraction: float = 0.1) -> np.ndarray:
    """SpecDiv: KL(P_truth || P_pred) between the normalised spectra over the highest wavenumbers.

        SpecDiv = sum_{m in band} P(m) log(P(m) / Q(m)),
        P = S_truth / sum_band S_truth,  Q = S_pred / sum_band S_pred,

    with S the radially binned spectrum in integer shells m = 1..M (M = n/2) and the band the last
    ceil(fraction M) shells (methods.md, "Cohesion": the top 10% of wavenumbers; at 64 x 64 the
    default keeps shells 29..32, at 32 x 32 shells 15..16). Dimensionless, >= 0, and exactly 0 for
    identical spectra; it sees the shape of the small-scale spectrum, not its level (a prediction
    with all small-scale power scaled by a constant scores 0).

    Which spectrum: with config None, the power spectrum of the fields themselves
    (`power_spectrum`: |f_hat|^2 per shell, averaged over channels, i.e. the field's variance
    spectrum in whatever units it is given, e.g. enstrophy for vorticity). With a config, the
    system's kinetic energy spectrum (`kinetic_energy_spectrum`; physical, not normalised, fields;
    QG's layers combined by thickness).

    Args:
        prediction, truth: (..., channel, n, n) with the same (channel, n, n); leading axes broadcast.
        config: None, or the system's config (or its dict) for the kinetic energy spectrum.
        fraction: the share of the shells kept, in (0, 1]; it must keep at least 2 shells (a
            single normalised shell is 1 for any field, so its divergence is identically 0).

    Returns:
        float64 of the broadcast leading shape. NaN where either field is not finite or the truth has
        no power in the band; inf where the prediction has exactly no power in a shell where the
        truth has some (e.g. a zero prediction). FFT round-off (~1e-32 of the field's power) in an
        otherwise empty shell keeps the value finite but large; a truth whose band holds only
        round-off is normalised like any other, so its score means nothing (use a larger fraction
        or a finer grid for such idealised fields).
    """
    if not (isinstance(fraction, (int, float, np.integer, np.floating)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    prediction, truth = _as_float64(prediction), _as_float64(truth)
    _leading_shape(prediction, truth, core_ndim=3)
    if config is None:
        spectrum_pred, spectrum_truth = power_spectrum(prediction), power_spectrum(truth)
    else:
        spectrum_pred = kinetic_energy_spectrum(prediction, config)[1]
        spectrum_truth = kinetic_energy_spectrum(truth, config)[1]
    num_shells = spectrum_truth.shape[-1]
    # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, which ceil would make 4.
    band_size = math.ceil(round(fraction * num_shells, 9))
    if band_size < 2:
        raise ValueError(f"fraction={fraction} keeps {band_size} of the grid's {num_shells} shells; the divergence "
                         f"needs at least 2 (fraction >= {2 / num_shells:.3g})")
    band_pred, band_truth = spectrum_pred[..., -band_size:], spectrum_truth[..., -band_size:]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        total_pred = band_pred.sum(axis=-1, keepdims=True)
        total_truth = band_truth.sum(axis=-1, keepdims=True)
        # A prediction with no power in the band has Q = 0 (not 0/0), so the divergence is inf.
        q = band_pred / np.where(total_pred > 0, total_pred, 1.0)
        p = band_truth / total_truth
        # 0 log 0 := 0; p > 0 where q = 0 gives +inf.
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
        divergence = terms.sum(axis=-1)
    undefined = (~np.isfinite(total_pred) | ~np.isfinite(total_truth) | (total_truth <= 0))[..., 0]
    return np.where(undefined, np.nan, divergence)


# -- ensemble spread-skill --------------------------------------------------------------------------
class SpreadSkill(NamedTuple):
    """Result of `ensemble_spread_skill`; each field has the truth's leading shape.

    Attributes:
        spread: sqrt((M + 1) / M * mean over (channel, y, x) of the unbiased ensemble variance).
        skill: RMSE of the ensemble mean against the truth.
        ratio: spread / skill; ~1 for a reliable ensemble, < 1 under-dispersive, > 1 over-dispersive
            (NaN where both are 0).
    """

    spread: np.ndarray
    skill: np.ndarray
    ratio: np.ndarray


def ensemble_spread_skill(members, truth, member_axis: int = 0) -> SpreadSkill:
    """Spread, skill and spread-skill ratio of an ensemble forecast (Fortin et al. 2014).

        spread = sqrt((M + 1) / M  mean_space[ 1/(M-1) sum_i (x_i - xbar)^2 ])
        skill  = sqrt(mean_space[ (xbar - y)^2 ])

    over the M members x_i, their mean xbar and the truth y, with mean_space over (channel, y, x).
    If the truth is statistically one more member, E[(xbar - y)^2] = (M + 1)/M E[unbiased variance]
    (Fortin, Abaza, Anctil & Turcotte 2014, "Why should ensemble spread match the RMSE of the
    ensemble mean?", J. Hydrometeor. 15), so the spread here carries the finite-ensemble factor
    sqrt((M + 1)/M) and the ratio is ~1 for a reliable ensemble of any size. Both are in the fields'
    units. To pool many samples (e.g. over initial conditions), average spread^2 and skill^2 and
    then take the ratio of their square roots, rather than averaging ratios.

    Args:
        members: (..., member, ..., channel, y, x) with the members on `member_axis`; M >= 2.
        truth: the members' shape without the member axis.
        member_axis: the members' axis (not one of the last three).

    Returns:
        `SpreadSkill(spread, skill, ratio)`, float64 arrays of shape truth.shape[:-3]. NaN or inf in a
        sample's members or truth makes its values NaN or inf.
    """
    members, truth = _as_float64(members), _as_float64(truth)
    if members.ndim < 4:
        raise ValueError(f"members must be (..., member, ..., channel, y, x), got shape {members.shape}")
    leading_axes = members.ndim - 3  # the member axis is one of these, never (channel, y, x)
    if not (isinstance(member_axis, (int, np.integer)) and -members.ndim <= member_axis < members.ndim
            and member_axis % members.ndim < leading_axes):
        raise ValueError(f"member_axis must be one of the leading axes 0..{leading_axes - 1} (or "
                         f"{-members.ndim}..{-4}) of members {members.shape}, got {member_axis!r}")
    members = np.moveaxis(members, member_axis, 0)
    num_members = members.shape[0]
    if num_members < 2:
        raise ValueError(f"the ensemble needs at least 2 members for an unbiased variance, got {num_members}")
    if members.shape[1:] != truth.shape:
        raise ValueError(f"truth must have the members' shape without the member axis {members.shape[1:]}, "
                         f"got {truth.shape}")
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        ensemble_mean = members.mean(axis=0)
        variance = members.var(axis=0, ddof=1)
        spread = np.sqrt((num_members + 1) / num_members * variance.mean(axis=FIELD_AXES))
        skill = np.sqrt(np.mean(np.square(ensemble_mean - truth), axis=FIELD_AXES))
        ratio = spread / skill
    return SpreadSkill(spread=spread, skill=skill, ratio=ratio)
