"""Two-layer quasi-geostrophic turbulence: the discrete model of pyqg's `QGModel` (pyqg 0.7.2).

    q_m = lap(psi_m) + (-1)^m F_m (psi_1 - psi_2),  F_1 = 1/(rd^2 (1 + delta)),  F_2 = delta F_1
    dq_m/dt + J(psi_m, q_m) + U_m dq_m/dx + beta_m dpsi_m/dx = -delta_{m,2} r_ek lap(psi_2) + filter
    beta_1 = beta + F_1 (U_1 - U_2),  beta_2 = beta - F_2 (U_1 - U_2),  delta = H_1 / H_2

m = 1 (upper), 2 (lower); u_m = -dpsi_m/dy, v_m = dpsi_m/dx; SI units (m, s). In spectral space:
  inversion   per wavenumber, a 2x2 solve with determinant |k|^2 (|k|^2 + F_1 + F_2); mean mode 0;
  advection   -(i k (u_m + U_m) q_m + i l v_m q_m)^ computed from physical products (pyqg forms the
              background advection inside the flux, so U_m q_m enters through the product);
  beta        -i k beta_m psi_hat_m;
  drag        + r_ek |k|^2 psi_hat_2 in the lower layer;
  filter      applied to q_hat after every step (pyqg's exponential filter by default, the sharp 2/3
              rule or none as options).
Time stepping is pyqg's AB3 with forward-Euler and AB2 start-up (`emu.solvers.AdamsBashforth3`).

Reference: Ross, Li, Perezhogin, Fernandez-Granda & Zanna (2023), "Benchmarking of machine learning
ocean subgrid parameterizations in an idealized model", JAMES 15, e2022MS003258 (presets `eddy` and
`jet`); pyqg documentation, "Layered quasigeostrophic model".

Good values: 256^2 truth with dt = 3600 s, spun up ~6 years (eddy ~2-3 years, jet ~3-5 years to
stationarity), coarse-grained to 64^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from emu.backends import ArrayBackend
from emu.grid import Grid, two_thirds_mask
from emu.spectral import exponential_filter, isotropic_spectrum
from emu.systems.base import (
    SystemConfig,
    require,
    require_choice,
    require_finite,
    require_nonnegative,
    require_positive,
    require_power_of_two,
)

QG_FILTERS = ("exponential", "sharp", "none")

QG_PRESETS = {
    "eddy": {"beta": 1.5e-11, "bottom_drag": 5.787e-7, "layer_depth_ratio": 0.25},
    "jet": {"beta": 1e-11, "bottom_drag": 7e-8, "layer_depth_ratio": 0.1},
}


@dataclass(frozen=True)
class QGConfig(SystemConfig):
    """Parameters of the two-layer QG model (SI units).

    Attributes:
        grid_size: grid points per side (power of two).
        domain_length: side L of the square domain [m].
        deformation_radius: first baroclinic deformation radius rd [m].
        upper_layer_depth: H_1 [m].
        layer_depth_ratio: delta = H_1 / H_2.
        upper_layer_velocity, lower_layer_velocity: background zonal flows U_1, U_2 [m/s].
        beta: planetary vorticity gradient [1/(m s)].
        bottom_drag: linear drag r_ek on the lower layer [1/s].
        filter: spectral filter applied after each step: "exponential" (pyqg), "sharp" (2/3 rule) or
            "none".
        filter_factor: strength of the exponential filter (pyqg's `filterfac`).
        dt: time step [s].
        max_cfl: the run stops with a blow-up error when max|u| dt/dx exceeds this.
        preset: the preset these values started from (informational).
    """

    grid_size: int = 64
    domain_length: float = 1.0e6
    deformation_radius: float = 15_000.0
    upper_layer_depth: float = 500.0
    layer_depth_ratio: float = 0.25
    upper_layer_velocity: float = 0.025
    lower_layer_velocity: float = 0.0
    beta: float = 1.5e-11
    bottom_drag: float = 5.787e-7
    filter: str = "exponential"
    filter_factor: float = 23.6
    dt: float = 3600.0
    max_cfl: float = 1.0
    preset: str = "eddy"

    system: ClassVar[str] = "qg"
    presets: ClassVar[dict] = QG_PRESETS
    default_preset: ClassVar[str] = "eddy"

    def __post_init__(self):
        require_power_of_two("grid_size", self.grid_size)
        require_positive("domain_length", self.domain_length)
        require_positive("deformation_radius", self.deformation_radius)
        require_positive("upper_layer_depth", self.upper_layer_depth)
        require_positive("layer_depth_ratio", self.layer_depth_ratio)
        require_finite("upper_layer_velocity", self.upper_layer_velocity)
        require_finite("lower_layer_velocity", self.lower_layer_velocity)
        require_finite("beta", self.beta)
        require_nonnegative("bottom_drag", self.bottom_drag)
        require_choice("filter", self.filter, QG_FILTERS)
        require_positive("filter_factor", self.filter_factor)
        require_positive("dt", self.dt)
        require_positive("max_cfl", self.max_cfl)

    @property
    def spacing(self) -> float:
        return self.domain_length / self.grid_size

    @property
    def lower_layer_depth(self) -> float:
        return self.upper_layer_depth / self.layer_depth_ratio

    @property
    def coupling(self) -> tuple[float, float]:
        """(F_1, F_2) = (1/(rd^2 (1+delta)), delta F_1) [1/m^2]."""
        f1 = 1.0 / (self.deformation_radius**2 * (1.0 + self.layer_depth_ratio))
        return f1, self.layer_depth_ratio * f1

    @property
    def layer_weights(self) -> tuple[float, float]:
        """Thickness fractions (H_1/H, H_2/H) for layer-weighted means."""
        total = self.upper_layer_depth + self.lower_layer_depth
        return self.upper_layer_depth / total, self.lower_layer_depth / total

    @property
    def mean_pv_gradients(self) -> tuple[float, float]:
        """(beta_1, beta_2): planetary plus background-shear PV gradients [1/(m s)]."""
        f1, f2 = self.coupling
        shear = self.upper_layer_velocity - self.lower_layer_velocity
        return self.beta + f1 * shear, self.beta - f2 * shear


def inversion_coefficients(wavenumber_squared: np.ndarray, f1: float, f2: float) -> np.ndarray:
    """Inverse of the PV operator per wavenumber: psi_hat = A q_hat, A shape (2, 2, n, n//2+1).

    q_hat = M psi_hat with M = [[-(k2 + F1), F1], [F2, -(k2 + F2)]]; det M = k2 (k2 + F1 + F2).
    The mean mode (k2 = 0) is singular and set to 0.
    """
    k2 = wavenumber_squared
    determinant = k2 * (k2 + f1 + f2)
    inverse = np.where(determinant > 0, 1.0 / np.where(determinant > 0, determinant, 1.0), 0.0)
    return np.stack([
        np.stack([-(k2 + f2) * inverse, -f1 * inverse]),
        np.stack([-f2 * inverse, -(k2 + f1) * inverse]),
    ])


class QGEquation:
    """pyqg's two-layer tendency on a `Grid`; state q_hat of shape (batch, 2, n, n//2+1)."""

    field_names = ("pv_upper", "pv_lower")
    field_units = ("1/s", "1/s")
    default_stepper = "ab3"
    linear_operator = None  # everything is explicit, as in pyqg

    def __init__(self, config: QGConfig, backend: ArrayBackend):
        self.config = config
        self.backend = backend
        self.grid = Grid(config.grid_size, config.domain_length, backend)
        f1, f2 = config.coupling
        k2 = self.grid.wavenumber_squared_numpy
        inversion = inversion_coefficients(k2, f1, f2)
        self.inversion = [[backend.asarray(inversion[i, j]) for j in range(2)] for i in range(2)]
        beta1, beta2 = config.mean_pv_gradients
        # (1, 2, 1, 1): per-layer constants broadcast over batch and wavenumbers.
        self.background_velocity = backend.asarray(
            np.array([config.upper_layer_velocity, config.lower_layer_velocity]).reshape(1, 2, 1, 1))
        psi_to_tendency = -np.stack([beta1 * 1j * self.grid.kx_numpy * np.ones_like(k2),
                                     beta2 * 1j * self.grid.kx_numpy - config.bottom_drag * k2])
        self._psi_to_tendency = backend.asarray(psi_to_tendency[np.newaxis])  # beta and drag on psi
        self._minus_ikx = -self.grid.ikx  # broadcastable (1, n//2+1) and (n, 1), as on the grid
        self._minus_iky = -self.grid.iky
        if config.filter == "exponential":
            step_filter = exponential_filter(config.grid_size, config.filter_factor)
        elif config.filter == "sharp":
            step_filter = two_thirds_mask(config.grid_size)
        else:
            step_filter = None
        self.step_filter = None if step_filter is None else backend.asarray(step_filter)
        # Fused CUDA kernels for explicit_terms and the AB3 step when the backend has them (cupy); None
        # elsewhere, and the array expressions below run.
        self.fused = backend.fused_operators(self)

    # -- the equation -------------------------------------------------------------------------
    def streamfunction_hat(self, q_hat):
        """PV inversion: psi_hat (batch, 2, n, n//2+1)."""
        a, native = self.inversion, self.backend.native
        q1, q2 = q_hat[:, 0], q_hat[:, 1]
        psi_hat = self.backend.empty(tuple(q_hat.shape), complex_valued=True)
        for layer in range(2):
            native.multiply(a[layer][0], q1, out=psi_hat[:, layer])
            psi_hat[:, layer] += a[layer][1] * q2
        return psi_hat

    def explicit_terms(self, q_hat):
        """dq_hat/dt: advection (with background flow), beta and bottom drag, as pyqg computes it."""
        if self.fused is not None:
            return self.fused.explicit_terms(q_hat)
        grid, native, backend = self.grid, self.backend.native, self.backend
        psi_hat = self.streamfunction_hat(q_hat)
        # Inputs of the three inverse transforms (q, u, v) written into one buffer: one batched call.
        spectral = backend.empty((3,) + tuple(q_hat.shape), complex_valued=True)
        spectral[0] = q_hat
        native.multiply(self._minus_iky, psi_hat, out=spectral[1])
        native.multiply(grid.ikx, psi_hat, out=spectral[2])
        q, u, v = grid.to_physical(spectral)
        fluxes = backend.empty((2,) + tuple(q.shape))
        u += self.background_velocity  # pyqg advects with the total zonal velocity u_m + U_m
        native.multiply(u, q, out=fluxes[0])
        native.multiply(v, q, out=fluxes[1])
        fluxes_hat = grid.to_spectral(fluxes)
        # -(i k F_u + i l F_v) - i k beta_m psi + drag k^2 psi_2, with the psi factors precomputed.
        tendency = self._minus_ikx * fluxes_hat[0]
        tendency += self._minus_iky * fluxes_hat[1]
        tendency += self._psi_to_tendency * psi_hat
        return tendency

    # -- state conversion ---------------------------------------------------------------------
    def to_state(self, pv: np.ndarray):
        """Physical PV (batch, 2, n, n) numpy -> q_hat on the backend."""
        pv = np.asarray(pv)
        require(pv.ndim == 4 and pv.shape[1:] == (2,) + self.grid.shape, "pv",
                f"an array of shape (batch, 2, {self.grid.num_points}, {self.grid.num_points})", pv.shape)
        return self.grid.to_spectral(self.backend.asarray(pv))

    def fields(self, q_hat):
        """Physical PV (batch, 2, n, n) on the backend."""
        return self.grid.to_physical(q_hat)

    def initial_condition(self, batch: int, seed: int) -> np.ndarray:
        """pyqg's default start, seeded: q_1 = 1e-7 r(y, x) + 1e-6 r(x), q_2 = 0 (r uniform in [0, 1)).

        Small noise in the upper layer, which baroclinic instability amplifies; turbulence develops
        after a few hundred days.
        """
        require(isinstance(batch, int) and batch >= 1, "batch", "an integer >= 1", batch)
        n = self.grid.num_points
        rng = np.random.default_rng(seed)
        pv = np.zeros((batch, 2, n, n))
        pv[:, 0] = 1e-7 * rng.random((batch, n, n)) + 1e-6 * rng.random((batch, 1, n))
        return pv

    # -- diagnostics ----------------------------------------------------------------------------
    def layer_energy(self, q_hat) -> np.ndarray:
        """Kinetic energy 1/2 <|u_m|^2> per sample and layer, shape (batch, 2) [m^2/s^2]."""
        psi_hat = self.streamfunction_hat(q_hat)
        return 0.5 * self.grid.mean_from_spectrum(self.backend.xp.abs(psi_hat) ** 2 * self.grid.wavenumber_squared)

    def energy(self, q_hat) -> np.ndarray:
        """Thickness-weighted kinetic energy (H_1 KE_1 + H_2 KE_2)/H per sample [m^2/s^2]."""
        w1, w2 = self.config.layer_weights
        layer = self.layer_energy(q_hat)
        return w1 * layer[:, 0] + w2 * layer[:, 1]

    def enstrophy(self, q_hat) -> np.ndarray:
        """Thickness-weighted PV enstrophy 1/2 <q_m^2> per sample [1/s^2]."""
        w1, w2 = self.config.layer_weights
        layer = 0.5 * self.grid.mean_from_spectrum(self.backend.xp.abs(q_hat) ** 2)
        return w1 * layer[:, 0] + w2 * layer[:, 1]

    def cfl(self, q_hat) -> float:
        """Courant number max(|u_m + U_m|, |v_m|) dt / dx over batch and layers (pyqg's `_calc_cfl`)."""
        grid = self.grid
        psi_hat = self.streamfunction_hat(q_hat)
        u, v = grid.to_physical(self.backend.stack([-grid.iky * psi_hat, grid.ikx * psi_hat]))
        speed = max(self.backend.max_abs(u + self.background_velocity), self.backend.max_abs(v))
        return speed * self.config.dt / grid.spacing

    def kinetic_energy_spectrum(self, q_hat, shell_width: float = 1.0):
        """(k, E(k)): thickness-weighted isotropic KE spectrum per sample [k in rad/m], shells
        `shell_width` wide in wavenumber index."""
        psi_hat = self.backend.to_numpy(self.streamfunction_hat(q_hat))
        n = self.grid.num_points
        density = 0.5 * np.abs(psi_hat) ** 2 * self.grid.wavenumber_squared_numpy / n**4
        w1, w2 = self.config.layer_weights
        k, layer_spectra = isotropic_spectrum(density, n, self.config.domain_length, shell_width)
        return k, w1 * layer_spectra[:, 0] + w2 * layer_spectra[:, 1]
