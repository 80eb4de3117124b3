"""The one door to Julia: starting it through juliacall, loading emu's Julia package, passing arrays.

Everything in emu that runs Julia code goes through this module; nothing else imports juliacall, and
importing emu never does (Julia starts on first use of the julia backend, in `start`).

Starting Julia. Importing juliacall makes juliapkg find a Julia (PYTHON_JULIAPKG_EXE, juliaup, PATH,
or a download), collect every `juliapkg.json` on `sys.path` (emu's, `emu/juliapkg.json`, declares
the local package `Emu` from `julia/`) and install them into one Julia environment: minutes on the
first start and after any `juliapkg.json` changes, which is why `emu julia install` exists (it does
that wait visibly, once). Before the import, `start` sets two juliacall defaults the user can
override: PYTHON_JULIACALL_THREADS = emu's CPU thread count (`emu.backends.cpu_threads`: 1 unless
`--threads N`, as for every other thread pool of emu; FFTW.jl's threads are Julia threads, and Emu
plans large transforms on all of them) unless PYTHON_JULIACALL_THREADS, `-X juliacall-threads` or
JULIA_NUM_THREADS is set, and, with more than one thread, PYTHON_JULIACALL_HANDLE_SIGNALS=yes, which
juliacall needs for threads; then Ctrl-C no longer raises KeyboardInterrupt inside a Julia call, so
long runs are driven from Python in chunks (`JuliaStepper.advance` is called once per state check,
at most every 100 steps).

Import order. juliacall must be imported before torch: juliacall itself warns that the other order
may segfault (pytorch/pytorch#78829). The CLI starts Julia in `get_backend`, before any torch
import. Library code that reaches `start` with torch already imported (e.g. `ddpm_step(...,
backend="julia")` on CPU tensors, whose module imports torch) gets a `BackendUnavailable` saying to
call `emu.julia.start()` before importing torch; EMU_JULIA_AFTER_TORCH=warn starts Julia anyway.

The calls. `JULIA_CALLS` lists every Julia function the bridge calls, with the number of positional
arguments it passes; `call` refuses anything else, and tests/test_julia_structure.py checks the Julia
package defines each one with a method of that arity (without a Julia runtime).

Arrays. A C-contiguous numpy array (batch, [layer], ny, nx) is the same memory as a Julia array
(nx, ny, [layer], batch). The bridge hands Julia exactly that: a plain `Array{T,N}` made by
`unsafe_wrap(Array, Ptr{T}(address), reversed_shape; own=false)` (CPU) or a `CuArray` made the same
way from a CUDA torch tensor's device pointer (CUDA.jl), zero copies either way. Such an array is
valid only during the call it is passed to: Julia copies what it keeps (the solver state) into its
own arrays, and writes results into arrays Python allocated (`get_fields!`, `ddpm_step!`, ...).
Per-sample DDPM coefficients cross as host Float64 vectors of length batch, which Julia rounds to
the samples' element type at its entry point (a Python float must never reach Float32 code as
Float64); seeds and offsets as UInt64.

GPU. `cuda:N` is CUDA device N in Julia too (`CUDA.device!(N)`, checked against the GPUs CUDA.jl
sees). CUDA.jl runs on its own stream: the bridge synchronises torch's device before a call and
`CUDA.synchronize()`s before returning, so torch never reads a half-written output. That, and the
per-sample coefficients crossing as host vectors, makes Julia's DDPM kernels on a GPU slower than
torch's eager step: the fused DDPM calls here run emu's CuPy kernels (emu.diffusion.fused, on
torch's stream, no host round trip, the same Philox noise) for CUDA tensors, and Julia's GPU
kernels only with `gpu_kernel="julia"` (a correctness check) or, with a warning, where CuPy cannot
run. The solvers (`JuliaSolver`) do run on CUDA.jl. CUDA.jl is a weak dependency of Emu (CPU users
never install it); `emu julia install --cuda` adds it to the juliacall environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from emu.backends import ArrayBackend, BackendUnavailable, get_backend, register_backend

# What the bridge calls in the Julia module `Emu`: (name, number of positional arguments).
JULIA_CALLS: tuple[tuple[str, int], ...] = (
    ("make_problem", 4),       # (config_json, batch, dtype, device) -> problem
    ("set_fields!", 2),        # (problem, fields): state <- stepper.init(equation.to_state(fields))
    ("stepforward!", 2),       # (problem, num_steps)
    ("get_fields!", 2),        # (out, problem) -> out, the physical fields
    ("courant_number", 1),     # (problem) -> Float64
    ("all_finite", 1),         # (problem) -> Bool
    ("ddpm_step!", 8),         # (out, noisy, predicted_noise, reciprocal_sqrt_alpha, noise_coefficient,
                               #  posterior_std, seed, offset): noise drawn in the kernel (emu.diffusion.philox)
    ("ddpm_step!", 7),         # (out, noisy, predicted_noise, reciprocal_sqrt_alpha, noise_coefficient,
                               #  posterior_std, noise)
    ("add_noise!", 6),         # (out, clean, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, seed, offset)
    ("tweedie!", 5),           # (out, noisy, predicted_noise, sqrt_alpha_bar, sqrt_one_minus_alpha_bar)
    ("philox_normal!", 3),     # (out, seed, offset)
)
JULIA_MODULE = "Emu"
JULIA_COMPAT = "1.10"  # the oldest Julia emu's package supports (julia/Project.toml [compat])
# CUDA.jl for --device cuda: a weak dependency of Emu, added to the juliacall environment on request.
CUDA_PACKAGE = {"name": "CUDA", "uuid": "052768ef-5323-5732-b1bb-66c8b64840ba", "version": "5"}

INSTALL_JULIACALL = 'pip install -e ".[julia]" (in a checkout of emu; pip install "emu[julia]" otherwise)'
FIRST_START = ("`emu julia install` (python -m emu.cli julia install) installs Julia and emu's Julia packages "
               "once, with visible progress (several minutes)")

_MAIN: Any = None                 # juliacall's Main once Julia runs and `using Emu` succeeded
_FUNCTIONS: dict[str, Any] = {}   # name -> Julia function, for the names in JULIA_CALLS
_FAILURE: str | None = None       # why Julia could not start (a second try in one process cannot succeed)
_CUDA_HELPERS: Any = None   # CudaHelpers once CUDA.jl is loaded
_CPU_WRAP: Any = None
# EMU_JULIA_AFTER_TORCH: what `start` does when torch is imported and juliacall is not yet.
AFTER_TORCH_POLICIES = ("error", "warn")
# The kernels of the fused DDPM calls on CUDA tensors (see the module docstring, "GPU").
GPU_KERNELS = ("cupy", "julia")


def juliapkg_json() -> Path:
    """emu's `juliapkg.json` (package data beside this module; juliapkg finds it on sys.path)."""
    return Path(__file__).resolve().parent / "juliapkg.json"


