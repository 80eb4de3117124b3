"""Array backends: one solver implementation over several array namespaces.

The solvers are written once against a tiny interface (`ArrayBackend`): creation of arrays from
numpy, the 2D real FFT pair over the last two axes, and conversion back to numpy. Everything else in
the hot loop is arithmetic with operators (`*`, `+`), which numpy, torch and CuPy arrays share. The
namespaces themselves come from `array_api_compat`, so CuPy plugs in through the same door.

Backends:
  numpy  - CPU; FFTs through FFTW (pyFFTW, plans built once per shape and cached) when pyFFTW is
           installed, else numpy's pocketfft. FFTW is what makes pyqg fast; planned FFTW transforms
           are 2-6x faster than pocketfft here, most of all for the complex-to-real inverse.
  torch  - CPU or CUDA (`device="cuda"`); elementwise work on every CPU thread torch is given, FFTs
           by cuFFT on the GPU and by FFTW on the CPU (torch.fft when pyFFTW is missing).
  EMU_FFT=numpy in the environment switches FFTW off (numpy's or torch's own FFTs).
  cupy   - CUDA (`device="cuda"` or "cuda:N"): CuPy arrays, cuFFT through cupy.fft, and the solvers'
           elementwise chains run as fused CUDA kernels (kernels/spectral.cu, emu.solvers.fused; set
           EMU_CUPY_FUSED=0 for CuPy's generic array expressions instead). Raises `BackendUnavailable`
           saying what to install when CuPy or a GPU is missing (emu.cuda.require_cupy).
  julia  - CPU or CUDA; the state is stepped by emu's Julia package through juliacall (`emu.julia`), numpy
           arrays on the Python side. Raises `BackendUnavailable` saying why when Julia cannot start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

BackendName = Literal["numpy", "torch", "cupy", "julia"]
BACKENDS: tuple[str, ...] = ("numpy", "torch", "cupy", "julia")
DTypeName = Literal["float32", "float64"]
DTYPES: tuple[str, ...] = ("float32", "float64")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what to install or use."""


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keeps glibc from returning every large temporary array to the OS (Linux only; once).

    The solvers' arrays are ~0.1-10 MB. With glibc's defaults, as soon as two such temporaries are
    alive together malloc serves them by mmap and frees them by munmap, so every arithmetic
    expression pays page faults and zero-filling: `a*x + b*y` on 1 MB complex arrays measured 1.8 ms
    instead of 0.1 ms here, and whole solver steps ran 2-6x slower. Raising the mmap and trim
    thresholds (mallopt) keeps that memory in the heap for reuse. Process-wide; set
    EMU_MALLOC_TUNING=0 to leave the allocator alone.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("EMU_MALLOC_TUNING", "1") == "0":
        return _ALLOCATOR_TUNED
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        libc.mallopt(m_mmap_threshold, 256 * 1024 * 1024)
        libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to tune
        return False
    return True


_CPU_THREADS = {"count": 1}


def set_cpu_threads(count: int) -> None:
    """Threads each CPU thread pool of this process may use (FFTW's and torch's): 1 by default.

    Measured on 2 shared cores: with two threads per pool a solver step or a training batch ran 3-30x
    slower whenever the other core was busy (another job, a second thread pool), while one thread per
    process is never much slower than the best case. `--threads N` opts in to more. Sets
    OMP_NUM_THREADS too, so torch imported later (and DataLoader workers) start with `count`.
    """
    if not (isinstance(count, int) and count >= 1):
        raise ValueError(f"threads must be an integer >= 1, got {count!r}")
    _CPU_THREADS["count"] = count
    os.environ["OMP_NUM_THREADS"] = str(count)
    _FFTW.clear()  # plans are built for a thread count: rebuild them with the new one
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)


def cpu_threads() -> int:
    """The thread count of `set_cpu_threads` (EMU_FFTW_THREADS still overrides it for FFTW)."""
    return _CPU_THREADS["count"]


