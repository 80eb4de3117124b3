"""Memory a solver run will need, checked before any work against what the machine has.

A run too large for the machine otherwise grows until the kernel's OOM killer ends it (and maybe its
neighbours) minutes later with no message: `simulate --grid 8192 --batch 64` reached 24 GB after
150 s. `check_memory` refuses it in milliseconds, naming the estimate and what is available.

The estimate counts arrays of one physical field of the whole ensemble, F = batch x layers x n^2 x
itemsize bytes (a spectral array, n x (n/2+1) complex, is the same size):
- solver working set: 32 F. Measured with tracemalloc over Crank-Nicolson RK4 (kolmogorov) and AB3
  (qg) steps, float32 and float64, 64^2-256^2, batch 1-8: each ensemble member added 24 F
  (kolmogorov) and 29 F (qg) to the peak (state, stage tendencies or AB3 history, velocity and
  gradient fields, products, FFTW plan buffers); 32 leaves a margin.
- grid constants (wavenumbers, filters, dealiasing masks): 12 n^2 x 8 bytes, shared by the batch
  (measured: 11).
- process: 64 MB for the interpreter and libraries (tracemalloc saw 16 MB before the first array).
- restart copy: the state and the stepper's memory as complex128 each time a restart state is
  saved: 4 x batch x layers x n (n/2+1) x 16 bytes.
- output: one snapshot at the saved size (float64) plus any caller-held buffer (`extra_bytes`, e.g.
  the trajectories `generate` keeps before writing a batch).
`tests/test_simulate_robustness.py` checks the estimate against measured peaks of the generic path (never
below, at most 3x above); the numpy backend's fused CPU kernels need less (no temporaries beyond the
FFTW buffers), so the estimate covers them with room to spare.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from emu.errors import UserError

WORKING_SET_FIELDS = 32
GRID_CONSTANT_FIELDS = 12
RESTART_COPIES = 4
PROCESS_BYTES = 64 * 10**6


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs, by part."""

    solver: int
    grid: int
    restart: int
    output: int
    process: int = PROCESS_BYTES

    @property
    def total(self) -> int:
        return self.solver + self.grid + self.restart + self.output + self.process

    def describe(self) -> str:
        parts = ", ".join(f"{name} {format_bytes(getattr(self, name))}"
                          for name in ("solver", "grid", "restart", "output", "process"))
        return f"{format_bytes(self.total)} ({parts})"


def format_bytes(count: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{int(count)} B"


def estimate_memory(*, grid_size: int, layers: int, batch: int, dtype: str, output_size: int,
                    extra_bytes: int = 0) -> MemoryEstimate:
    """The estimate of the module docstring for one solver ensemble."""
    itemsize = 4 if dtype == "float32" else 8
    points = grid_size * grid_size
    field = batch * layers * points * itemsize
    spectral = batch * layers * grid_size * (grid_size // 2 + 1) * 16
    return MemoryEstimate(solver=WORKING_SET_FIELDS * field, grid=GRID_CONSTANT_FIELDS * points * 8,
                          restart=RESTART_COPIES * spectral,
                          output=batch * layers * output_size * output_size * 8 + int(extra_bytes))


def available_host_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable of /proc/meminfo, lowered by a cgroup
    (container) limit when there is one; None where neither can be read (not Linux)."""
    limits = []
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for maximum, current in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(maximum) as stream:
                text = stream.read().strip()
            with open(current) as stream:
                used = int(stream.read().strip())
        except (OSError, ValueError):
            continue
        if text.isdigit() and int(text) < 1 << 60:
            limits.append(int(text) - used)
        break
    return min(limits) if limits else None


def check_memory(estimate: MemoryEstimate, *, what: str, available: int | None = None, where: str = "this machine",
                 hint: str = "use a smaller --grid or --batch") -> None:
    """Raises UserError when `estimate` exceeds the available memory. EMU_MEMORY_CHECK=0 skips it
    (for a machine whose swap or overcommit the estimate does not know about)."""
    if os.environ.get("EMU_MEMORY_CHECK", "1") == "0":
        return
    available = available_host_memory() if available is None else available
    if available is not None and estimate.total > available:
        raise UserError(f"memory: {what} needs about {estimate.describe()}, more than the "
                        f"{format_bytes(available)} available on {where}; {hint} "
                        "(EMU_MEMORY_CHECK=0 skips this check)")
