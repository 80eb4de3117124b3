"""Array backends: one solver implementation over several array namespaces.

The solvers are written once against a tiny interface (`ArrayBackend`): creation of arrays from
numpy, the 2D real FFT pair over the last two axes, and conversion back to numpy. Everything else in
the hot loop is arithmetic with operators (`*`, `+`), which numpy, torch and CuPy arrays share. The
namespaces themselves come from `array_api_compat`, so CuPy plugs in through the same door.

Backends:
  numpy  - CPU, numpy's pocketfft.
  torch  - CPU or CUDA (`device="cuda"`), torch.fft; uses every CPU thread torch is given.
  cupy   - not yet available (its own issue); asking for it raises `BackendUnavailable`.
  julia  - not yet available (its own issue); asking for it raises `BackendUnavailable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

BackendName = Literal["numpy", "torch", "cupy", "julia"]
BACKENDS: tuple[str, ...] = ("numpy", "torch", "cupy", "julia")
DTypeName = Literal["float32", "float64"]
DTYPES: tuple[str, ...] = ("float32", "float64")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what to install or use."""


@dataclass(frozen=True)
class ArrayBackend:
    """An array namespace plus the few operations the solvers need beyond arithmetic.

    Attributes:
        name: "numpy" or "torch".
        device: "cpu" or a torch device string such as "cuda" or "cuda:1".
        dtype: real floating-point precision of physical fields, "float32" or "float64".
    """

    name: str
    device: str
    dtype: str
    xp: Any  # the array_api_compat namespace

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
        return self.xp.asarray(host, device=self.device)

    def to_numpy(self, array) -> np.ndarray:
        """Copies an array of this backend into a numpy array on the host."""
        if self.name == "numpy":
            return np.asarray(array)
        return array.detach().cpu().numpy()

    def rfft2(self, field):
        """Real FFT over the last two axes (y, x): (..., ny, nx) -> (..., ny, nx//2 + 1)."""
        return self.xp.fft.rfftn(field, axes=(-2, -1))

    def irfft2(self, field_hat, shape: tuple[int, int]):
        """Inverse of `rfft2`; `shape` is the physical (ny, nx)."""
        return self.xp.fft.irfftn(field_hat, s=shape, axes=(-2, -1))

    def all_finite(self, array) -> bool:
        return bool(self.xp.all(self.xp.isfinite(array)))

    def max_abs(self, array) -> float:
        return float(self.xp.max(self.xp.abs(array)))

    def stack(self, arrays, axis: int = 0):
        return self.xp.stack(arrays, axis=axis)

    def copy(self, array):
        return array.copy() if self.name == "numpy" else array.clone()


def get_backend(name: str = "numpy", device: str | None = None, dtype: str = "float64") -> ArrayBackend:
    """Returns the array backend `name` on `device` in precision `dtype`.

    Raises:
        ValueError: unknown name or dtype, or a device the backend does not have.
        BackendUnavailable: a known backend that cannot run here (message says why).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if name == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"device: the numpy backend runs on 'cpu' only, got {device!r}; use --backend torch --device cuda for a GPU")
        import array_api_compat.numpy as xp

        return ArrayBackend("numpy", "cpu", dtype, xp)
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
        return ArrayBackend("torch", device, dtype, xp)
    if name == "cupy":
        raise BackendUnavailable(
            "backend 'cupy' is not available yet: the CuPy backend and fused CUDA kernels land in their own "
            "issue. Use --backend torch --device cuda for GPU runs today."
        )
    if name == "julia":
        raise BackendUnavailable(
            "backend 'julia' is not available yet: the Julia solver package and its juliacall bridge land in "
            "their own issue. Use --backend numpy or --backend torch today."
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
