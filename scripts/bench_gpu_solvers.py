"""Solver throughput on a GPU: emu's cupy backend (fused kernels) against torch-CUDA, CuPy without
the fused kernels, and jax-cfd when it is importable (Kolmogorov only), as a markdown table.

    python scripts/bench_gpu_solvers.py                                  # 64..512^2, batches 1, 8, 64
    python scripts/bench_gpu_solvers.py --grids 256,512 --batches 1 --dtypes float32 --out gpu.md

Each cell is steps/s of one whole-batch step (`emu.bench.emu_steps_per_second`: default stepper,
random initial condition, warm-up, then about --seconds of stepping closed by a device synchronise).
"traj/s" is batch * steps/s, what an ensemble run produces; the ratios compare trajectory-steps/s of
fused cupy with torch-CUDA on the same batch and with jax-cfd (one trajectory, its step jitted and
repeated 10 times per call). Issue 7's goal: cupy >= torch-CUDA and >= 1.5x jax-cfd at 512^2.
The same numbers, one configuration at a time: `emu bench --backend cupy,torch --device cuda ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from emu.backends import BackendUnavailable
from emu.bench import emu_steps_per_second, jaxcfd_steps_per_second


@contextlib.contextmanager
def environment(**values):
    """Sets environment variables for the duration (EMU_CUPY_FUSED is read when a backend is made)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def measure(system: str, backend: str, grid: int, dtype: str, batch: int, seconds: float, fused: bool = True):
    """Steps/s, or the reason it could not run."""
    try:
        with environment(EMU_CUPY_FUSED="1" if fused else "0"):
            return emu_steps_per_second(system, None, backend, grid, dtype, batch, seconds, device="cuda")
    except BackendUnavailable as error:
        return str(error)


def jax_device() -> str | None:
    try:
        import jax

        return jax.devices()[0].platform
    except Exception:  # jax missing or without a usable device
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="kolmogorov,qg")
    parser.add_argument("--grids", default="64,128,256,512")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    parser.add_argument("--no-generic", action="store_true", help="skip CuPy without fused kernels")
    parser.add_argument("--out", default="bench_gpu_solvers.md", help="markdown table written here")
    args = parser.parse_args(argv)
    split = lambda text: [item for item in text.split(",") if item]  # noqa: E731

    try:  # nothing to compare without the cupy backend: say why at once
        from emu.cuda import require_cupy

        require_cupy()
    except BackendUnavailable as error:
        print(f"bench_gpu_solvers: {error}", file=sys.stderr)
        return 2
    solvers = [("cupy (fused)", "cupy", True), ("torch-cuda", "torch", True)]
    if not args.no_generic:
        solvers.append(("cupy (generic)", "cupy", False))
    platform = jax_device()
    header = ["system", "dtype", "grid", "batch"] + [f"{label} steps/s" for label, _, _ in solvers]
    header += ["cupy/torch traj", "jax-cfd steps/s" if platform else "jax-cfd", "cupy/jax-cfd traj"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print("\n".join(lines), flush=True)
    notes = set()
    started = time.perf_counter()
    for system in split(args.systems):
        for dtype in split(args.dtypes):
            for grid in [int(g) for g in split(args.grids)]:
                jax_rate = None
                if system == "kolmogorov" and platform:
                    peer = jaxcfd_steps_per_second(grid, dtype, args.seconds)
                    jax_rate = peer[0] if peer else None
                for batch in [int(b) for b in split(args.batches)]:
                    rates = []
                    for label, backend, fused in solvers:
                        rate = measure(system, backend, grid, dtype, batch, args.seconds, fused)
                        if isinstance(rate, str):
                            notes.add(f"{label}: {rate}")
                            rate = None
                        rates.append(rate)
                    cupy_rate, torch_rate = rates[0], rates[1]
                    cells = [system, dtype, str(grid), str(batch)]
                    cells += ["-" if r is None else f"{r:.1f}" for r in rates]
                    cells.append(f"{cupy_rate / torch_rate:.2f}" if cupy_rate and torch_rate else "-")
                    cells.append(f"{jax_rate:.1f}" if jax_rate else "-")
                    cells.append(f"{batch * cupy_rate / jax_rate:.2f}" if cupy_rate and jax_rate else "-")
                    lines.append("| " + " | ".join(cells) + " |")
                    print(lines[-1], flush=True)
    import platform as host

    device = "unknown GPU"
    with contextlib.suppress(Exception):
        import cupy

        device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    footer = ["", f"{device}; {host.node()}; {time.strftime('%Y-%m-%d %H:%M')}; ~{args.seconds:g} s per cell; "
              f"jax-cfd on {platform or 'n/a (not importable)'}; {time.perf_counter() - started:.0f} s in all."]
    footer += [f"note: {note}" for note in sorted(notes)]
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines + footer) + "\n")
    print("\n".join(footer))
    print(f"table written to {args.out}")
    return 0 if not any(note.startswith("cupy") for note in notes) else 1


if __name__ == "__main__":
    sys.exit(main())
