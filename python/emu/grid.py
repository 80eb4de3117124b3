"""The doubly periodic grid, built once and shared by an equation and its diagnostics.

Layout convention (everywhere in emu): physical arrays are `(..., ny, nx)` with x the last,
fastest axis; spectral arrays are their `rfft2` over the last two axes, `(..., ny, nx//2 + 1)`.
Grid points sit at x_j = j * dx, j = 0..n-1 (jax-cfd's `offsets=(0, 0)` convention). Wavenumbers are
angular (radians per unit length): k = 2*pi/L * index.
"""

from __future__ import annotations

import numpy as np

from emu.backends import ArrayBackend


def angular_wavenumbers(num_points: int, domain_extent: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns (kx, ky) as numpy arrays shaped (1, n//2 + 1) and (n, 1) for an rfft2 layout."""
    fundamental = 2.0 * np.pi / domain_extent
    kx = fundamental * np.fft.rfftfreq(num_points, d=1.0 / num_points)
    ky = fundamental * np.fft.fftfreq(num_points, d=1.0 / num_points)
    return kx[np.newaxis, :], ky[:, np.newaxis]


def rfft_weights(num_points: int) -> np.ndarray:
    """Multiplicity of each rfft2 column in the full spectrum: 1 for kx = 0 and Nyquist, else 2.

    Sums over the half spectrum weighted this way equal sums over the full spectrum (Parseval).
    """
    weights = np.full(num_points // 2 + 1, 2.0)
    weights[0] = 1.0
    if num_points % 2 == 0:
        weights[-1] = 1.0
    return weights


def two_thirds_mask(num_points: int) -> np.ndarray:
    """Orszag's 2/3 rule as a 0/1 mask in rfft2 layout: keeps modes with |index| < n/3 on both axes.

    A quadratic product of two fields whose modes all satisfy |index| < n/3 aliases only onto modes
    that this mask removes, so the kept modes of the product are exact. That is what makes the
    truncated (Galerkin) nonlinear terms conserve energy and enstrophy to round-off.
    """
    keep = int(np.ceil(num_points / 3.0)) - 1  # largest index strictly below n/3
    index_x = np.abs(np.fft.rfftfreq(num_points, d=1.0 / num_points))[np.newaxis, :]
    index_y = np.abs(np.fft.fftfreq(num_points, d=1.0 / num_points))[:, np.newaxis]
    return ((index_x <= keep) & (index_y <= keep)).astype(np.float64)


def jax_cfd_mask(num_points: int) -> np.ndarray:
    """jax-cfd's `brick_wall_filter_2d` as it acts on a real field, in emu's rfft2 layout.

    jax-cfd stores fields as [x, y] with y the halved axis and keeps full-axis indices
    [-(2n/3)//2, (2n/3)//2 - 1] and half-axis indices [0, 2(n/2+1)/3). Seen from emu's (y, x-half)
    layout that drops the x index n/3 (21 at n = 64) for y index > 0 and, through the Hermitian part
    the inverse transform keeps, halves it at y index 0. Not a projection (so the truncated dynamics
    conserve energy only approximately); offered to reproduce jax-cfd to round-off.
    """
    n = num_points
    stored = np.zeros((n, n // 2 + 1))  # [x, y-half], as jax-cfd builds it
    stored[: int(2 / 3 * n) // 2, : int(2 / 3 * (n // 2 + 1))] = 1
    stored[-int(2 / 3 * n) // 2 :, : int(2 / 3 * (n // 2 + 1))] = 1
    full = np.zeros((n, n))  # [x, y] over the whole plane
    full[:, : n // 2 + 1] = stored
    index = np.arange(n)
    for y in range(1, n // 2):  # y < 0 is stored as the conjugate (-x, -y)
        full[(-index) % n, n - y] = stored[index, y]
    for y in (0, n // 2):  # self-conjugate columns: the inverse keeps the Hermitian part
        full[:, y] = 0.5 * (stored[:, y] + stored[(-index) % n, y])
    return np.ascontiguousarray(full.T[:, : n // 2 + 1])


def jax_cfd_wavenumbers(num_points: int, domain_extent: float) -> tuple[np.ndarray, np.ndarray]:
    """jax-cfd's derivative wavenumbers as they act on a real field, in emu's rfft2 layout.

    Returns (kx, ky) shaped (n, n//2+1) and (n, 1): i kx f_hat is d/dx and i ky f_hat is d/dy of the
    real field f as jax-cfd computes them. They equal `angular_wavenumbers` except at the Nyquist
    index n/2, where the derivative is a convention, not a fact (the grid points cannot tell the
    wave exp(i n/2 x) from exp(-i n/2 x), whose derivatives have opposite signs):

      - an rfft's halved axis takes rfftfreq's +n/2, and the inverse transform keeps only the
        Hermitian part of that self-conjugate column, so i (n/2) f_hat there is dropped: the
        derivative along the halved axis has no Nyquist part;
      - the full axis takes fftfreq's -n/2, kept, except where it meets the halved axis' index 0 or
        n/2 (self-conjugate points: dropped too).

    emu halves x, so its own convention (`angular_wavenumbers`) drops d/dx at x index n/2 and keeps
    d/dy at y index n/2 with ky = -n/2. jax-cfd stores [x, y] and halves y: it drops d/dy at y index
    n/2 and keeps d/dx at x index n/2 with kx = -n/2 on its stored half ky > 0, hence, through
    the conjugates of that half, kx = +n/2 where ky < 0. In emu's (y, x-half) layout that is:

      kx[r, n/2] = -(n/2) sign(ky[r]) (2 pi / L), 0 in the rows r = 0 and r = n/2;
      ky[n/2] = 0;

    every other entry being the grid's. (`KolmogorovEquation` with dealias="jax-cfd" builds its
    derivative_x = i kx, derivative_y = i ky, to_u = i ky/|k|^2, to_v = -i kx/|k|^2 from these.)
    """
    n = num_points
    nyquist = n // 2
    fundamental = 2.0 * np.pi / domain_extent
    kx, ky = angular_wavenumbers(n, domain_extent)
    kx = np.repeat(kx, n, axis=0)  # (n, n//2+1): the Nyquist column depends on the row
    ky = ky.copy()
    index_y = np.fft.fftfreq(n, d=1.0 / n)
    kx[:, nyquist] = -nyquist * fundamental * np.sign(index_y)
    kx[[0, nyquist], nyquist] = 0.0  # the self-conjugate points (the inverse transform drops them anyway)
    ky[nyquist, 0] = 0.0
    return kx, ky


class Grid:
    """A square doubly periodic grid with its wavenumber arrays on one array backend.

    Args:
        num_points: grid points per side (a power of two, at least 8).
        domain_extent: side length L of the square domain (in the system's length unit).
        backend: the array backend the arrays live on.

    Attributes:
        spacing: dx = L / n.
        kx, ky: angular wavenumbers, broadcastable shapes (1, n//2+1) and (n, 1).
        wavenumber_squared: kx^2 + ky^2, shape (n, n//2+1).
        inverse_wavenumber_squared: 1 / (kx^2 + ky^2), with 0 for the mean mode.
        dealias: the 2/3-rule mask (`two_thirds_mask`).
        x, y: numpy coordinate vectors of the grid points.
    """

    def __init__(self, num_points: int, domain_extent: float, backend: ArrayBackend):
        self.num_points = int(num_points)
        self.domain_extent = float(domain_extent)
        self.backend = backend
        self.spacing = self.domain_extent / self.num_points
        self.shape = (self.num_points, self.num_points)
        self.spectral_shape = (self.num_points, self.num_points // 2 + 1)
        kx, ky = angular_wavenumbers(self.num_points, self.domain_extent)
        k2 = kx**2 + ky**2
        inverse_k2 = np.zeros_like(k2)
        inverse_k2[k2 > 0] = 1.0 / k2[k2 > 0]
        self.kx_numpy, self.ky_numpy = kx, ky
        self.wavenumber_squared_numpy = k2
        self.kx = backend.asarray(kx)
        self.ky = backend.asarray(ky)
        self.ikx = backend.asarray(1j * kx)
        self.iky = backend.asarray(1j * ky)
        self.wavenumber_squared = backend.asarray(k2)
        self.inverse_wavenumber_squared = backend.asarray(inverse_k2)
        self.dealias = backend.asarray(two_thirds_mask(self.num_points))
        self.rfft_weights = backend.asarray(rfft_weights(self.num_points))
        self.x = np.arange(self.num_points) * self.spacing
        self.y = np.arange(self.num_points) * self.spacing

    def mean_from_spectrum(self, density_hat) -> np.ndarray:
        """Domain mean of a quadratic quantity from its half-spectrum density |f_hat|^2 (Parseval):
        <f^2> = sum over the full spectrum of |f_hat|^2 / n^4. Sums the last two axes; numpy result."""
        total = self.backend.xp.sum(density_hat * self.rfft_weights, axis=(-2, -1))
        return self.backend.to_numpy(total) / self.num_points**4

    def to_spectral(self, field):
        """rfft2 over the last two axes."""
        return self.backend.rfft2(field)

    def to_physical(self, field_hat):
        """irfft2 over the last two axes, back to (..., n, n)."""
        return self.backend.irfft2(field_hat, self.shape)
