"""The DDPM-step benchmark (emu.bench_ddpm, `emu bench --ddpm`, scripts/bench_ddpm.py) runs on the CPU.

Speed itself is measured on a GPU, never asserted in tests; here: the table's arithmetic (effective
GB/s from the step's minimum traffic), the fused row explaining that it needs a GPU, the CLI wiring.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from emu.bench_ddpm import run_ddpm_benchmarks


def test_ddpm_bench_runs_on_cpu_and_explains_the_fused_row():
    lines = []
    rows = run_ddpm_benchmarks(batches=[2, 3], grid=8, dtype="float32", device="cpu", seconds=0.01, compile=False,
                               echo=lines.append)
    timed = [row for row in rows if "gpu_microseconds" in row]
    assert [(row["step"], row["batch"]) for row in timed] == [("torch eager", 2), ("ddpm_step API", 2),
                                                              ("torch eager", 3), ("ddpm_step API", 3)]
    for row in timed:
        nbytes = 3 * row["batch"] * 8 * 8 * 4  # read x_t and eps_hat, write x_{t-1}, float32
        assert row["wall_microseconds"] > 0 and row["gpu_microseconds"] == row["wall_microseconds"]  # CPU: one time
        assert row["bytes"] == nbytes
        assert row["gb_per_s"] == pytest.approx(nbytes / (row["gpu_microseconds"] * 1e-6) / 1e9)
        assert row["fraction_of_copy"] == pytest.approx(row["gb_per_s"] / row["copy_gb_per_s"])
    fused = [row for row in rows if row["step"] == "fused (cupy)"]
    assert len(fused) == 2 and all("needs a GPU" in row["unavailable"] for row in fused)
    assert any(line.startswith("note: fused (cupy): needs a GPU") for line in lines)


def test_ddpm_bench_rejects_bad_arguments_naming_them():
    with pytest.raises(ValueError, match="dtype"):
        run_ddpm_benchmarks(batches=[2], grid=8, dtype="float16", device="cpu", seconds=0.01, compile=False)
    with pytest.raises(ValueError, match="batch"):
        run_ddpm_benchmarks(batches=[0], grid=8, device="cpu", seconds=0.01, compile=False)


def test_ddpm_bench_cli_prints_every_row(monkeypatch):
    from emu.cli import main

    monkeypatch.setattr(torch, "compile", lambda function, **_: function)  # the wiring, not inductor's speed
    result = CliRunner().invoke(main, ["bench", "--ddpm", "--batch", "2", "--grid", "8", "--seconds", "0.01",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for name in ("torch eager", "torch.compile", "fused (cupy)", "ddpm_step API"):
        assert name in result.output
    assert "float32" in result.output and "needs a GPU" in result.output
