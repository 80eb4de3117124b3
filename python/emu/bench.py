"""Solver throughput, with honest ratios: emu against its peer, its own FFTs and a busy machine.

Speed is measured here and in scripts/, never in tests. `run_benchmarks` (the `emu bench` command)
times, for each grid and backend, in one process run:

  emu      emu's solver step of the whole batch (default stepper, random initial condition), in this
           process: the bare-FFT measurement must use the very plans the step uses (the backend's
           process-wide `FFTWPlans` cache), and the julia/fake-julia and GPU backends live here too;
  peer     pyqg 0.7.2 (qg) or jax-cfd (kolmogorov), one trajectory, in its own persistent worker
           process (`emu.bench_peers`, run by the peer's python: --pyqg-python / --jaxcfd-python, by
           default this interpreter when it imports the peer), which builds the model once per grid,
           warms up and then answers "run k steps" with the seconds they took (JSON lines);
  fft      the bare time of the transforms one step performs (`fft_set`), with the backend's own
           plans: FFTW plan executions (`FFTWPlans`, the numpy and torch-CPU backends) or
           backend.rfft2/irfft2 (elsewhere);
  loaded   with --busy-cores N: emu's step again while N busy processes spin (pure CPU); they are
           stopped (SIGSTOP) during every other measurement.

These run in R rounds (--rounds), interleaved (emu, peer, fft, loaded; the order reversed every
other round, so drift and the neighbours' load hit both sides alike), each about --seconds/R of
stepping. Each round gives one ratio per pair; the table reports their median and range
(`RatioStats`: "median [min-max]") and the rounds count, with steps/s medians:
  vs peer      = trajectory-steps/s of emu / steps/s of the peer (> 1: emu faster);
  step/FFT     = emu's step time / the bare time of its FFTs (1.0 would be a step that is only FFTs);
  loaded/quiet = emu's step time with N busy processes / without (1.20: 20% slower when loaded).
The peers run with emu's thread count (--threads; pyqg ntd, OMP_NUM_THREADS, and for jax at one
thread XLA_FLAGS=--xla_cpu_multi_thread_eigen=false), and every row shows cpu/wall, the CPU seconds
per wall second its process used while timed: the threads that really ran.

Configurations match: the QG presets are pyqg's parameters (eddy = pyqg's defaults), passed to
pyqg from emu's config; Kolmogorov is jax-cfd's `ForcedNavierStokes2D` (drag 0.1, k_f = 4, smooth)
with emu's viscosity and dt, started from emu's initial vorticity.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from emu.backends import BackendUnavailable, get_backend
from emu.errors import UserError
from emu.solvers import make_stepper
from emu.systems import make_config, make_equation

WORKER = Path(__file__).with_name("bench_peers.py")


# -- timing primitives ------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Timing:
    """One timed chunk: `steps` steps (or FFT sets) in `seconds` of wall time, `cpu_seconds` of the
    timed process's CPU time over them (None where not measured)."""

    steps: int
    seconds: float
    cpu_seconds: float | None = None

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else math.inf


@dataclass(frozen=True)
class RatioStats:
    """Median and range of per-round values."""

    median: float
    low: float
    high: float
    values: tuple[float, ...] = ()

    @property
    def rounds(self) -> int:
        return len(self.values)

    def text(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high, "rounds": self.rounds,
                "values": list(self.values)}


def summarize(values) -> RatioStats:
    """RatioStats of `values` (at least one)."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("summarize needs at least one value")
    return RatioStats(statistics.median(values), min(values), max(values), values)


def per_round_ratios(numerator: list[Timing], denominator: list[Timing], scale: float = 1.0) -> list[float]:
    """scale * (numerator's seconds per step) / (denominator's), round by round."""
    if len(numerator) != len(denominator):
        raise ValueError(f"rounds differ: {len(numerator)} against {len(denominator)}")
    return [scale * a.seconds_per_step / b.seconds_per_step for a, b in zip(numerator, denominator)]


def steps_for(run: Callable[[int], Timing], seconds: float, granularity: int = 1, probe_seconds: float = 0.02,
              max_steps: int = 10**7) -> int:
    """How many steps of `run` (a multiple of `granularity`) take about `seconds`: probes with 1, 4,
    16, ... granules until one probe lasts `probe_seconds` (or `seconds`, if shorter)."""
    steps = granularity
    while True:
        timing = run(steps)
        if timing.seconds >= min(probe_seconds, seconds) or steps >= max_steps:
            break
        steps *= 4
    granules = round(seconds / timing.seconds_per_step / granularity)
    return int(min(max(granules, 1) * granularity, max_steps))


def interleave(runners: dict[str, Callable[[int], Timing]], steps: dict[str, int], rounds: int) -> dict[str, list[Timing]]:
    """`rounds` rounds of every runner with its step count, in the given order in even rounds and
    reversed in odd ones. Returns each runner's Timings, one per round."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(runners)
    timings: dict[str, list[Timing]] = {name: [] for name in names}
    for index in range(rounds):
        for name in (names if index % 2 == 0 else names[::-1]):
            timings[name].append(runners[name](steps[name]))
    return timings


