"""`simulate` leaves nothing silently wrong: exact reproducibility across processes, restarts after
SIGTERM and kill -9, a memory guard, and one-line errors for what a user can get wrong (issue 12)."""

import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from emu.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _environment(tmp_path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", EMU_FFTW_WISDOM=str(tmp_path / "wisdom"))
    env.pop("EMU_FFTW_PLANNER", None)  # the default planner (FFTW_MEASURE + shared wisdom) is under test
    return env


def _emu(tmp_path, *arguments, check=True, **options) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "emu.cli", *arguments], cwd=tmp_path, env=_environment(tmp_path),
                            capture_output=True, text=True, timeout=300, **options)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _fields_by_step(path) -> dict[int, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {int(step): handle["fields"][index] for index, step in enumerate(handle["step"][()])}


def _start_long_run(tmp_path, out, *extra) -> subprocess.Popen:
    arguments = [sys.executable, "-m", "emu.cli", "simulate", "--grid", "64", "--steps", "10000000", "--save-every",
                 "20", "--out", out, "--no-plot", "--no-progress", *extra]
    return subprocess.Popen(arguments, cwd=tmp_path, env=_environment(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_restart_beyond(tmp_path, out, step: int, timeout: float = 120.0) -> Path:
    """Waits until the running writer of `out` has saved a restart state past `step`; returns its temp file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for temporary in tmp_path.glob(f".{out}.*.tmp"):
            try:
                with h5py.File(temporary, "r", locking=False) as handle:
                    if "restart" in handle and int(handle["restart"].attrs["step"]) > step:
                        return temporary
            except (OSError, KeyError):
                pass
        time.sleep(0.2)
    raise AssertionError(f"no restart state beyond step {step} appeared in {timeout} s")


# -- reproducibility -------------------------------------------------------------------------------

def test_same_command_in_two_processes_gives_the_same_bits(tmp_path):
    # The issue: --steps 2740 and --steps 6000 differed by 1e-14 at step 0 (FFTW_MEASURE plans per process).
    _emu(tmp_path, "simulate", "--grid", "64", "--steps", "300", "--save-every", "50", "--out", "a.h5", "--no-plot",
         "--no-progress")
    _emu(tmp_path, "simulate", "--grid", "64", "--steps", "600", "--save-every", "50", "--out", "b.h5", "--no-plot",
         "--no-progress")
    first, second = _fields_by_step(tmp_path / "a.h5"), _fields_by_step(tmp_path / "b.h5")
    assert sorted(first) == list(range(0, 301, 50))
    for step, values in first.items():
        np.testing.assert_array_equal(values, second[step], err_msg=f"step {step}")
    with h5py.File(tmp_path / "b.h5", "r") as handle:
        assert "fftw_wisdom" in handle.attrs and "fftw" in handle.attrs["fftw_wisdom"]


def test_sigterm_then_init_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    process = _start_long_run(tmp_path, "cut.h5")
    _wait_for_restart_beyond(tmp_path, "cut.h5", 100)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    with h5py.File(tmp_path / "cut.h5", "r") as handle:
        assert handle.attrs["status"] == "interrupted"
        stopped = int(handle["restart"].attrs["step"])
    _emu(tmp_path, "simulate", "--init", "cut.h5", "--steps", "100", "--save-every", "20", "--out", "rest.h5",
         "--no-plot", "--no-progress")
    _emu(tmp_path, "simulate", "--grid", "64", "--steps", str(stopped + 100), "--save-every", "20", "--out",
         "whole.h5", "--no-plot", "--no-progress")
    whole, rest = _fields_by_step(tmp_path / "whole.h5"), _fields_by_step(tmp_path / "rest.h5")
    assert max(rest) == stopped + 100
    for step in (stopped + 20, stopped + 100):
        np.testing.assert_array_equal(rest[step], whole[step], err_msg=f"step {step}")


def test_kill_9_leaves_a_temporary_file_that_init_continues_exactly(tmp_path):
    process = _start_long_run(tmp_path, "killed.h5", "--restart-every", "0")
    temporary = _wait_for_restart_beyond(tmp_path, "killed.h5", 60)
    process.kill()
    process.wait(timeout=30)
    assert not (tmp_path / "killed.h5").exists()
    with h5py.File(temporary, "r") as handle:
        restart_step = int(handle["restart"].attrs["step"])
    # A new run into the same --out reports the killed one instead of leaving it unexplained.
    report = _emu(tmp_path, "simulate", "--grid", "64", "--steps", "20", "--out", "killed.h5", "--no-plot",
                  "--no-progress")
    assert f"continue it with --init {temporary.name}" in report.stderr
    _emu(tmp_path, "simulate", "--init", temporary.name, "--steps", "40", "--save-every", "20", "--out", "killed.h5",
         "--no-plot", "--no-progress")
    assert not temporary.exists(), "the continued temporary file should be consumed"
    _emu(tmp_path, "simulate", "--grid", "64", "--steps", str(restart_step + 40), "--save-every", "20", "--out",
         "whole.h5", "--no-plot", "--no-progress")
    continued, whole = _fields_by_step(tmp_path / "killed.h5"), _fields_by_step(tmp_path / "whole.h5")
    np.testing.assert_array_equal(continued[restart_step + 40], whole[restart_step + 40])


def test_a_temporary_file_without_restart_state_is_removed_and_said(tmp_path):
    from emu.data.hdf5 import SnapshotWriter
    from emu.systems import make_config

    writer = SnapshotWriter(tmp_path / "k.h5", config=make_config("kolmogorov", grid_size=16),
                            field_names=("vorticity",), field_units=("1/time",), snapshot_shape=(1, 16, 16))
    writer.file.attrs["writer_pid"] = 2**22 + 12345  # no such process: as if killed before its first snapshot
    writer.file.close()
    result = _emu(tmp_path, "simulate", "--grid", "16", "--steps", "4", "--out", "k.h5", "--no-plot", "--no-progress")
    assert "removed" in result.stderr and not writer.temporary.exists()


# -- memory guard ------------------------------------------------------------------------------------

def test_memory_guard_refuses_a_huge_grid_at_once():
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["simulate", "--grid", "8192", "--batch", "64", "--steps", "1", "--no-plot",
                                       "--out", "never.h5"])
    elapsed = time.perf_counter() - started
    assert result.exit_code == 1
    assert "memory:" in result.output and "TB" in result.output and "available" in result.output
    assert elapsed < 1.0, f"the refusal took {elapsed:.2f} s"
    assert not Path("never.h5").exists()


@pytest.mark.parametrize("system, dtype, grid, batch", [("kolmogorov", "float64", 256, 4), ("qg", "float32", 256, 4),
                                                         ("qg", "float64", 128, 8)])
def test_memory_estimate_covers_the_measured_peak(system, dtype, grid, batch):
    import dataclasses

    from emu.backends import get_backend
    from emu.memory import estimate_memory
    from emu.runs import initial_state
    from emu.solvers import make_stepper
    from emu.systems import make_config, make_equation

    def peak_bytes(fused: bool) -> int:
        tracemalloc.start()
        try:
            config = make_config(system, grid_size=grid)
            backend = get_backend("numpy", dtype=dtype)
            equation = make_equation(config, backend if fused else dataclasses.replace(backend, fused_kernels=False))
            stepper = make_stepper(equation, config.dt, None)
            state = initial_state(equation, batch=batch, seed=0)
            for _ in range(4):
                state = stepper.step(state)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    estimate = estimate_memory(grid_size=grid, layers=2 if system == "qg" else 1, batch=batch, dtype=dtype,
                               output_size=grid).total
    # The estimate is sized on the generic array path (numpy without numba, torch), the hungriest.
    generic = peak_bytes(fused=False)
    assert generic <= estimate <= 3 * generic, (generic, estimate)
    # The fused CPU kernels write into FFTW's buffers and need less; the estimate still covers them.
    assert peak_bytes(fused=True) <= estimate


# -- one-line errors and refused conflicts -------------------------------------------------------------

def _refused(arguments, *fragments, cwd=None):
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=cwd):
        result = runner.invoke(main, arguments)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]
    return error_lines[0]


@pytest.fixture(scope="module")
def run_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(main, ["simulate", "--grid", "16", "--steps", "4", "--out", str(folder / "k.h5"),
                                       "--no-plot", "--no-progress"])
    assert result.exit_code == 0, result.output
    return folder / "k.h5"


def test_init_on_a_text_file_or_a_truncated_file_is_one_line(tmp_path, run_file):
    (tmp_path / "notes.h5").write_text("hello\n")
    _refused(["simulate", "--init", str(tmp_path / "notes.h5")], "notes.h5", "not a readable emu run file")
    data = run_file.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    _refused(["simulate", "--init", str(tmp_path / "cut.h5")], "cut.h5", "not a readable emu run file")


def test_init_conflicts_and_perturb_without_init_are_refused(run_file):
    _refused(["simulate", "--init", str(run_file), "--system", "qg"], "--system qg", "kolmogorov")
    _refused(["simulate", "--init", str(run_file), "--preset", "re5000"], "--preset re5000", "re1000")
    _refused(["simulate", "--perturb", "1e-3", "--grid", "16"], "--perturb", "--init")


def test_unwritable_out_or_plot_fails_before_the_run(tmp_path):
    (tmp_path / "plain-file").write_text("")
    started = time.perf_counter()
    _refused(["simulate", "--grid", "16", "--steps", "100000", "--out", str(tmp_path / "plain-file" / "k.h5"),
              "--no-plot"], "--out", "cannot write")
    _refused(["simulate", "--grid", "16", "--steps", "100000", "--out", str(tmp_path / "k.h5"), "--plot",
              str(tmp_path / "plain-file" / "k.png")], "--plot", "cannot write")
    assert time.perf_counter() - started < 5.0
    assert not (tmp_path / "k.h5").exists()


def test_plot_goes_next_to_out_by_default(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["simulate", "--grid", "16", "--steps", "4", "--out", str(tmp_path / "sub" / "run.h5"),
                                  "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sub" / "run.png").is_file()


def test_qg_spinup_needs_a_unit():
    from emu.generate import parse_model_time

    assert parse_model_time("3y", "qg") == 3 * 360 * 86400.0
    assert parse_model_time("200d", "qg") == 200 * 86400.0
    assert parse_model_time("7200s", "qg") == 7200.0
    assert parse_model_time("10", "kolmogorov") == 10.0
    _refused(["generate", "--system", "qg", "--spinup", "10", "--out", "q"], "spinup", "unit", "200d")


def test_devices_and_side_interpreters_that_are_missing_are_one_line():
    pytest.importorskip("torch")
    import torch

    if not torch.cuda.is_available():
        _refused(["simulate", "--backend", "torch", "--device", "cuda", "--grid", "16", "--no-plot"], "cuda",
                 "--device cpu")
        _refused(["bench", "--ddpm", "--device", "cuda", "--seconds", "0.01"], "cuda", "--device cpu")
    _refused(["simulate", "--backend", "torch", "--device", "gpu", "--grid", "16", "--no-plot"], "device", "cuda:N")
    _refused(["bench", "--system", "qg", "--grid", "16", "--seconds", "0.01", "--pyqg-python", "/no/such/python"],
             "--pyqg-python", "no such executable")


def test_debug_keeps_the_traceback(tmp_path):
    (tmp_path / "notes.h5").write_text("hello\n")
    result = _emu(tmp_path, "--debug", "simulate", "--init", "notes.h5", check=False)
    assert result.returncode == 1 and "Traceback" in result.stderr and "UserError" in result.stderr


# -- threads ---------------------------------------------------------------------------------------------

def test_one_thread_per_pool_by_default_and_threads_opts_in(tmp_path):
    script = ("import sys; from click.testing import CliRunner; from emu.cli import main; import emu.backends as b;"
              "r = CliRunner().invoke(main, sys.argv[1:]); assert r.exit_code == 0, r.output;"
              "import torch; print(b.cpu_threads(), torch.get_num_threads(), b.fftw_plans('numpy').threads)")
    env = {k: v for k, v in _environment(tmp_path).items() if k != "OMP_NUM_THREADS"}
    common = ["simulate", "--backend", "torch", "--grid", "16", "--steps", "2", "--no-plot", "--no-progress", "--out",
              str(tmp_path / "t.h5")]
    default = subprocess.run([sys.executable, "-c", script, *common], env=env, capture_output=True, text=True,
                             timeout=120)
    assert default.returncode == 0, default.stderr
    assert default.stdout.split() == ["1", "1", "1"]
    opted = subprocess.run([sys.executable, "-c", script, *common, "--threads", "2"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert opted.returncode == 0, opted.stderr
    assert opted.stdout.split() == ["2", "2", "2"]


def test_small_datasets_keep_a_validation_and_a_test_trajectory():
    from emu.generate import GenerationPlan
    from emu.systems import make_config

    config = make_config("kolmogorov", grid_size=16)

    def counts(trajectories, split=(0.9, 0.05, 0.05)):
        plan = GenerationPlan(config, trajectories=trajectories, length=2, interval=1, spinup_steps=0, downsample=8,
                              split=split)
        ranges = plan.split_ranges
        assert ranges["train"][0] == 0 and ranges["test"][1] == trajectories
        assert ranges["train"][1] == ranges["valid"][0] and ranges["valid"][1] == ranges["test"][0]
        return tuple(plan.split_counts.values())

    assert counts(6) == (4, 1, 1)  # the README's example: 5/0/1 before
    assert counts(100, (0.8, 0.1, 0.1)) == (80, 10, 10)
    assert counts(5, (1.0, 0.0, 0.0)) == (5, 0, 0)
    assert counts(2) == (2, 0, 0)  # too few to give every split one
