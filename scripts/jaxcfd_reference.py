"""Writes the jax-cfd reference fixture for emu's Kolmogorov solver (tests/test_jaxcfd_agreement.py).

    JAX_ENABLE_X64=1 python scripts/jaxcfd_reference.py [--output tests/fixtures/jaxcfd_kolmogorov_n64.npz]
                                                         [--steps 1 10 100 500]

(the script turns float64 on by itself before importing jax). Needs jax and jax-cfd in the same
environment as emu (`pip install "jax[cpu]" jax-cfd`; written against jax 0.10.2, jax-cfd 0.2.1).

What it does:
  1. Builds emu's `re1000` Kolmogorov config at 64^2 (nu = 1e-3, drag 0.1, forcing -4 cos(4y), the
     default dt = 0.5 dx / 7) and draws emu's documented random initial vorticity with seed 0.
  2. Transposes it into jax-cfd's layout (arrays indexed [x, y], x the first axis; rfft over y, the
     last axis), runs `jax_cfd.spectral.equations.ForcedNavierStokes2D(viscosity=1e-3, grid,
     smooth=True)` stepped by `jax_cfd.spectral.time_stepping.crank_nicolson_rk4` at emu's dt in
     float64, and records the vorticity after STEPS steps.
  3. Transposes back to emu's (y, x) layout and writes an .npz (atomically: temp file + os.replace)
     with omega0 (n, n), steps (k,), omega (k, n, n), dt, viscosity, drag, grid_size, seed, versions.

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
STEPS = (1, 10, 100, 500)
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "jaxcfd_kolmogorov_n64.npz"


def emu_setup():
    """emu's config and initial vorticity (n, n) in emu's (y, x) layout."""
    from emu.backends import get_backend
    from emu.systems import make_config, make_equation

    config = make_config("kolmogorov", "re1000", grid_size=GRID_SIZE)
    equation = make_equation(config, get_backend("numpy"))
    omega0 = equation.initial_condition(1, seed=SEED)[0]
    return config, omega0


def run_jaxcfd(omega0_yx: np.ndarray, viscosity: float, dt: float, steps=STEPS) -> np.ndarray:
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
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS),
                        help="increasing step counts at which to record the vorticity (default: %(default)s)")
    args = parser.parse_args(argv)
    steps = tuple(args.steps)
    if any(b <= a for a, b in zip(steps, steps[1:])) or steps[0] < 1:
        parser.error(f"--steps must be increasing positive integers, got {steps}")

    import importlib.metadata

    config, omega0 = emu_setup()
    omega = run_jaxcfd(omega0, config.viscosity, config.dt, steps)
    atomic_savez(
        args.output,
        omega0=omega0,
        steps=np.asarray(steps, dtype=np.int64),
        omega=omega,
        dt=np.float64(config.dt),
        viscosity=np.float64(config.viscosity),
        drag=np.float64(config.drag),
        grid_size=np.int64(GRID_SIZE),
        seed=np.int64(SEED),
        jax_version=np.str_(importlib.metadata.version("jax")),
        jax_cfd_version=np.str_(importlib.metadata.version("jax-cfd")),
        emu_config=np.str_(config.to_json()),
    )
    print(f"wrote {args.output}: steps {steps}, dt = {config.dt:.6g}, nu = {config.viscosity:g}, "
          f"max |omega| {np.abs(omega0).max():.3f} -> {np.abs(omega[-1]).max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