# -- busy cores -------------------------------------------------------------------------------------
class BusyCores:
    """`count` background processes that spin on the CPU (numpy, `bench_peers.py spin`), stopped
    (SIGSTOP) except inside `loaded()`; all killed and reaped on exit, even after an error. They also
    die with this process (PR_SET_PDEATHSIG, and a parent check in their loop).

        with BusyCores(1) as busy:
            with busy.loaded():
                ...   # one other core busy
    """

    def __init__(self, count: int, settle: float = 0.05, python: str | None = None):
        if not (isinstance(count, int) and count >= 0):
            raise ValueError(f"--busy-cores must be an integer >= 0, got {count!r}")
        self.count, self.settle = count, settle
        self.python = python or sys.executable
        self.processes: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def __enter__(self) -> "BusyCores":
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        try:
            for _ in range(self.count):
                self.processes.append(subprocess.Popen([self.python, str(WORKER), "spin"], stdin=subprocess.DEVNULL,
                                                       stdout=subprocess.PIPE, env=env))
            for process in self.processes:
                if not _Lines(process.stdout).readline(120).startswith(b"ready"):
                    raise RuntimeError(f"busy process {process.pid} did not start (status {process.poll()})")
            self._signal(signal.SIGSTOP)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _signal(self, signum) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, signum)
        if signum == signal.SIGSTOP:  # wait until the kernel has them stopped ("T" in /proc)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not all(process_state(p) in ("T", "t", None) for p in self.pids):
                time.sleep(0.001)

    @contextlib.contextmanager
    def loaded(self):
        """The busy processes run inside this block (after `settle` seconds to get them scheduled)."""
        if not self.processes:
            yield
            return
        self._signal(signal.SIGCONT)
        time.sleep(self.settle)
        try:
            yield
        finally:
            self._signal(signal.SIGSTOP)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()  # SIGKILL ends stopped processes too
        for process in self.processes:
            process.wait(timeout=10)
            if process.stdout:
                process.stdout.close()


def process_state(pid: int) -> str | None:
    """The one-letter state of process `pid` from /proc (R, S, T, Z, ...), None when it is gone or
    there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[0]


class _Lines:
    """Lines of an unbuffered binary pipe, read with a timeout (select) and without losing what
    follows a line in the same read."""

    def __init__(self, stream):
        self.stream, self.buffer = stream, b""

    def readline(self, timeout: float) -> bytes:
        """The next line with its newline; what is left (maybe b"") at end of file. TimeoutError after
        `timeout` seconds without a whole line."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.stream], [], [], left)[0]:
                raise TimeoutError(f"no answer within {timeout:g} s")
            chunk = os.read(self.stream.fileno(), 65536)
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"


# -- peers ------------------------------------------------------------------------------------------
PEER_OPTIONS = {
    # kind: (option, module to find, how to install it, name)
    "pyqg": ("--pyqg-python", "pyqg", ("build the side environment of scripts/pyqg_reference.py (pyqg 0.7.2 needs "
                                       "numpy<2, cython<3 and pyfftw)"), "pyqg"),
    "jaxcfd": ("--jaxcfd-python", "jax_cfd", "install it there: {python} -m pip install 'jax[cpu]' jax-cfd", "jax-cfd"),
}


