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


class FFTWPlans:
    """Cache of pyFFTW plans for the 2D real transform pair over the last two axes.

    A plan is built once per (direction, shape, dtype), with `FFTW_MEASURE` by default (set
    EMU_FFTW_PLANNER=FFTW_ESTIMATE for quicker, slower plans; MEASURE plans can differ between
    processes at round-off level, each plan itself is deterministic). Results are fresh arrays that
    never alias the plan's buffers.
    """

    # Transforms smaller than this many complex outputs run on one thread: below it, waking threads
    # costs more than it saves (64^2 grids); above it, two threads halve the time on 2 cores.
    threading_threshold = 2**15

    def __init__(self, threads: int | None = None, planner: str | None = None):
        import pyfftw

        self._pyfftw = pyfftw
        self.threads = threads or int(os.environ.get("EMU_FFTW_THREADS", 0)) or len(os.sched_getaffinity(0))
        self.planner = planner or os.environ.get("EMU_FFTW_PLANNER", "FFTW_MEASURE")
        self._plans: dict = {}

    def _plan(self, direction: str, shape: tuple, dtype, physical_shape: tuple[int, int]):
        key = (direction, shape, np.dtype(dtype).str, physical_shape)
        plan = self._plans.get(key)
        if plan is None:
            builders = self._pyfftw.builders
            template = self._pyfftw.empty_aligned(shape, dtype=dtype)
            spectral_size = int(np.prod(shape[:-1])) * (physical_shape[-1] // 2 + 1)
            threads = self.threads if spectral_size >= self.threading_threshold else 1
            if direction == "forward":
                plan = builders.rfftn(template, axes=(-2, -1), threads=threads, planner_effort=self.planner)
            else:
                plan = builders.irfftn(template, s=physical_shape, axes=(-2, -1), threads=threads,
                                       planner_effort=self.planner)
            self._plans[key] = plan
        return plan

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

    The numpy backend's plans use every core for large transforms; the torch backend's use one
    thread, because torch's own OpenMP threads spin while FFTW's run and two thread pools
    oversubscribe the cores (measured: 10x slower steps at 256^2 on 2 cores). `reproducible` plans
    use FFTW_ESTIMATE, which picks the same algorithm in every process (FFTW_MEASURE times
    candidates and may pick differently, changing results at round-off, which chaos then grows).
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
        fused_kernels: whether the equations run their fused CUDA kernels (`fused_operators`).
    """

    name: str
    device: str
    dtype: str
    xp: Any  # the array_api_compat namespace
    fft: Any = None  # FFTWPlans for the numpy backend when pyFFTW is installed
    fused_kernels: bool = False

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
        if not self.fused_kernels:
            return None
        from emu.solvers.fused import fused_operators

        return fused_operators(equation)


def _cupy_backend(device: str | None, dtype: str) -> ArrayBackend:
    """The cupy backend on `device` ("cuda" or "cuda:N"), made the current CuPy device of this thread
    so that arrays, FFTs and kernels all land there."""
    device = device or "cuda"
    index_text = device[len("cuda:"):] if device.startswith("cuda:") else "0" if device == "cuda" else None
    if index_text is None or not index_text.isdigit():
        raise ValueError(f"device: the cupy backend runs on 'cuda' or 'cuda:N', got {device!r}; "
                         "use --backend numpy or torch for the CPU")
    from emu.cuda import require_cupy  # emu.cuda imports this module: import here, not at the top

    cupy = require_cupy()
    index = int(index_text)
    count = cupy.cuda.runtime.getDeviceCount()
    if index >= count:
        raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    cupy.cuda.Device(index).use()
    import array_api_compat.cupy as xp

    fused = os.environ.get("EMU_CUPY_FUSED", "1") != "0"
    return ArrayBackend("cupy", f"cuda:{index}", dtype, xp, None, fused_kernels=fused)


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
        return ArrayBackend("numpy", "cpu", dtype, xp, fftw_plans("numpy", reproducible) if use_fftw else None)
    if name == "torch":
        import array_api_compat.torch as xp
        import torch

        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"device {device!r}: torch sees no CUDA GPU on this machine (torch {torch.__version__}); "
                "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu"
            )
        if not (device == "cpu" or device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        # On the CPU, torch's own complex-to-real FFT is several times slower than planned FFTW;
        # CPU tensors go through FFTW (zero-copy numpy views) when pyFFTW is installed.
        use_fftw = device == "cpu" and os.environ.get("EMU_FFT", "fftw") != "numpy"
        return ArrayBackend("torch", device, dtype, xp, fftw_plans("torch", reproducible) if use_fftw else None)
    if name == "cupy":
        return _cupy_backend(device, dtype)
    if name == "julia":
        from emu.julia import julia_backend  # starts Julia now (juliacall), or says why it cannot

        return julia_backend(device=device, dtype=dtype, reproducible=reproducible)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