def juliacall_installed() -> bool:
    return importlib.util.find_spec("juliacall") is not None


def _offline() -> bool:
    return os.environ.get("PYTHON_JULIAPKG_OFFLINE", "").lower() == "yes"


def explain_start_failure(error: BaseException) -> str:
    """The message a user sees when importing juliacall failed with `error`: why, and what to do."""
    text = f"{type(error).__name__}: {error}".strip()
    exe = os.environ.get("PYTHON_JULIAPKG_EXE")
    if isinstance(error, ModuleNotFoundError) and error.name in ("juliacall", "juliapkg"):
        return f"the julia backend needs juliacall, which is not installed: {INSTALL_JULIACALL}; then {FIRST_START}."
    if "is not a Julia executable" in text:
        return (f"PYTHON_JULIAPKG_EXE={exe} is not a Julia executable: point it at the `julia` program of an "
                f"installed Julia >= {JULIA_COMPAT} (e.g. export PYTHON_JULIAPKG_EXE=$(which julia)), or unset it "
                "to let juliapkg find or download one.")
    if "could not find Julia" in text:
        wanted = text.split("could not find Julia", 1)[1].strip() or f">= {JULIA_COMPAT}"
        if _offline():
            return (f"Julia could not be started: juliacall found no Julia {wanted} on this machine and "
                    "PYTHON_JULIAPKG_OFFLINE=yes forbids downloading one. Set PYTHON_JULIAPKG_EXE to the `julia` "
                    f"program of an installed Julia >= {JULIA_COMPAT} (e.g. export PYTHON_JULIAPKG_EXE=$(which "
                    f"julia)), or unset PYTHON_JULIAPKG_OFFLINE so that {FIRST_START}.")
        return (f"Julia could not be started: juliacall found no Julia {wanted} and could not install one. Install "
                f"Julia >= {JULIA_COMPAT} (https://julialang.org/downloads or juliaup) and set PYTHON_JULIAPKG_EXE "
                f"to its `julia` program. ({text})")
    if _is_network_error(error):
        return (f"Julia could not be started: juliapkg could not download Julia or emu's Julia packages ({text}). "
                f"Set PYTHON_JULIAPKG_EXE to the `julia` program of an installed Julia >= {JULIA_COMPAT}, or run "
                "where the network reaches julialang.org and the Julia package servers; with Julia and the packages "
                "installed, PYTHON_JULIAPKG_OFFLINE=yes stops juliapkg from going online.")
    if type(error).__name__ == "CalledProcessError":
        return (f"Julia started, but installing emu's Julia packages failed ({text}; Julia's output is above). "
                f"Run {FIRST_START.split(' (')[0]} to retry with the full log; the packages come from the "
                f"General registry and the local package {juliapkg_json()} points at.")
    return (f"Julia could not be started through juliacall ({text}). `emu julia status` shows what juliapkg "
            "sees; PYTHON_JULIAPKG_EXE, PYTHON_JULIAPKG_PROJECT and PYTHON_JULIAPKG_OFFLINE control it.")


