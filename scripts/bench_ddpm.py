"""The fused DDPM step benchmark (emu.bench_ddpm) as a script, with the rows optionally saved as JSON.

    python scripts/bench_ddpm.py --device cuda                         # 64^2, batch 64/256/1024, float32
    python scripts/bench_ddpm.py --device cuda --batch 256 1024 --grid 128 --json ddpm_bench.json

The same table as `python -m emu.cli bench --ddpm`: microseconds per call, effective GB/s and the
fraction of the copy bandwidth measured in the same run, for the eager torch sequence,
torch.compile of it, the fused CuPy kernel and the public ddpm_step. Without a GPU and CuPy the torch
rows run on the CPU and the fused row says why it cannot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from emu.bench_ddpm import DEFAULT_BATCHES, DEFAULT_GRID, run_ddpm_benchmarks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=list(DEFAULT_BATCHES), help="samples per step")
    parser.add_argument("--grid", type=int, default=DEFAULT_GRID, help="points per side")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda when available)")
    parser.add_argument("--seconds", type=float, default=1.0, help="wall time per measurement")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    try:
        rows = run_ddpm_benchmarks(batches=args.batch, grid=args.grid, dtype=args.dtype, device=args.device,
                                   seconds=args.seconds, compile=not args.no_compile)
    except ValueError as error:
        parser.error(str(error))
    if args.json is not None:
        # Atomic write: a temporary file beside the target, then a rename.
        handle, temporary = tempfile.mkstemp(dir=args.json.resolve().parent, suffix=".tmp")
        with os.fdopen(handle, "w") as stream:
            json.dump(rows, stream, indent=2)
        os.replace(temporary, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
