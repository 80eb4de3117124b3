"""The one door to CuPy: importing it, loading emu's CUDA sources, sharing torch's memory and stream.

Everything in emu that runs a hand-written CUDA kernel goes through here, so there is one place that
knows where the sources live (`kernels/`, shipped as `emu/_resources/kernels`), how they are compiled
(NVRTC through `cupy.RawModule`, once per source and options, cached for the process and on disk by
CuPy, keyed by the headers too) and on which stream kernels run (CuPy's view of torch's current
stream, so no host synchronisation is needed between a torch op and a kernel).

CuPy is imported lazily: importing emu never needs it. When it cannot run, `require_cupy` raises
`BackendUnavailable` with the reason and what to install.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from typing import Any

from emu.backends import ArrayBackend, BackendUnavailable, register_backend
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


_INCLUDE = re.compile(r'#include\s+"([^"]+)"')


def included_headers(source_name: str) -> tuple[str, ...]:
    """The local headers (`#include "..."`, transitively) of `kernels/<source_name>`, sorted."""
    directory = kernels_dir()
    found, pending = set(), [source_name]
    while pending:
        for header in _INCLUDE.findall((directory / pending.pop()).read_text()):
            if header not in found:
                found.add(header)
                pending.append(header)
    return tuple(sorted(found))


@functools.lru_cache(maxsize=None)
def raw_module(source_name: str, options: tuple[str, ...] = ()) -> Any:
    """`cupy.RawModule` of `kernels/<source_name>`, compiled once per process. Headers beside it are
    found through `-I kernels/`.

    CuPy's on-disk cache keys a binary by the source text and the options only, not by the headers the
    source includes, so an edit of a header alone would run a stale binary; a digest of the included
    headers is passed as `-DEMU_HEADERS_DIGEST=...` to put them into the key.
    """
    cupy = require_cupy()
    directory = kernels_dir()
    path = directory / source_name
    if not path.is_file():
        raise FileNotFoundError(f"CUDA source {path} not found (broken install?)")
    digest = hashlib.sha256()
    for header in included_headers(source_name):
        digest.update((directory / header).read_bytes())
    return cupy.RawModule(code=path.read_text(), options=(
        *NVRTC_OPTIONS, f"-I{directory}", f"-DEMU_HEADERS_DIGEST={digest.hexdigest()[:16]}", *options))


_STREAMS: dict[tuple[int, int], Any] = {}


def torch_stream(stream: Any = None) -> Any:
    """CuPy's view of a torch CUDA stream (torch's current one when None), cached per stream: kernels
    launched in it run after the work torch has queued there."""
    cupy = require_cupy()
    import torch

    stream = stream if stream is not None else torch.cuda.current_stream()
    key = (stream.device.index, stream.cuda_stream)
    if key not in _STREAMS:
        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
            _STREAMS[key] = cupy.cuda.Stream.from_external(stream)  # CuPy >= 14
        else:
            _STREAMS[key] = cupy.cuda.ExternalStream(stream.cuda_stream, stream.device.index)
    return _STREAMS[key]


def _fused_operators(equation):
    from emu.solvers.fused import fused_operators  # the fused solver kernels, built on this door

    return fused_operators(equation)


def cupy_backend(device: str | None = None, dtype: str = "float64", reproducible: bool = False) -> ArrayBackend:
    """The cupy backend on `device` ("cuda" or "cuda:N"), made the current CuPy device of this thread
    so that arrays, FFTs and kernels all land there. cuFFT plans are deterministic, so `reproducible`
    changes nothing. EMU_CUPY_FUSED=0 keeps CuPy's generic array expressions instead of the fused kernels."""
    device = device or "cuda"
    index_text = device[len("cuda:"):] if device.startswith("cuda:") else "0" if device == "cuda" else None
    if index_text is None or not index_text.isdigit():
        raise ValueError(f"device: the cupy backend runs on 'cuda' or 'cuda:N', got {device!r}; "
                         "use --backend numpy or torch for the CPU")
    cupy = require_cupy()
    index = int(index_text)
    count = cupy.cuda.runtime.getDeviceCount()
    if index >= count:
        raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    cupy.cuda.Device(index).use()
    import array_api_compat.cupy as xp

    fused = os.environ.get("EMU_CUPY_FUSED", "1") != "0"
    return ArrayBackend("cupy", f"cuda:{index}", dtype, xp, None, fused_kernels=fused, fused_factory=_fused_operators)


register_backend("cupy", cupy_backend)