def _is_network_error(error: BaseException) -> bool:
    import urllib.error

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (urllib.error.URLError, ConnectionError, TimeoutError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _fail(message: str) -> None:
    global _FAILURE
    _FAILURE = message
    raise BackendUnavailable(message)


def start() -> Any:
    """Starts Julia (once per process), loads `Emu` and looks up the functions of `JULIA_CALLS`.

    Returns juliacall's `Main`. Raises `BackendUnavailable` with the reason and what to do when
    juliacall is missing, no Julia can be found or installed, or `using Emu` fails; a failure is
    remembered, so later calls in the same process fail at once with the same message. Also
    `BackendUnavailable` (not remembered) when torch is imported and juliacall is not, unless
    EMU_JULIA_AFTER_TORCH=warn (module docstring, "Import order").
    """
    global _MAIN
    if _MAIN is not None:
        return _MAIN
    if _FAILURE is not None:
        raise BackendUnavailable(_FAILURE)
    if not juliacall_installed():
        _fail(f"the julia backend needs juliacall, which is not installed: {INSTALL_JULIACALL}; then {FIRST_START}.")
    _check_import_order()
    _set_thread_defaults()
    try:
        import juliacall
    except BaseException as error:  # juliapkg raises bare Exceptions; SystemExit from a failed Julia too
        if isinstance(error, KeyboardInterrupt):
            raise
        _fail(explain_start_failure(error))
    main = juliacall.Main
    try:
        main.seval(f"using {JULIA_MODULE}")
    except Exception as error:
        _fail(f"Julia started, but `using {JULIA_MODULE}` failed: {error}. The package comes from "
              f"{_emu_package_path()}; run {FIRST_START.split(' (')[0]} to reinstall its dependencies.")
    functions = {}
    for name, _ in JULIA_CALLS:
        try:
            functions[name] = main.seval(f"{JULIA_MODULE}.{name}")
        except Exception:
            _fail(f"the Julia package {JULIA_MODULE} ({_emu_package_path()}) has no function `{name}`, which the "
                  "bridge calls: the Julia package and emu's Python side are from different versions.")
    _FUNCTIONS.update(functions)
    _MAIN = main
    return main


def _check_import_order() -> None:
    """Refuses to import juliacall after torch (juliacall: "This may cause a segfault"), unless
    EMU_JULIA_AFTER_TORCH=warn; nothing to check once juliacall is imported or while torch is not."""
    if "juliacall" in sys.modules or "torch" not in sys.modules:
        return
    policy = os.environ.get("EMU_JULIA_AFTER_TORCH", "error").strip().lower()
    if policy not in AFTER_TORCH_POLICIES:
        raise ValueError(f"EMU_JULIA_AFTER_TORCH must be one of {AFTER_TORCH_POLICIES}, got {policy!r}")
    reason = ("torch is already imported, and juliacall warns that importing it after torch may segfault "
              "(https://github.com/pytorch/pytorch/issues/78829)")
    if policy == "warn":
        warnings.warn(f"starting Julia although {reason} (EMU_JULIA_AFTER_TORCH=warn)", RuntimeWarning, stacklevel=3)
        return
    raise BackendUnavailable(
        f"the julia backend cannot start Julia here: {reason}. Start Julia before torch is imported: put "
        "`import emu.julia; emu.julia.start()` (or `import juliacall`) at the top of your script, before "
        "`import torch` and before importing the emu modules that import it (emu.diffusion, emu.models, "
        "emu.training, ...); the emu command line does this itself. To start it anyway, at that risk, set "
        "EMU_JULIA_AFTER_TORCH=warn.")


def _set_thread_defaults() -> None:
    """emu's juliacall thread settings, before juliacall is imported; the user's own settings win.

    Julia threads = `emu.backends.cpu_threads()` (1 unless `--threads N`) unless the thread count is
    set by PYTHON_JULIACALL_THREADS, `-X juliacall-threads=N` or Julia's own JULIA_NUM_THREADS.
    More than one thread needs PYTHON_JULIACALL_HANDLE_SIGNALS=yes (juliacall's advice).
    """
    from emu.backends import cpu_threads

    given = (os.environ.get("PYTHON_JULIACALL_THREADS") or sys._xoptions.get("juliacall-threads")
             or os.environ.get("JULIA_NUM_THREADS"))
    if given is None:
        given = os.environ["PYTHON_JULIACALL_THREADS"] = str(cpu_threads())
    if str(given).strip() != "1":
        os.environ.setdefault("PYTHON_JULIACALL_HANDLE_SIGNALS", "yes")


def _emu_package_path() -> str:
    try:
        entry = json.loads(juliapkg_json().read_text())["packages"][JULIA_MODULE]
        return str((juliapkg_json().parent / entry["path"]).resolve())
    except (OSError, KeyError, ValueError):
        return "julia/"


def call(name: str, *args: Any, **keywords: Any) -> Any:
    """Calls `Emu.<name>(args...; keywords...)`; only the (name, arity) pairs of `JULIA_CALLS` are allowed."""
    if (name, len(args)) not in JULIA_CALLS:
        raise TypeError(f"the bridge does not call {JULIA_MODULE}.{name} with {len(args)} arguments "
                        "(add it to emu.julia.JULIA_CALLS so the structure tests check it)")
    start()
    return _FUNCTIONS[name](*args, **keywords)


# -- arrays -------------------------------------------------------------------------------------

def _julia_element_type(dtype) -> Any:
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"the julia backend works in float32 or float64, got {dtype}")
    return getattr(start(), "Float32" if dtype == np.float32 else "Float64")


