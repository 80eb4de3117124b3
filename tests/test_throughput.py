"""The emulator benchmark runs and reports consistent numbers (speed itself is never asserted in tests)."""

import math

import pytest
from click.testing import CliRunner

from emu.cli import main
from emu.models import count_parameters, make_model
from emu.training.throughput import emulator_throughput, parse_emulator_specs


def test_parse_emulator_specs():
    assert parse_emulator_specs("unet:paper, drn") == [("unet", "paper"), ("drn", "small")]
    with pytest.raises(ValueError, match="emulator"):
        parse_emulator_specs(" , ")


def test_emulator_throughput_reports_consistent_rates():
    row = emulator_throughput("drn", "small", channels=2, grid=8, batch=2, unroll=2, seconds=0.05, warmup=1)
    assert row["parameters"] == count_parameters(make_model("drn", "small", 2, 2))
    for key in ("inference_samples_per_second", "training_windows_per_second"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert row["inference_ms_per_sample"] == pytest.approx(1e3 / row["inference_samples_per_second"])
    assert row["training_ms_per_window"] == pytest.approx(1e3 / row["training_windows_per_second"])
    with pytest.raises(ValueError, match="unroll"):
        emulator_throughput("drn", "small", unroll=0)


def test_bench_cli_emulator_table_and_errors():
    result = CliRunner().invoke(main, ["bench", "--emulator", "drn:small", "--system", "kolmogorov", "--grid", "8",
                                       "--batch", "1", "--unroll", "1", "--seconds", "0.02"])
    assert result.exit_code == 0, result.output
    assert "drn:small" in result.output and "131,681" in result.output  # one channel for kolmogorov
    bad = CliRunner().invoke(main, ["bench", "--emulator", "mlp:small", "--grid", "8"])
    assert bad.exit_code != 0 and "arch must be one of" in bad.output
    bad_grid = CliRunner().invoke(main, ["bench", "--emulator", "drn", "--grid", "8,x"])
    assert bad_grid.exit_code != 0 and "--grid" in bad_grid.output
