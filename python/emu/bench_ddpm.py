"""Speed of one DDPM reverse step: the fused CUDA kernel vs the eager torch sequence and torch.compile.

The step (Ho et al. 2020, Alg. 2; emu.diffusion.ddpm) on a (batch, 1, grid, grid) sample with
per-sample coefficients c_1 = 1/sqrt(alpha_t), c_2 = beta_t/sqrt(1 - alpha_bar_t), sigma_t:

    x_{t-1} = c_1 (x_t - c_2 eps_hat) + sigma_t z,   z ~ N(0, I) drawn fresh every call

Rows, each timed on the same inputs (levels drawn once, coefficients gathered once, so every row
times the step itself, not the level checks around it):

  torch eager      z = torch.randn(...); then the expression above: 6 kernels, each a pass over memory
  torch.compile    the same function compiled by inductor (one or two fused kernels, its own RNG)
  fused (cupy)     emu.diffusion.fused.fused_ddpm_step: one kernel, z from Philox inside it
  ddpm_step API    emu.diffusion.ddpm_step(backend="auto"), with its per-call level check and gathers

Two times per row:

  wall   microseconds per call of back-to-back calls between two synchronisations
         (bench.calls_per_second): what a Python sampling loop sees, host launch overhead included.
  GPU    the device's own time per call: the calls are queued behind a spin kernel
         (torch.cuda._sleep) that keeps the GPU busy until the host has queued them all, then timed
         with CUDA events, so host overhead between launches does not count. On the CPU, = wall.

From the GPU time: effective bandwidth = the step's minimum memory traffic (read x_t and eps_hat,
write x_{t-1}: 3 * batch * grid^2 * itemsize bytes) / time, the same numerator for every row; that
as a fraction of the device's copy bandwidth, measured in the same run and the same way as
2 * bytes / time of a 256 MiB `dst.copy_(src)`; and the speedup over the eager sequence. The issue's
goal for the fused row is >= 80% of copy bandwidth and >= 3x the eager sequence at 64^2 x 256 and
above. At these sizes a step moves a few MB, a few microseconds of GPU time, while a Python launch
costs several: the wall column says how much of the kernel's speed a Python loop can use (CUDA
graphs would recover the rest).

On a machine without CuPy and a GPU the fused row reports why it cannot run; the torch rows run on
the CPU.

    python -m emu.cli bench --ddpm --device cuda        # batch 64, 256, 1024 at 64^2, float32
    python scripts/bench_ddpm.py --device cuda --json ddpm_bench.json
"""

from __future__ import annotations

from typing import Callable

import torch

from emu.backends import BackendUnavailable
from emu.bench import calls_per_second

DEFAULT_BATCHES: tuple[int, ...] = (64, 256, 1024)
DEFAULT_GRID = 64
LEVEL_COUNT = 1000


def copy_bandwidth(device: torch.device, seconds: float, megabytes: int | None = None) -> float:
    """Device copy bandwidth in GB/s: 2 * bytes / time of dst.copy_(src) (one read, one write), timed
    like the steps (`device_seconds_per_call`). Buffers of 256 MiB on a GPU (far beyond its L2
    cache), 64 MiB on the CPU, unless `megabytes`."""
    size = (megabytes or (256 if device.type == "cuda" else 64)) * 2**20
    source = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    destination = torch.empty_like(source)
    wall = 1.0 / calls_per_second(lambda: destination.copy_(source), seconds, warmup=3, minimum=5,
                                  synchronize=_synchronizer(device))
    return 2 * size / device_seconds_per_call(lambda: destination.copy_(source), device, wall) / 1e9