def _cpu_wrap() -> Any:
    """The Julia closure that views host memory as an `Array` (dims already reversed)."""
    global _CPU_WRAP
    if _CPU_WRAP is None:
        _CPU_WRAP = start().seval("(address, T, dims...) -> unsafe_wrap(Array, Ptr{T}(UInt(address)), dims; own = false)")
    return _CPU_WRAP


def as_julia(array: np.ndarray) -> Any:
    """A zero-copy Julia `Array` over a C-contiguous numpy array, dims reversed (valid during one call)."""
    if not (isinstance(array, np.ndarray) and array.flags.c_contiguous and array.flags.aligned):
        raise ValueError("as_julia needs an aligned, C-contiguous numpy array")
    element_type = _julia_element_type(array.dtype)
    return _cpu_wrap()(array.ctypes.data, element_type, *reversed(array.shape))


class CudaHelpers(NamedTuple):
    """The Julia closures the bridge uses on CUDA devices."""

    wrap: Any          # (address, T, dims...) -> CuArray over device memory of the current device, not owned
    synchronize: Any   # () -> CUDA.synchronize() of the current device
    select: Any        # (index) -> CUDA.device!(index): the device the next wraps and kernels use
    device_count: Any  # () -> the number of GPUs CUDA.jl sees


def require_cuda(index: int | None = None) -> CudaHelpers:
    """Loads CUDA.jl (Emu's CUDA extension comes with it) and returns the `CudaHelpers`;
    `BackendUnavailable` when CUDA.jl is not installed or finds no GPU. With `index`, also checks that
    CUDA.jl sees a GPU `cuda:index` (ValueError naming the devices there are, as
    `emu.backends.torch_device` does)."""
    helpers = _load_cuda()
    if index is not None:
        count = int(helpers.device_count())
        if not 0 <= index < count:
            raise ValueError(f"--device cuda:{index}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1} (as CUDA.jl numbers them; CUDA_VISIBLE_DEVICES renumbers them)")
    return helpers


def _load_cuda() -> CudaHelpers:
    global _CUDA_HELPERS
    if _CUDA_HELPERS is not None:
        return _CUDA_HELPERS
    main = start()
    try:
        main.seval("using CUDA")
    except Exception as error:
        raise BackendUnavailable(
            f"--device cuda with the julia backend needs CUDA.jl in juliacall's Julia environment, which does not "
            f"load ({error}). Run `emu julia install --cuda` once (adds CUDA.jl {CUDA_PACKAGE['version']}.x), "
            "or use --device cpu.") from None
    if not bool(main.seval("CUDA.functional()")):
        raise BackendUnavailable("CUDA.jl is installed but finds no usable GPU or driver (CUDA.functional() is "
                                 "false; `julia -e 'using CUDA; CUDA.versioninfo()'` says why). Use --device cpu.")
    _CUDA_HELPERS = CudaHelpers(
        wrap=main.seval("(address, T, dims...) -> unsafe_wrap(CUDA.CuArray, CUDA.CuPtr{T}(UInt(address)), dims; "
                        "own = false)"),
        synchronize=main.seval("() -> CUDA.synchronize()"),
        select=main.seval("index -> (CUDA.device!(Int(index)); nothing)"),
        device_count=main.seval("() -> length(CUDA.devices())"),
    )
    return _CUDA_HELPERS


def _tensor_to_julia(tensor) -> Any:
    """A zero-copy Julia view (dims reversed) of a contiguous torch tensor on the CPU or a CUDA device."""
    if not tensor.is_contiguous():
        raise ValueError("the julia backend needs contiguous tensors (call .contiguous())")
    if tensor.device.type == "cpu":
        return as_julia(tensor.detach().numpy())
    # The caller (`_run_fused`) has made the tensor's GPU current: the wrap belongs to that device.
    element_type = _julia_element_type(str(tensor.dtype).removeprefix("torch."))
    return require_cuda().wrap(tensor.data_ptr(), element_type, *reversed(tuple(tensor.shape)))


def _coefficient(value, like) -> Any:
    """A per-sample coefficient as Julia wants it: a host Float64 vector of length batch (Julia rounds
    it to the samples' element type at entry, as Python's schedule gather casts to the sample dtype).
    `value` is a tensor of batch elements ((batch,) or (batch, 1, ..., 1)), one element, or a number."""
    import torch

    batch = int(like.shape[0])
    if isinstance(value, torch.Tensor):
        vector = value.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
    else:
        vector = np.asarray(value, dtype=np.float64).reshape(-1)
    if vector.size == 1:
        vector = np.full(batch, vector[0])
    if vector.size != batch:
        raise ValueError(f"a per-sample coefficient must have batch = {batch} elements, got {vector.size}")
    return np.ascontiguousarray(vector)


