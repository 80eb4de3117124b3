"""Writes the jax-cfd reference fixture for emu's Kolmogorov solver (tests/test_jaxcfd_agreement.py).

    JAX_ENABLE_X64=1 python scripts/jaxcfd_reference.py [--state smooth|nyquist] [--output PATH]
                                                         [--steps 1 10 100 500]

(the script turns float64 on by itself before importing jax). Needs jax and jax-cfd in the same
environment as emu (`pip install "jax[cpu]" jax-cfd`; written against jax 0.10.2, jax-cfd 0.2.1).

What it does:
  1. Builds emu's `re1000` Kolmogorov config at 64^2 (nu = 1e-3, drag 0.1, forcing -4 cos(4y), the
     default dt = 0.5 dx / 7) and draws emu's documented random initial vorticity with seed 0.
     --state smooth (the default) starts from it as it is: it has no Nyquist content (its modes obey
     the 2/3 rule). --state nyquist starts from a state that has: that vorticity rounded to float32
     (which spreads ~1e-7 relative content over every mode, the Nyquist row and column included)
     plus a random field living on the Nyquist row (y index n/2) and column (x index n/2) only, of
     max |.| = 1e-2 max|omega| (`nyquist_state`). There the two codes' conventions for the derivative
     of a Nyquist mode differ (emu.grid.jax_cfd_wavenumbers), so it tests `dealias="jax-cfd"`'s.
  2. Transposes it into jax-cfd's layout (arrays indexed [x, y], x the first axis; rfft over y, the
     last axis), runs `jax_cfd.spectral.equations.ForcedNavierStokes2D(viscosity=1e-3, grid,
     smooth=True)` stepped by `jax_cfd.spectral.time_stepping.crank_nicolson_rk4` at emu's dt in
     float64, and records the vorticity after STEPS steps.
  3. Transposes back to emu's (y, x) layout and writes an .npz (atomically: temp file + os.replace)
     with omega0 (n, n), steps (k,), omega (k, n, n), dt, viscosity, drag, grid_size, seed, state,
     versions (and nyquist_seed, nyquist_amplitude for --state nyquist).

Fixtures: tests/fixtures/jaxcfd_kolmogorov_n64.npz (smooth, steps 1 10 100 500) and
tests/fixtures/jaxcfd_kolmogorov_nyquist_n64.npz (nyquist, steps 1 10 100).

The test reads only the .npz, so jax is not needed at test time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ["JAX_ENABLE_X64"] = "1"  # before jax is imported

import numpy as np

GRID_SIZE = 64
SEED = 0
NYQUIST_SEED = 1
NYQUIST_AMPLITUDE = 1e-2  # max |Nyquist part| / max |omega|
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
# state -> (default output, default steps)
STATES = {
    "smooth": (FIXTURES / "jaxcfd_kolmogorov_n64.npz", (1, 10, 100, 500)),
    "nyquist": (FIXTURES / "jaxcfd_kolmogorov_nyquist_n64.npz", (1, 10, 100)),
}


def nyquist_state(omega0: np.ndarray, seed: int = NYQUIST_SEED, amplitude: float = NYQUIST_AMPLITUDE) -> np.ndarray:
    """omega0 rounded to float32, plus a random real field whose rfft2 (emu layout) lives on the
    Nyquist row (y index n/2) and column (x index n/2) only, scaled to max |.| = amplitude max|omega0|."""
    n = omega0.shape[-1]
    rng = np.random.default_rng(seed)
    spectrum = np.zeros((n, n // 2 + 1), dtype=complex)
    spectrum[n // 2, :] = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    spectrum[:, n // 2] = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    nyquist = np.fft.irfft2(spectrum, s=(n, n))
    nyquist *= amplitude * np.abs(omega0).max() / np.abs(nyquist).max()
    return omega0.astype(np.float32).astype(np.float64) + nyquist


def emu_setup(state: str = "smooth"):
    """emu's config and initial vorticity (n, n) in emu's (y, x) layout."""
    from emu.backends import get_backend
    from emu.systems import make_config, make_equation

    config = make_config("kolmogorov", "re1000", grid_size=GRID_SIZE)
    equation = make_equation(config, get_backend("numpy"))
    omega0 = equation.initial_condition(1, seed=SEED)[0]
    if state == "nyquist":
        omega0 = nyquist_state(omega0)
    return config, omega0


def run_jaxcfd(omega0_yx: np.ndarray, viscosity: float, dt: float, steps=STATES["smooth"][1]) -> np.ndarray:
    """jax-cfd's pseudospectral Kolmogorov flow from omega0 (emu layout); returns (len(steps), n, n)."""
    import jax
    import jax.numpy as jnp
    from jax_cfd.base import grids
    from jax_cfd.spectral import equations, time_stepping

    if not jax.config.jax_enable_x64:
        raise RuntimeError("jax must run in float64: set JAX_ENABLE_X64=1 before jax is imported")
    n = omega0_yx.shape[-1]
    grid = grids.Grid((n, n), domain=((0.0, 2.0 * np.pi), (0.0, 2.0 * np.pi)))
    equation = equations.ForcedNavierStokes2D(viscosity, grid, smooth=True)
    step_fn = time_stepping.crank_nicolson_rk4(equation, dt)

    def advance(vorticity_hat, num_steps):
        return jax.lax.fori_loop(0, num_steps, lambda _, state: step_fn(state), vorticity_hat)

    advance = jax.jit(advance)  # num_steps traced: one compilation for every segment
    # emu: [y, x]; jax-cfd: [x, y]  ->  transpose in, transpose out.
    vorticity_hat = jnp.fft.rfftn(jnp.asarray(omega0_yx.T, dtype=jnp.float64))
    outputs, done = [], 0
    for target in steps:
        vorticity_hat = advance(vorticity_hat, target - done)
        done = target
        outputs.append(np.asarray(jnp.fft.irfftn(vorticity_hat, s=(n, n))).T)
    return np.stack(outputs)


def atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", choices=tuple(STATES), default="smooth",
                        help="initial state: emu's seeded vorticity, or it with Nyquist content (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the .npz to write (default: the state's fixture in tests/fixtures)")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="increasing step counts at which to record the vorticity (default: the state's, "
                             + "; ".join(f"{name}: {' '.join(map(str, steps))}" for name, (_, steps) in STATES.items())
                             + ")")
    args = parser.parse_args(argv)
    default_output, default_steps = STATES[args.state]
    output = args.output if args.output is not None else default_output
    steps = tuple(args.steps) if args.steps is not None else default_steps
    if any(b <= a for a, b in zip(steps, steps[1:])) or steps[0] < 1:
        parser.error(f"--steps must be increasing positive integers, got {steps}")

    import importlib.metadata

    config, omega0 = emu_setup(args.state)
    omega = run_jaxcfd(omega0, config.viscosity, config.dt, steps)
    extra = {"nyquist_seed": np.int64(NYQUIST_SEED), "nyquist_amplitude": np.float64(NYQUIST_AMPLITUDE)} \
        if args.state == "nyquist" else {}
    atomic_savez(
        output,
        omega0=omega0,
        steps=np.asarray(steps, dtype=np.int64),
        omega=omega,
        dt=np.float64(config.dt),
        viscosity=np.float64(config.viscosity),
        drag=np.float64(config.drag),
        grid_size=np.int64(GRID_SIZE),
        seed=np.int64(SEED),
        state=np.str_(args.state),
        **extra,
        jax_version=np.str_(importlib.metadata.version("jax")),
        jax_cfd_version=np.str_(importlib.metadata.version("jax-cfd")),
        emu_config=np.str_(config.to_json()),
    )
    print(f"wrote {output} ({args.state}): steps {steps}, dt = {config.dt:.6g}, nu = {config.viscosity:g}, "
          f"max |omega| {np.abs(omega0).max():.3f} -> {np.abs(omega[-1]).max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
