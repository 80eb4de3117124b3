"""Kolmogorov flow: 2D forced incompressible Navier-Stokes in vorticity form.

    d(omega)/dt + u . grad(omega) = nu lap(omega) - alpha omega + F(y),
    lap(psi) = -omega,   u = d(psi)/dy,   v = -d(psi)/dx,   omega = dv/dx - du/dy,
    F(y) = -k_f A cos(k_f y)   (the curl of the velocity forcing (A sin(k_f y), 0)),

on the doubly periodic square [0, L)^2 (L = 2 pi), density 1, nondimensional units. This is
jax-cfd's `spectral.equations.ForcedNavierStokes2D` (Kochkov et al. 2021, PNAS 118, e2101784118;
Boffetta & Ecke 2012): forcing wavenumber 4, drag 0.1, nu = 1/Re, the advection term filtered by
the 2/3 rule, the forcing sampled on the grid points y_j = j dy and curled spectrally.

Split for an implicit-explicit stepper: `linear_operator` L = -nu |k|^2 - alpha (diagonal, treated
implicitly) and `explicit_terms` N(omega) = -(u . grad omega) filtered + F.

Good values: Re = 1000 (nu = 1e-3) resolves at 128^2-256^2; Re = 10,000 (nu = 1e-4, the Thermalizer
and SNS data) needs 512^2 with dt = 1e-3 (CFL ~ 0.57 at max velocity 7), then spectral truncation
to 64^2. Spin-up to statistical stationarity takes about 10 time units (the drag time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from emu.backends import ArrayBackend
from emu.grid import Grid, jax_cfd_mask, jax_cfd_wavenumbers, two_thirds_mask
from emu.spectral import isotropic_spectrum
from emu.systems.base import (
    SystemConfig,
    require,
    require_choice,
    require_nonnegative,
    require_positive,
    require_power_of_two,
)

KOLMOGOROV_PRESETS = {
    # Kochkov et al. (2021): Re = 1000.
    "re1000": {"viscosity": 1e-3},
    # The Thermalizer repository's data config.
    "re5000": {"viscosity": 2e-4},
    # What the Thermalizer and SNS runs read (their text says nu = 1e-3; their data folder says Re 10^4).
    "re10000": {"viscosity": 1e-4},
}


@dataclass(frozen=True)
class KolmogorovConfig(SystemConfig):
    """Parameters of Kolmogorov flow (nondimensional: length 1 = L/(2 pi), velocity ~ forcing).

    Attributes:
        grid_size: grid points per side (power of two).
        viscosity: kinematic viscosity nu = 1/Re (>= 0; 0 gives the Euler equations).
        drag: linear drag coefficient alpha (>= 0).
        forcing_wavenumber: k_f of the forcing (integer >= 0; 0 switches forcing off).
        forcing_amplitude: A of the velocity forcing A sin(k_f y).
        domain_extent: side length L of the square (default 2 pi).
        dt: time step; None picks dt = cfl_safety * dx / max_velocity.
        max_velocity: maximum speed of the random initial condition, also used for the default dt.
        peak_wavenumber: wavenumber where the initial condition's energy spectrum peaks.
        cfl_safety: target Courant number for the default dt.
        max_cfl: the run stops with a blow-up error when max|u| dt/dx exceeds this.
        dealias: the mask on the advection term and the derivative convention at the Nyquist index.
            "two_thirds": Orszag's rule, symmetric (the truncated nonlinear term conserves energy
            and enstrophy exactly), and emu's own Nyquist convention. "jax-cfd": jax-cfd's
            `brick_wall_filter_2d` as it acts (differs at index n/3, `emu.grid.jax_cfd_mask`) and
            jax-cfd's Nyquist convention (`emu.grid.jax_cfd_wavenumbers`); reproduces jax-cfd to
            round-off from any state, where "two_thirds" agrees to ~2e-3 after one step at 64^2.
            The convention, in emu's (y, x-half) rfft2 layout with h = n/2: emu's own drops d/dx in
            the x index h column (rfftfreq's +h on the halved axis, which the inverse transform's
            Hermitian part removes) and keeps d/dy in the y index h row with ky = -h (fftfreq);
            jax-cfd's (its arrays [x, y], y halved) is the opposite: d/dy dropped in row h, d/dx
            kept in column h with kx = -h sign(ky) (0 at ky = 0 and ky = -h); u = d(psi)/dy and
            v = -d(psi)/dx follow. It lives in the equation's tables derivative_x, derivative_y,
            to_u, to_v. Measured (float64, vs jax-cfd 0.2.1): from a 64^2 state with Nyquist
            content 5e-16, 2e-15, 7e-14 after 1, 10, 100 steps (1.5e-4, 1.0e-3, 7.8e-3 with emu's
            convention and jax-cfd's mask); from the float32-rounded initial state at 128^2, 1e-11
            after 1000 steps (3.7e-9). A state without Nyquist content does not see the
            convention (tests/test_jaxcfd_agreement.py).
        preset: the preset these values started from (informational).
    """

    grid_size: int = 128
    viscosity: float = 1e-3
    drag: float = 0.1
    forcing_wavenumber: int = 4
    forcing_amplitude: float = 1.0
    domain_extent: float = 2.0 * math.pi
    dt: float | None = None
    max_velocity: float = 7.0
    peak_wavenumber: float = 4.0
    cfl_safety: float = 0.5
    max_cfl: float = 1.0
    dealias: str = "two_thirds"
    preset: str = "re1000"

    system: ClassVar[str] = "kolmogorov"
    presets: ClassVar[dict] = KOLMOGOROV_PRESETS
    default_preset: ClassVar[str] = "re1000"

    def __post_init__(self):
        require_power_of_two("grid_size", self.grid_size)
        require_nonnegative("viscosity", self.viscosity)
        require_nonnegative("drag", self.drag)
        require(isinstance(self.forcing_wavenumber, int) and self.forcing_wavenumber >= 0
                and self.forcing_wavenumber < self.grid_size // 3,
                "forcing_wavenumber", f"an integer in [0, grid_size/3) = [0, {self.grid_size // 3})",
                self.forcing_wavenumber)
        require_nonnegative("forcing_amplitude", self.forcing_amplitude)
        require_positive("domain_extent", self.domain_extent)
        require_positive("max_velocity", self.max_velocity)
        require_positive("peak_wavenumber", self.peak_wavenumber)
        require(0 < self.cfl_safety <= 1.0, "cfl_safety", "in (0, 1]", self.cfl_safety)
        require_positive("max_cfl", self.max_cfl)
        require_choice("dealias", self.dealias, ("two_thirds", "jax-cfd"))
        if self.dt is None:
            spacing = self.domain_extent / self.grid_size
            object.__setattr__(self, "dt", self.cfl_safety * spacing / self.max_velocity)
        require_positive("dt", self.dt)

    @property
    def spacing(self) -> float:
        return self.domain_extent / self.grid_size


class KolmogorovEquation:
    """The vorticity equation on a `Grid`, split as d(omega_hat)/dt = L omega_hat + N(omega_hat).

    State: omega_hat, shape (batch, n, n//2+1), complex, on the grid's backend.

    Constant tables on the backend, broadcastable to (n, n//2+1), read by the array code below and
    by fused kernels that take their factors from the equation:
        derivative_x, derivative_y: omega_hat -> the hats of d(omega)/dx, d(omega)/dy (i kx, i ky);
        to_u, to_v: omega_hat -> u_hat, v_hat (i ky / |k|^2, -i kx / |k|^2; `_to_u`, `_to_v` are
            the same arrays under their former names);
        dealias: the advection mask; forcing_hat: F_hat (None without forcing); linear_operator: L.
    The first four carry the Nyquist convention of the config's `dealias` mode: emu's own
    (derivative_x, derivative_y are then `grid.ikx`, `grid.iky` themselves) or jax-cfd's
    (`emu.grid.jax_cfd_wavenumbers`; derivative_x a full (n, n//2+1) table).
    fused: fused operators when the backend has them, else None; never the CUDA ones in jax-cfd
    mode, whose kernels compute emu's own wavenumbers in-kernel.
    """

    field_names = ("vorticity",)
    field_units = ("1/time",)
    default_stepper = "cn_rk4"

    def __init__(self, config: KolmogorovConfig, backend: ArrayBackend):
        self.config = config
        self.backend = backend
        self.grid = Grid(config.grid_size, config.domain_extent, backend)
        k2 = self.grid.wavenumber_squared_numpy
        self.linear_operator = backend.asarray(-config.viscosity * k2 - config.drag)
        # Products of constant factors, precomputed so each stage multiplies once per field. Every
        # spectral derivative (here and in fused kernels) goes through these four tables, so they
        # carry the Nyquist convention of the dealias mode (class docstring, KolmogorovConfig.dealias).
        if config.dealias == "jax-cfd":
            kx, ky = jax_cfd_wavenumbers(config.grid_size, config.domain_extent)
            self.derivative_x = backend.asarray(1j * kx)
            self.derivative_y = backend.asarray(1j * ky)
        else:
            kx, ky = self.grid.kx_numpy, self.grid.ky_numpy
            self.derivative_x, self.derivative_y = self.grid.ikx, self.grid.iky
        inverse_k2 = np.where(k2 > 0, 1.0 / np.where(k2 > 0, k2, 1.0), 0.0)
        self.to_u = backend.asarray(1j * ky * inverse_k2)
        self.to_v = backend.asarray(-1j * kx * inverse_k2)
        self._to_u, self._to_v = self.to_u, self.to_v  # the older private names, kept as aliases
        # Forcing: the velocity forcing (A sin(k_f y), 0) on the grid points, curled spectrally:
        # F_hat = i kx fy_hat - i ky fx_hat = -i ky fx_hat.
        y = self.grid.y[:, np.newaxis] * np.ones((1, config.grid_size))
        fx_hat = np.fft.rfft2(config.forcing_amplitude * np.sin(config.forcing_wavenumber * y))
        self.forcing_hat = backend.asarray(-1j * ky * fx_hat) if config.forcing_wavenumber else None
        # The advection's mask, and the mask with the advection's minus sign.
        mask = two_thirds_mask if config.dealias == "two_thirds" else jax_cfd_mask
        self.dealias = backend.asarray(mask(config.grid_size))
        self._negative_dealias = -self.dealias
        # Fused CUDA kernels for explicit_terms and the CN-RK4 stages when the backend has them (cupy);
        # None elsewhere, and the array expressions below run. The CUDA kernels compute emu's own
        # wavenumbers in-kernel and know nothing of jax-cfd's Nyquist convention, so in jax-cfd mode
        # on cupy the generic array path (on the GPU all the same) runs instead.
        if config.dealias == "jax-cfd" and backend.name == "cupy":
            self.fused = None
        else:
            self.fused = backend.fused_operators(self)

    # -- the equation -------------------------------------------------------------------------
    def velocity_hat(self, omega_hat):
        """(u_hat, v_hat) = (i ky, -i kx) psi_hat with psi_hat = omega_hat / |k|^2 (i kx, i ky: the
        `derivative_x`, `derivative_y` tables, which carry the Nyquist convention)."""
        psi_hat = omega_hat * self.grid.inverse_wavenumber_squared
        return self.derivative_y * psi_hat, -self.derivative_x * psi_hat

    def advection_hat(self, omega_hat):
        """-(u . grad omega), its rfft2 filtered by the 2/3 rule (the `dealias` mask)."""
        grid, native = self.grid, self.backend.native
        # The four inverse transforms in one batched call, their inputs written straight into one
        # buffer (no stacking copies): u, v, d(omega)/dx, d(omega)/dy.
        spectral = self.backend.empty((4,) + tuple(omega_hat.shape), complex_valued=True)
        native.multiply(self.to_u, omega_hat, out=spectral[0])
        native.multiply(self.to_v, omega_hat, out=spectral[1])
        native.multiply(self.derivative_x, omega_hat, out=spectral[2])
        native.multiply(self.derivative_y, omega_hat, out=spectral[3])
        u, v, omega_x, omega_y = grid.to_physical(spectral)
        u *= omega_x
        v *= omega_y
        u += v
        return grid.to_spectral(u) * self._negative_dealias

    def explicit_terms(self, omega_hat):
        """N(omega_hat): filtered advection plus forcing (jax-cfd's `explicit_terms`)."""
        if self.fused is not None:
            return self.fused.explicit_terms(omega_hat)
        terms = self.advection_hat(omega_hat)
        if self.forcing_hat is not None:
            terms = terms + self.forcing_hat
        return terms

    # -- state conversion ---------------------------------------------------------------------
    def to_state(self, vorticity: np.ndarray):
        """Physical vorticity (batch, n, n) numpy -> omega_hat on the backend."""
        vorticity = np.asarray(vorticity)
        require(vorticity.ndim == 3 and vorticity.shape[1:] == self.grid.shape, "vorticity",
                f"an array of shape (batch, {self.grid.num_points}, {self.grid.num_points})", vorticity.shape)
        return self.grid.to_spectral(self.backend.asarray(vorticity))

    def fields(self, omega_hat):
        """Physical vorticity (batch, n, n) on the backend."""
        return self.grid.to_physical(omega_hat)

    def initial_condition(self, batch: int, seed: int) -> np.ndarray:
        """Random band-limited vorticity, (batch, n, n) float64, reproducible from `seed`.

        As jax-cfd's `filtered_velocity_field`: white noise filtered in spectral space by the amplitude
        p(k) = exp(-(ln k - ln k_p - s^2)^2 / (2 s^2)) / k (log-normal, s^2 = 0.25, peaked near k_p),
        here applied to the streamfunction as |psi_hat| ~ p(k)/k so that |u_hat| ~ p(k) and the field
        is divergence-free by construction; restricted to the 2/3-rule modes. Each sample's velocity
        is scaled so that max |u| = max_velocity.
        """
        require(isinstance(batch, int) and batch >= 1, "batch", "an integer >= 1", batch)
        n = self.grid.num_points
        rng = np.random.default_rng(seed)
        k2 = self.grid.wavenumber_squared_numpy
        k = np.sqrt(k2)
        safe_k = np.where(k > 0, k, 1.0)
        variance = 0.25
        log_normal = np.exp(-((np.log(safe_k) - np.log(self.config.peak_wavenumber) - variance) ** 2) / (2 * variance)) / safe_k
        amplitude = np.where(k > 0, log_normal / safe_k, 0.0)
        amplitude *= two_thirds_mask(n)
        noise = rng.standard_normal((batch,) + self.grid.spectral_shape) + 1j * rng.standard_normal((batch,) + self.grid.spectral_shape)
        psi_hat = noise * amplitude
        psi = np.fft.irfft2(psi_hat, s=self.grid.shape)  # a real field: Hermitian symmetry by construction
        psi_hat = np.fft.rfft2(psi)
        u = np.fft.irfft2(1j * self.grid.ky_numpy * psi_hat, s=self.grid.shape)
        v = np.fft.irfft2(-1j * self.grid.kx_numpy * psi_hat, s=self.grid.shape)
        speed = np.sqrt(u**2 + v**2).max(axis=(-2, -1), keepdims=True)
        vorticity = np.fft.irfft2(k2 * psi_hat, s=self.grid.shape)
        return vorticity * (self.config.max_velocity / speed)

    # -- diagnostics ----------------------------------------------------------------------------
    def energy(self, omega_hat) -> np.ndarray:
        """E = 1/2 <|u|^2> per sample (domain mean)."""
        magnitude = self.backend.xp.abs(omega_hat) ** 2 * self.grid.inverse_wavenumber_squared
        return 0.5 * self.grid.mean_from_spectrum(magnitude)

    def enstrophy(self, omega_hat) -> np.ndarray:
        """Z = 1/2 <omega^2> per sample (domain mean)."""
        return 0.5 * self.grid.mean_from_spectrum(self.backend.xp.abs(omega_hat) ** 2)

    def cfl(self, omega_hat) -> float:
        """Courant number max(|u|, |v|) dt / dx over the batch."""
        u_hat, v_hat = self.velocity_hat(omega_hat)
        velocity = self.grid.to_physical(self.backend.stack([u_hat, v_hat]))
        return self.backend.max_abs(velocity) * self.config.dt / self.grid.spacing

    def kinetic_energy_spectrum(self, omega_hat, shell_width: float = 1.0):
        """(k, E(k)): isotropic KE spectrum per sample, shells `shell_width` wide (integer shells by
        default; sum = energy)."""
        omega_hat = self.backend.to_numpy(omega_hat)
        n = self.grid.num_points
        k2 = self.grid.wavenumber_squared_numpy
        inverse = np.where(k2 > 0, 1.0 / np.where(k2 > 0, k2, 1.0), 0.0)
        density = 0.5 * np.abs(omega_hat) ** 2 * inverse / n**4
        return isotropic_spectrum(density, n, self.config.domain_extent, shell_width)