def _run_fused(name: str, out, *arguments) -> None:
    """Calls the Julia kernel `name`: tensors become zero-copy Julia arrays; on a CUDA device, that
    device is made CUDA.jl's current one first, torch is synchronised before (CUDA.jl uses its own
    stream) and CUDA.jl after."""
    import torch

    def converted():
        return [_tensor_to_julia(a) if isinstance(a, torch.Tensor) else as_julia(a) if isinstance(a, np.ndarray)
                else a for a in (out, *arguments)]

    if out.device.type == "cuda":
        helpers = require_cuda(out.device.index)
        helpers.select(out.device.index)
        arrays = converted()
        torch.cuda.synchronize(out.device)
        call(name, *arrays)
        helpers.synchronize()
    else:
        call(name, *converted())


def _samples(name: str, tensor, like=None):
    """`tensor` made contiguous (and cast to `like`'s dtype), checked to have `like`'s shape."""
    if like is not None:
        if tuple(tensor.shape) != tuple(like.shape):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}")
        tensor = tensor.to(device=like.device, dtype=like.dtype)
    return tensor.contiguous()


def _seed_offset(seed: int, offset: int) -> tuple[Any, Any]:
    from emu.diffusion.philox import check_uint64

    return np.uint64(check_uint64("seed", seed)), np.uint64(check_uint64("offset", offset))


