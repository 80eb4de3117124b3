"""Solver throughput on a GPU: emu's cupy backend (fused kernels) against torch-CUDA, CuPy without
the fused kernels, and jax-cfd when it is importable (Kolmogorov only), as a markdown table.

    python scripts/bench_gpu_solvers.py                                  # both systems, 64..512^2, batches 1, 8, 64
    python scripts/bench_gpu_solvers.py --grids 256,512 --batches 1 --dtypes float32 --out gpu.md --json gpu.json
    python scripts/bench_gpu_solvers.py --dtypes float32 --no-generic --seconds 0.5 --budget 120

Each cell is steps/s of one whole-batch step (`emu.bench.emu_steps_per_second`: default stepper,
random initial condition, warm-up, then about --seconds of stepping closed by a device synchronise).
"traj/s" is batch * steps/s, what an ensemble run produces; the ratios compare trajectory-steps/s of
fused cupy with torch-CUDA on the same batch and with jax-cfd (one trajectory, its step jitted and
repeated 10 times per call). Issue 7's goal: cupy >= torch-CUDA and >= 1.5x jax-cfd at 512^2.
The same numbers, one configuration at a time: `emu bench --backend cupy,torch --device cuda ...`.

The default matrix is both systems (kolmogorov, qg) x grids 64, 128, 256, 512 x batches 1, 8, 64 x
float32 and float64. --budget stops starting new cells once that many seconds have passed (the
table then says which cells were left out); --json writes the rows as JSON too. scripts/gpu_check.py
calls `solver_rows` and `markdown_table` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

# jax (only imported when jax-cfd is there to compare against) must not take 75% of the GPU's memory
# at start: torch and CuPy share the card with it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# (label in the table, emu backend, fused kernels, key in the JSON rows)
SOLVERS: tuple[tuple[str, str, bool, str], ...] = (
    ("cupy (fused)", "cupy", True, "cupy_fused"),
    ("torch-cuda", "torch", True, "torch_cuda"),
    ("cupy (generic)", "cupy", False, "cupy_generic"),
)
SYSTEMS = ("kolmogorov", "qg")
GRIDS = (64, 128, 256, 512)
BATCHES = (1, 8, 64)
DTYPES = ("float32", "float64")


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
    from emu.backends import BackendUnavailable
    from emu.bench import emu_steps_per_second

    try:
        with environment(EMU_CUPY_FUSED="1" if fused else "0"):
            return emu_steps_per_second(system, None, backend, grid, dtype, batch, seconds, device="cuda")
    except BackendUnavailable as error:
        return str(error)


def jax_device() -> str | None:
    """jax's platform when jax-cfd can be compared against (both importable), else None. jax is not
    imported at all without jax-cfd: starting it would claim GPU memory for nothing."""
    if importlib.util.find_spec("jax_cfd") is None:
        return None
    try:
        import jax

        return jax.devices()[0].platform
    except Exception:  # jax missing or without a usable device
        return None


def jax_rate(grid: int, dtype: str, seconds: float) -> float | None:
    from emu.bench import jaxcfd_steps_per_second

    peer = jaxcfd_steps_per_second(grid, dtype, seconds)
    return peer[0] if peer else None


def solver_rows(*, systems=SYSTEMS, grids=GRIDS, batches=BATCHES, dtypes=DTYPES, seconds: float = 1.0,
                solvers=SOLVERS, budget: float | None = None, platform: str | None = None,
                measure: Callable = measure, jax_rate: Callable = jax_rate,
                on_row: Callable[[dict], None] | None = None,
                clock: Callable[[], float] = time.monotonic) -> tuple[list[dict], list[str]]:
    """Measures every (system, dtype, grid, batch) cell; returns (rows, notes).

    A row: system, dtype, grid, batch, `<key>_steps_per_s` for each solver (None where it could not
    run; the reason goes into the notes), cupy_over_torch (fused cupy / torch-CUDA steps/s, same
    batch), jaxcfd_steps_per_s and cupy_over_jaxcfd_traj (batch * cupy / jax-cfd) when `platform`.
    `budget` (seconds from the call): no cell is started when the time left is less than the longest
    cell so far took; the notes say how many cells were left out. `on_row` sees each row as it is made.
    """
    started = clock()
    cells = [(system, dtype, int(grid), int(batch)) for system in systems for dtype in dtypes
             for grid in grids for batch in batches]
    rows: list[dict] = []
    notes: dict[str, None] = {}
    jax_rates: dict[tuple[str, str, int], float | None] = {}
    longest = 0.0
    for index, (system, dtype, grid, batch) in enumerate(cells):
        if budget is not None and clock() - started + longest > budget:
            notes[f"budget: {budget:g} s ran out; {len(cells) - index} of {len(cells)} cells left out "
                  f"(from {system} {dtype} {grid}^2 batch {batch})"] = None
            break
        cell_start = clock()
        row: dict = {"system": system, "dtype": dtype, "grid": grid, "batch": batch}
        for label, backend, fused, key in solvers:
            rate = measure(system, backend, grid, dtype, batch, seconds, fused)
            if isinstance(rate, str):
                notes[f"{label}: {rate}"] = None
                rate = None
            row[f"{key}_steps_per_s"] = rate
        cupy_rate, torch_rate = row.get("cupy_fused_steps_per_s"), row.get("torch_cuda_steps_per_s")
        row["cupy_over_torch"] = cupy_rate / torch_rate if cupy_rate and torch_rate else None
        if system == "kolmogorov" and platform:
            if (system, dtype, grid) not in jax_rates:
                jax_rates[system, dtype, grid] = jax_rate(grid, dtype, seconds)
            peer = jax_rates[system, dtype, grid]
            row["jaxcfd_steps_per_s"] = peer
            row["cupy_over_jaxcfd_traj"] = batch * cupy_rate / peer if cupy_rate and peer else None
        row["seconds"] = clock() - cell_start
        longest = max(longest, row["seconds"])
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows, list(notes)


def markdown_table(rows: list[dict], solvers=SOLVERS, platform: str | None = None) -> list[str]:
    """The rows as a markdown table (lines)."""
    header = ["system", "dtype", "grid", "batch"] + [f"{label} steps/s" for label, *_ in solvers]
    header += ["cupy/torch traj", "jax-cfd steps/s" if platform else "jax-cfd", "cupy/jax-cfd traj"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    number = lambda value, form: "-" if value is None else format(value, form)  # noqa: E731
    for row in rows:
        cells = [row["system"], row["dtype"], str(row["grid"]), str(row["batch"])]
        cells += [number(row.get(f"{key}_steps_per_s"), ".1f") for *_, key in solvers]
        cells += [number(row.get("cupy_over_torch"), ".2f"), number(row.get("jaxcfd_steps_per_s"), ".1f"),
                  number(row.get("cupy_over_jaxcfd_traj"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def device_name() -> str:
    with contextlib.suppress(Exception):
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return "unknown GPU"


def write_atomically(path: Path, text: str) -> None:
    """A temporary file beside `path`, then a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600; the report is for everyone to read
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--grids", default=",".join(map(str, GRIDS)))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    parser.add_argument("--no-generic", action="store_true", help="skip CuPy without fused kernels")
    parser.add_argument("--budget", type=float, default=None,
                        help="start no new cell after about this many seconds (default: no limit)")
    parser.add_argument("--out", default="bench_gpu_solvers.md", help="markdown table written here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    split = lambda text: [item for item in text.split(",") if item]  # noqa: E731
    try:
        grids, batches = [int(g) for g in split(args.grids)], [int(b) for b in split(args.batches)]
    except ValueError as error:
        parser.error(f"--grids/--batches take comma-separated integers: {error}")
    unknown = sorted(set(split(args.systems)) - set(SYSTEMS)) + sorted(set(split(args.dtypes)) - set(DTYPES))
    if unknown:
        parser.error(f"unknown system or dtype {unknown}; systems: {','.join(SYSTEMS)}, dtypes: {','.join(DTYPES)}")

    from emu.backends import BackendUnavailable

    try:  # nothing to compare without the cupy backend: say why at once
        from emu.cuda import require_cupy

        require_cupy()
    except BackendUnavailable as error:
        print(f"bench_gpu_solvers: {error}", file=sys.stderr)
        return 2
    solvers = SOLVERS[:2] if args.no_generic else SOLVERS
    platform = jax_device()
    lines = markdown_table([], solvers, platform)
    print("\n".join(lines), flush=True)

    def echo(row):
        print(markdown_table([row], solvers, platform)[-1], flush=True)

    started = time.perf_counter()
    rows, notes = solver_rows(systems=split(args.systems), grids=grids, batches=batches, dtypes=split(args.dtypes),
                              seconds=args.seconds, solvers=solvers, budget=args.budget, platform=platform,
                              on_row=echo)
    import platform as host

    elapsed = time.perf_counter() - started
    footer = ["", f"{device_name()}; {host.node()}; {time.strftime('%Y-%m-%d %H:%M')}; ~{args.seconds:g} s per cell; "
              f"jax-cfd on {platform or 'n/a (not importable)'}; {elapsed:.0f} s in all."]
    footer += [f"note: {note}" for note in notes]
    write_atomically(Path(args.out), "\n".join(markdown_table(rows, solvers, platform) + footer) + "\n")
    if args.json is not None:
        write_atomically(args.json, json.dumps({"device": device_name(), "seconds_per_cell": args.seconds,
                                                "jax_platform": platform, "elapsed_s": elapsed, "rows": rows,
                                                "notes": notes}, indent=2) + "\n")
    print("\n".join(footer))
    print(f"table written to {args.out}" + (f", rows to {args.json}" if args.json else ""))
    return 0 if not any(note.startswith("cupy") for note in notes) else 1


if __name__ == "__main__":
    sys.exit(main())
