"""The one door to CuPy: importing it, loading emu's CUDA sources, sharing torch's memory and stream.

Everything in emu that runs a hand-written CUDA kernel goes through here, so there is one place that
knows where the sources live (`kernels/`, shipped as `emu/_resources/kernels`), how they are compiled
(NVRTC through `cupy.RawModule`, once per source and options, cached for the process and on disk by
CuPy), and how torch tensors cross (DLPack, zero copies) and on which stream kernels run (torch's
current stream, so no host synchronisation is needed between a torch op and a kernel).

CuPy is imported lazily: importing emu never needs it. When it cannot run, `require_cupy` raises
`BackendUnavailable` with the reason and what to install.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from emu.backends import BackendUnavailable
from emu.resources import kernels_dir

NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17",)


@functools.lru_cache(maxsize=None)
def require_cupy() -> Any:
    """The cupy module, with a GPU it can use; else `BackendUnavailable` saying why and what to do."""
    try:
        import cupy
    except ImportError as error:
        raise BackendUnavailable(
            f"CuPy is not installed ({error}). Install it with `pip install -e \".[gpu]\"` (cupy-cuda12x) on a "
            "machine with an NVIDIA GPU and CUDA 12 drivers, or use --backend torch/numpy."
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError when no driver is present
        raise BackendUnavailable(f"CuPy is installed but finds no usable CUDA device ({error}).") from None
    if count < 1:
        raise BackendUnavailable("CuPy is installed but this machine has no CUDA GPU.")
    return cupy


@functools.lru_cache(maxsize=None)
def raw_module(source_name: str, options: tuple[str, ...] = ()) -> Any:
    """`cupy.RawModule` of `kernels/<source_name>`, compiled once per process (CuPy caches the binary
    on disk too). Headers beside it are found through `-I kernels/`."""
    cupy = require_cupy()
    directory = kernels_dir()
    path = directory / source_name
    if not path.is_file():
        raise FileNotFoundError(f"CUDA source {path} not found (broken install?)")
    return cupy.RawModule(code=path.read_text(), options=(*NVRTC_OPTIONS, f"-I{directory}", *options))


def torch_stream() -> contextlib.AbstractContextManager:
    """A context in which CuPy launches on torch's current CUDA stream (no host sync between them)."""
    cupy = require_cupy()
    import torch

    return cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)


def as_cupy(tensor: Any) -> Any:
    """A CuPy view of a CUDA torch tensor (DLPack: same memory, no copy)."""
    cupy = require_cupy()
    return cupy.from_dlpack(tensor)
