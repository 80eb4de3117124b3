"""Solver runs that write emu files: the glue between the physics layer and the data layer."""

from __future__ import annotations

import time as wallclock
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from emu.backends import export_fftw_wisdom, get_backend, import_fftw_wisdom
from emu.data.files import check_writable, open_hdf5
from emu.data.hdf5 import RestartState, SnapshotWriter, load_restart, unfinished_runs
from emu.memory import check_memory, estimate_memory
from emu.solvers import BlowUpError, StepperState, check_state, integrate, make_stepper
from emu.spectral import spectral_truncate
from emu.systems import make_equation
from emu.systems.base import ConfigError, require


@dataclass
class SimulationResult:
    """Summary of a finished run (also printed by the CLI)."""

    path: Path
    status: str
    steps: int
    snapshots: int
    model_time: float
    wall_seconds: float
    energy: np.ndarray
    enstrophy: np.ndarray
    cfl: float

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.wall_seconds if self.wall_seconds > 0 else float("nan")


def snapshot_fields(equation, state_hat, output_size: int) -> np.ndarray:
    """Physical fields of `state_hat` on an `output_size` grid (spectral truncation if coarser)."""
    if output_size == equation.grid.num_points:
        return equation.backend.to_numpy(equation.fields(state_hat))
    coarse_hat = spectral_truncate(equation.backend.to_numpy(state_hat), output_size)
    return np.fft.irfft2(coarse_hat, s=(output_size, output_size))


def _restart_to_numpy(equation, state: StepperState, step: int, model_time: float) -> RestartState:
    to_numpy = equation.backend.to_numpy
    history = {name: to_numpy(value).astype(np.complex128) for name, value in state.history.items()}
    return RestartState(to_numpy(state.state_hat).astype(np.complex128), history, state.level, step, model_time)


def _free_device_memory(backend) -> int | None:
    """Free bytes on the GPU of a CUDA backend, or None where it cannot be asked."""
    try:
        if backend.name == "cupy":
            import cupy

            return int(cupy.cuda.runtime.memGetInfo()[0])
        if backend.name == "torch":
            import torch

            return int(torch.cuda.mem_get_info(torch.device(backend.device))[0])
    except Exception:  # a driver that cannot say: the run goes on, as it would without the check
        return None
    return None


def initial_state(equation, *, batch: int, seed: int, restart: RestartState | None = None,
                  perturb: float = 0.0) -> StepperState:
    """The starting `StepperState`: a fresh random field, or a restart (optionally replicated to
    `batch` members and perturbed by relative noise `perturb`)."""
    backend = equation.backend
    if restart is None:
        return StepperState(equation.to_state(equation.initial_condition(batch, seed)))
    state_hat, history = restart.state_hat, dict(restart.history)
    saved_batch = state_hat.shape[0]
    if batch != saved_batch:
        require(saved_batch == 1, "batch", f"{saved_batch} (the batch of the --init file) or any size when the file holds one member", batch)
        state_hat = np.repeat(state_hat, batch, axis=0)
        history = {name: np.repeat(value, batch, axis=0) for name, value in history.items()}
    if perturb > 0:
        rng = np.random.default_rng(seed)
        fields = np.fft.irfft2(state_hat, s=equation.grid.shape)
        scale = perturb * fields.std(axis=tuple(range(1, fields.ndim)), keepdims=True)
        state_hat = np.fft.rfft2(fields + scale * rng.standard_normal(fields.shape))
    return StepperState(backend.asarray(state_hat, complex_valued=True),
                        {name: backend.asarray(value, complex_valued=True) for name, value in history.items()},
                        restart.level)