def fftw_wisdom_path() -> Path | None:
    """Where FFTW_MEASURE plans are remembered between processes (EMU_FFTW_WISDOM; "off" disables):
    by default ~/.cache/emu/fftw-wisdom (or under XDG_CACHE_HOME)."""
    setting = os.environ.get("EMU_FFTW_WISDOM", "")
    if setting.lower() in ("off", "0", "none"):
        return None
    if setting:
        return Path(setting)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "emu" / "fftw-wisdom"


def export_fftw_wisdom() -> str:
    """Every plan this process knows, as text (FFTW's own wisdom format, double/single/long double
    joined by a form feed): stored in each run file, so `--init` continues with the same plans."""
    try:
        import pyfftw
    except ImportError:
        return ""
    return "\f".join(part.decode("ascii") for part in pyfftw.export_wisdom())


def import_fftw_wisdom(text: str) -> None:
    """Makes the plans in `text` (from `export_fftw_wisdom`) the ones FFTW_MEASURE planning picks."""
    if not text:
        return
    import pyfftw

    parts = tuple(part.encode("ascii") for part in text.split("\f"))
    if len(parts) == 3:
        pyfftw.import_wisdom(parts)


class FFTWPlans:
    """Cache of pyFFTW plans for the 2D real transform pair over the last two axes.

    A plan is built once per (direction, shape, dtype). Planning is `FFTW_MEASURE` (it times
    candidate algorithms: 1.05-1.4x faster steps than FFTW_ESTIMATE here) made reproducible by wisdom:
    FFTW_MEASURE alone may pick another algorithm in each process, which changes results at round-off
    and chaos grows that (two runs of one command differed by 1e-9 after 2740 steps). So the first
    process on a machine that needs a plan measures it under a file lock and saves FFTW's wisdom to
    `fftw_wisdom_path()`; every later process (and a run continued with `--init`, which also imports
    the wisdom stored in its file) plans from that wisdom and gets the same algorithm, bit for bit.
    EMU_FFTW_PLANNER=FFTW_ESTIMATE plans without measuring (same plan in every process, slower);
    EMU_FFTW_WISDOM=off measures per process (fast, not reproducible). Results are fresh arrays that
    never alias the plan's buffers.
    """

    # Transforms smaller than this many complex outputs run on one thread: below it, waking threads
    # costs more than it saves (64^2 grids); above it, two threads halve the time on 2 idle cores.
    threading_threshold = 2**15
    # 2D transforms of more than 2^17 and fewer than 2^19 points (512^2 among powers of two) are
    # planned FFTW_PATIENT instead of FFTW_MEASURE: measured on one core, four batched 512^2 float64
    # inverse transforms ran 1.90 ms instead of 2.67 ms, for 6 s of planning, once per machine (the
    # wisdom file keeps it). At 256^2 PATIENT found nothing better; at 1024^2 it planned for 48 s and
    # ran 7% slower.
    patient_points = (2**17, 2**19)

    def __init__(self, threads: int | None = None, planner: str | None = None):
        import pyfftw

        self._pyfftw = pyfftw
        self.threads = threads or int(os.environ.get("EMU_FFTW_THREADS", 0)) or cpu_threads()
        self.planner = planner or os.environ.get("EMU_FFTW_PLANNER", "FFTW_MEASURE")
        self._plans: dict = {}

    def _build(self, direction: str, shape: tuple, dtype, physical_shape: tuple[int, int]):
        builders = self._pyfftw.builders
        template = self._pyfftw.empty_aligned(shape, dtype=dtype)
        spectral_size = int(np.prod(shape[:-1])) * (physical_shape[-1] // 2 + 1)
        threads = self.threads if spectral_size >= self.threading_threshold else 1
        planner = self.planner
        points = physical_shape[-2] * physical_shape[-1]
        if planner == "FFTW_MEASURE" and self.patient_points[0] < points < self.patient_points[1]:
            planner = "FFTW_PATIENT"
        if direction == "forward":
            return builders.rfftn(template, axes=(-2, -1), threads=threads, planner_effort=planner)
        return builders.irfftn(template, s=physical_shape, axes=(-2, -1), threads=threads, planner_effort=planner)

    def _plan(self, direction: str, shape: tuple, dtype, physical_shape: tuple[int, int]):
        key = (direction, shape, np.dtype(dtype).str, physical_shape)
        plan = self._plans.get(key)
        if plan is None:
            wisdom = fftw_wisdom_path() if self.planner != "FFTW_ESTIMATE" else None
            if wisdom is None:
                plan = self._build(direction, shape, dtype, physical_shape)
            else:
                plan = self._build_with_wisdom(wisdom, direction, shape, dtype, physical_shape)
            self._plans[key] = plan
        return plan

    def _build_with_wisdom(self, wisdom: Path, *args):
        """Plans under an exclusive lock on the wisdom file: read what other processes measured, plan
        (from it, or by measuring), save the union atomically. Concurrent first runs (shards starting
        together) thus measure once and agree."""
        import fcntl

        from emu.data.atomic import write_text_atomically

        try:
            wisdom.parent.mkdir(parents=True, exist_ok=True)
            lock = open(wisdom.with_name(wisdom.name + ".lock"), "a")
        except OSError:  # a read-only home: plan without sharing (still exact within this process)
            return self._build(*args)
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if wisdom.exists():
                import_fftw_wisdom(wisdom.read_text())
            plan = self._build(*args)
            try:
                write_text_atomically(wisdom, export_fftw_wisdom())
            except OSError:
                pass
        return plan

    def plan(self, direction: str, shape: tuple, dtype, physical_shape: tuple[int, int]):
        """The cached pyFFTW plan ("forward": real `shape` -> complex; "inverse": complex `shape` ->
        real `physical_shape` on the last two axes). Fused kernels write its `input_array`, call
        `execute()` (unnormalised) and read its `output_array` in place."""
        if direction not in ("forward", "inverse"):
            raise ValueError(f"direction must be 'forward' or 'inverse', got {direction!r}")
        return self._plan(direction, tuple(shape), dtype, tuple(physical_shape))

    @staticmethod
    def _run(plan, data: np.ndarray, scale: float | None = None) -> np.ndarray:
        # Copy in, execute, copy out: the plan owns its aligned buffers (a complex-to-real transform
        # destroys its input, so the caller's array, maybe the solver state, is never handed over)
        # and the result never aliases them. Faster than pyFFTW's checked __call__ (measured
        # 1.14 ms against 1.62 ms for six 256^2 inverse transforms).
        # `execute` skips pyFFTW's normalisation of the inverse; `scale` applies it while copying out.
        plan.input_array[...] = data
        plan.execute()
        return plan.output_array.copy() if scale is None else plan.output_array * scale

    def rfft2(self, field: np.ndarray) -> np.ndarray:
        return self._run(self._plan("forward", field.shape, field.dtype, field.shape[-2:]), field)

    def irfft2(self, field_hat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        plan = self._plan("inverse", field_hat.shape, field_hat.dtype, tuple(shape))
        return self._run(plan, field_hat, scale=1.0 / (shape[0] * shape[1]))


_FFTW: dict[str, FFTWPlans] = {}


def fftw_plans(owner: str = "numpy", reproducible: bool = False) -> FFTWPlans | None:
    """The process-wide FFTW plan cache of a backend, or None when pyFFTW is not installed.

    The numpy backend's plans use `cpu_threads()` threads for large transforms (1 unless
    `--threads`); the torch backend's use one thread, because torch's own OpenMP threads spin while
    FFTW's run and two thread pools oversubscribe the cores (measured: 10x slower steps at 256^2 on
    2 cores). `reproducible` plans use FFTW_ESTIMATE, which picks the same algorithm in every process
    and on every machine of one kind without any shared wisdom (data generation shards use it).
    """
    key = f"{owner}{'-reproducible' if reproducible else ''}"
    if key not in _FFTW:
        try:
            _FFTW[key] = FFTWPlans(threads=None if owner == "numpy" else 1,
                                   planner="FFTW_ESTIMATE" if reproducible else None)
        except ImportError:
            return None
    return _FFTW[key]


@dataclass(frozen=True)
class ArrayBackend:
    """An array namespace plus the few operations the solvers need beyond arithmetic.

    Attributes:
        name: "numpy", "torch" or "cupy".
        device: "cpu" or a torch device string such as "cuda" or "cuda:1" (cupy: always "cuda:N").
        dtype: real floating-point precision of physical fields, "float32" or "float64".
        fused_kernels: whether the equations run fused kernels (`fused_operators`): CUDA on cupy, numba on numpy.
        fused_factory: equation -> fused operators, supplied by the backend's door module (emu.cuda).
    """

    name: str
    device: str
    dtype: str
    xp: Any  # the array_api_compat namespace
    fft: Any = None  # FFTWPlans for the numpy backend when pyFFTW is installed
    fused_kernels: bool = False
    fused_factory: Any = None

    @property
    def real_dtype(self):
        return getattr(self.xp, self.dtype)

    @property
    def complex_dtype(self):
        return self.xp.complex64 if self.dtype == "float32" else self.xp.complex128

    def asarray(self, array, complex_valued: bool = False):
        """Moves a numpy array (or scalar) onto this backend in its working precision."""
        dtype = np.complex128 if complex_valued or np.iscomplexobj(array) else np.float64
        host = np.asarray(array, dtype=dtype)
        if self.dtype == "float32":
            host = host.astype(np.complex64 if dtype == np.complex128 else np.float32)
        if self.name == "numpy":
            return np.ascontiguousarray(host)
        if self.name == "cupy":  # onto the current device, which get_backend selected
            return self.native.asarray(host)
        return self.xp.asarray(host, device=self.device)

    def to_numpy(self, array) -> np.ndarray:
        """Copies an array of this backend into a new numpy array on the host (never a view, so
        changing the result cannot change the solver state)."""
        if self.name == "numpy":
            return np.array(array, copy=True)
        if self.name == "cupy":
            return array.get()  # a new host array
        return array.detach().cpu().numpy().copy()

    def rfft2(self, field):
        """Real FFT over the last two axes (y, x): (..., ny, nx) -> (..., ny, nx//2 + 1)."""
        if self.fft is not None:
            if self.name == "torch":  # CPU tensors share memory with numpy: FFTW on zero-copy views
                return self.xp.from_numpy(self.fft.rfft2(field.numpy()))
            return self.fft.rfft2(field)
        return self.xp.fft.rfftn(field, axes=(-2, -1))

    def irfft2(self, field_hat, shape: tuple[int, int]):
        """Inverse of `rfft2`; `shape` is the physical (ny, nx)."""
        if self.fft is not None:
            if self.name == "torch":
                return self.xp.from_numpy(self.fft.irfft2(field_hat.numpy(), shape))
            return self.fft.irfft2(field_hat, shape)
        return self.xp.fft.irfftn(field_hat, s=shape, axes=(-2, -1))

    @property
    def native(self):
        """The numpy, torch or cupy module itself, for `multiply(a, b, out=...)` into preallocated buffers."""
        if self.name == "numpy":
            return np
        if self.name == "cupy":
            import cupy

            return cupy
        import torch

        return torch

    def empty(self, shape: tuple, complex_valued: bool = False):
        """An uninitialised array in this backend's working precision."""
        dtype = self.complex_dtype if complex_valued else self.real_dtype
        if self.name == "numpy":
            return np.empty(shape, dtype=dtype)
        if self.name == "cupy":  # on the current device, which get_backend selected
            return self.native.empty(shape, dtype=dtype)
        return self.xp.empty(shape, dtype=dtype, device=self.device)

    def all_finite(self, array) -> bool:
        return bool(self.xp.all(self.xp.isfinite(array)))

    def max_abs(self, array) -> float:
        return float(self.xp.max(self.xp.abs(array)))

    def stack(self, arrays, axis: int = 0):
        return self.xp.stack(arrays, axis=axis)

    def copy(self, array):
        return array.clone() if self.name == "torch" else array.copy()

    def fused_operators(self, equation):
        """Fused-kernel operators for `equation` (emu.solvers.fused), or None when this backend has
        none (numpy, torch) or the system has no fused kernels; the equation's generic array code runs
        then."""
        if not self.fused_kernels or self.fused_factory is None:
            return None
        return self.fused_factory(equation)


def cpu_fused_status() -> tuple[bool, str]:
    """(available, reason) of the numpy backend's fused CPU kernels (`emu.cpu_kernels`, numba)."""
    from emu.cpu_kernels import cpu_fused_status as status

    return status()


def _numba_fused_operators(equation):
    from emu.solvers.fused_cpu import fused_cpu_operators

    return fused_cpu_operators(equation)


# Backends that live in their own door module (emu.cuda for CuPy, emu.julia for juliacall) and register
# their factory when imported: this physics-layer module names them but never imports them, so
# `import emu.backends` pulls in neither CuPy, juliacall nor the fused solver kernels.
ACCELERATED_BACKENDS = {"cupy": "emu.cuda", "julia": "emu.julia"}
_FACTORIES: dict[str, Any] = {}


def register_backend(name: str, factory) -> None:
    """Called by a door module on import: `factory(device=, dtype=, reproducible=)` makes the backend."""
    _FACTORIES[name] = factory


def torch_device(device: str | None):
    """The torch.device named by `--device` ("cpu", "cuda" or "cuda:N"; None: cuda when torch sees a
    GPU, else cpu).

    Checked before any data is read or model built, because torch itself only fails at the first
    `.to(device)` with an assertion about how it was compiled, which names neither the option nor
    the way out. Raises ValueError for a malformed name or a GPU index past the last one, and
    BackendUnavailable for CUDA on a machine or torch build without it.
    """
    import re

    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip()
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", text):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise BackendUnavailable(f"--device {text}: no CUDA device on this machine (torch {torch.__version__}, "
                                     f"{build}); use --device cpu")
        count = torch.cuda.device_count()
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= count:
            raise ValueError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device(text)


def get_backend(name: str = "numpy", device: str | None = None, dtype: str = "float64",
                reproducible: bool = False) -> ArrayBackend:
    """Returns the array backend `name` on `device` in precision `dtype`.

    `reproducible=True` makes FFTs bit-identical from process to process (FFTW_ESTIMATE plans), as
    data generation needs for resumed and sharded runs to equal an uninterrupted one.

    Raises:
        ValueError: unknown name or dtype, or a device the backend does not have.
        BackendUnavailable: a known backend that cannot run here (message says why).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if name in ("numpy", "torch"):
        tune_allocator()
    if name == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"device: the numpy backend runs on 'cpu' only, got {device!r}; use --backend torch --device cuda for a GPU")
        import array_api_compat.numpy as xp

        use_fftw = os.environ.get("EMU_FFT", "fftw") != "numpy"
        plans = fftw_plans("numpy", reproducible) if use_fftw else None
        # The fused CPU kernels (numba, emu.cpu_kernels) write into FFTW's buffers: with pyFFTW and
        # numba present (and EMU_CPU_FUSED unset), the equations run them; else their generic code.
        fused, _ = cpu_fused_status() if plans is not None else (False, "")
        return ArrayBackend("numpy", "cpu", dtype, xp, plans, fused_kernels=fused,
                            fused_factory=_numba_fused_operators if fused else None)
    if name == "torch":
        import array_api_compat.torch as xp
        import torch

        device = str(torch_device(device or "cpu"))
        # On the CPU, torch's own complex-to-real FFT is several times slower than planned FFTW;
        # CPU tensors go through FFTW (zero-copy numpy views) when pyFFTW is installed.
        use_fftw = device == "cpu" and os.environ.get("EMU_FFT", "fftw") != "numpy"
        return ArrayBackend("torch", device, dtype, xp, fftw_plans("torch", reproducible) if use_fftw else None)
    if name in ACCELERATED_BACKENDS:
        import importlib

        importlib.import_module(ACCELERATED_BACKENDS[name])  # registers the factory
        # cupy: fails at once saying what to install; julia: starts Julia now, or says why it cannot
        return _FACTORIES[name](device=device, dtype=dtype, reproducible=reproducible)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
