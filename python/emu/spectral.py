"""Spectral operators as small pure functions of numpy arrays (and, where noted, any backend).

Conventions: rfft2 layout `(..., ny, nx//2 + 1)`, angular wavenumbers, numpy's unnormalised forward
transform (a field's mean is `field_hat[..., 0, 0] / n**2`).
"""

from __future__ import annotations

import numpy as np

from emu.grid import angular_wavenumbers, rfft_weights  # noqa: F401  (rfft_weights is part of this API)


def exponential_filter(num_points: int, filter_factor: float = 23.6, cutoff: float = 0.65 * np.pi) -> np.ndarray:
    """pyqg's exponential spectral filter, rfft2 layout, shape (n, n//2 + 1).

    sigma(k) = exp(-filter_factor * (|k| dx - cutoff)^4) for |k| dx > cutoff, else 1, where |k| dx is
    the wavenumber magnitude in grid units (Arbic & Flierl 2003; pyqg `Model._initialize_filter`).
    """
    kx, ky = angular_wavenumbers(num_points, 2.0 * np.pi)  # dx = 2*pi/n  =>  k*dx = index * 2*pi/n
    dx = 2.0 * np.pi / num_points
    scaled = np.sqrt((kx * dx) ** 2 + (ky * dx) ** 2)
    sigma = np.exp(-filter_factor * (scaled - cutoff) ** 4)
    sigma[scaled <= cutoff] = 1.0
    return sigma


def isotropic_spectrum(energy_density_hat: np.ndarray, num_points: int, domain_extent: float,
                       shell_width: float = 1.0):
    """Sums a half-spectrum energy density over isotropic shells.

    Args:
        energy_density_hat: (..., n, n//2+1) nonnegative, e.g. |u_hat|^2 + |v_hat|^2 scaled so that
            its rfft-weighted sum is the domain-mean energy.
        num_points, domain_extent: the grid.
        shell_width: width w of the shells in wavenumber index: shell m holds |index| in
            [(m - 1/2) w, (m + 1/2) w). 1 (default) gives integer shells; sqrt(2) the bins of the
            Thermalizer reference code (fewer, wider shells: smoother spectra at the grid scale).

    Returns:
        (k, spectrum): k = shell centres in angular wavenumber (1..M) * w * 2*pi/L with
        M = floor(n/2 / w), spectrum summed over the shells; shape (..., M). Cells beyond the last
        shell (the corners past n/2) are dropped, so spectrum.sum() <= total energy.
    """
    if not shell_width >= 1.0:
        raise ValueError(f"shell_width must be >= 1 (wavenumber index units), got {shell_width!r}")
    index_x = np.fft.rfftfreq(num_points, d=1.0 / num_points)[np.newaxis, :]
    index_y = np.fft.fftfreq(num_points, d=1.0 / num_points)[:, np.newaxis]
    # floor(r / w + 1/2); for w = 1 this is rint(r) (an integer |index|^2 is never (m + 1/2)^2, so no ties)
    shell = np.floor(np.sqrt(index_x**2 + index_y**2) / shell_width + 0.5).astype(np.int64)
    weighted = energy_density_hat * rfft_weights(num_points)
    n_shells = int(np.floor(num_points // 2 / shell_width + 1e-9))
    # One-hot shell membership (cells beyond the last shell are dropped).
    membership = (shell.ravel()[:, np.newaxis] == np.arange(n_shells + 1)[np.newaxis, :]).astype(np.float64)
    flat = weighted.reshape(weighted.shape[:-2] + (-1,))
    spectrum = flat @ membership
    k = np.arange(1, n_shells + 1) * shell_width * 2.0 * np.pi / domain_extent
    return k, spectrum[..., 1:]


def spectral_truncate(field_hat: np.ndarray, num_points_out: int) -> np.ndarray:
    """Keeps the modes a coarser grid can represent and rescales for the new grid size.

    Input (..., n, n//2+1) from an n-point grid, output (..., m, m//2+1) for m = num_points_out < n,
    scaled by (m/n)^2 so that the inverse transform on the m grid gives the same physical amplitudes.
    The coarse Nyquist row and column are set to zero (they cannot hold a real, symmetric mode).
    """
    n = field_hat.shape[-2]
    m = int(num_points_out)
    if m > n:
        raise ValueError(f"downsample: target grid {m} is larger than the source grid {n}")
    if m == n:
        return field_hat
    half = m // 2
    out = np.zeros(field_hat.shape[:-2] + (m, half + 1), dtype=field_hat.dtype)
    out[..., :half, :half] = field_hat[..., :half, :half]
    out[..., m - half + 1 :, :half] = field_hat[..., n - half + 1 :, :half]
    return out * (m / n) ** 2


def downsample(field: np.ndarray, num_points_out: int) -> np.ndarray:
    """Spectral downsampling of physical fields (..., n, n) -> (..., m, m) (see `spectral_truncate`)."""
    if field.shape[-1] == num_points_out:
        return field
    coarse_hat = spectral_truncate(np.fft.rfft2(field), num_points_out)
    return np.fft.irfft2(coarse_hat, s=(num_points_out, num_points_out)).astype(field.dtype, copy=False)