def _cupy_runs(device, gpu_kernel: str) -> bool:
    """Whether a fused DDPM call on `device` (a torch.device) runs emu's CuPy kernel instead of Julia's.

    On CUDA tensors (the device type emu.diffusion.fused launches on; its host-build tests set
    "cpu") with gpu_kernel="cupy", when CuPy can run; where it cannot, Julia's GPU kernel runs, with
    a warning saying why that is slow and what to install.
    """
    if gpu_kernel not in GPU_KERNELS:
        raise ValueError(f"gpu_kernel must be one of {GPU_KERNELS}, got {gpu_kernel!r}")
    from emu.diffusion import fused

    if device.type != fused._DEVICE_TYPE or gpu_kernel == "julia":
        return False
    from emu.cuda import require_cupy

    try:
        require_cupy()
    except BackendUnavailable as error:
        warnings.warn(f"the fused DDPM step on {device} runs emu's CuPy kernel, which cannot run here ({error}); "
                      "running Julia's CUDA kernel instead, which copies the coefficients to the host and "
                      "synchronises the GPU twice per call (slower than torch's eager step). Install CuPy "
                      '(pip install -e ".[gpu]"), or pass gpu_kernel="julia" to choose Julia\'s kernel.',
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def _device_coefficient(value, like):
    """A per-sample coefficient as the CuPy kernels take it: a (batch,) tensor on like's device, made
    from the values `_coefficient` accepts without passing through host memory (the kernels round
    it to like's dtype, as Julia does)."""
    import torch

    batch = int(like.shape[0])
    if isinstance(value, torch.Tensor):
        vector = value.detach().reshape(-1)
    else:
        vector = torch.from_numpy(np.asarray(value, dtype=np.float64).reshape(-1))
    if vector.numel() == 1:
        vector = vector.expand(batch)
    if vector.numel() != batch:
        raise ValueError(f"a per-sample coefficient must have batch = {batch} elements, got {vector.numel()}")
    return vector.to(device=like.device)


def fused_ddpm_step(noisy, predicted_noise, reciprocal_sqrt_alpha, noise_coefficient, posterior_std,
                    seed: int, offset: int, *, gpu_kernel: str = "cupy"):
    """One DDPM reverse step in a single fused kernel, the noise drawn in the kernel.

        out = reciprocal_sqrt_alpha (noisy - noise_coefficient predicted_noise) + posterior_std z,
        z = emu.diffusion.philox.philox_normal(noisy.shape, seed, offset)

    Args:
        noisy, predicted_noise: torch tensors of one shape (batch, ...), float32 or float64, on the
            CPU (Julia's kernel, on numpy views) or a CUDA device (see `gpu_kernel`).
        reciprocal_sqrt_alpha, noise_coefficient, posterior_std: per-sample tensors (batch,) or
            (batch, 1, ..., 1), or Python numbers (rounded to noisy's dtype by the kernel).
        seed, offset: the Philox key and call index, integers in [0, 2**64).
        gpu_kernel: for CUDA tensors, "cupy" (default: emu.diffusion.fused.fused_ddpm_step on
            torch's stream, no copies, no host synchronisation; Julia's kernel, with a warning,
            where CuPy cannot run) or "julia" (Julia's CUDA kernel: a correctness check, slower
            than torch's eager step). Unused on the CPU.

    Returns:
        A new tensor like `noisy`.
    """
    import torch

    seed, offset = _seed_offset(seed, offset)
    noisy = _samples("noisy", noisy)
    predicted_noise = _samples("predicted_noise", predicted_noise, noisy)
    if _cupy_runs(noisy.device, gpu_kernel):
        from emu.diffusion.fused import fused_ddpm_step as cupy_ddpm_step

        return cupy_ddpm_step(noisy, predicted_noise, *(_device_coefficient(c, noisy) for c in (
            reciprocal_sqrt_alpha, noise_coefficient, posterior_std)), seed=int(seed), offset=int(offset))
    out = torch.empty_like(noisy)
    _run_fused("ddpm_step!", out, noisy, predicted_noise, _coefficient(reciprocal_sqrt_alpha, noisy),
               _coefficient(noise_coefficient, noisy), _coefficient(posterior_std, noisy), seed, offset)
    return out


def fused_ddpm_step_with_noise(noisy, predicted_noise, reciprocal_sqrt_alpha, noise_coefficient, posterior_std,
                               noise, *, gpu_kernel: str = "cupy"):
    """`fused_ddpm_step` with the noise z given (noisy's shape) instead of drawn in the kernel."""
    import torch

    noisy = _samples("noisy", noisy)
    predicted_noise = _samples("predicted_noise", predicted_noise, noisy)
    noise = _samples("noise", noise, noisy)
    if _cupy_runs(noisy.device, gpu_kernel):
        from emu.diffusion.fused import fused_ddpm_step as cupy_ddpm_step

        return cupy_ddpm_step(noisy, predicted_noise, *(_device_coefficient(c, noisy) for c in (
            reciprocal_sqrt_alpha, noise_coefficient, posterior_std)), noise=noise)
    out = torch.empty_like(noisy)
    _run_fused("ddpm_step!", out, noisy, predicted_noise, _coefficient(reciprocal_sqrt_alpha, noisy),
               _coefficient(noise_coefficient, noisy), _coefficient(posterior_std, noisy), noise)
    return out


def fused_add_noise(clean, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, seed: int, offset: int, *,
                    gpu_kernel: str = "cupy"):
    """q_sample in one kernel: sqrt_alpha_bar clean + sqrt_one_minus_alpha_bar z, z from
    (seed, offset) as in `fused_ddpm_step` (and `gpu_kernel` as there)."""
    import torch

    seed, offset = _seed_offset(seed, offset)
    clean = _samples("clean", clean)
    if _cupy_runs(clean.device, gpu_kernel):
        from emu.diffusion.fused import fused_add_noise as cupy_add_noise

        return cupy_add_noise(clean, _device_coefficient(sqrt_alpha_bar, clean),
                              _device_coefficient(sqrt_one_minus_alpha_bar, clean), seed=int(seed),
                              offset=int(offset))[0]
    out = torch.empty_like(clean)
    _run_fused("add_noise!", out, clean, _coefficient(sqrt_alpha_bar, clean),
               _coefficient(sqrt_one_minus_alpha_bar, clean), seed, offset)
    return out


def fused_tweedie(noisy, predicted_noise, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, *, gpu_kernel: str = "cupy"):
    """Tweedie's clean estimate in one kernel: (noisy - sqrt_one_minus_alpha_bar eps) / sqrt_alpha_bar
    (`gpu_kernel` as in `fused_ddpm_step`)."""
    import torch

    noisy = _samples("noisy", noisy)
    predicted_noise = _samples("predicted_noise", predicted_noise, noisy)
    if _cupy_runs(noisy.device, gpu_kernel):
        from emu.diffusion.fused import fused_tweedie as cupy_tweedie

        return cupy_tweedie(noisy, predicted_noise, _device_coefficient(sqrt_alpha_bar, noisy),
                            _device_coefficient(sqrt_one_minus_alpha_bar, noisy))
    out = torch.empty_like(noisy)
    _run_fused("tweedie!", out, noisy, predicted_noise, _coefficient(sqrt_alpha_bar, noisy),
               _coefficient(sqrt_one_minus_alpha_bar, noisy))
    return out


def philox_normal(shape: tuple[int, ...], seed: int, offset: int = 0, dtype: str = "float32",
                  device: str = "cpu", *, gpu_kernel: str = "cupy"):
    """Standard normal noise by emu's convention (the twin of `emu.diffusion.philox.philox_normal`),
    as a torch tensor: Julia's kernel on the CPU; on a CUDA device as `gpu_kernel` says (see
    `fused_ddpm_step`)."""
    import torch

    seed, offset = _seed_offset(seed, offset)
    if _cupy_runs(torch.device(device), gpu_kernel):
        from emu.diffusion.fused import fused_philox_normal

        return fused_philox_normal(tuple(shape), int(seed), int(offset), dtype=getattr(torch, dtype), device=device)
    out = torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=device)
    _run_fused("philox_normal!", out, seed, offset)
    return out


# -- solvers --------------------------------------------------------------------------------------

