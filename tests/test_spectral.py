"""Spectral helpers: truncation/downsampling, isotropic spectra, pyqg's filter, the 2/3 mask, the grid."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emu.grid import Grid, angular_wavenumbers, two_thirds_mask
from emu.spectral import downsample, exponential_filter, isotropic_spectrum, rfft_weights, spectral_truncate
from emu.systems import make_config, make_equation

LOW_MODES = [(1.0, 0, 1, 0.2), (0.5, 3, -2, 1.0), (-0.8, 7, 5, -0.3), (0.3, -7, 7, 0.7), (0.6, 4, 0, 2.1)]


def analytic_field(num_points, modes=LOW_MODES, domain_extent=2 * math.pi):
    """sum a cos(k . x + phase) on the n-point grid x_j = j L/n (modes given by integer indices)."""
    coordinates = np.arange(num_points) * domain_extent / num_points
    x, y = coordinates[np.newaxis, :], coordinates[:, np.newaxis]
    fundamental = 2 * math.pi / domain_extent
    return sum(a * np.cos(fundamental * (mx * x + my * y) + phase) for a, mx, my, phase in modes)


# -- truncation and downsampling -------------------------------------------------------------------
@pytest.mark.parametrize("coarse", [16, 32])
def test_downsample_of_a_low_mode_field_is_exact(helpers, coarse):
    """Modes with |index| <= 7 < coarse/2 survive truncation unchanged: downsampling the 64^2 field
    equals the analytic field evaluated on the coarse grid (the same points x_j = j L/m)."""
    fine = analytic_field(64)[np.newaxis]
    assert helpers.relative_max_error(downsample(fine, coarse)[0], analytic_field(coarse)) < 1e-13
    coarse_hat = spectral_truncate(np.fft.rfft2(fine), coarse)
    assert coarse_hat.shape == (1, coarse, coarse // 2 + 1)
    assert helpers.relative_max_error(coarse_hat[0], np.fft.rfft2(analytic_field(coarse))) < 1e-13


def test_truncation_removes_the_unrepresentable_modes():
    """A mode above the coarse Nyquist (index 9 on a 16 grid) and the coarse Nyquist itself (index 8)
    are removed; the truncated field keeps only the representable part."""
    fine = analytic_field(64, [(1.0, 2, 1, 0.0), (1.0, 9, 0, 0.0), (1.0, 0, 8, 0.0), (1.0, 3, -10, 0.5)])
    expected = analytic_field(16, [(1.0, 2, 1, 0.0)])
    assert np.abs(downsample(fine[np.newaxis], 16)[0] - expected).max() < 1e-13
    assert np.array_equal(downsample(fine[np.newaxis], 64)[0], fine)  # same size: unchanged
    with pytest.raises(ValueError):
        spectral_truncate(np.fft.rfft2(fine), 128)


def test_downsample_keeps_dtype_and_batch_axes():
    field = np.stack([analytic_field(32), 2 * analytic_field(32)]).astype(np.float32)[:, np.newaxis]
    coarse = downsample(field, 16)
    assert coarse.shape == (2, 1, 16, 16) and coarse.dtype == np.float32
    assert np.abs(coarse[1, 0] - 2 * coarse[0, 0]).max() < 1e-5


# -- spectra ---------------------------------------------------------------------------------------
def test_rfft_weights_give_parseval():
    field = np.random.default_rng(1).standard_normal((32, 32))
    half = np.abs(np.fft.rfft2(field)) ** 2
    assert np.sum(half * rfft_weights(32)) / 32**4 == pytest.approx(np.mean(field**2), rel=1e-13)


def test_isotropic_spectrum_sums_to_the_energy(numpy64, helpers):
    """For a band-limited field (all modes inside the inscribed circle |index| < n/2 - 1/2) the KE
    spectrum summed over shells equals the energy 1/2 <|u|^2> computed in physical space."""
    config = make_config("kolmogorov", "re1000", grid_size=32)
    equation = make_equation(config, numpy64)
    omega = 3.0 * helpers.band_limited_field((2,), 32, 15, seed=3)
    omega_hat = equation.to_state(omega)
    k, spectrum = equation.kinetic_energy_spectrum(omega_hat)
    u_hat, v_hat = equation.velocity_hat(omega_hat)
    u = numpy64.to_numpy(equation.grid.to_physical(u_hat))
    v = numpy64.to_numpy(equation.grid.to_physical(v_hat))
    energy = 0.5 * np.mean(u**2 + v**2, axis=(-2, -1))
    assert spectrum.shape == (2, 16) and np.allclose(k, np.arange(1, 17))
    assert np.allclose(spectrum.sum(axis=-1), energy, rtol=1e-12, atol=0)
    assert np.allclose(equation.energy(omega_hat), energy, rtol=1e-12, atol=0)
    assert np.allclose(equation.enstrophy(omega_hat), 0.5 * np.mean(omega**2, axis=(-2, -1)), rtol=1e-12, atol=0)


def test_isotropic_spectrum_puts_a_mode_in_its_shell():
    """A single mode with index (3, 4) has |index| = 5: all its energy lands in shell 5 (k = 5 * 2 pi/L)."""
    n, length = 32, 10.0
    field = analytic_field(n, [(1.0, 3, 4, 0.0)], domain_extent=length)
    density = np.abs(np.fft.rfft2(field)) ** 2 / n**4
    k, spectrum = isotropic_spectrum(density, n, length)
    assert np.allclose(k, np.arange(1, n // 2 + 1) * 2 * math.pi / length)
    assert spectrum[4] == pytest.approx(np.mean(field**2), rel=1e-13)
    assert np.abs(np.delete(spectrum, 4)).max() < 1e-14


def test_qg_spectrum_sums_to_the_thickness_weighted_energy(numpy64, helpers):
    config = make_config("qg", "eddy", grid_size=32)
    equation = make_equation(config, numpy64)
    q_hat = equation.to_state(1e-6 * helpers.band_limited_field((2, 2), 32, 15, seed=8))
    _, spectrum = equation.kinetic_energy_spectrum(q_hat)
    assert np.allclose(spectrum.sum(axis=-1), equation.energy(q_hat), rtol=1e-12, atol=0)


# -- filters and masks -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [16, 64, 256])
def test_exponential_filter_is_pyqgs(n):
    """sigma = 1 for |k| dx <= 0.65 pi, exp(-23.6 (|k| dx - 0.65 pi)^4) above (pyqg's default)."""
    sigma = exponential_filter(n)
    index_x = np.fft.rfftfreq(n, d=1.0 / n)[np.newaxis, :]
    index_y = np.fft.fftfreq(n, d=1.0 / n)[:, np.newaxis]
    scaled = np.sqrt(index_x**2 + index_y**2) * 2 * math.pi / n  # |k| dx
    assert sigma.shape == (n, n // 2 + 1)
    assert np.all(sigma[scaled <= 0.65 * math.pi] == 1.0)
    above = scaled > 0.65 * math.pi
    assert np.all(sigma[above] < 1.0)
    assert np.allclose(sigma[above], np.exp(-23.6 * (scaled[above] - 0.65 * math.pi) ** 4), rtol=1e-12, atol=1e-100)
    corner = np.exp(-23.6 * (math.sqrt(2) * math.pi - 0.65 * math.pi) ** 4)
    assert sigma[n // 2, n // 2] == pytest.approx(corner, rel=1e-12)


@pytest.mark.parametrize("n", [8, 16, 24, 32, 48, 64, 96, 128])
def test_two_thirds_mask_keeps_indices_below_n_over_3(n):
    mask = two_thirds_mask(n)
    index_x = np.fft.rfftfreq(n, d=1.0 / n)[np.newaxis, :] * np.ones((n, 1))
    index_y = np.fft.fftfreq(n, d=1.0 / n)[:, np.newaxis] * np.ones((1, n // 2 + 1))
    expected = (np.abs(index_x) < n / 3) & (np.abs(index_y) < n / 3)
    assert mask.shape == (n, n // 2 + 1)
    assert np.array_equal(mask.astype(bool), expected)
    assert set(np.unique(mask)) <= {0.0, 1.0}


def test_two_thirds_mask_removes_every_alias_of_a_product():
    """Two fields inside the mask: their physical-space product, masked, equals the exact product's
    masked modes (computed on a grid twice as fine, where nothing aliases)."""
    n = 48
    rng = np.random.default_rng(4)
    mask = two_thirds_mask(n).astype(bool)

    def random_in_mask():
        return np.fft.irfft2((rng.standard_normal((n, n // 2 + 1)) + 1j * rng.standard_normal((n, n // 2 + 1))) * mask,
                             s=(n, n))

    a, b = random_in_mask(), random_in_mask()
    product_hat = np.fft.rfft2(a * b) * mask
    # Exact product: zero-pad to 2n, multiply, truncate back.
    fine_a = np.fft.irfft2(_pad(np.fft.rfft2(a), 2 * n), s=(2 * n, 2 * n))
    fine_b = np.fft.irfft2(_pad(np.fft.rfft2(b), 2 * n), s=(2 * n, 2 * n))
    exact_hat = spectral_truncate(np.fft.rfft2(fine_a * fine_b), n) * mask
    assert np.abs(product_hat - exact_hat).max() < 1e-12 * np.abs(exact_hat).max()


def _pad(field_hat, m):
    """Zero-pads an rfft2 spectrum from n to m points (inverse of spectral_truncate), scaled by (m/n)^2."""
    n = field_hat.shape[-2]
    half = n // 2
    out = np.zeros((m, m // 2 + 1), dtype=complex)
    out[:half, :half] = field_hat[:half, :half]
    out[m - half + 1 :, :half] = field_hat[n - half + 1 :, :half]
    return out * (m / n) ** 2


# -- the grid --------------------------------------------------------------------------------------
def test_grid_wavenumbers_and_coordinates(numpy64, helpers):
    length = 1.0e6
    grid = Grid(16, length, numpy64)
    kx, ky = angular_wavenumbers(16, length)
    assert grid.spacing == length / 16
    assert np.allclose(grid.x, np.arange(16) * length / 16) and np.array_equal(grid.x, grid.y)
    assert np.allclose(kx[0], 2 * math.pi / length * np.arange(9))
    assert np.allclose(ky[:, 0], 2 * math.pi / length * np.fft.fftfreq(16, d=1 / 16))
    k2 = grid.wavenumber_squared_numpy
    inverse = numpy64.to_numpy(grid.inverse_wavenumber_squared)
    assert inverse[0, 0] == 0.0
    assert np.allclose(inverse[k2 > 0] * k2[k2 > 0], 1.0, rtol=1e-15)
    # spectral derivative of sin(3 * 2 pi x / L) is 3 * 2 pi / L cos(...)
    field = np.sin(3 * 2 * math.pi * grid.x / length)[np.newaxis, :] * np.ones((16, 1))
    derivative = numpy64.to_numpy(grid.to_physical(grid.ikx * grid.to_spectral(numpy64.asarray(field))))
    expected = 3 * 2 * math.pi / length * np.cos(3 * 2 * math.pi * grid.x / length) * np.ones((16, 1))
    assert helpers.relative_max_error(derivative, expected) < 1e-13