def device_seconds_per_call(function: Callable[[], object], device: torch.device, wall_seconds: float,
                            calls: int = 50) -> float:
    """The device's time per call of `function` (see the module docstring); `wall_seconds` (per call,
    host included) sizes the spin that hides the host. The wall time itself on the CPU."""
    if device.type != "cuda":
        return wall_seconds
    calls = max(5, min(calls, int(0.5 / max(wall_seconds, 1e-9))))  # at most ~0.5 s of queueing
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    if hasattr(torch.cuda, "_sleep"):  # spin ~2x the host's queueing time (at >= 1 GHz; longer is harmless)
        torch.cuda._sleep(int(2 * calls * wall_seconds * 2e9))
    start.record()
    for _ in range(calls):
        function()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def ddpm_step_functions(batch: int, grid: int, dtype: torch.dtype, device: torch.device, *,
                        compile: bool = True) -> tuple[dict[str, Callable[[], torch.Tensor] | str], int]:
    """{row name: a no-argument step, or why the row cannot run}, and the step's minimum bytes moved."""
    from emu.diffusion import CosineSchedule, ddpm_step

    schedule = CosineSchedule(LEVEL_COUNT)
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (batch, 1, grid, grid)
    noisy = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    predicted = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    levels = torch.randint(1, LEVEL_COUNT, (batch,), generator=generator, device=device)
    c1, c2, sigma = (schedule.gather(name, levels, noisy) for name in
                     ("reciprocal_sqrt_alphas", "noise_coefficients", "posterior_stds"))

    def eager() -> torch.Tensor:
        z = torch.randn(shape, dtype=dtype, device=device)
        return c1 * (noisy - c2 * predicted) + sigma * z

    functions: dict[str, Callable[[], torch.Tensor] | str] = {"torch eager": eager}
    if compile:
        try:
            compiled = torch.compile(eager, dynamic=False)
            compiled()  # compile now (errors here, not in the timed loop)
            functions["torch.compile"] = compiled
        except Exception as error:  # no C++ compiler / triton: the row says why
            functions["torch.compile"] = f"torch.compile failed: {type(error).__name__}: {str(error)[:200]}"
    try:
        from emu.diffusion.fused import fused_ddpm_step
        from emu.cuda import require_cupy

        if device.type != "cuda":
            raise BackendUnavailable(f"the fused kernel needs a CUDA device (this run is on {device}); "
                                     "run with --device cuda on a GPU machine with CuPy")
        require_cupy()
        calls = [0]
        c1_flat, c2_flat, sigma_flat = (c.reshape(batch).contiguous() for c in (c1, c2, sigma))

        def fused() -> torch.Tensor:
            calls[0] += 1  # a fresh Philox offset per call, as in a sampling chain
            return fused_ddpm_step(noisy, predicted, c1_flat, c2_flat, sigma_flat, seed=1234, offset=calls[0])

        fused()
        functions["fused (cupy)"] = fused
    except BackendUnavailable as error:
        functions["fused (cupy)"] = f"needs a GPU with CuPy: {error}"
    api_generator = torch.Generator().manual_seed(1)
    functions["ddpm_step API"] = lambda: ddpm_step(noisy, levels, predicted, schedule, generator=api_generator)
    return functions, 3 * noisy.numel() * noisy.element_size()


def run_ddpm_benchmarks(*, batches: list[int] | tuple[int, ...] = DEFAULT_BATCHES, grid: int = DEFAULT_GRID,
                        dtype: str = "float32", device: str | None = None, seconds: float = 1.0,
                        compile: bool = True, echo: Callable[[str], None] = print) -> list[dict]:
    """Times every row at each batch size, prints a table and returns its rows (dicts).

    Args:
        batches: samples per step. grid: points per side. dtype: "float32" or "float64".
        device: "cuda[:N]" or "cpu"; None picks cuda when torch sees a GPU.
        seconds: wall time per measurement. compile: include the torch.compile row.
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    for name, values in (("batch", batches), ("grid", [grid])):
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must be positive integers, got {values!r}")
    from emu.backends import torch_device as resolve_device

    torch_device = resolve_device(device)
    torch_dtype = getattr(torch, dtype)
    label = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "CPU"
    bandwidth = copy_bandwidth(torch_device, min(seconds, 1.0))
    echo(f"emu bench --ddpm: DDPM reverse step, {grid}^2 x 1 channel, {dtype}, on {label} ({torch_device}); "
         f"copy bandwidth {bandwidth:.1f} GB/s (dst.copy_(src) on the device)")
    header = (f"{'step':<16}{'batch':>7}{'wall us':>10}{'GPU us':>10}{'GB/s':>9}{'% copy':>8}"
              f"{'vs eager':>10}{'wall vs eager':>15}")
    echo(header)
    echo("-" * len(header))
    rows, notes = [], []
    for batch in batches:
        functions, nbytes = ddpm_step_functions(batch, grid, torch_dtype, torch_device, compile=compile)
        eager = None
        for name, function in functions.items():
            if isinstance(function, str):
                notes.append(f"{name}: {function}")
                rows.append({"step": name, "batch": batch, "grid": grid, "dtype": dtype, "unavailable": function})
                echo(f"{name:<16}{batch:>7}" + "".join(f"{'-':>{width}}" for width in (10, 10, 9, 8, 10, 15)))
                continue
            wall = 1.0 / calls_per_second(function, seconds, warmup=3, minimum=5,
                                          synchronize=_synchronizer(torch_device))
            gpu = device_seconds_per_call(function, torch_device, wall)
            eager = eager or (wall, gpu)
            gigabytes_per_second = nbytes / gpu / 1e9
            row = {"step": name, "batch": batch, "grid": grid, "dtype": dtype, "device": str(torch_device),
                   "wall_microseconds": wall * 1e6, "gpu_microseconds": gpu * 1e6, "gb_per_s": gigabytes_per_second,
                   "fraction_of_copy": gigabytes_per_second / bandwidth, "speedup_vs_eager": eager[1] / gpu,
                   "wall_speedup_vs_eager": eager[0] / wall, "copy_gb_per_s": bandwidth, "bytes": nbytes}
            rows.append(row)
            echo(f"{name:<16}{batch:>7}{wall * 1e6:>10.1f}{gpu * 1e6:>10.1f}{gigabytes_per_second:>9.1f}"
                 f"{100 * row['fraction_of_copy']:>7.0f}%{row['speedup_vs_eager']:>9.2f}x"
                 f"{row['wall_speedup_vs_eager']:>14.2f}x")
    for note in dict.fromkeys(notes):
        echo(f"note: {note}")
    return rows


def _synchronizer(device: torch.device) -> Callable[[], None] | None:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None
