"""emu's command line: `python -m emu.cli COMMAND --help` (or `emu COMMAND` once installed)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import click
import numpy as np

from emu.backends import BACKENDS, DTYPES, BackendUnavailable
from emu.errors import UserError
from emu.systems import SYSTEMS
from emu.systems.base import ConfigError

DEFAULT_STEPS = {"kolmogorov": 2000, "qg": 25000}  # qg: the eddy preset is turbulent after ~700 days


def _parse_settings(settings: tuple[str, ...]) -> dict:
    """`--set name=value` pairs; values are read as JSON when they parse (numbers, null), else text."""
    values = {}
    for item in settings:
        if "=" not in item:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--set")
        name, text = item.split("=", 1)
        try:
            values[name.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[name.strip()] = text
    return values


class _StopOnSignal:
    """SIGTERM and SIGINT during `simulate`: the first one asks the run to stop at its next state check,
    where the file and its restart state agree (`stop` of `emu.runs.simulate`); a second one interrupts
    at once. Raising KeyboardInterrupt straight from the handler is not enough: when the signal lands
    in a weakref callback or `__del__` (h5py has many), Python prints "Exception ignored" and the run
    goes on. `restore` puts the previous handlers back; a signal ignored at start (nohup) stays ignored.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}

    def __call__(self) -> str | None:
        return self.received

    def _handle(self, signum, frame):  # pragma: no cover - exercised through subprocess tests
        if self.received is not None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} (second signal)")
        self.received = signal.Signals(signum).name

    def install(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def _set_threads(ctx, param, value):
    from emu.backends import set_cpu_threads

    if value is not None:
        if value < 1:
            raise click.BadParameter(f"must be an integer >= 1, got {value}", ctx=ctx, param=param)
        set_cpu_threads(value)
    return value


threads_option = click.option(
    "--threads", type=int, default=1, show_default=True, expose_value=False, callback=_set_threads, is_eager=True,
    help="CPU threads per thread pool (FFTW, torch). One thread per process is robust on shared cores "
         "(two lost 3-30x whenever the other core was busy); raise it on an idle machine.")


def solver_options(command):
    """The options every solver-running command shares: system, preset, backend, device, dtype, threads."""
    options = [
        threads_option,
        click.option("--system", type=click.Choice(tuple(SYSTEMS)), default="kolmogorov", show_default=True),
        click.option("--preset", default=None, help="kolmogorov: re1000 (default), re5000, re10000; qg: eddy (default), jet."),
        click.option("--backend", type=click.Choice(BACKENDS), default="numpy", show_default=True),
        click.option("--device", default=None, help="cpu (default) or cuda[:N] (torch backend; cupy: cuda[:N] only)."),
        click.option("--dtype", type=click.Choice(DTYPES), default="float64", show_default=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class _Commands(click.Group):
    """The top-level group: the one place where errors a user can cause become one line.

    Any `emu.errors.user_error_types()` exception raised by any command (files, formats, devices,
    checkpoints, parameters) is printed as `Error: MESSAGE` with exit code 1; `--debug` (or
    EMU_DEBUG=1) re-raises it with its traceback. Other exceptions are bugs and keep their traceback.
    """

    def invoke(self, ctx):
        from emu.errors import one_line, user_error_types

        try:
            return super().invoke(ctx)
        except user_error_types() as error:
            if ctx.meta.get("emu.debug") or os.environ.get("EMU_DEBUG", "") not in ("", "0"):
                raise
            raise click.ClickException(one_line(error) + "  (--debug for the traceback)") from error


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="emu")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of one line.")
@click.pass_context
def main(ctx, debug):
    """emu: pseudospectral ground truth, neural emulators and diffusion stabilisers for 2D chaos."""
    ctx.meta["emu.debug"] = debug


@main.command()
@solver_options
@click.option("--grid", "grid_size", type=int, default=None, help="Solver grid points per side (power of two). [default: 128 kolmogorov, 64 qg]")
@click.option("--steps", type=int, default=None, help="Solver steps. [default: 2000 kolmogorov, 25000 qg (~2.9 years)]")
@click.option("--dt", type=float, default=None, help="Time step (kolmogorov default: CFL-based; qg: 3600 s).")
@click.option("--save-every", type=int, default=None, help="Steps between snapshots. [default: steps/100]")
@click.option("--downsample", type=int, default=None, help="Save fields spectrally truncated to this grid size.")
@click.option("--batch", type=int, default=1, show_default=True, help="Ensemble members run together.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random initial condition.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="HDF5 output. [default: SYSTEM.h5]")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="PNG of the final state. [default: OUT with .png]")
@click.option("--no-plot", is_flag=True, help="Skip the PNG.")
@click.option("--init", "init", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Continue from the last snapshot of an earlier emu file (its config is used), also from the "
                   "temporary file of a killed run.")
@click.option("--perturb", type=float, default=None, help="Relative noise added to an --init state. [default: 0]")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE", help="Any other config field, e.g. --set viscosity=2e-4.")
@click.option("--restart-every", "restart_interval", type=float, default=10.0, show_default=True,
              help="Wall seconds between restart states saved during the run: a killed run loses at most this.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.pass_context
def simulate(ctx, system, preset, backend, device, dtype, grid_size, steps, dt, save_every, downsample, batch, seed, out,
             plot, no_plot, init, perturb, settings, restart_interval, progress):
    """Run a pseudospectral solver and write snapshots to HDF5 (plus a PNG).

    \b
    python -m emu.cli simulate --system kolmogorov --backend numpy --grid 64 --steps 100 --out k.h5 --plot k.png
    python -m emu.cli simulate --system qg --preset eddy --backend torch --grid 64 --steps 2000 --out q.h5
    python -m emu.cli simulate --init q.h5 --steps 2000 --out q2.h5     # continue exactly
    """
    from pathlib import Path

    from emu.data.files import check_writable
    from emu.data.hdf5 import load_restart
    from emu.runs import simulate as run_simulation
    from emu.solvers import BlowUpError
    from emu.systems import config_from_dict, make_config

    given = {name for name in ("system", "preset", "seed")
             if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    overrides = _parse_settings(settings)
    if perturb is not None and not perturb >= 0:
        raise ConfigError(f"perturb must be >= 0 (relative noise on the --init state), got {perturb!r}")
    if init is not None:
        config, _ = load_restart(init)
        if "system" in given and system != config.system:
            raise ConfigError(f"--system {system}: {init} holds a {config.system} run, and --init continues it; "
                              f"drop --system (or start a new {system} run without --init)")
        if "preset" in given and preset != config.preset:
            raise ConfigError(f"--preset {preset}: {init} was run with preset {config.preset}, and --init keeps its "
                              "config; drop --preset, or change single fields with --set NAME=VALUE")
        system = config.system
        changes = {k: v for k, v in dict(overrides, dt=dt).items() if v is not None}
        if grid_size is not None and grid_size != config.grid_size:
            raise ConfigError(f"grid: {init} was run on a {config.grid_size}^2 grid; --init continues on that grid")
        if changes:
            config = config_from_dict({**config.to_dict(), **changes})  # validates names and values
    else:
        if perturb is not None:
            raise ConfigError("--perturb perturbs the state of an --init file; give --init FILE, or drop --perturb "
                              "(a new run starts from a random field of --seed)")
        config = make_config(system, preset, grid_size=grid_size, dt=dt, **overrides)
    steps = DEFAULT_STEPS[system] if steps is None else steps
    save_every = max(1, steps // 100) if save_every is None else save_every
    out = out or f"{system}.h5"
    plot_path = None if no_plot else (plot or str(Path(out).with_suffix(".png")))
    if plot_path is not None:
        check_writable(plot_path, "--plot")  # now, not after the whole run
    stop = _StopOnSignal().install()
    try:
        result = run_simulation(config, out=out, backend=backend, device=device, dtype=dtype, steps=steps,
                                save_every=save_every, downsample=downsample, batch=batch, seed=seed, init=init,
                                perturb=perturb or 0.0, progress=progress, stop=stop,
                                restart_interval=restart_interval, echo=lambda line: click.echo(line, err=True))
    except BlowUpError as error:
        click.echo(f"error: {error}", err=True)
        click.echo(f"the snapshots up to the last good one are saved in {out} (status blew_up)", err=True)
        sys.exit(3)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the snapshots so far are saved in {out} (status interrupted); "
                   f"continue with --init {out}", err=True)
        sys.exit(130)
    finally:
        stop.restore()
    if plot_path is not None:
        from emu.plotting import plot_run

        plot_run(result.path, plot_path)
    energy = ", ".join(f"{e:.4g}" for e in result.energy[:4]) + (" ..." if len(result.energy) > 4 else "")
    click.echo(f"{config.system} ({config.preset}) {config.grid_size}^2 {backend} {dtype}: {result.steps} steps in "
               f"{result.wall_seconds:.1f} s ({result.steps_per_second:.0f} steps/s), t = {result.model_time:.4g}, "
               f"E = {energy}, CFL = {result.cfl:.3f} -> {result.path} ({result.snapshots} snapshots)"
               + (f", {plot_path}" if plot_path else ""))


@main.command()
@threads_option
@click.option("--system", type=click.Choice(tuple(SYSTEMS)), default="qg", show_default=True)
@click.option("--preset", default=None)
@click.option("--backend", "backends", default="numpy,torch", show_default=True, help="Comma-separated backends.")
@click.option("--grid", "grids", default=None, help="Comma-separated grid sizes. [default: 64,128,256 solvers, 64 emulators]")
@click.option("--dtype", type=click.Choice(DTYPES), default="float64", show_default=True)
@click.option("--batch", type=int, default=None, help="Trajectories (solvers) or samples (emulators). [default: 1 solvers, 8 emulators]")
@click.option("--seconds", type=float, default=2.0, show_default=True,
              help="Time budget per measurement (solvers: emu, peer, FFTs, loaded each; split over the rounds).")
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="Also time pyqg / jax-cfd, each in its own worker process, when available.")
@click.option("--pyqg-python", default=None, envvar="EMU_PYQG_PYTHON",
              help="Python of a side environment with pyqg 0.7.2 (see scripts/pyqg_reference.py). "
                   "[default: this python, if it imports pyqg]")
@click.option("--jaxcfd-python", default=None, envvar="EMU_JAXCFD_PYTHON",
              help="Python of a side environment with jax-cfd (pip install 'jax[cpu]' jax-cfd). "
                   "[default: this python, if it imports jax_cfd]")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Solvers: interleaved rounds of emu / peer / bare FFTs; ratios are the median [min-max] over them.")
@click.option("--fft/--no-fft", "time_fft", default=True, show_default=True,
              help="Solvers: also time the bare FFTs of one step (the step/FFT ratio).")
@click.option("--busy-cores", type=click.IntRange(min=0), default=0, show_default=True,
              help="Solvers: start N busy (pure CPU) processes and time each round's step quiet and loaded "
                   "(the loaded/quiet ratio: the slowdown when N other cores are busy).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Solvers: also write the rows (with every per-round ratio) to this JSON file.")
@click.option("--device", default=None)
@click.option("--emulator", "emulators", default=None, metavar="ARCH:PRESET[,...]",
              help="Time neural emulators instead of solvers, e.g. unet:small,drn:paper (samples/s, inference and training).")
@click.option("--channels", type=int, default=None, help="Emulator channels. [default: 1 kolmogorov, 2 qg]")
@click.option("--unroll", type=int, default=4, show_default=True, help="Emulator training: unrolled steps per window.")
@click.option("--amp", is_flag=True, help="Emulators: bfloat16 autocast.")
@click.option("--compile", "compile_network", is_flag=True, help="Emulators: torch.compile the network.")
@click.option("--ddpm", is_flag=True, help="Time the fused DDPM step (CuPy kernel) against eager torch and torch.compile "
              "instead. [defaults: --grid 64, batch 64,256,1024 (or --batch), float32]")
def bench(system, preset, backends, grids, dtype, batch, seconds, peers, pyqg_python, jaxcfd_python, rounds,
          time_fft, busy_cores, json_path, device, emulators, channels, unroll, amp, compile_network, ddpm):
    """Throughput of solvers (steps/s, and per-round ratios against the peer in its own process, against the
    step's bare FFTs and, with --busy-cores, against a busy machine), with --emulator of neural emulators,
    with --ddpm of the DDPM reverse step (time, GB/s and fraction of the measured copy bandwidth).

    \b
    python -m emu.cli bench --system qg --backend numpy,torch --grid 64,128,256
    python -m emu.cli bench --system qg --grid 64,256 --pyqg-python /work/pyqg-venv/bin/python --busy-cores 1
    python -m emu.cli bench --system kolmogorov --grid 64,256 --jaxcfd-python /work/jaxcfd-venv/bin/python
    python -m emu.cli bench --emulator unet:small,drn:small --grid 32,64 --batch 8
    python -m emu.cli bench --ddpm --device cuda
    """
    if ddpm or emulators:
        source = click.get_current_context().get_parameter_source
        options = {"jaxcfd_python": "--jaxcfd-python", "rounds": "--rounds", "time_fft": "--fft/--no-fft",
                   "busy_cores": "--busy-cores", "json_path": "--json"}
        solver_only = [option for name, option in options.items() if source(name) == click.core.ParameterSource.COMMANDLINE]
        if solver_only:
            raise click.UsageError(f"{', '.join(solver_only)}: for solver benchmarks only, not with "
                                   f"{'--ddpm' if ddpm else '--emulator'}")
    if ddpm:
        from emu.bench_ddpm import DEFAULT_BATCHES, run_ddpm_benchmarks

        dtype_given = click.get_current_context().get_parameter_source("dtype") != click.core.ParameterSource.DEFAULT
        for grid in _int_list(grids or "64", "grid"):
            run_ddpm_benchmarks(batches=[batch] if batch else list(DEFAULT_BATCHES), grid=grid,
                                dtype=dtype if dtype_given else "float32", device=device, seconds=seconds,
                                echo=click.echo)
        return
    if emulators:
        from emu.training.throughput import parse_emulator_specs, run_emulator_benchmarks

        run_emulator_benchmarks(parse_emulator_specs(emulators), grids=_int_list(grids or "64", "grid"),
                                channels=channels or (1 if system == "kolmogorov" else 2), batch=batch or 8,
                                unroll=unroll, seconds=seconds, device=device, amp=amp, compile=compile_network,
                                echo=click.echo)
        return
    from emu.bench import run_benchmarks

    run_benchmarks(system=system, preset=preset, backends=[b for b in backends.split(",") if b],
                   grids=_int_list(grids or "64,128,256", "grid"), dtype=dtype, batch=batch or 1, seconds=seconds,
                   peers=peers, pyqg_python=pyqg_python, jaxcfd_python=jaxcfd_python, rounds=rounds, fft=time_fft,
                   busy_cores=busy_cores, json_path=json_path, device=device, echo=click.echo)


def _int_list(text: str, name: str) -> list[int]:
    """'64,128' -> [64, 128]; a clear error naming the option otherwise."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers, got {text!r}", param_hint=f"--{name}") from None


GENERATE_DEFAULTS = {"kolmogorov": {"grid": 128, "downsample": 64, "spinup": "10", "interval": 5},
                     "qg": {"grid": 64, "downsample": 64, "spinup": "3y", "interval": 5}}


@main.command()
@solver_options
@click.option("--trajectories", type=int, default=16, show_default=True, help="Trajectories over all shards and splits.")
@click.option("--length", type=int, default=20, show_default=True, help="Snapshots per trajectory.")
@click.option("--interval", type=int, default=None, help="Solver steps between snapshots. [default: 5]")
@click.option("--spinup", default=None, help="Model time from the random start to the first snapshot; qg takes 200d or 3y. "
              "[default: 10 kolmogorov, 3y qg]")
@click.option("--grid", "grid_size", type=int, default=None, help="Solver grid. [default: 128 kolmogorov, 64 qg]")
@click.option("--dt", type=float, default=None, help="Solver time step (default: the config's).")
@click.option("--downsample", type=int, default=None, help="Saved grid size. [default: 64]")
@click.option("--split", default="0.9,0.05,0.05", show_default=True, help="Fractions of train,valid,test.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch", type=int, default=8, show_default=True, help="Trajectories stepped together.")
@click.option("--shard", type=int, default=None, help="This process makes shard SHARD of NUM_SHARDS. "
              "[default: torchrun's RANK when WORLD_SIZE is set, else 0]")
@click.option("--num-shards", type=int, default=None, help="[default: torchrun's WORLD_SIZE, else 1]")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE", help="Any other config field.")
@click.option("--out", type=click.Path(file_okay=False), default="data", show_default=True, help="Dataset folder.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def generate(system, preset, backend, device, dtype, trajectories, length, interval, spinup, grid_size, dt, downsample,
             split, seed, batch, shard, num_shards, settings, out, progress):
    """Generate training trajectories from spun-up random states (The Well's HDF5 format).

    \b
    python -m emu.cli generate --system kolmogorov --backend numpy --trajectories 6 --length 5 --grid 64 --downsample 32 --out data/
    python -m emu.cli generate --system qg --trajectories 100 --shard 0 --num-shards 4 --out qgdata/   # one of 4 processes
    python -m emu.cli data merge qgdata/ --out qgmerged/

    Rerunning the same command resumes a stopped run; other parameters into the same folder are refused.
    """
    from emu.generate import GenerationPlan, generate as run_generation, parse_model_time, spinup_steps
    from emu.solvers import BlowUpError
    from emu.systems import make_config

    defaults = GENERATE_DEFAULTS[system]
    # Under torchrun (or any launcher that sets RANK/WORLD_SIZE) each rank makes its own shard.
    if num_shards is None:
        num_shards = int(os.environ.get("WORLD_SIZE", 1))
    if shard is None:
        shard = int(os.environ.get("RANK", 0)) if "WORLD_SIZE" in os.environ else 0
    try:
        config = make_config(system, preset, grid_size=grid_size or defaults["grid"], dt=dt, **_parse_settings(settings))
        try:
            fractions = tuple(float(part) for part in split.split(","))
        except ValueError:
            raise ConfigError(f"split must be three numbers like 0.9,0.05,0.05, got {split!r}") from None
        plan = GenerationPlan(config, trajectories=trajectories, length=length,
                              interval=interval or defaults["interval"],
                              spinup_steps=spinup_steps(config, parse_model_time(spinup or defaults["spinup"], system)),
                              downsample=downsample or min(defaults["downsample"], config.grid_size),
                              split=fractions, seed=seed, batch=batch, dtype=dtype)
        from emu.generate import shard_range

        empty = [name for name, fraction in zip(("train", "valid", "test"), plan.split) if fraction > 0
                 and plan.split_counts[name] == 0]
        if empty:
            click.echo(f"warning: --split {split} leaves no trajectory of {trajectories} for {', '.join(empty)}; "
                       "use more --trajectories (training without a valid split picks best.pt by training loss)",
                       err=True)

        start, stop = shard_range(trajectories, shard, num_shards) if 0 <= shard < num_shards else (0, 0)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=stop - start, unit="traj", desc=f"{system} shard {shard}/{num_shards}", dynamic_ncols=True)
        try:
            files = run_generation(plan, out, shard=shard, num_shards=num_shards, backend=backend, device=device,
                                   progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    except BlowUpError as error:
        click.echo(f"error: {error}; the trajectories completed so far are kept in {out}: rerun to resume "
                   f"(or lower --dt)", err=True)
        sys.exit(3)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: completed trajectories are kept in {out}; rerun the same command to resume", err=True)
        sys.exit(130)
    click.echo(f"{system} ({config.preset}): {stop - start} trajectories x {plan.length} snapshots every "
               f"{plan.snapshot_interval:.4g} (spin-up {plan.spinup_steps} steps), {plan.downsample}^2 -> "
               + ", ".join(str(f) for f in files))


@main.group()
def data():
    """Inspect, check and merge datasets made by `generate`."""


@data.command()
@click.argument("path", type=click.Path(exists=True))
def info(path):
    """What a dataset folder (or one file) holds.

    \b
    python -m emu.cli data info data/
    """
    from emu.data.inspect import describe

    click.echo(describe(path))


@data.command()
@click.argument("path", type=click.Path(exists=True))
def validate(path):
    """Check completeness against emu_dataset.json, shapes, NaN/inf and the stored statistics; exit 1 on any problem.

    \b
    python -m emu.cli data validate data/
    """
    from emu.data.inspect import validate as run_validation

    problems, summary = run_validation(path)
    click.echo(summary)
    if problems:
        for problem in problems:
            click.echo(f"problem: {problem}", err=True)
        sys.exit(1)


@data.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for the merged files; not PATH, not inside it and not containing it.")
@click.option("--allow-partial", is_flag=True,
              help="Merge although planned shard files are missing; the merged files record which (validate fails).")
@click.option("--copy", "copy_fields", is_flag=True,
              help="Copy the fields instead of linking them (readable through file objects, e.g. the_well's WellDataset).")
def merge(path, out, allow_partial, copy_fields):
    """Join shard files into one file per split with HDF5 virtual datasets (no copy).

    Every shard file that PATH/emu_dataset.json plans must be there and complete.

    \b
    python -m emu.cli data merge data/ --out merged/
    """
    from emu.data.well import merge_shards

    files = merge_shards(path, out, allow_partial=allow_partial, copy=copy_fields,
                         warn=lambda message: click.echo(f"warning: {message}", err=True))
    kind = "copied" if copy_fields else "virtual datasets, no copy"
    click.echo(f"merged ({kind}): " + ", ".join(str(f) for f in files))


@main.group()
def train():
    """Train models: emulators, the stabilisers' diffusion models (Thermalizer, SNS) and Cohesion's
    parts (Koopman prior, window score network)."""


def training_options(*, batch_size: int, lr: float, out: str, max_grad_norm: float | None = None):
    """The options every `train` command shares (optimiser, devices, files), with per-model defaults."""
    options = [
        threads_option,
        click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False), required=True,
                     help="Dataset folder from `generate`."),
        click.option("--epochs", type=int, default=10, show_default=True),
        click.option("--batch-size", type=int, default=batch_size, show_default=True),
        click.option("--lr", type=float, default=lr, show_default=True),
        click.option("--weight-decay", type=float, default=0.05, show_default=True),
        click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True),
        click.option("--amp", is_flag=True, help="bfloat16 autocast."),
        click.option("--compile", "compile_model", is_flag=True, help="torch.compile the network."),
        click.option("--workers", type=int, default=0, show_default=True, help="DataLoader workers."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--max-grad-norm", type=float, default=max_grad_norm, show_default=True,
                     help="Clip the global gradient norm to this before each step; 0 turns clipping off."),
        click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)."),
        click.option("--out", type=click.Path(file_okay=False), default=out, show_default=True,
                     help="Folder for the checkpoints and metrics; must be new or empty unless --resume or --overwrite."),
        click.option("--resume", is_flag=True, help="Continue the run in OUT from OUT/last.pt (same settings; a larger "
                     "--epochs extends it, the cosine schedule then being recomputed over the new total)."),
        click.option("--overwrite", is_flag=True, help="Delete emu's files in OUT (last.pt, best.pt, metrics.jsonl, "
                     "loss.png, thermalizer_levels.json) and train anew."),
        click.option("--progress/--no-progress", default=True, show_default=True),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _run_training(train_function, config_class, out, resume, overwrite, progress, **settings):
    """Builds the config, trains, names the files that are there (errors are one line: see _Commands)."""
    from pathlib import Path

    if settings.get("max_grad_norm") == 0:
        settings["max_grad_norm"] = None
    config = config_class(**settings)
    train_function(config, out, resume=resume, overwrite=overwrite, progress=progress, echo=click.echo)
    # Only what exists: best.pt is missing when no epoch had a finite validation score.
    written = [str(Path(out) / name) for name in ("last.pt", "best.pt", "metrics.jsonl", "loss.png")
               if (Path(out) / name).is_file()]
    click.echo("wrote " + ", ".join(written))


def level_options(command):
    """The level options the Thermalizer's classifier and SNS's heads share (emu.stabilizers.levels)."""
    options = [
        click.option("--levels", "num_levels", type=int, default=1000, show_default=True,
                     help="Diffusion levels T (cosine schedule)."),
        click.option("--level-sampling", type=click.Choice(["uniform", "mixture"]), default=None,
                     help="Training levels: uniform over all (paper), or a mixture with --low-level-fraction of each "
                          "batch below --low-level-max. [default: the preset's: small mixture, paper uniform]"),
        click.option("--low-level-fraction", type=float, default=0.5, show_default=True),
        click.option("--low-level-max", type=int, default=50, show_default=True),
        click.option("--level-target", type=click.Choice(["categorical", "gaussian"]), default=None,
                     help="Level loss: one-hot cross-entropy (paper) or against a target smoothed in log SNR (width "
                          "--level-target-width). [default: the preset's: small gaussian, paper categorical]"),
        click.option("--level-target-width", type=float, default=0.25, show_default=True),
        click.option("--snapshot-stride", type=int, default=None,
                     help="Train on every k-th stored snapshot of each trajectory (decorrelated samples). "
                          "[default: the preset's: small 4, paper 1]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@train.command()
@click.option("--arch", type=click.Choice(["unet", "drn"]), default="drn", show_default=True)
@click.option("--preset", type=click.Choice(["small", "paper"]), default="small", show_default=True)
@click.option("--unroll", type=int, default=4, show_default=True, help="Steps of the multistep loss.")
@click.option("--noise", type=float, default=1e-5, show_default=True, help="Input noise tau (1e-5 DRN, 1e-4 UNet).")
@training_options(batch_size=32, lr=5e-4, out="run")
def emulator(data_dir, arch, preset, unroll, noise, epochs, batch_size, lr, weight_decay, schedule, amp, compile_model,
             workers, seed, max_grad_norm, device, out, resume, overwrite, progress):
    """Train a residual emulator with the unrolled multistep loss (torchrun for several processes).

    \b
    python -m emu.cli train emulator --data data/ --arch drn --epochs 1 --unroll 2 --out run/
    python -m emu.cli train emulator --data data/ --arch drn --epochs 2 --unroll 2 --out run/ --resume   # one more epoch
    torchrun --nproc-per-node 2 -m emu.cli train emulator --data data/ --arch drn --epochs 1 --unroll 2 --out run2/

    Stops with exit code 1 on NaN/inf (in a batch, the loss or the gradients), keeping the
    checkpoints of the epochs before.
    """
    from emu.training.trainer import TrainingConfig, train_emulator

    _run_training(train_emulator, TrainingConfig, out, resume, overwrite, progress, data=str(data_dir), arch=arch,
                  preset=preset, unroll=unroll, noise=noise, epochs=epochs, batch_size=batch_size, lr=lr,
                  weight_decay=weight_decay, schedule=schedule, amp=amp, compile=compile_model, seed=seed,
                  num_workers=workers, device=device, max_grad_norm=max_grad_norm)


@train.command()
@click.option("--preset", type=click.Choice(["small", "paper"]), default="small", show_default=True)
@click.option("--classifier-weight", type=float, default=1.0, show_default=True, help="Weight of the level cross-entropy.")
@click.option("--ema", "ema_decay", type=float, default=0.995, show_default=True, help="Weight EMA decay (0: off).")
@level_options
@training_options(batch_size=64, lr=2e-4, out="thermalizer", max_grad_norm=1.0)
def thermalizer(data_dir, preset, num_levels, classifier_weight, ema_decay, level_sampling, low_level_fraction,
                low_level_max, level_target, level_target_width, snapshot_stride, epochs, batch_size, lr, weight_decay,
                schedule, amp, compile_model, workers, seed, max_grad_norm, device, out, resume, overwrite, progress):
    """Train the Thermalizer: a DDPM of single snapshots with a noise-level classifier head (paper eq. 8).

    \b
    python -m emu.cli train thermalizer --data data/ --preset small --epochs 1 --out th/
    torchrun --nproc-per-node 2 -m emu.cli train thermalizer --data data/ --epochs 1 --out th2/
    """
    from emu.stabilizers.thermalizer import ThermalizerTrainingConfig, train_thermalizer

    _run_training(train_thermalizer, ThermalizerTrainingConfig, out, resume, overwrite, progress, data=str(data_dir),
                  preset=preset, num_levels=num_levels, classifier_weight=classifier_weight, ema_decay=ema_decay,
                  level_sampling=level_sampling, low_level_fraction=low_level_fraction, low_level_max=low_level_max,
                  level_target=level_target, level_target_width=level_target_width, snapshot_stride=snapshot_stride,
                  epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule, amp=amp,
                  compile=compile_model, seed=seed, num_workers=workers, device=device, max_grad_norm=max_grad_norm)


@train.command()
@click.option("--preset", type=click.Choice(["small", "paper"]), default="small", show_default=True)
@click.option("--classifier-weight", type=float, default=0.1, show_default=True,
              help="Weight of each head's level cross-entropy (the paper's 0.1).")
@click.option("--ema", "ema_decay", type=float, default=0.999, show_default=True, help="Weight EMA decay (0: off).")
@click.option("--anchor-lag", type=int, default=10, show_default=True,
              help="Snapshots between the clean anchor frame and the current one in training (the paper: 100 on QG); "
                   "the anchor in rollouts is the trajectory's initial state.")
@click.option("--no-anchor", is_flag=True, help="Train without the anchor frame: inputs (x_{t-1}, x_t) only.")
@level_options
@training_options(batch_size=64, lr=2e-4, out="sns", max_grad_norm=1.0)
def sns(data_dir, preset, classifier_weight, ema_decay, anchor_lag, no_anchor, num_levels, level_sampling,
        low_level_fraction, low_level_max, level_target, level_target_width, snapshot_stride, epochs, batch_size, lr,
        weight_decay, schedule, amp, compile_model, workers, seed, max_grad_norm, device, out, resume, overwrite,
        progress):
    """Train SNS: a conditional diffusion model of (previous, current) pairs noised to two independent
    levels, with a noise-level head per frame (paper eq. 4).

    \b
    python -m emu.cli train sns --data data/ --preset small --epochs 1 --out sns/
    torchrun --nproc-per-node 2 -m emu.cli train sns --data data/ --epochs 1 --out sns2/
    """
    from emu.stabilizers.sns import SNSTrainingConfig, train_sns

    _run_training(train_sns, SNSTrainingConfig, out, resume, overwrite, progress, data=str(data_dir), preset=preset,
                  num_levels=num_levels, classifier_weight=classifier_weight, ema_decay=ema_decay,
                  anchor=not no_anchor, anchor_lag=anchor_lag, level_sampling=level_sampling,
                  low_level_fraction=low_level_fraction, low_level_max=low_level_max, level_target=level_target,
                  level_target_width=level_target_width, snapshot_stride=snapshot_stride, epochs=epochs,
                  batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule, amp=amp,
                  compile=compile_model, seed=seed, num_workers=workers, device=device, max_grad_norm=max_grad_norm)


@train.command()
@click.option("--preset", type=click.Choice(["small", "paper"]), default="small", show_default=True)
@click.option("--latent-dim", type=int, default=None, help="Koopman latent dimension. [default: the preset's, 64 small]")
@click.option("--horizon", type=int, default=8, show_default=True, help="Steps of the multistep prediction loss.")
@click.option("--stable/--free", default=True, show_default=True,
              help="Operator with spectral radius < 1 by construction, or a free matrix.")
@click.option("--reconstruction-weight", type=float, default=1.0, show_default=True)
@click.option("--prediction-weight", type=float, default=1.0, show_default=True)
@click.option("--linearity-weight", type=float, default=1.0, show_default=True)
@click.option("--ema", "ema_decay", type=float, default=0.0, show_default=True, help="Weight EMA decay (0: off).")
@training_options(batch_size=32, lr=1e-3, out="koopman")
def koopman(data_dir, preset, latent_dim, horizon, stable, reconstruction_weight, prediction_weight, linearity_weight,
            ema_decay, epochs, batch_size, lr, weight_decay, schedule, amp, compile_model, workers, seed,
            max_grad_norm, device, out, resume, overwrite, progress):
    """Train Cohesion's coherent prior: a deep Koopman autoencoder (encoder, linear latent operator,
    decoder) on reconstruction + multistep prediction + latent linearity losses.

    \b
    python -m emu.cli train koopman --data data/ --epochs 1 --horizon 3 --out koopman/
    """
    from emu.training.koopman import KoopmanTrainingConfig, train_koopman

    _run_training(train_koopman, KoopmanTrainingConfig, out, resume, overwrite, progress, data=str(data_dir),
                  preset=preset, latent_dim=latent_dim, horizon=horizon, stable=stable,
                  reconstruction_weight=reconstruction_weight, prediction_weight=prediction_weight,
                  linearity_weight=linearity_weight, ema_decay=ema_decay, epochs=epochs, batch_size=batch_size, lr=lr,
                  weight_decay=weight_decay, schedule=schedule, amp=amp, compile=compile_model, seed=seed,
                  num_workers=workers, device=device, max_grad_norm=max_grad_norm)


@train.command()
@click.option("--preset", type=click.Choice(["small", "paper"]), default="small", show_default=True)
@click.option("--window", type=int, default=5, show_default=True, help="Consecutive snapshots per scored window W.")
@click.option("--eta", type=float, default=1e-3, show_default=True,
              help="VP cosine schedule: alpha(t) = cos(acos(sqrt(eta)) t)^2.")
@click.option("--ema", "ema_decay", type=float, default=0.999, show_default=True, help="Weight EMA decay (0: off).")
@click.option("--window-stride", type=int, default=1, show_default=True,
              help="Distance between the starts of consecutive training windows.")
@click.option("--stratified-time/--uniform-time", default=True, show_default=True,
              help="Stratify the diffusion times within each batch (lower-variance loss).")
@click.option("--prediction", type=click.Choice(["eps", "v"]), default="eps", show_default=True,
              help="The network predicts the noise (eps) or v = mu eps - sigma x0 (bounded Tweedie error at high noise).")
@training_options(batch_size=32, lr=2e-4, out="score", max_grad_norm=1.0)
def score(data_dir, preset, window, eta, ema_decay, window_stride, stratified_time, prediction, epochs, batch_size,
          lr, weight_decay, schedule, amp, compile_model, workers, seed, max_grad_norm, device, out, resume, overwrite,
          progress):
    """Train Cohesion's score network: a UNet with a time embedding over windows of W frames
    (continuous-time VP SDE, cosine schedule, noise or v prediction).

    \b
    python -m emu.cli train score --data data/ --epochs 1 --window 3 --out score/
    """
    from emu.training.score import ScoreTrainingConfig, train_score

    _run_training(train_score, ScoreTrainingConfig, out, resume, overwrite, progress, data=str(data_dir), preset=preset,
                  window=window, eta=eta, ema_decay=ema_decay, window_stride=window_stride,
                  stratified_time=stratified_time, prediction=prediction, epochs=epochs, batch_size=batch_size, lr=lr,
                  weight_decay=weight_decay, schedule=schedule, amp=amp, compile=compile_model, seed=seed,
                  num_workers=workers, device=device, max_grad_norm=max_grad_norm)


@main.group()
def tune():
    """Tune stabilisers on rollouts."""


@tune.command("thermalizer")
@threads_option
@click.option("--emulator", "emulator_checkpoint", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--thermalizer", "thermalizer_checkpoint", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--init", type=click.Path(exists=True, file_okay=False), required=True, help="Dataset folder.")
@click.option("--s-init", "s_inits", default="6,7,8,9,10", show_default=True, help="Comma-separated s_init values.")
@click.option("--s-stop", "s_stops", default="2,3,4,5", show_default=True, help="Comma-separated s_stop values.")
@click.option("--trajectories", type=int, default=2, show_default=True)
@click.option("--steps", type=int, default=200, show_default=True, help="Rollout steps per pair (spectrum of the second half).")
@click.option("--split", type=click.Choice(["test", "valid", "train"]), default="test", show_default=True)
@click.option("--runaway-level", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@click.option("--progress/--no-progress", default=True, show_default=True)
def tune_thermalizer_command(emulator_checkpoint, thermalizer_checkpoint, init, s_inits, s_stops, trajectories, steps,
                             split, runaway_level, seed, device, progress):
    """Grid search of (s_init, s_stop) by KE-spectrum match; writes the best pair beside the thermalizer.

    \b
    python -m emu.cli tune thermalizer --emulator run/last.pt --thermalizer th/last.pt --init data/ --steps 200
    """
    from emu.stabilizers.thermalizer import tune_thermalizer

    tune_thermalizer(emulator_checkpoint, thermalizer_checkpoint, init, s_inits=_int_list(s_inits, "s-init"),
                     s_stops=_int_list(s_stops, "s-stop"), trajectories=trajectories, steps=steps, split=split,
                     runaway_level=runaway_level, seed=seed, device=device, progress=progress, echo=click.echo)


@main.command()
@threads_option
@click.option("--emulator", "checkpoint", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--init", "init", type=click.Path(exists=True, file_okay=False), required=True, help="Dataset folder.")
@click.option("--trajectories", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--split", type=click.Choice(["test", "valid", "train"]), default="test", show_default=True)
@click.option("--divergence-threshold", type=float, default=1e3, show_default=True,
              help="RMS of the normalised state above which a trajectory is flagged as diverged.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@click.option("--out", type=click.Path(dir_okay=False), default="rollout.h5", show_default=True)
@click.option("--stabilizer", default=None, metavar="METHOD:CKPT",
              help="Correct every step with a stabiliser, e.g. thermalizer:th/last.pt (paper Algorithm 1).")
@click.option("--thermalizer", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Short for --stabilizer thermalizer:CKPT.")
@click.option("--fixed-level", type=int, default=None,
              help="Thermalizer diagnostic: thermalize every step from this level, without the classifier.")
@click.option("--no-fresh-noise", is_flag=True,
              help="Thermalizer diagnostic: denoise the state as it is, without re-noising it to its predicted level.")
@click.option("--s-init", type=int, default=None, help="Thermalizer: thermalize where the predicted level exceeds "
              "this. [default: the pair in thermalizer_levels.json beside the checkpoint, else 7]")
@click.option("--s-stop", type=int, default=None, help="Thermalizer: denoise down to this level. [default: as --s-init, else 4]")
@click.option("--sns-path", type=click.Choice(["A", "B", "C"]), default=None,
              help="SNS traversal of the (previous, current) noise-level plane: A previous frame first (the paper's "
                   "best), B current first, C equalise then diagonal. [default: A]")
@click.option("--activation-threshold", type=int, default=None,
              help="SNS: leave samples whose two predicted levels are both below this (the paper: 5 on QG). [default: none]")
@click.option("--sns-mode", type=click.Choice(["refine", "generate"]), default=None,
              help="SNS: refine the emulator's output (Algorithm 1), or generate each state from pure noise "
                   "conditioned on the previous one (Algorithm 2; 1000 network calls a step). [default: refine]")
@click.option("--runaway-level", type=int, default=None,
              help="Predicted levels above this are flagged and corrected from this level. [default: thermalizer "
                   "100, sns 200]")
@click.option("--progress/--no-progress", default=True, show_default=True)
def rollout(checkpoint, init, trajectories, steps, split, divergence_threshold, seed, device, out, stabilizer,
            thermalizer, fixed_level, no_fresh_noise, s_init, s_stop, sns_path, activation_threshold, sns_mode,
            runaway_level, progress):
    """Roll an emulator out from dataset initial states (optionally thermalized); streams the states to HDF5.

    \b
    python -m emu.cli rollout --emulator run/last.pt --init data/ --trajectories 1 --steps 20 --out r.h5
    python -m emu.cli rollout --emulator run/last.pt --thermalizer th/last.pt --s-init 7 --s-stop 4 --init data/ --trajectories 1 --steps 20 --out rt.h5
    python -m emu.cli rollout --emulator run/last.pt --stabilizer sns:sns/last.pt --init data/ --trajectories 1 --steps 20 --out rs.h5

    --split must hold data (no fallback to another split); a damaged or non-plain checkpoint is refused.
    """
    from emu.training.rollouts import rollout_to_file

    method = "thermalizer" if thermalizer else (stabilizer or "").partition(":")[0]
    given = {"thermalizer": {"--fixed-level": fixed_level, "--no-fresh-noise": no_fresh_noise or None,
                             "--s-init": s_init, "--s-stop": s_stop},
             "sns": {"--sns-path": sns_path, "--activation-threshold": activation_threshold, "--sns-mode": sns_mode}}
    for owner, flags in given.items():
        misplaced = [flag for flag, value in flags.items() if value is not None and method != owner]
        if misplaced:
            raise UserError(f"{', '.join(misplaced)} {'is a' if len(misplaced) == 1 else 'are'} {owner} "
                            f"option{'s' if len(misplaced) > 1 else ''}: use {'it' if len(misplaced) == 1 else 'them'} "
                            f"with --stabilizer {owner}:CKPT" + (" (or --thermalizer CKPT)" if owner == "thermalizer" else ""))
    options = {"fixed_level": fixed_level, "fresh_noise": False if no_fresh_noise else None, "path": sns_path,
               "activation_threshold": activation_threshold, "mode": sns_mode}
    result = rollout_to_file(checkpoint, init, out, trajectories=trajectories, steps=steps, split=split,
                             divergence_threshold=divergence_threshold, device=device, seed=seed, progress=progress,
                             stabilizer=stabilizer, thermalizer=thermalizer, s_init=s_init, s_stop=s_stop,
                             runaway_level=runaway_level,
                             stabilizer_options={k: v for k, v in options.items() if v is not None})
    mse = result["mse"]
    diverged = [int(d) for d in result["diverged_at"]]
    # A few steps on a log scale: the whole curve is in the file (emu/mse), not on the terminal.
    mean_mse = np.nanmean(mse, axis=0) if mse.shape[1] > 1 else np.array([])
    shown = sorted({s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000) if s < len(mean_mse)}
                   | ({len(mean_mse) - 1} if len(mean_mse) > 1 else set()))
    click.echo(f"{trajectories} trajectories x {steps} steps from {result['split']} -> {out}")
    if shown:
        click.echo("mean MSE vs solver (normalised): " + ", ".join(f"step {s}: {mean_mse[s]:.3g}" for s in shown))
    click.echo(f"diverged at: {diverged} (-1 = never)")
    if "skipped" in result:  # SNS
        evaluations, skipped = result["denoising_steps"][:, 1:], result["skipped"][:, 1:]
        click.echo(f"refined {int((evaluations > 0).sum())} of {evaluations.size} sample-steps with "
                   f"{int(evaluations.sum())} network evaluations ({evaluations.mean():.1f} per sample-step); skipped "
                   f"{int(skipped.sum())} of {skipped.size} sample-steps (--activation-threshold); median predicted "
                   f"levels: previous {float(np.median(result['previous_level'][:, 1:])):.0f}, current "
                   f"{float(np.median(result['predicted_level'][:, 1:])):.0f}")
        if result["runaway"][:, 1:].any():
            click.echo(f"warning: {int(result['runaway'][:, 1:].sum())} sample-steps had a predicted level above "
                       "--runaway-level or a non-finite state (flagged in emu/runaway)", err=True)
    elif "denoising_steps" in result:
        applied = result["denoising_steps"][:, 1:]
        runaway = result["runaway"][:, 1:]
        click.echo(f"thermalized {int((applied > 0).sum())} of {applied.size} sample-steps, "
                   f"{int(applied.sum())} denoising steps in all; median predicted level "
                   f"{float(np.median(result['predicted_level'][:, 1:])):.0f}")
        if runaway.any():
            click.echo(f"warning: predicted level ran away (> {runaway_level or 100}) in {int(runaway.sum())} sample-steps "
                       "(flagged in emu/runaway; corrected from --runaway-level)", err=True)


@main.command()
@threads_option
@click.option("--koopman", "koopman_checkpoint", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Koopman prior from `emu train koopman`.")
@click.option("--score", "score_checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Window score network from `emu train score` (not needed for --mode prior).")
@click.option("--init", type=click.Path(exists=True, file_okay=False), required=True,
              help="Dataset folder: forecasts start from the first snapshot of its trajectories.")
@click.option("--horizon", type=int, default=50, show_default=True, help="Frames forecast after the initial state.")
@click.option("--mode", type=click.Choice(["plan", "autoregressive", "prior"]), default="plan", show_default=True,
              help="plan: the whole sequence in one pass (R = T); autoregressive: window by window (R = 1); "
                   "prior: the Koopman prior alone.")
@click.option("--members", type=int, default=1, show_default=True, help="Ensemble members per trajectory.")
@click.option("--trajectories", type=int, default=2, show_default=True)
@click.option("--split", type=click.Choice(["test", "valid", "train"]), default="test", show_default=True)
@click.option("--steps", type=int, default=64, show_default=True, help="Sampler (predictor) steps.")
@click.option("--corrections", type=int, default=1, show_default=True, help="Langevin corrector steps per step.")
@click.option("--tau", type=float, default=0.5, show_default=True, help="Langevin step size.")
@click.option("--strength", type=float, default=1.0, show_default=True, help="Guidance strength (0: unconditional).")
@click.option("--observation-noise", type=float, default=0.1, show_default=True,
              help="sigma_y of the Gaussian likelihood of the prior (normalised units).")
@click.option("--gamma", type=float, default=None,
              help="Weight of (sigma/mu)^2 in its variance. [default: 1]")
@click.option("--operator", default="coarsen:4", show_default=True,
              help="How the prior is observed: identity, coarsen:F (F x F block means) or frames:S (every S-th frame).")
@click.option("--prior-error", type=click.Choice(["calibrated", "none"]), default="calibrated", show_default=True,
              help="calibrated: observe the prior's frame k with noise sqrt(sigma_y^2 + e_k^2), e_k its RMS error at "
                   "lead k measured on the valid split of --calibration-data; none: sigma_y for every frame.")
@click.option("--calibration-data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Dataset folder whose valid trajectories calibrate the prior's error. [default: --init]")
@click.option("--window-stride", type=int, default=None,
              help="Plan mode: score windows every S frames (1 <= S <= W; S = 1 is SDA's composition). "
                   "[default: W - 2, at least 1: exact at t = 0 for first-order dynamics; 3 for W = 5, a third of the "
                   "network calls]")
@click.option("--frames-per-run", type=int, default=1, show_default=True,
              help="Autoregressive mode: frames R each sampler run generates (1 <= R <= W - 1).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@click.option("--out", type=click.Path(dir_okay=False), default="forecast.h5", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def forecast(koopman_checkpoint, score_checkpoint, init, horizon, mode, members, trajectories, split, steps,
             corrections, tau, strength, observation_noise, gamma, operator, prior_error, calibration_data,
             window_stride, frames_per_run, seed, device, out, progress):
    """Cohesion: forecast with the Koopman prior refined by guided diffusion over the whole sequence
    (plan) or window by window (autoregressive); writes the dataset's HDF5 layout with the timing.

    \b
    python -m emu.cli forecast --koopman koopman/last.pt --score score/last.pt --init data/ --horizon 6 --mode plan --members 2 --steps 8 --out f.h5
    """
    from emu.data.files import check_writable
    from emu.stabilizers.cohesion import CohesionSettings, forecast_to_file

    check_writable(out, "--out")
    settings = CohesionSettings(steps=steps, corrections=corrections, tau=tau, strength=strength,
                                observation_noise=observation_noise, gamma=gamma, operator=operator,
                                window_stride=window_stride, frames_per_run=frames_per_run)
    calibrate_on = (calibration_data or init) if prior_error == "calibrated" else None
    result = forecast_to_file(koopman_checkpoint, score_checkpoint, init, out, horizon=horizon, mode=mode,
                              members=members, trajectories=trajectories, split=split, settings=settings,
                              calibrate_on=calibrate_on, device=device, seed=seed, progress=progress)
    timings = result["timings"]
    mse = np.nanmean(result["mse"], axis=0)
    shown = [s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if s < len(mse)] + [len(mse) - 1]
    click.echo(f"{trajectories} trajectories x {members} members x {horizon} frames ({mode}) -> {out}")
    if result["settings"].prior_error is not None:
        errors = result["settings"].prior_error
        click.echo(f"prior error calibrated on {calibrate_on} (valid): RMS {errors[0]:.3g} at lead 0, "
                   f"{errors[min(len(errors) - 1, horizon)]:.3g} at lead {min(len(errors) - 1, horizon)}")
    click.echo(f"prior {timings['prior_seconds']:.2f} s, diffusion {timings['diffusion_seconds']:.2f} s "
               f"({(timings['prior_seconds'] + timings['diffusion_seconds']) / horizon * 1e3:.1f} ms per frame)")
    if len(mse) > 1:
        click.echo("mean MSE vs solver (normalised): " + ", ".join(f"frame {s}: {mse[s]:.3g}" for s in sorted(set(shown))))


@main.group("thermalizer")
def thermalizer_group():
    """Inspect a trained Thermalizer: level calibration, denoiser check, automatic levels."""


@thermalizer_group.command("check")
@threads_option
@click.option("--thermalizer", "checkpoint", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Dataset folder: clean held-out states come from its valid split (else test).")
@click.option("--split", type=click.Choice(["valid", "test", "train"]), default=None,
              help="Split to take clean states from. [default: valid, else test]")
@click.option("--states", type=int, default=64, show_default=True, help="Clean held-out states.")
@click.option("--s-stop", type=int, default=4, show_default=True, help="s_stop of the denoiser check.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Calibration curve PNG. [default: calibration.png beside the checkpoint]")
@click.option("--write/--no-write", default=True, show_default=True,
              help="Write the automatic (s_init, s_stop) to thermalizer_levels.json beside the checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
def thermalizer_check(checkpoint, data_dir, split, states, s_stop, plot, write, seed, device):
    """Predicted vs true noise level on clean held-out states noised to s = 0..100, the denoiser check
    (noise to s = 10, 30, 60, thermalize to s_stop, MSE to the clean state), and automatic levels.

    \b
    python -m emu.cli thermalizer check --thermalizer th/last.pt --data data/
    """
    from pathlib import Path

    from emu.data.files import check_writable
    from emu.stabilizers.thermalizer import check_thermalizer

    plot = plot or str(Path(checkpoint).with_name("calibration.png"))
    check_writable(plot, "--plot")
    if not (isinstance(states, int) and states >= 1):
        raise ConfigError(f"states must be an integer >= 1, got {states!r}")
    check_thermalizer(checkpoint, data_dir, states=states, s_stop=s_stop, split=split, device=device, plot=plot,
                      write=write, seed=seed, echo=click.echo)


@main.group()
def julia():
    """The julia backend: check and install Julia and emu's Julia package (through juliacall)."""


@julia.command("status")
def julia_status():
    """What the julia backend would use (juliacall, Julia, the Emu package); never starts Julia.

    \b
    python -m emu.cli julia status
    """
    from emu.julia import status

    lines = status()
    width = max(len(item) for item, _ in lines)
    for item, value in lines:
        click.echo(f"{item:<{width}}  {value}")


@julia.command("install")
@click.option("--cuda", is_flag=True, help="Also install CUDA.jl (for --backend julia --device cuda).")
@click.option("--update", is_flag=True, help="Update the Julia packages to their newest compatible versions.")
def julia_install(cuda, update):
    """Install Julia (if needed) and emu's Julia packages now, showing progress (several minutes, once).

    Without this, the first `--backend julia` run does the same wait. PYTHON_JULIAPKG_EXE=/path/to/julia
    uses a Julia you installed; PYTHON_JULIAPKG_PROJECT chooses the Julia environment.

    \b
    python -m emu.cli julia install
    python -m emu.cli julia install --cuda
    """
    from emu.julia import install

    try:
        main_module = install(cuda=cuda, update=update)
    except BackendUnavailable as error:
        raise click.ClickException(str(error)) from error
    version = main_module.seval("string(VERSION)")
    click.echo(f"Julia {version} with emu's Julia package (Emu) installed and loaded"
               + (", CUDA.jl working" if cuda else "") + "; `--backend julia` is ready.")

if __name__ == "__main__":
    main()