class PeerWorker:
    """A persistent peer process (`bench_peers.py KIND` under `python`), spoken to in JSON lines.

        with PeerWorker("pyqg", "/venv/bin/python") as peer:
            peer.setup({...})        # builds the model, warms up
            timing = peer.run(100)   # Timing of 100 steps, measured inside the worker
    """

    def __init__(self, kind: str, python: str, *, env: dict | None = None, option: str | None = None,
                 timeout: float = 300.0):
        self.kind, self.python, self.option = kind, python, option
        self.label, self.granularity, self.threads = kind, 1, {}
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen([python, str(WORKER), kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._stderr, env=env, bufsize=0)
        self._lines = _Lines(self.process.stdout)
        try:
            hello = self._receive(timeout)
        except BaseException:
            self.close()
            raise
        if "error" in hello:
            self.close()
            if hello.get("missing") is not None and kind in PEER_OPTIONS:
                option_name, _, install, name = PEER_OPTIONS[kind]
                where = f"{option or option_name} {python}" if option else f"{name} (this python, {python})"
                raise UserError(f"{where}: {name} is not usable there ({hello['error']}); {install.format(python=python)}"
                                + ("" if option else f", or pass {option_name} PATH, or --no-peers"))
            raise RuntimeError(f"{kind} worker ({python}): {hello['error']}")
        self.version = hello.get("version", "")
        self.pid = hello.get("pid", self.process.pid)

    def __enter__(self) -> "PeerWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stderr_tail(self, limit: int = 2000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-limit:]

    def _receive(self, timeout: float) -> dict:
        try:
            line = self._lines.readline(timeout)
        except TimeoutError as error:
            raise RuntimeError(f"{self.kind} worker ({self.python}) gave {error}:\n{self.stderr_tail()}") from None
        if not line:
            status = self.process.wait(timeout=10)
            raise RuntimeError(f"{self.kind} worker ({self.python}) exited with status {status}:\n{self.stderr_tail()}")
        return json.loads(line)

    def request(self, message: dict, timeout: float = 600.0) -> dict:
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        reply = self._receive(timeout)
        if "error" in reply:
            raise RuntimeError(f"{self.label} worker ({self.python}): {reply['error']}\n{self.stderr_tail()}")
        return reply

    def setup(self, params: dict, timeout: float = 600.0) -> dict:
        reply = self.request({"op": "setup", "params": params}, timeout)
        self.label, self.granularity, self.threads = reply["label"], int(reply["granularity"]), reply.get("threads", {})
        return reply

    def run(self, steps: int) -> Timing:
        reply = self.request({"op": "run", "steps": int(steps)})
        if not reply.get("finite", True):
            raise RuntimeError(f"{self.label}: the benchmark state became non-finite")
        return Timing(int(reply["steps"]), float(reply["seconds"]), reply.get("cpu_seconds"))

    def close(self) -> None:
        process = self.process
        if process.poll() is None:
            try:
                process.stdin.write(b'{"op": "quit"}\n')
                process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            if stream:
                stream.close()
        self._stderr.close()


def resolve_peer_python(kind: str, given: str | None) -> str | None:
    """The python that runs peer `kind`: `given` (checked to be an executable), else this
    interpreter when it finds the peer's module, else None."""
    option, module, install, name = PEER_OPTIONS[kind]
    if given is not None:
        if not (os.path.isfile(given) and os.access(given, os.X_OK)):
            raise UserError(f"{option} {given}: no such executable; give the python of an environment with {name} "
                            f"({install.format(python='PYTHON')})")
        return given
    return sys.executable if importlib.util.find_spec(module) is not None else None


def peer_environment(kind: str, threads: int, device: str | None) -> dict:
    """The worker's environment: emu's thread count for the peer's pools too."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if kind == "jaxcfd":
        flags = env.get("XLA_FLAGS", "")
        if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
            env["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
        if device in (None, "cpu"):
            env.setdefault("JAX_PLATFORMS", "cpu")
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


def peer_params(kind: str, config, dtype: str, threads: int, scratch: Path) -> dict:
    """The peer's configuration, equal to emu's `config` (raises UserError where the peer cannot
    express it)."""
    if kind == "pyqg":
        if config.filter != "exponential":
            raise UserError(f"pyqg has only the exponential filter; this config has filter {config.filter!r} "
                            "(use --no-peers)")
        return {"grid": config.grid_size, "L": config.domain_length, "rd": config.deformation_radius,
                "H1": config.upper_layer_depth, "delta": config.layer_depth_ratio, "U1": config.upper_layer_velocity,
                "U2": config.lower_layer_velocity, "beta": config.beta, "rek": config.bottom_drag,
                "filterfac": config.filter_factor, "dt": config.dt, "threads": threads}
    if kind == "jaxcfd":
        fixed = {"drag": 0.1, "forcing_wavenumber": 4, "forcing_amplitude": 1.0, "domain_extent": 2 * math.pi}
        differing = {key: getattr(config, key) for key, value in fixed.items() if not math.isclose(getattr(config, key), value)}
        if differing:
            raise UserError(f"jax-cfd's ForcedNavierStokes2D fixes {fixed}; this config has {differing} (use --no-peers)")
        import numpy as np

        omega = make_equation(config, get_backend("numpy")).initial_condition(1, seed=0)[0]
        path = scratch / f"omega_{config.grid_size}.npy"
        np.save(path, omega)
        return {"grid": config.grid_size, "viscosity": config.viscosity, "dt": config.dt, "dtype": dtype,
                "initial_vorticity": str(path), "inner": 10}
    if kind == "sleep":
        return {"seconds_per_step": 1e-3}
    raise ValueError(f"unknown peer kind {kind!r}")


def peer_kind(system: str) -> str:
    return {"kolmogorov": "jaxcfd", "qg": "pyqg"}[system]


# -- emu's side -------------------------------------------------------------------------------------
def declared_fft_set(system: str, batch: int, n: int) -> list[tuple[str, tuple, tuple]]:
    """The transforms one default step performs, as (direction, input shape, physical shape): QG
    AB3: one batched inverse of (3, batch, 2, n, m) (q, u, v) and one forward of (2, batch, 2, n, n)
    (the fluxes); Kolmogorov CN-RK4: 5 stages, each an inverse of (4, batch, n, m) (u, v, omega_x,
    omega_y) and a forward of (batch, n, n). m = n//2 + 1."""
    m = n // 2 + 1
    if system == "qg":
        return [("inverse", (3, batch, 2, n, m), (n, n)), ("forward", (2, batch, 2, n, n), (n, n))]
    if system == "kolmogorov":
        return [("inverse", (4, batch, n, m), (n, n)), ("forward", (batch, n, n), (n, n))] * 5
    raise ValueError(f"no declared FFT set for system {system!r}")


@contextlib.contextmanager
def recording_ffts():
    """Records every ArrayBackend.rfft2/irfft2 call (direction, input shape, physical shape) made
    inside the block. Fused kernels that drive FFTW plans themselves are not seen (the list is then
    empty)."""
    from emu.backends import ArrayBackend

    calls: list[tuple[str, tuple, tuple]] = []
    forward, inverse = ArrayBackend.rfft2, ArrayBackend.irfft2

    def rfft2(self, field_):
        calls.append(("forward", tuple(field_.shape), tuple(field_.shape[-2:])))
        return forward(self, field_)

    def irfft2(self, field_hat, shape):
        calls.append(("inverse", tuple(field_hat.shape), tuple(shape)))
        return inverse(self, field_hat, shape)

    ArrayBackend.rfft2, ArrayBackend.irfft2 = rfft2, irfft2
    try:
        yield calls
    finally:
        ArrayBackend.rfft2, ArrayBackend.irfft2 = forward, inverse


def describe_fft_set(transforms: list[tuple[str, tuple, tuple]]) -> str:
    counts: dict[tuple, int] = {}
    for direction, shape, _ in transforms:
        counts[(direction, shape)] = counts.get((direction, shape), 0) + 1
    return " + ".join(f"{count} x {direction} {shape}" for (direction, shape), count in counts.items())


class EmuStep:
    """emu's solver for one configuration, in this process: `run(k)` times k steps of the batch."""

    def __init__(self, system: str, preset: str | None, backend: str, grid: int, dtype: str, batch: int,
                 device: str | None = None, warmup: int = 5):
        self.system, self.backend_name, self.grid, self.batch = system, backend, grid, batch
        self.config = make_config(system, preset, grid_size=grid)
        self.backend = get_backend(backend, device=device, dtype=dtype)
        self.equation = make_equation(self.config, self.backend)
        self.synchronize = _synchronizer(self.backend)
        self.recorded: list = []
        if backend == "julia":
            from emu.julia import JuliaSolver

            backend_ = self.backend
            self.solver = JuliaSolver(self.config, batch=batch, dtype=backend_.dtype, device=backend_.solver_device)
            self.solver.set_fields(self.equation.initial_condition(batch, seed=0))
            self.granularity = 10  # steps per call into Julia, as jax-cfd's are timed
            self.synchronize = self.solver.synchronize
            for _ in range(2):
                self.solver.step(self.granularity)
        else:
            self.granularity = 1
            self.stepper = make_stepper(self.equation, self.config.dt)
            self.state = self.stepper.init(self.equation.to_state(self.equation.initial_condition(batch, seed=0)))
            for _ in range(warmup):
                self.state = self.stepper.step(self.state)
            with recording_ffts() as calls:
                self.state = self.stepper.step(self.state)
            self.recorded = calls
        self.synchronize()

    def run(self, steps: int) -> Timing:
        if self.backend_name == "julia":
            calls = max(1, -(-steps // self.granularity))
            cpu, start = time.process_time(), time.perf_counter()
            for _ in range(calls):
                self.solver.step(self.granularity)
            self.synchronize()
            return Timing(calls * self.granularity, time.perf_counter() - start, time.process_time() - cpu)
        step, state = self.stepper.step, self.state
        self.synchronize()
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(steps):
            state = step(state)
        self.synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        self.state = state
        return Timing(steps, seconds, cpu)

    def finite(self) -> bool:
        if self.backend_name == "julia":
            return self.solver.all_finite()
        return self.backend.all_finite(self.state.state_hat)

    @property
    def fused(self):
        """The equation's fused operators (cupy's CUDA kernels, numba's CPU ones) or None."""
        return getattr(self.equation, "fused", None)

    def fft_set(self) -> tuple[list, str]:
        """(transforms of one step, where that list comes from): recorded from the step when it
        calls the backend's rfft2/irfft2, else the declared set of the system."""
        declared = declared_fft_set(self.system, self.batch, self.grid)
        if self.recorded:
            same = sorted(self.recorded) == sorted(declared)
            return self.recorded, "recorded" + (", as declared" if same else ", differs from the declared "
                                                 + describe_fft_set(declared))
        return declared, "declared" + (" (fused path)" if self.fused is not None else "")

    def path(self) -> str:
        if self.backend_name == "julia":
            return "julia"
        fused = self.fused
        text = f"fused {type(fused).__name__}" if fused is not None else "generic"
        if getattr(self.backend, "fused_kernels", False) and fused is None:
            text += " (backend has fused kernels, not for this system)"
        plans = getattr(self.backend, "fft", None)
        if plans is not None and hasattr(plans, "threads"):
            counts = sorted({fftw_threads(plans, shape, physical) for _, shape, physical in self.fft_set()[0]})
            text += f", fftw threads {'/'.join(map(str, counts))}"
        else:
            text += f", {self.backend_name} fft"
        return text


def fftw_threads(plans, shape: tuple, physical: tuple) -> int:
    """Threads FFTWPlans gives the plan of a transform of `shape` (as `FFTWPlans._build` decides)."""
    spectral_size = math.prod(shape[:-1]) * (physical[-1] // 2 + 1)
    return plans.threads if spectral_size >= getattr(plans, "threading_threshold", 0) else 1


def _synchronizer(backend) -> Callable[[], None]:
    if backend.name == "torch" and str(backend.device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    if backend.name == "cupy":  # kernels and cuFFT run asynchronously on CuPy's current stream
        return backend.native.cuda.get_current_stream().synchronize
    return lambda: None


class BareFFT:
    """The transforms of one step alone, on `emu.backend`'s own plans: `run(k)` times k sets.

    With FFTWPlans (numpy, torch on the CPU) each transform is its cached plan's `execute()` on data
    copied into the plan's input buffer beforehand (the copy untimed: a c2r plan destroys its input);
    elsewhere backend.rfft2/irfft2 closed by a device synchronise."""

    def __init__(self, emu: EmuStep):
        import numpy as np

        backend = emu.backend
        self.transforms, self.source = emu.fft_set()
        self.synchronize = emu.synchronize
        rng = np.random.default_rng(0)
        plans = getattr(backend, "fft", None)
        real = np.float32 if backend.dtype == "float32" else np.float64
        complex_ = np.complex64 if backend.dtype == "float32" else np.complex128
        self.plans_known = True
        self.items = []
        if plans is not None and hasattr(plans, "_plans"):
            self.method = "fftw plan.execute"
            get_plan = getattr(plans, "plan", None) or plans._plan
            for direction, shape, physical in self.transforms:
                dtype = complex_ if direction == "inverse" else real
                key = (direction, tuple(shape), np.dtype(dtype).str, tuple(physical))
                self.plans_known &= key in plans._plans
                plan = get_plan(direction, tuple(shape), dtype, tuple(physical))
                data = rng.standard_normal(shape).astype(dtype)
                if direction == "inverse":
                    data = data + 1j * rng.standard_normal(shape).astype(real)
                self.items.append((plan, data.astype(dtype)))
        else:
            self.method = f"{backend.name} rfft2/irfft2"
            for direction, shape, physical in self.transforms:
                data = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if direction == "inverse" else 0)
                self.items.append((direction, backend.asarray(data, complex_valued=direction == "inverse"), physical))
            self._backend = backend
        self.run(2)  # warm-up

    def run(self, sets: int) -> Timing:
        if self.method == "fftw plan.execute":
            import numpy as np

            seconds, clock = 0.0, time.perf_counter
            for _ in range(sets):
                for plan, data in self.items:
                    np.copyto(plan.input_array, data)
                    start = clock()
                    plan.execute()
                    seconds += clock() - start
            return Timing(sets, seconds)
        backend = self._backend
        self.synchronize()
        start = time.perf_counter()
        for _ in range(sets):
            for direction, data, physical in self.items:
                backend.irfft2(data, physical) if direction == "inverse" else backend.rfft2(data)
        self.synchronize()
        return Timing(sets, time.perf_counter() - start)


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

    synchronize = _synchronizer(array_backend)
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
    """Steps/s of jax-cfd's Kolmogorov solver in this process (the worker's `JaxCfdPeer`, built from
    emu's re1000 config and initial vorticity), or None if jax-cfd is not installed
    (scripts/bench_gpu_solvers.py; `emu bench` runs the same peer in a worker process instead)."""
    if importlib.util.find_spec("jax_cfd") is None:
        return None
    import numpy as np

    from emu.bench_peers import JaxCfdPeer

    config = make_config("kolmogorov", grid_size=grid)
    omega = make_equation(config, get_backend("numpy")).initial_condition(1, 0)[0]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "initial_vorticity.npy"
        np.save(path, omega)
        peer = JaxCfdPeer({"grid": grid, "dtype": dtype, "viscosity": viscosity, "dt": config.dt, "inner": inner,
                           "domain_extent": config.domain_extent, "initial_vorticity": str(path)})
    rate = calls_per_second(lambda: peer.advance(inner), seconds, warmup=2, minimum=2)
    if not peer.finite():
        raise RuntimeError("jax-cfd benchmark state became non-finite")
    return rate * inner, peer.label


# -- the benchmark ----------------------------------------------------------------------------------
def thread_settings() -> str:
    """emu's thread settings, as one line."""
    from emu.backends import cpu_threads

    parts = [f"emu cpu_threads()={cpu_threads()}", f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
             f"EMU_FFTW_THREADS={os.environ.get('EMU_FFTW_THREADS', 'unset')}"]
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        parts.append(f"torch.get_num_threads()={torch.get_num_threads()}")
    else:
        parts.append("torch not loaded")
    try:
        from emu.backends import FFTWPlans

        parts.append(f"FFTW plans under {FFTWPlans.threading_threshold} complex outputs: 1 thread")
    except ImportError:
        pass
    return ", ".join(parts)


def _peer_threads_text(threads: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in threads.items())


@dataclass
class _Row:
    solver: str
    grid: int
    batch: int
    rate: float
    cpu_per_wall: float | None
    vs_peer: RatioStats | None = None
    step_over_fft: RatioStats | None = None
    loaded_over_quiet: RatioStats | None = None
    path: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        row = {"solver": self.solver, "grid": self.grid, "batch": self.batch, "steps_per_second": self.rate,
               "cpu_per_wall": self.cpu_per_wall, "path": self.path, **self.extra}
        if not self.solver.startswith("emu"):
            return row
        row["vs_peer"] = self.vs_peer.median if self.vs_peer else float("nan")
        for key in ("vs_peer", "step_over_fft", "loaded_over_quiet"):
            stats = getattr(self, key)
            row[f"{key}_stats"] = stats.as_dict() if stats else None
        return row


def _cpu_per_wall(timings: list[Timing]) -> float | None:
    values = [t.cpu_seconds / t.seconds for t in timings if t.cpu_seconds is not None and t.seconds > 0]
    return statistics.median(values) if values else None


def _format_optional(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio_cell(stats: RatioStats | None, width: int) -> str:
    return f"{(stats.text() if stats else '-'):>{width}}"


def run_benchmarks(*, system: str, preset: str | None, backends: list[str], grids: list[int], dtype: str,
                   batch: int, seconds: float, peers: bool, pyqg_python: str | None, device: str | None,
                   jaxcfd_python: str | None = None, rounds: int = 5, fft: bool = True, busy_cores: int = 0,
                   json_path: str | None = None, echo: Callable[[str], None] = print) -> list[dict]:
    """Times every (grid, backend) pair against the peer, its bare FFTs and (busy_cores > 0) a busy
    machine in `rounds` interleaved rounds; prints the table; returns the rows (also to `json_path`)."""
    if not (seconds > 0):
        raise UserError(f"--seconds must be > 0, got {seconds}")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise UserError(f"--rounds must be an integer >= 1, got {rounds!r}")
    if not (isinstance(busy_cores, int) and busy_cores >= 0):
        raise UserError(f"--busy-cores must be an integer >= 0, got {busy_cores!r}")
    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    preset_name = make_config(system, preset).preset
    kind = peer_kind(system)
    given = {"pyqg": pyqg_python, "jaxcfd": jaxcfd_python}
    for name, python in given.items():  # a wrong path is an error even when that peer is not used here
        if python is not None:
            resolve_peer_python(name, python)
    if "julia" in backends:  # fail before any timing when Julia cannot start (and start it before torch)
        from emu.julia import start

        start()
    if "cupy" in backends:  # fail before any timing when CuPy or a GPU is missing
        from emu.cuda import require_cupy

        require_cupy()
    if "torch" in backends:
        import torch  # noqa: F401 - loaded now so that the header shows its threads

    from emu.backends import cpu_threads

    threads = cpu_threads()
    chunk = seconds / rounds
    notes: list[str] = []
    rows: list[_Row] = []
    summary: list[str] = []
    busy_summary: list[str] = []
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="emu-bench-")))
        peer = None
        if peers:
            python = resolve_peer_python(kind, given.get(kind))
            if python is None:
                option, _, install, name = PEER_OPTIONS[kind]
                notes.append(f"{name} not found in this python: {install.format(python=sys.executable)}, "
                             f"or pass {option} /path/to/venv/bin/python")
            else:
                peer = stack.enter_context(PeerWorker(kind, python, env=peer_environment(kind, threads, device),
                                                      option=PEER_OPTIONS[kind][0] if given.get(kind) else None))
        echo(f"emu bench: {system} ({preset_name}), {dtype}, {rounds} rounds interleaved, ~{seconds:g} s per "
             f"measurement (~{chunk:.2g} s per round)")
        echo(f"threads: {thread_settings()}")
        if peer is not None:
            if kind == "jaxcfd":
                flags = peer_environment(kind, threads, device).get("XLA_FLAGS")
                peer_threads = f"XLA_FLAGS={flags}" if flags else "XLA_FLAGS unset (jax's own thread pools)"
            else:
                peer_threads = f"ntd={threads}"
            echo(f"peer: {PEER_OPTIONS[kind][3]} {peer.version} in a worker process ({peer.python}, pid {peer.pid}), "
                 f"OMP_NUM_THREADS={threads}, {peer_threads}")
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        if load is not None:
            echo(f"machine: {os.cpu_count()} cpus, load average {load[0]:.2f} at start"
                 + (f"; {busy_cores} busy process(es) of this bench, running only while 'loaded' is timed"
                    if busy_cores else ""))
        busy = stack.enter_context(BusyCores(busy_cores)) if busy_cores else None
        header = (f"{'solver':<22}{'grid':>6}{'batch':>7}{'steps/s':>12}{'traj-steps/s':>14}{'Mpts*steps/s':>15}"
                  f"{'cpu/wall':>10}{'vs peer':>20}{'step/FFT':>20}" + (f"{'loaded/quiet':>20}" if busy else "")
                  + "  path")
        echo("ratios: median [min-max] of per-round ratios; vs peer = emu traj-steps/s / peer steps/s; "
             "step/FFT = step time / bare time of its FFTs" + ("; loaded/quiet = step time with the busy "
                                                                "processes / without" if busy else ""))
        echo(header)
        echo("-" * len(header))
        for grid in grids:
            config = make_config(system, preset, grid_size=grid)
            peer_ok = False
            if peer is not None:
                try:
                    peer.setup(peer_params(kind, config, dtype, threads, scratch))
                    peer_ok = True
                except UserError as error:
                    notes.append(str(error))
            peer_timings: list[Timing] = []
            grid_rows: list[_Row] = []
            for backend in backends:
                label = f"emu {backend}" + (f" ({device})" if device else "")
                try:
                    emu = EmuStep(system, preset, backend, grid, dtype, batch, device)
                except BackendUnavailable as error:
                    notes.append(f"{backend}: {error}")
                    continue
                runners: dict[str, Callable[[int], Timing]] = {"emu": emu.run}
                steps = {"emu": steps_for(emu.run, chunk, emu.granularity)}
                if peer_ok:
                    runners["peer"] = peer.run
                    steps["peer"] = steps_for(peer.run, chunk, peer.granularity)
                bare = None
                if fft and backend != "julia":
                    bare = BareFFT(emu)
                    runners["fft"] = bare.run
                    steps["fft"] = steps_for(bare.run, chunk)
                if busy is not None:
                    def loaded(count, emu=emu, busy=busy):
                        with busy.loaded():
                            return emu.run(count)

                    runners["loaded"] = loaded
                    steps["loaded"] = steps["emu"]
                timings = interleave(runners, steps, rounds)
                if not emu.finite():
                    raise RuntimeError(f"{label} {grid}: the benchmark state became non-finite")
                fused = emu.fused
                row = _Row(label, grid, batch, statistics.median(t.steps_per_second for t in timings["emu"]),
                           _cpu_per_wall(timings["emu"]), path=emu.path(),
                           extra={"rounds": rounds, "fused": type(fused).__name__ if fused is not None else None,
                                  "backend_fused_kernels": bool(getattr(emu.backend, "fused_kernels", False))})
                on_cpu = backend in ("numpy", "torch", "julia") and device in (None, "cpu")
                if on_cpu and threads == 1 and row.cpu_per_wall is not None and row.cpu_per_wall < 0.8:
                    notes.append(f"{label} {grid}: cpu/wall {row.cpu_per_wall:.2f} on one thread: this process got "
                                 "that fraction of a core while timed (other load on the machine); every number here "
                                 "is affected by it")
                if peer_ok:
                    peer_timings += timings["peer"]
                    row.vs_peer = summarize(per_round_ratios(timings["peer"], timings["emu"], scale=batch))
                if bare is not None:
                    row.step_over_fft = summarize(per_round_ratios(timings["emu"], timings["fft"]))
                    row.extra.update(fft_set=describe_fft_set(bare.transforms), fft_set_source=bare.source,
                                     fft_method=bare.method,
                                     fft_sets_per_second=statistics.median(t.steps_per_second for t in timings["fft"]))
                    summary.append(f"fft set {label} {grid}: {describe_fft_set(bare.transforms)} per step "
                                   f"[{bare.source}; {bare.method}"
                                   + ("" if bare.plans_known else "; plans built for this measurement, not the step's")
                                   + f"], step/FFT {row.step_over_fft.text()}")
                if busy is not None:
                    row.loaded_over_quiet = summarize(per_round_ratios(timings["loaded"], timings["emu"]))
                    slowdown = row.loaded_over_quiet.median - 1
                    cpu_loaded = _cpu_per_wall(timings["loaded"])
                    row.extra["cpu_per_wall_loaded"] = cpu_loaded
                    busy_summary.append(
                        f"busy {label} {grid}: {100 * abs(slowdown):.0f}% {'slower' if slowdown >= 0 else 'faster'} "
                        f"with {busy_cores} busy process(es) (loaded/quiet {row.loaded_over_quiet.text()}, {rounds} "
                        f"rounds; cpu/wall {_format_optional(cpu_loaded)} loaded, {_format_optional(row.cpu_per_wall)} "
                        "quiet)" + ("  <-- more than 20%" if slowdown > 0.2 else ""))
                grid_rows.append(row)
            if peer_ok and peer_timings:
                rate = statistics.median(t.steps_per_second for t in peer_timings)
                rows.append(_Row(peer.label, grid, 1, rate, _cpu_per_wall(peer_timings),
                                 path=_peer_threads_text(peer.threads),
                                 extra={"rounds": len(peer_timings), "threads": peer.threads}))
                _echo_row(rows[-1], busy is not None, echo, peer_row=True)
            for row in grid_rows:
                rows.append(row)
                _echo_row(row, busy is not None, echo)
    for line in summary + busy_summary:
        echo(line)
    for note in dict.fromkeys(notes):
        echo(f"note: {note}")
    result = [row.as_dict() for row in rows]
    if json_path:
        Path(json_path).write_text(json.dumps({"system": system, "preset": preset_name, "dtype": dtype,
                                               "rounds": rounds, "seconds": seconds, "busy_cores": busy_cores,
                                               "threads": thread_settings(), "cpus": os.cpu_count(),
                                               "load_average_at_start": load[0] if load else None, "rows": result}, indent=1, default=str))
    return result


def _echo_row(row: _Row, busy: bool, echo, peer_row: bool = False) -> None:
    traj = row.batch * row.rate
    cpu = _format_optional(row.cpu_per_wall)
    vs_peer = f"{'1.00':>20}" if peer_row else _ratio_cell(row.vs_peer, 20)
    echo(f"{row.solver:<22}{row.grid:>6}{row.batch:>7}{row.rate:>12.1f}{traj:>14.1f}"
         f"{row.batch * row.grid * row.grid * row.rate / 1e6:>15.1f}{cpu:>10}{vs_peer}{_ratio_cell(row.step_over_fft, 20)}"
         + (_ratio_cell(row.loaded_over_quiet, 20) if busy else "") + f"  {row.path}")
