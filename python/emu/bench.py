"""Solver throughput, measured side by side with the public peers in one process run.

Speed is measured here and in scripts/, never in tests. Each measurement: build the solver, take
warm-up steps, then step for about `seconds` of wall time and report steps per second (one step of
the whole batch), trajectory-steps per second (batch * steps/s: what an ensemble run produces) and
grid-point updates per second (batch * n^2 * steps/s / 1e6). The peers step one trajectory at a
time, so "vs peer" compares trajectory-steps/s; with --batch 1 that is plain steps/s.

Peers, when available on this machine:
  jax-cfd (kolmogorov): `ForcedNavierStokes2D` + `crank_nicolson_rk4`, the step jitted and repeated
      10 times inside one compiled call (its fastest use), single sample.
  pyqg 0.7.2 (qg): `QGModel(ntd=1)` stepped with `_step_forward`, single sample; imported here if it
      is, else run by the side interpreter given as --pyqg-python / EMU_PYQG_PYTHON (pyqg does not
      build against numpy 2; see scripts/pyqg_reference.py for that environment).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Callable

from emu.backends import BackendUnavailable, get_backend
from emu.errors import UserError
from emu.solvers import make_stepper
from emu.systems import make_config, make_equation

_PYQG_TIMER = r"""
import json, sys, time
import pyqg
n, seconds, preset = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
presets = {"eddy": dict(beta=1.5e-11, rek=5.787e-7, delta=0.25), "jet": dict(beta=1e-11, rek=7e-8, delta=0.1)}
m = pyqg.QGModel(nx=n, L=1e6, rd=15000.0, H1=500.0, U1=0.025, U2=0.0, filterfac=23.6, dt=3600.0,
                 tmax=1e15, twrite=10**9, tavestart=1e15, ntd=1, log_level=0, **presets[preset])
for _ in range(20):
    m._step_forward()
count, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds or count < 10:
    m._step_forward()
    count += 1
print(json.dumps({"steps_per_second": count / (time.perf_counter() - start), "version": pyqg.__version__}))
"""


def calls_per_second(step: Callable[[], None], seconds: float, warmup: int = 5, minimum: int = 10,
                     synchronize: Callable[[], None] | None = None) -> float:
    """Calls of `step` per second over about `seconds` of wall time (at least `minimum` calls) after
    `warmup` untimed calls; `synchronize` (e.g. torch.cuda.synchronize) closes both ends of the interval."""
    for _ in range(warmup):
        step()
    if synchronize:
        synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < minimum:
        step()
        count += 1
    if synchronize:
        synchronize()
    return count / (time.perf_counter() - start)


def emu_steps_per_second(system: str, preset: str | None, backend: str, grid: int, dtype: str, batch: int,
                         seconds: float, device: str | None = None) -> float:
    """Steps/s of emu's solver for one configuration (random initial condition, default stepper)."""
    config = make_config(system, preset, grid_size=grid)
    array_backend = get_backend(backend, device=device, dtype=dtype)
    equation = make_equation(config, array_backend)
    if backend == "julia":
        return julia_steps_per_second(equation, batch, seconds)
    stepper = make_stepper(equation, config.dt)
    holder = [stepper.init(equation.to_state(equation.initial_condition(batch, seed=0)))]

    def step():
        holder[0] = stepper.step(holder[0])

    synchronize = None
    if backend == "torch" and array_backend.device.startswith("cuda"):
        import torch

        synchronize = torch.cuda.synchronize
    if backend == "cupy":  # kernels and cuFFT run asynchronously on CuPy's current stream
        synchronize = array_backend.native.cuda.get_current_stream().synchronize
    return calls_per_second(step, seconds, synchronize=synchronize)


def julia_steps_per_second(equation, batch: int, seconds: float, inner: int = 10) -> float:
    """Steps/s of emu's Julia solver: `inner` steps per call into Julia (as jax-cfd's are timed), the
    state staying in Julia; the same random initial condition as the Python backends."""
    from emu.julia import JuliaSolver

    backend = equation.backend
    solver = JuliaSolver(equation.config, batch=batch, dtype=backend.dtype, device=backend.solver_device)
    solver.set_fields(equation.initial_condition(batch, seed=0))
    rate = calls_per_second(lambda: solver.step(inner), seconds, warmup=2, minimum=2, synchronize=solver.synchronize)
    if not solver.all_finite():
        raise RuntimeError("julia benchmark state became non-finite")
    return rate * inner


