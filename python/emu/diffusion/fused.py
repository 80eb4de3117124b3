"""Launchers of the fused DDPM kernels (kernels/ddpm.cu) for CUDA torch tensors, through emu.cuda.

Each launcher runs one kernel that reads every input once and writes every output once, on torch's
current stream (no host synchronisation), in the tensors' own memory (no copies; the kernels get the
tensors' device pointers). The equations, with per-sample coefficients gathered from a schedule in
the sample's dtype (Ho, Jain & Abbeel 2020, eqs. 4 and 11; see emu.diffusion.ddpm):

    ddpm_step:  x_{t-1} = c_1 (x_t - c_2 eps_hat) + sigma_t z,
                c_1 = 1/sqrt(alpha_t), c_2 = beta_t/sqrt(1 - alpha_bar_t), sigma_t the posterior std
    add_noise:  x_t     = sqrt(alpha_bar_t) x_clean + sqrt(1 - alpha_bar_t) z
    tweedie:    x_clean ~ (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)

z is either given or drawn inside the kernel from Philox4x32-10 at (seed, offset) by emu's noise
convention (emu.diffusion.philox, whose numpy twin `philox_normal` gives the same numbers). Every
operation is rounded separately as in torch's eager expression, so with given noise a kernel returns
torch's result bit for bit.

Inputs are made C-contiguous (a copy only if they are not) and must be float32 or float64 CUDA
tensors on one device. tests/test_kernels.py runs these launchers on the CPU against ddpm.cu built
for the host; tests/test_kernels_gpu.py runs them on a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from emu.cuda import raw_module, require_cupy, torch_stream
from emu.diffusion.philox import check_uint64

KERNEL_SOURCE = "ddpm.cu"
THREADS_PER_BLOCK = 256
_SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}
_DEVICE_TYPE = "cuda"  # where the tensors must live (the host-build tests of tests/test_kernels.py set "cpu")


def fused_ddpm_step(noisy: torch.Tensor, predicted_noise: torch.Tensor, reciprocal_sqrt_alpha: torch.Tensor,
                    noise_coefficient: torch.Tensor, posterior_std: torch.Tensor, *,
                    noise: torch.Tensor | None = None, seed: int = 0, offset: int = 0,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """x_{t-1} = c_1 (x_t - c_2 eps_hat) + sigma_t z in one kernel (module docstring).

    Args:
        noisy: x_t, (batch, ...) float32/float64 CUDA tensor.
        predicted_noise: eps_hat, noisy's shape (cast to noisy's dtype).
        reciprocal_sqrt_alpha, noise_coefficient, posterior_std: c_1, c_2 and sigma_t per sample,
            (batch,) or (batch, 1, ..., 1); cast to noisy's dtype.
        noise: z, noisy's shape; None draws it in the kernel from (seed, offset).
        seed, offset: the Philox key and call index, integers in [0, 2**64 - 1] (unused with `noise`).
        out: where to write x_{t-1} (C-contiguous, noisy's shape and dtype, sharing no memory with
            the inputs); None allocates it.
    """
    dtype, count, per_sample = _check_sample("noisy", noisy)
    seed, offset = check_uint64("seed", seed), check_uint64("offset", offset)
    arrays = [_operand("predicted_noise", predicted_noise, noisy)]
    if noise is not None:
        arrays.append(_operand("noise", noise, noisy))
    arrays += [_coefficient(name, value, noisy) for name, value in (
        ("reciprocal_sqrt_alpha", reciprocal_sqrt_alpha), ("noise_coefficient", noise_coefficient),
        ("posterior_std", posterior_std))]
    out = _output("out", out, noisy)
    if count:
        noisy = noisy.contiguous()
        if noise is None:
            _launch(f"ddpm_step_{_SUFFIXES[dtype]}", count, noisy, *arrays, out, _u64(count), _u64(per_sample),
                    _u64(seed), _u64(offset))
        else:
            _launch(f"ddpm_step_noise_{_SUFFIXES[dtype]}", count, noisy, *arrays, out, _u64(count), _u64(per_sample))
    return out


def fused_add_noise(clean: torch.Tensor, signal_scale: torch.Tensor, noise_scale: torch.Tensor, *,
                    noise: torch.Tensor | None = None, seed: int = 0, offset: int = 0,
                    out: torch.Tensor | None = None,
                    noise_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = sqrt(alpha_bar_t) x_clean + sqrt(1 - alpha_bar_t) z in one kernel; returns (x_t, z).

    With noise=None, z is drawn in the kernel from (seed, offset) and written out beside x_t (the
    regression target of training); otherwise `noise` is read and returned as given.

    Args:
        clean: (batch, ...) float32/float64 CUDA tensor.
        signal_scale, noise_scale: sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) per sample.
        noise, seed, offset, out: as in `fused_ddpm_step`.
        noise_out: where to write the drawn z (noise=None only); None allocates it.
    """
    dtype, count, per_sample = _check_sample("clean", clean)
    seed, offset = check_uint64("seed", seed), check_uint64("offset", offset)
    scales = [_coefficient("signal_scale", signal_scale, clean), _coefficient("noise_scale", noise_scale, clean)]
    out = _output("out", out, clean)
    if noise is None:
        noise_out = _output("noise_out", noise_out, clean)
        if count:
            _launch(f"add_noise_philox_{_SUFFIXES[dtype]}", count, clean.contiguous(), *scales, out, noise_out,
                    _u64(count), _u64(per_sample), _u64(seed), _u64(offset))
        return out, noise_out
    if noise_out is not None:
        raise ValueError("noise_out is written only when the kernel draws the noise (noise=None)")
    noise = _operand("noise", noise, clean)
    if count:
        _launch(f"add_noise_{_SUFFIXES[dtype]}", count, clean.contiguous(), noise, *scales, out, _u64(count),
                _u64(per_sample))
    return out, noise