def _solver_device(device: str | None) -> str:
    """The device name Julia's `make_device` gets: "cpu" or "cuda:N" ("cuda" is cuda:0, as torch's
    first GPU); ValueError for anything else, as `emu.backends.torch_device`."""
    text = str(device or "cpu").strip()
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", text):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if text == "cpu":
        return "cpu"
    return text if ":" in text else "cuda:0"


def _cuda_index(solver_device: str) -> int | None:
    """N of "cuda:N" (a `_solver_device` name); None for "cpu"."""
    return None if solver_device == "cpu" else int(solver_device.split(":")[1])


class JuliaSolver:
    """A batch of trajectories of one system, stepped by emu's Julia package.

        solver = JuliaSolver(config, batch=4, dtype="float32")
        solver.set_fields(equation.initial_condition(4, seed=0))   # numpy (batch, [2,] n, n)
        solver.step(100)
        fields = solver.fields()                                  # numpy, same layout

    The Julia problem holds the state, the stepper's memory and FFT plans; Python sees physical
    fields only. Same configs, schemes and start-up as the Python solvers (`set_fields` starts the
    stepper as `stepper.init(equation.to_state(fields))` does).
    """

    def __init__(self, config, *, batch: int, dtype: str = "float64", device: str | None = None,
                 reproducible: bool = False):
        from emu.systems import SYSTEMS

        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if not (isinstance(batch, int) and batch >= 1):
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        self.config, self.batch, self.dtype = config, batch, dtype
        self.device = _solver_device(device)
        start()
        if self.device != "cpu":
            require_cuda(_cuda_index(self.device))
        num_fields = len(SYSTEMS[config.system][1].field_names)
        n = config.grid_size
        self.shape = (batch,) + ((num_fields,) if num_fields > 1 else ()) + (n, n)
        # FFTW_ESTIMATE plans are the same in every process (data generation's resumes and shards).
        planner = {"planner": "FFTW_ESTIMATE"} if reproducible else {}
        self.problem = call("make_problem", config.to_json(), batch, dtype, self.device, **planner)

    def set_fields(self, fields: np.ndarray) -> None:
        fields = np.ascontiguousarray(fields, dtype=self.dtype)
        if fields.shape != self.shape:
            raise ValueError(f"fields must have shape {self.shape}, got {fields.shape}")
        call("set_fields!", self.problem, as_julia(fields))

    def step(self, num_steps: int = 1) -> None:
        call("stepforward!", self.problem, int(num_steps))

    def fields(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        call("get_fields!", as_julia(out), self.problem)
        return out

    def courant_number(self) -> float:
        return float(call("courant_number", self.problem))

    def all_finite(self) -> bool:
        return bool(call("all_finite", self.problem))

    def synchronize(self) -> None:
        if self.device != "cpu":
            helpers = require_cuda()
            helpers.select(_cuda_index(self.device))
            helpers.synchronize()


class JuliaStepper:
    """The stepper of the julia backend: the `emu.solvers` stepper contract over `JuliaSolver`s.

    `advance(state, n)` takes n steps in Julia and returns the state read back (numpy, spectral).
    A state it did not return itself (a fresh initial condition, a restart) is first sent to Julia.
    Julia keeps a multistep method's memory (qg's AB3 tendencies) to itself, so the states returned
    for such systems carry level 0 and no history: a file written by a julia run continues (with
    any backend) by restarting the start-up steps, which is valid but not bit-identical.
    """

    def __init__(self, equation, dt: float, name: str | None = None):
        if name not in (None, equation.default_stepper):
            raise ValueError(f"the julia backend steps {equation.config.system} with {equation.default_stepper!r} "
                             f"only, got stepper {name!r}")
        if abs(float(dt) - equation.config.dt) > 1e-12 * abs(equation.config.dt):
            raise ValueError(f"the julia backend steps with the config's dt = {equation.config.dt}, got {dt}")
        self.equation = equation
        self.dt = float(dt)
        self.name = equation.default_stepper
        self._multistep = equation.default_stepper == "ab3"
        self._solvers: dict[int, JuliaSolver] = {}
        self._current = None  # (state returned last, its solver)

    def _solver(self, batch: int) -> JuliaSolver:
        if batch not in self._solvers:
            backend = self.equation.backend
            self._solvers[batch] = JuliaSolver(self.equation.config, batch=batch, dtype=backend.dtype,
                                               device=backend.solver_device, reproducible=backend.reproducible)
        return self._solvers[batch]

    def init(self, state_hat):
        from emu.solvers import StepperState

        return StepperState(state_hat)

    def advance(self, state, num_steps: int):
        from emu.solvers import StepperState
        from emu.systems.base import ConfigError

        batch = int(state.state_hat.shape[0])
        solver = self._solver(batch)
        if self._current is None or self._current[0] is not state:
            if state.history or (self._multistep and state.level):
                raise ConfigError("init: the julia backend cannot continue a multistep run from its saved history "
                                  "(the Julia solver keeps it internally); continue this file with --backend numpy "
                                  "or torch")
            solver.set_fields(self.equation.backend.to_numpy(self.equation.fields(state.state_hat)))
        if num_steps:
            solver.step(num_steps)
        state_hat = self.equation.to_state(solver.fields())
        level = 0 if self._multistep else state.level + num_steps
        result = StepperState(state_hat, {}, level)
        self._current = (result, solver)
        return result

    def step(self, state):
        return self.advance(state, 1)


@dataclass(frozen=True)
class JuliaHostBackend(ArrayBackend):
    """The Python side of the julia backend: numpy arrays on the host for initial conditions,
    diagnostics and files (`host`), while Julia steps the state on `solver_device` ("cpu" or
    "cuda:N")."""

    host: ArrayBackend | None = None
    solver_device: str = "cpu"
    reproducible: bool = False

    def asarray(self, array, complex_valued: bool = False):
        return self.host.asarray(array, complex_valued)

    def to_numpy(self, array) -> np.ndarray:
        return self.host.to_numpy(array)

    def rfft2(self, field):
        return self.host.rfft2(field)

    def irfft2(self, field_hat, shape):
        return self.host.irfft2(field_hat, shape)

    @property
    def native(self):
        return np

    def empty(self, shape: tuple, complex_valued: bool = False):
        return self.host.empty(shape, complex_valued)

    def copy(self, array):
        return array.copy()


def julia_backend(device: str | None = None, dtype: str = "float64", reproducible: bool = False) -> JuliaHostBackend:
    """The julia backend (see `emu.backends.get_backend`): starts Julia now, so a missing runtime fails fast."""
    solver_device = _solver_device(device)
    start()
    if solver_device != "cpu":
        require_cuda(_cuda_index(solver_device))
    host = get_backend("numpy", dtype=dtype, reproducible=reproducible)
    return JuliaHostBackend("julia", device or "cpu", dtype, host.xp, host.fft, host=host, solver_device=solver_device,
                            reproducible=reproducible)


# -- installation and status (emu julia install|status) -----------------------------------------

def status() -> list[tuple[str, str]]:
    """What the julia backend would use, as (item, value) lines; never starts Julia."""
    import shutil

    lines = [("emu juliapkg.json", f"{juliapkg_json()} (Emu -> {_emu_package_path()})")]
    if not juliacall_installed():
        lines.append(("juliacall", f"not installed: {INSTALL_JULIACALL}"))
        return lines
    from importlib.metadata import PackageNotFoundError, version

    for name in ("juliacall", "juliapkg"):
        try:
            lines.append((name, version(name)))
        except PackageNotFoundError:
            lines.append((name, "installed (version unknown)"))
    for variable in ("PYTHON_JULIAPKG_EXE", "PYTHON_JULIAPKG_PROJECT", "PYTHON_JULIAPKG_OFFLINE",
                     "PYTHON_JULIACALL_THREADS", "JULIA_NUM_THREADS", "PYTHON_JULIACALL_HANDLE_SIGNALS",
                     "EMU_JULIA_AFTER_TORCH"):
        lines.append((variable, os.environ.get(variable, "(unset)")))
    try:
        import juliapkg.deps as deps
        from juliapkg.state import STATE

        lines.append(("Julia environment", str(STATE.get("project"))))
        files = deps.deps_files()
        found = any(Path(f).resolve() == juliapkg_json() for f in files)
        lines.append(("emu's juliapkg.json seen by juliapkg", "yes" if found else
                      "NO (emu is not on sys.path as a package folder; reinstall emu)"))
        meta = deps.load_meta()
        if meta:
            lines.append(("Julia", f"{meta.get('version')} at {meta.get('executable')}"))
            resolved = bool(deps.can_skip_resolve())
            lines.append(("Emu resolved", "yes, up to date" if resolved else
                          "installed before, but a juliapkg.json changed: the next start re-resolves "
                          "(run `emu julia install` to do it now)"))
        else:
            exe = os.environ.get("PYTHON_JULIAPKG_EXE") or shutil.which("julia") or shutil.which("juliaup")
            lines.append(("Julia", exe or "none found on PATH (juliapkg downloads one unless offline)"))
            lines.append(("Emu resolved", "no: run `emu julia install`"))
    except Exception as error:  # juliapkg internals differ between versions: report, never crash
        lines.append(("juliapkg", f"could not inspect its state ({type(error).__name__}: {error})"))
    return lines


def install(cuda: bool = False, update: bool = False) -> Any:
    """Resolves and installs Julia and emu's Julia packages (juliapkg prints each step, Julia's Pkg
    its progress), then starts Julia and loads Emu (precompiling it). `cuda` adds CUDA.jl."""
    if not juliacall_installed():
        raise BackendUnavailable(f"juliacall is not installed: {INSTALL_JULIACALL}")
    import juliapkg

    if cuda:
        juliapkg.add(CUDA_PACKAGE["name"], CUDA_PACKAGE["uuid"], version=CUDA_PACKAGE["version"])
    try:
        juliapkg.resolve(force=True, update=update)
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            raise
        raise BackendUnavailable(explain_start_failure(error)) from None
    main = start()
    if cuda:
        require_cuda()
    return main


register_backend("julia", julia_backend)