def jaxcfd_steps_per_second(grid: int, dtype: str, seconds: float, viscosity: float = 1e-3,
                            inner: int = 10) -> tuple[float, str] | None:
    """Steps/s of jax-cfd's Kolmogorov solver, or None if jax-cfd is not installed."""
    try:
        import jax
        import jax_cfd
        from jax_cfd.base import funcutils, grids
        from jax_cfd.spectral import equations, time_stepping
    except ImportError:
        return None
    import math

    import numpy as np

    jax.config.update("jax_enable_x64", dtype == "float64")
    jax_grid = grids.Grid((grid, grid), domain=((0, 2 * math.pi), (0, 2 * math.pi)))
    dt = make_config("kolmogorov", grid_size=grid).dt
    equation = equations.ForcedNavierStokes2D(viscosity, jax_grid, smooth=True)
    step = jax.jit(funcutils.repeated(time_stepping.crank_nicolson_rk4(equation, dt), inner))
    omega = make_equation(make_config("kolmogorov", grid_size=grid), get_backend("numpy")).initial_condition(1, 0)[0]
    state = [jax.numpy.fft.rfftn(jax.numpy.asarray(omega.T.astype(dtype)))]

    def advance():
        state[0] = step(state[0])

    rate = calls_per_second(advance, seconds, warmup=2, minimum=2, synchronize=lambda: state[0].block_until_ready())
    assert np.isfinite(np.asarray(state[0])).all(), "jax-cfd benchmark state became non-finite"
    return rate * inner, f"jax-cfd {jax_cfd.__version__}"


def pyqg_steps_per_second(grid: int, preset: str, seconds: float, python: str | None) -> tuple[float, str] | None:
    """Steps/s of pyqg 0.7.2's QGModel, or None when neither this interpreter nor `python` has pyqg."""
    try:
        import pyqg  # noqa: F401

        import sys

        python = sys.executable
    except ImportError:
        if not python:
            return None
    result = subprocess.run([python, "-c", _PYQG_TIMER, str(grid), str(seconds), preset],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"pyqg benchmark failed in {python}:\n{result.stderr[-2000:]}")
    values = json.loads(result.stdout.strip().splitlines()[-1])
    return values["steps_per_second"], f"pyqg {values['version']}"


def run_benchmarks(*, system: str, preset: str | None, backends: list[str], grids: list[int], dtype: str,
                   batch: int, seconds: float, peers: bool, pyqg_python: str | None, device: str | None,
                   echo: Callable[[str], None] = print) -> list[dict]:
    """Runs every (backend, grid) pair and the peer for `system`; prints a table; returns the rows."""
    preset_name = make_config(system, preset).preset
    if pyqg_python is not None and not (os.path.isfile(pyqg_python) and os.access(pyqg_python, os.X_OK)):
        raise UserError(f"--pyqg-python {pyqg_python}: no such executable; give the python of an environment "
                        "with pyqg 0.7.2 (see scripts/pyqg_reference.py)")
    if "julia" in backends:  # fail before any timing when Julia cannot start (and start it before torch)
        from emu.julia import start

        start()
    if "cupy" in backends:  # fail before any timing when CuPy or a GPU is missing
        from emu.cuda import require_cupy

        require_cupy()
    rows = []
    header = f"{'solver':<22}{'grid':>6}{'batch':>7}{'steps/s':>12}{'traj-steps/s':>14}{'Mpts*steps/s':>15}{'vs peer':>10}"
    echo(f"emu bench: {system} ({preset_name}), {dtype}, ~{seconds:g} s per measurement")
    echo(header)
    echo("-" * len(header))
    notes = []
    for grid in grids:
        peer = None
        if peers:
            if system == "kolmogorov":
                peer = jaxcfd_steps_per_second(grid, dtype, seconds)
                if peer is None:
                    notes.append("jax-cfd is not installed: pip install 'jax[cpu]' jax-cfd")
            else:
                peer = pyqg_steps_per_second(grid, preset_name, seconds, pyqg_python)
                if peer is None:
                    notes.append("pyqg not found: build the side environment of scripts/pyqg_reference.py and pass "
                                 "--pyqg-python /path/to/venv/bin/python")
        if peer is not None:
            rate, label = peer
            rows.append({"solver": label, "grid": grid, "batch": 1, "steps_per_second": rate})
            echo(f"{label:<22}{grid:>6}{1:>7}{rate:>12.1f}{rate:>14.1f}{grid * grid * rate / 1e6:>15.1f}{'1.00':>10}")
        for backend in backends:
            label = f"emu {backend}" + (f" ({device})" if device else "")
            try:
                rate = emu_steps_per_second(system, preset, backend, grid, dtype, batch, seconds, device)
            except BackendUnavailable as error:
                notes.append(f"{backend}: {error}")
                continue
            ratio = batch * rate / peer[0] if peer is not None else float("nan")
            rows.append({"solver": label, "grid": grid, "batch": batch, "steps_per_second": rate, "vs_peer": ratio})
            ratio_text = f"{ratio:.2f}" if peer is not None else "-"
            echo(f"{label:<22}{grid:>6}{batch:>7}{rate:>12.1f}{batch * rate:>14.1f}"
                 f"{batch * grid * grid * rate / 1e6:>15.1f}{ratio_text:>10}")
    for note in dict.fromkeys(notes):
        echo(f"note: {note}")
    return rows