def fused_tweedie(noisy: torch.Tensor, predicted_noise: torch.Tensor, signal_scale: torch.Tensor,
                  noise_scale: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """E[x_clean | x_t] ~ (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t) in one kernel.

    Args as in `fused_add_noise` (signal_scale = sqrt(alpha_bar_t), noise_scale = sqrt(1 - alpha_bar_t)).
    """
    dtype, count, per_sample = _check_sample("noisy", noisy)
    arrays = [_operand("predicted_noise", predicted_noise, noisy), _coefficient("signal_scale", signal_scale, noisy),
              _coefficient("noise_scale", noise_scale, noisy)]
    out = _output("out", out, noisy)
    if count:
        _launch(f"tweedie_{_SUFFIXES[dtype]}", count, noisy.contiguous(), *arrays, out, _u64(count), _u64(per_sample))
    return out


def fused_philox_normal(shape: tuple[int, ...], seed: int, offset: int = 0, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cuda", out: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normal noise of `shape` by emu's convention: the GPU twin of `philox.philox_normal`.

    `out`, when given, is written instead (C-contiguous CUDA tensor; its shape, dtype and device win).
    """
    if out is None:
        if dtype not in _SUFFIXES:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if torch.device(device).type != _DEVICE_TYPE:
            raise ValueError(f"device must be a CUDA device, got {device}")
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        _check_sample("out", out.reshape(1, -1) if out.ndim == 0 else out)
        if not out.is_contiguous():
            raise ValueError("out must be C-contiguous")
        dtype = out.dtype
    seed, offset = check_uint64("seed", seed), check_uint64("offset", offset)
    count = out.numel()
    if count:
        _launch(f"philox_normal_{_SUFFIXES[dtype]}", count, out, _u64(count), _u64(seed), _u64(offset))
    return out


# -- launching ---------------------------------------------------------------------------------------
def _launch(name: str, count: int, *args: Any) -> None:
    """Runs kernel `name` over ceil(count / 4) Philox groups, THREADS_PER_BLOCK threads a block.

    Tensors are passed as their device pointers (numpy.uint64: the kernel parameter is a pointer of
    the same size), integers as given. That is the same zero-copy exchange as DLPack without building
    a CuPy view per array and call, which would cost more host time than the kernel itself at 64^2 x 256.
    """
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    groups = -(-count // 4)
    blocks = min(-(-groups // THREADS_PER_BLOCK), 2**31 - 1)
    params = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
    _run_kernel(name, device, blocks, params)


def _run_kernel(name: str, device: torch.device, blocks: int, params: tuple) -> None:
    """Launches kernel `name` of ddpm.cu on `device`, in CuPy's view of torch's current stream there.

    (tests/test_kernels.py swaps this function for the host build of ddpm.cu, to check the launchers
    on the CPU.)
    """
    cupy = require_cupy()
    with cupy.cuda.Device(device.index), torch_stream(torch.cuda.current_stream(device)):
        _kernel(name, device.index)((blocks,), (THREADS_PER_BLOCK,), params)


@functools.lru_cache(maxsize=None)
def _kernel(name: str, device_index: int) -> Any:
    # Looked up once per device, inside that device's context (CuPy loads modules per device).
    return raw_module(KERNEL_SOURCE).get_function(name)


def _check_sample(name: str, tensor: Any) -> tuple[torch.dtype, int, int]:
    """(dtype, element count, elements per sample) of a (batch, ...) float CUDA tensor."""
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _SUFFIXES or tensor.ndim < 1:
        got = (f"dtype {tensor.dtype}, shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor)
               else type(tensor).__name__)
        raise ValueError(f"{name} must be a float32 or float64 tensor of shape (batch, ...), got {got}")
    if tensor.device.type != _DEVICE_TYPE:
        raise ValueError(f"{name} must be on a CUDA device for the fused kernels, got {tensor.device}")
    count = tensor.numel()
    return tensor.dtype, count, (count // tensor.shape[0] if count else 1)


def _operand(name: str, tensor: Any, like: torch.Tensor) -> torch.Tensor:
    """`tensor` as a C-contiguous tensor of like's shape, dtype and device."""
    if not isinstance(tensor, torch.Tensor) or tensor.shape != like.shape:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {got}")
    if tensor.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {tensor.device}")
    return tensor.to(like.dtype).contiguous()


def _output(name: str, out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """`out`, checked to be a C-contiguous tensor of like's shape, dtype and device; a new one if None."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if (not isinstance(out, torch.Tensor) or out.shape != like.shape or out.dtype != like.dtype
            or out.device != like.device or not out.is_contiguous()):
        got = (f"shape {tuple(out.shape)}, {out.dtype} on {out.device}, contiguous={out.is_contiguous()}"
               if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ValueError(f"{name} must be a C-contiguous tensor of shape {tuple(like.shape)}, {like.dtype} on "
                         f"{like.device}, got {got}")
    return out


def _coefficient(name: str, values: Any, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values as a contiguous (batch,) tensor of like's dtype on like's device."""
    batch = like.shape[0]
    if not isinstance(values, torch.Tensor) or values.numel() != batch or (values.ndim and values.shape[0] != batch):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{name} must hold one value per sample, shape ({batch},) or ({batch}, 1, ..., 1), got {got}")
    return values.reshape(batch).to(device=like.device, dtype=like.dtype).contiguous()


def _u64(value: int) -> np.uint64:
    return np.uint64(value)