def simulate(config=None, *, out, backend: str = "numpy", device: str | None = None, dtype: str = "float64",
             steps: int = 1000, save_every: int = 10, downsample: int | None = None, batch: int = 1,
             seed: int = 0, init: str | Path | None = None, perturb: float = 0.0,
             progress: bool = True, stepper: str | None = None,
             output_dtype: str | None = None, stop: Callable[[], Any] | None = None,
             restart_interval: float = 10.0, echo: Callable[[str], None] | None = None) -> SimulationResult:
    """Runs a solver and streams snapshots into the emu file `out`.

    Args:
        config: the system config; with `init`, None takes the config stored in that file.
        out: path of the HDF5 file to write (atomically).
        backend, device, dtype: array backend ("numpy", "torch"), device ("cpu", "cuda"), precision.
        steps: solver steps to take; save_every: steps between snapshots (the start is saved too).
        downsample: grid size of the saved fields (spectral truncation); None saves at solver size.
        batch, seed: ensemble size and seed of the random initial condition (or of `perturb` noise).
        init: an earlier emu file; the run continues from its last snapshot (exactly, with the
            stepper's memory), replicated to `batch` members if the file holds one.
        perturb: relative amplitude of noise added to an `init` state (0 = exact continuation).
        progress: show a progress bar with steps/s.
        output_dtype: dtype of /fields (default: the run's dtype).
        stop: polled between steps (at each state check, every min(save_every, 100) steps); a truthy
            return (e.g. the name of a signal received) ends the run as a KeyboardInterrupt would, at a
            point where the file and its restart state agree (the CLI's SIGTERM/SIGINT use this).
        restart_interval: wall seconds between restart states saved while the run goes on (at the
            next snapshot; the first snapshot always saves one), so a run killed outright (kill -9)
            leaves a temporary file that `init` continues from, losing at most this long.
        echo: where notices go (unfinished earlier runs found beside `out`); None prints nothing.

    Returns:
        A `SimulationResult`. Raises `BlowUpError` after closing the file with the data so far.
    """
    require(isinstance(steps, int) and steps >= 0, "steps", "an integer >= 0", steps)
    require(isinstance(save_every, int) and save_every >= 1, "save_every", "an integer >= 1", save_every)
    require(isinstance(batch, int) and batch >= 1, "batch", "an integer >= 1", batch)
    require(perturb >= 0, "perturb", ">= 0", perturb)
    restart = None
    wisdom = ""
    if init is not None:
        stored_config, restart = load_restart(init)
        with open_hdf5(init, "emu run file") as handle:
            wisdom = str(handle.attrs.get("fftw_wisdom", ""))
        if config is None:
            config = stored_config
        elif config.system != stored_config.system or config.grid_size != stored_config.grid_size:
            raise ConfigError(f"init: {init} holds a {stored_config.system} run on a {stored_config.grid_size}^2 grid, "
                              f"which cannot start a {config.system} run on a {config.grid_size}^2 grid")
    if config is None:
        raise ConfigError("config: give a system config, or --init with an emu file to take it from")
    output_size = config.grid_size if downsample is None else int(downsample)
    require(output_size <= config.grid_size and output_size >= 4 and output_size % 2 == 0, "downsample",
            f"an even grid size between 4 and the solver grid {config.grid_size}", downsample)
    require(restart_interval >= 0, "restart_interval", ">= 0 seconds", restart_interval)
    layers_count = 2 if config.system == "qg" else 1
    estimate = estimate_memory(grid_size=config.grid_size, layers=layers_count, batch=batch, dtype=dtype,
                               output_size=output_size)
    if backend in ("numpy", "julia") or (backend == "torch" and (device or "cpu") == "cpu"):
        check_memory(estimate, what=f"a {config.grid_size}^2 {config.system} run of batch {batch} in {dtype}")
    check_writable(out, "--out")
    for earlier in unfinished_runs(out):
        if echo is None or earlier["alive"] or Path(earlier["temporary"]) == Path(init or ""):
            continue
        if earlier["restart_step"] is None:
            Path(earlier["temporary"]).unlink(missing_ok=True)
            echo(f"removed {earlier['temporary']}: the temporary file of a killed run of {out} without a restart state")
        else:
            echo(f"note: {earlier['temporary']} is the temporary file of a killed run of {out} "
                 f"({earlier['snapshots']} snapshots, restart state at step {earlier['restart_step']}); "
                 f"continue it with --init {earlier['temporary']}, or delete it")

    import_fftw_wisdom(wisdom)  # before any plan is built: the continued run uses the same FFT plans
    array_backend = get_backend(backend, device=device, dtype=dtype)
    if array_backend.device.startswith("cuda"):
        free = _free_device_memory(array_backend)
        if free is not None:
            check_memory(estimate, what=f"a {config.grid_size}^2 {config.system} run of batch {batch} in {dtype}",
                         available=free, where=f"GPU {array_backend.device}")
    equation = make_equation(config, array_backend)
    time_stepper = make_stepper(equation, config.dt, stepper)
    state = initial_state(equation, batch=batch, seed=seed, restart=restart, perturb=perturb)
    first_step = 0 if restart is None else restart.step
    first_time = 0.0 if restart is None else restart.time

    layers = () if len(equation.field_names) == 1 else (len(equation.field_names),)
    snapshot_shape = (batch,) + layers + (output_size, output_size)
    attrs = {"backend": backend, "device": array_backend.device, "dtype": dtype, "seed": seed,
             "save_every": save_every, "stepper": time_stepper.name, "init": str(init or ""),
             "perturb": perturb}
    writer = SnapshotWriter(out, config=config, field_names=equation.field_names, field_units=equation.field_units,
                            snapshot_shape=snapshot_shape, dtype=output_dtype or dtype, attrs=attrs)
    last_saved: dict[str, Any] = {}
    restart_saved = {"at": -float("inf")}

    def save(current: StepperState, done: int) -> None:
        step = first_step + done
        model_time = first_time + done * config.dt
        cfl = equation.cfl(current.state_hat)
        writer.append(snapshot_fields(equation, current.state_hat, output_size), time=model_time, step=step,
                      energy=equation.energy(current.state_hat), enstrophy=equation.enstrophy(current.state_hat),
                      cfl=cfl)
        last_saved.update(state=current, step=step, time=model_time, done=done)
        now = wallclock.perf_counter()
        if now - restart_saved["at"] >= restart_interval:  # a kill -9 loses at most this much
            writer.set_restart(_restart_to_numpy(equation, current, step, model_time))
            restart_saved["at"] = now

    bar = None
    started = wallclock.perf_counter()
    try:
        if equation.backend.all_finite(state.state_hat):
            save(state, 0)  # the start is a good state even when its CFL number fails the check below
        check_state(equation, state.state_hat, 0)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, unit="step", desc=f"{config.system} {config.grid_size}^2 {backend}",
                       dynamic_ncols=True, mininterval=0.5)

        def report(done: int) -> None:
            if bar is not None:
                bar.update(done)
            reason = stop() if stop is not None else None
            if reason:
                raise KeyboardInterrupt(reason if isinstance(reason, str) else "stop requested")

        state = integrate(time_stepper, state, steps, save_every, on_save=save, progress=report)
        if steps % save_every:
            check_state(equation, state.state_hat, steps)  # integrate checks only every check_every steps
            save(state, steps)
    except BaseException as error:
        if bar is not None:
            bar.close()
        status = ("blew_up" if isinstance(error, BlowUpError) else
                  "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
        if last_saved:
            writer.set_restart(_restart_to_numpy(equation, last_saved["state"], last_saved["step"], last_saved["time"]))
        writer.file.attrs["fftw_wisdom"] = export_fftw_wisdom()
        writer.close(status, f"{type(error).__name__}: {error}")
        raise
    if bar is not None:
        bar.close()
    wall = wallclock.perf_counter() - started
    writer.set_restart(_restart_to_numpy(equation, state, last_saved["step"], last_saved["time"]))
    writer.file.attrs["fftw_wisdom"] = export_fftw_wisdom()
    path = writer.close("complete")
    if init is not None and Path(init).name.startswith(f".{Path(out).name}.") and Path(init).suffix == ".tmp":
        Path(init).unlink(missing_ok=True)  # a killed run's temporary file, now continued into `out`
    return SimulationResult(path, "complete", steps, writer.count, last_saved["time"], wall,
                            equation.energy(state.state_hat), equation.enstrophy(state.state_hat),
                            equation.cfl(state.state_hat))
