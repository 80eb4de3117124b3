"""scripts/gpu_check.py (the one GPU check) and scripts/bench_gpu_solvers.py, on a machine without a GPU.

What can be checked here: the one line and exit code without a GPU; the pytest plugin that picks
the GPU tests and counts them, and the time limit that kills a phase, on fake GPU tests; the total
budget with fake phases on a fake clock; the report files (contents, atomic replacement); the DDPM
phase process on the CPU (its fused row must make the phase fail); the solver table's cells, ratios
and budget with a fake measurement. The speeds themselves are measured on a GPU, never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_gpu_solvers")


def _gpu_usable() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


def _run(*arguments, script=SCRIPT, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = ["bash", str(script)] if script.suffix == ".sh" else [sys.executable, str(script)]
    return subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- without a GPU: one line -------------------------------------------------------------------------

@pytest.mark.skipif(_gpu_usable() or shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    import torch

    expected = []
    if shutil.which("nvidia-smi") is None:
        expected.append("no NVIDIA driver (nvidia-smi not found)")
    if torch.version.cuda is None:
        expected.append(f"torch {torch.__version__} is a CPU-only build")
    elif not torch.cuda.is_available():
        expected.append("sees no CUDA device")
    if importlib.util.find_spec("cupy") is None:
        expected.append("CuPy is not installed")
    assert expected  # this machine has at least one reason
    out = tmp_path / "report"
    for script, extra, code in ((SCRIPT, [], 0), (SCRIPT.with_suffix(".sh"), [], 0), (SCRIPT, ["--require-gpu"], 3)):
        result = _run("--out", str(out), *extra, script=script)
        lines = result.stdout.splitlines()
        assert result.returncode == code, (script, extra, result.stdout, result.stderr)
        assert len(lines) == 1 and result.stderr == "", (result.stdout, result.stderr)
        assert lines[0].startswith("gpu_check: no usable GPU, nothing run: ")
        for reason in expected:
            assert reason in lines[0], (reason, lines[0])
        assert not out.exists()  # nothing run, nothing written


def test_bad_arguments_exit_2_naming_the_option():
    result = _run("--phases", "tests,benchmarks")
    assert result.returncode == 2 and "--phases" in result.stderr and "tests,ddpm,solvers,cohesion" in result.stderr
    result = _run("--solver-batches", "1,x")
    assert result.returncode == 2 and "--solver-batches" in result.stderr


# -- the budget ----------------------------------------------------------------------------------------

def _fake_phase(gpu_check, clock, name, takes, budget, *, limits, raises=False):
    def run(limit):
        limits.append(limit)
        clock.now += min(takes, limit)
        if raises:
            raise RuntimeError("the phase broke")
        return {"status": "passed" if takes <= limit else "timeout", "summary": f"{name} took {min(takes, limit):g} s",
                "rows": [name]}

    return gpu_check.Phase(name, run, budget)


def test_phases_share_the_total_budget_and_late_ones_are_skipped_with_a_note(gpu_check):
    clock, limits, snapshots, lines = FakeClock(), [], [], []
    phases = [_fake_phase(gpu_check, clock, "a", 100, 150, limits=limits),
              _fake_phase(gpu_check, clock, "b", 300, 200, limits=limits),  # runs out of its own budget
              _fake_phase(gpu_check, clock, "c", 15, 60, limits=limits),  # gets only what is left: 30 s
              _fake_phase(gpu_check, clock, "d", 1, 60, limits=limits)]  # 15 s left < 20: skipped
    results = gpu_check.run_phases(phases, 330, clock=clock, min_seconds=20, echo=lines.append,
                                   on_phase=lambda so_far: snapshots.append([r["name"] for r in so_far]))
    assert limits == [150, 200, 30]
    assert [r["name"] for r in results] == ["a", "b", "c", "d"]
    assert [r["status"] for r in results] == ["passed", "timeout", "passed", "skipped"]
    assert [r["wall_s"] for r in results] == [100, 200, 15, 0]
    assert [r["limit_s"] for r in results] == [150, 200, 30, 0]
    assert results[0]["rows"] == ["a"] and results[0]["summary"] == "a took 100 s"
    assert "15 s left" in results[3]["notes"][0] and "330 s" in results[3]["notes"][0]
    assert snapshots == [["a"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d"]]  # the report after each
    assert any("d: skipped" in line for line in lines)
    assert gpu_check.overall(results) == ("incomplete", gpu_check.EXIT_INCOMPLETE)


def test_a_phase_that_raises_is_an_error_and_the_next_still_runs(gpu_check):
    clock, limits = FakeClock(), []
    phases = [_fake_phase(gpu_check, clock, "a", 5, 60, limits=limits, raises=True),
              _fake_phase(gpu_check, clock, "b", 5, 60, limits=limits)]
    results = gpu_check.run_phases(phases, 480, clock=clock, echo=lambda line: None)
    assert [r["status"] for r in results] == ["error", "passed"] and limits == [60, 60]
    assert "RuntimeError: the phase broke" in results[0]["summary"]
    assert gpu_check.overall(results) == ("failed", gpu_check.EXIT_FAILED)
    assert gpu_check.overall(results[1:]) == ("passed", gpu_check.EXIT_OK)
    assert gpu_check.overall([{"status": "dry-run"}]) == ("dry-run", gpu_check.EXIT_OK)


# -- the GPU tests phase: plugin, counts, time limit ----------------------------------------------------

FAKE_TESTS = '''
import os, time
import pytest

@pytest.mark.gpu
def test_passes():
    assert 1 + 1 == 2

@pytest.mark.gpu
def test_fails():
    assert 2 + 2 == 5, "arithmetic is broken"

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs CuPy on the GPU")
def test_skipped_marked():
    pass

@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_skipped_unmarked_but_needs_cuda():
    pass

@pytest.mark.skipif(False, reason="needs a machine without a CUDA device")
def test_cpu_only():
    pass

def test_plain():
    pass
'''

SLOW_TESTS = '''
import os, time
import pytest

@pytest.mark.gpu
def test_quick():
    pass

@pytest.mark.gpu
def test_hangs():
    with open(os.environ["PID_FILE"], "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(120)
'''


def _fake_suite(tmp_path, source):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: fake GPU tests\n")
    path = tmp_path / "test_fake_gpu.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_tests_phase_selects_gpu_tests_and_counts_outcomes(gpu_check, tmp_path):
    path = _fake_suite(tmp_path, FAKE_TESTS)
    log = tmp_path / "tests.log"
    result = gpu_check.tests_phase(60, paths=[path], work=tmp_path, log_path=log,
                                   env=gpu_check.phase_environment([]), cwd=tmp_path)
    assert result["status"] == "failed" and result["exit_code"] == 1
    assert (result["selected"], result["deselected"]) == (4, 2)  # test_cpu_only and test_plain left out
    assert (result["passed"], result["failed"], result["skipped"], result["error"]) == (1, 1, 2, 0)
    assert [entry["nodeid"].split("::")[-1] for entry in result["failures"]] == ["test_fails"]
    assert "arithmetic is broken" in result["failures"][0]["message"]
    assert result["skip_reasons"] == {"needs CuPy on the GPU": 1, "needs a CUDA GPU": 1}
    assert result["summary"].startswith("1 passed, 1 failed, 0 errors, 2 skipped of 4 selected")
    assert "1 failed, 1 passed, 2 skipped, 2 deselected" in log.read_text()


def test_tests_phase_is_killed_at_its_limit_and_keeps_what_finished(gpu_check, tmp_path, monkeypatch):
    path = _fake_suite(tmp_path, SLOW_TESTS)
    pid_file = tmp_path / "pid"
    env = {**gpu_check.phase_environment([]), "PID_FILE": str(pid_file)}
    started = time.monotonic()
    result = gpu_check.tests_phase(8, paths=[path], work=tmp_path, log_path=tmp_path / "tests.log", env=env,
                                   cwd=tmp_path)
    assert time.monotonic() - started < 30
    assert result["status"] == "timeout" and result["exit_code"] is None
    assert (result["selected"], result["passed"], result["failed"]) == (2, 1, 0)
    assert any("killed at its 8 s limit" in note for note in result["notes"])
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the hanging test's process is gone
        os.kill(pid, 0)
    assert "killed after 8 s" in (tmp_path / "tests.log").read_text()


def test_the_real_gpu_test_files_are_found(gpu_check):
    names = [path.name for path in gpu_check.gpu_test_files()]
    assert {"test_kernels_gpu.py", "test_cupy_backend.py"} <= set(names)
    assert "test_gpu_check.py" not in names and "test_spectral.py" not in names


# -- the benchmark phases ------------------------------------------------------------------------------

def test_ddpm_phase_runs_emus_benchmark_in_its_own_process_and_fails_without_the_fused_kernel(gpu_check, tmp_path):
    options = ["--seconds", "0.01", "--device", "cpu", "--ddpm-batches", "2,3", "--ddpm-grid", "8", "--no-compile"]
    log = tmp_path / "ddpm.log"
    result = gpu_check.benchmark_phase("ddpm", 90, options=options, work=tmp_path, log_path=log,
                                       env={**gpu_check.phase_environment([]), "OMP_NUM_THREADS": "1"})
    assert result["exit_code"] == 0
    assert [(row["step"], row["batch"]) for row in result["rows"]] == [
        ("torch eager", 2), ("fused (cupy)", 2), ("ddpm_step API", 2),
        ("torch eager", 3), ("fused (cupy)", 3), ("ddpm_step API", 3)]
    eager = result["rows"][0]
    assert eager["bytes"] == 3 * 2 * 8 * 8 * 4 and eager["copy_gb_per_s"] > 0
    assert all("needs a GPU" in row["unavailable"] for row in result["rows"] if row["step"] == "fused (cupy)")
    # the fused kernel is what the phase is for: a run where it cannot run fails
    assert result["status"] == "failed" and "the fused kernel could not run" in result["summary"]
    assert "emu bench --ddpm: DDPM reverse step, 8^2" in log.read_text()


def test_cohesion_phase_times_both_modes_in_its_own_process(gpu_check, tmp_path):
    options = ["--device", "cpu", "--cohesion-grid", "16", "--cohesion-horizon", "6", "--cohesion-steps", "2"]
    log = tmp_path / "cohesion.log"
    result = gpu_check.benchmark_phase("cohesion", 120, options=options, work=tmp_path, log_path=log,
                                       env={**gpu_check.phase_environment([]), "OMP_NUM_THREADS": "1"})
    assert result["exit_code"] == 0 and result["status"] == "passed", result
    assert [row["mode"] for row in result["rows"]] == ["plan, stride 1", "plan, stride 3", "autoregressive"]
    assert all(row["seconds"] > 0 for row in result["rows"])
    assert set(result["speedups"]) == {"plan, stride 1", "plan, stride 3"} and "goal (>= 10x)" in result["summary"]
    assert result["horizon"] == 6 and result["grid"] == 16
    lines = gpu_check._cohesion_section({"status": "passed", "wall_s": 1.0, "limit_s": 60.0, **result})
    assert any(line.startswith("| plan, stride 3 | ") for line in lines)


def test_cohesion_summary_reads_the_goal_from_the_timings(gpu_check):
    rows = [{"mode": "plan, stride 1", "seconds": 2.0}, {"mode": "plan, stride 3", "seconds": 0.8},
            {"mode": "autoregressive", "seconds": 10.0}]
    summary = gpu_check.summarize_cohesion(rows)
    assert summary["speedups"] == {"plan, stride 1": 5.0, "plan, stride 3": 12.5} and summary["goal_met"] is True
    assert summary["summary"] == "plan, stride 1 5.00x, plan, stride 3 12.50x autoregressive's speed; goal (>= 10x) met"
    rows[1]["seconds"] = 1.25
    assert gpu_check.summarize_cohesion(rows)["goal_met"] is False
    assert gpu_check.summarize_cohesion(rows[:2])["broken"] is False and "no plan/autoregressive pair" in \
        gpu_check.summarize_cohesion(rows[:2])["summary"]
    assert gpu_check.summarize_cohesion([{"mode": "autoregressive", "error": "OutOfMemoryError"}])["broken"] is True


def test_ddpm_summary_reads_the_goal_from_the_fused_rows(gpu_check):
    def row(step, batch, gpu_us, fraction, speedup):
        return {"step": step, "batch": batch, "grid": 64, "gpu_microseconds": gpu_us, "fraction_of_copy": fraction,
                "speedup_vs_eager": speedup, "gb_per_s": 4000 * fraction, "copy_gb_per_s": 4000.0}

    rows = [row("torch eager", 256, 30.0, 0.2, 1.0), row("torch.compile", 256, 12.0, 0.5, 2.5),
            row("fused (cupy)", 256, 6.0, 0.85, 5.0), row("fused (cupy)", 1024, 20.0, 0.9, 3.5),
            row("torch.compile", 1024, 50.0, 0.4, 1.6)]
    summary = gpu_check.summarize_ddpm(rows)
    assert summary["goal_met"] is True and summary["broken"] is False
    assert summary["summary"].startswith("fused 90% of copy (3600 of 4000 GB/s), 3.50x eager, 2.50x torch.compile "
                                         "at 64^2 x 1024")
    rows[2]["fraction_of_copy"] = 0.7  # batch 256 below 80% of copy: not met
    assert gpu_check.summarize_ddpm(rows)["goal_met"] is False


def test_solver_rows_ratios_budget_and_jax_with_fake_measurements(bench):
    calls, jax_calls, clock = [], [], FakeClock()
    rate = {"cupy": 300.0, "torch": 200.0}

    def measure(system, backend, grid, dtype, batch, seconds, fused):
        calls.append((system, backend, grid, batch, fused))
        clock.now += 1.0
        return rate[backend] / batch if backend == "cupy" or system == "kolmogorov" else "torch broke"

    def jax_rate(grid, dtype, seconds):
        jax_calls.append(grid)
        return 50.0

    rows, notes = bench.solver_rows(systems=("kolmogorov", "qg"), grids=(64, 128), batches=(1, 8), dtypes=("float32",),
                                    seconds=0.1, solvers=bench.SOLVERS[:2], platform="gpu", measure=measure,
                                    jax_rate=jax_rate, clock=clock)
    assert [(r["system"], r["grid"], r["batch"]) for r in rows] == [
        (s, g, b) for s in ("kolmogorov", "qg") for g in (64, 128) for b in (1, 8)]
    assert len(calls) == 16 and jax_calls == [64, 128]  # jax-cfd once per Kolmogorov grid, none for QG
    k8 = rows[1]
    assert k8["cupy_fused_steps_per_s"] == 300 / 8 and k8["torch_cuda_steps_per_s"] == 25.0
    assert k8["cupy_over_torch"] == pytest.approx(1.5)
    assert k8["jaxcfd_steps_per_s"] == 50.0 and k8["cupy_over_jaxcfd_traj"] == pytest.approx(8 * 37.5 / 50)
    qg = rows[4]
    assert qg["torch_cuda_steps_per_s"] is None and qg["cupy_over_torch"] is None and "jaxcfd_steps_per_s" not in qg
    assert notes == ["torch-cuda: torch broke"]
    table = bench.markdown_table(rows, bench.SOLVERS[:2], "gpu")
    assert len(table) == 2 + 8 and "jax-cfd steps/s" in table[0]
    assert table[3] == "| kolmogorov | float32 | 64 | 8 | 37.5 | 25.0 | 1.50 | 50.0 | 6.00 |"
    assert table[6] == "| qg | float32 | 64 | 1 | 300.0 | - | - | - | - |"

    clock.now, calls[:] = 0.0, []  # each cell takes 2 s on the fake clock; 5 s of budget: two cells
    rows, notes = bench.solver_rows(systems=("kolmogorov", "qg"), grids=(64, 128), batches=(1, 8), dtypes=("float32",),
                                    seconds=0.1, solvers=bench.SOLVERS[:2], budget=5, measure=measure, clock=clock)
    assert len(rows) == 2 and len(calls) == 4
    assert notes == ["budget: 5 s ran out; 6 of 8 cells left out (from kolmogorov float32 128^2 batch 1)"]


def test_solver_summary_and_the_512_goal(gpu_check):
    rows = [{"grid": grid, "batch": batch, "cupy_fused_steps_per_s": 1.0, "cupy_over_torch": ratio}
            for grid, batch, ratio in ((256, 1, 0.8), (512, 1, 1.2), (512, 64, 1.1))]
    summary = gpu_check.summarize_solvers(rows)
    assert summary["goal_met"] is True and summary["broken"] is False
    assert summary["summary"] == "3 cells; cupy/torch median 1.10x (range 0.80-1.20); at 512^2 1.10-1.20x; " \
                                 "goal (cupy >= torch-CUDA at 512^2) met"
    rows.append({"grid": 512, "batch": 8, "cupy_fused_steps_per_s": None, "cupy_over_torch": None})
    assert gpu_check.summarize_solvers(rows)["broken"] is True  # cupy could not run in one cell


@pytest.mark.skipif(_gpu_usable(), reason="CuPy runs on this machine's GPU")
def test_bench_gpu_solvers_cli_says_why_without_cupy(bench, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path / "t.md"), "--grids", "64"]) == 2
    assert capsys.readouterr().err.startswith("bench_gpu_solvers: ")
    assert not (tmp_path / "t.md").exists()
    with pytest.raises(SystemExit):
        bench.main(["--systems", "burgers"])


# -- the report -----------------------------------------------------------------------------------------

def _fake_report(gpu_check):
    environment = {"gpu": "NVIDIA H200", "gpu_memory_mib": 143771, "compute_capability": "9.0", "multiprocessors": 132,
                   "driver": "580.159.03", "cuda_driver_api": "13.0", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
                   "cupy": "14.2.0", "cupy_cuda_runtime": "13.0", "python": "3.12.3", "executable": "/opt/python3",
                   "host": "gpu-box", "emu": "abc123"}
    tests = {"name": "tests", "title": "GPU tests", "status": "failed", "wall_s": 12.34, "limit_s": 200.0,
             "summary": "39 passed, 1 failed", "notes": [], "files": ["tests/test_kernels_gpu.py"],
             "failures": [{"nodeid": "tests/test_kernels_gpu.py::test_x", "message": "assert 1 | 2"}],
             "skip_reasons": {"needs julia": 2},
             "slowest": [{"nodeid": "tests/test_kernels_gpu.py::test_y", "seconds": 3.0}]}
    ddpm_rows = [{"step": "torch eager", "batch": 256, "grid": 64, "dtype": "float32", "wall_microseconds": 40.0,
                  "gpu_microseconds": 30.0, "gb_per_s": 500.0, "fraction_of_copy": 0.12, "speedup_vs_eager": 1.0,
                  "copy_gb_per_s": 4100.0},
                 {"step": "fused (cupy)", "batch": 256, "grid": 64, "dtype": "float32", "wall_microseconds": 12.0,
                  "gpu_microseconds": 5.0, "gb_per_s": 3500.0, "fraction_of_copy": 0.85, "speedup_vs_eager": 6.0,
                  "copy_gb_per_s": 4100.0},
                 {"step": "torch.compile", "batch": 256, "grid": 64, "dtype": "float32", "unavailable": "no triton"}]
    ddpm = {"name": "ddpm", "title": "DDPM", "status": "passed", "wall_s": 50.0, "limit_s": 120.0, "summary": "ok",
            "notes": ["a note"], "rows": ddpm_rows}
    solvers = {"name": "solvers", "title": "Solvers", "status": "skipped", "wall_s": 0.0, "limit_s": 0.0,
               "summary": "not started", "notes": ["skipped: budget"], "solvers": ["cupy (fused)", "torch-cuda"],
               "rows": [{"system": "qg", "dtype": "float32", "grid": 512, "batch": 64, "cupy_fused_steps_per_s": 120.0,
                         "torch_cuda_steps_per_s": 60.0, "cupy_over_torch": 2.0}]}
    return gpu_check.build_report(environment=environment, results=[tests, ddpm, solvers], budget=480, started=0.0,
                                  wall=62.5, status="failed", exit_code=1, argv=["scripts/gpu_check.py"])


def test_report_json_and_markdown(gpu_check, tmp_path):
    report = _fake_report(gpu_check)
    json_path, md_path = gpu_check.write_report(tmp_path / "out", report)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]  # no temp left
    assert json.loads(json_path.read_text()) == report
    assert oct(json_path.stat().st_mode & 0o777) == "0o644"
    md = md_path.read_text()
    assert md.startswith("# emu GPU check: FAILED\n")
    assert "1970-01-01T00:00:00+00:00 on gpu-box; budget 480 s, 62 s in all; exit code 1." in md
    assert "| GPU | NVIDIA H200 (143771 MiB, compute capability 9.0, 132 SMs) |" in md
    assert "| driver | 580.159.03 (CUDA 13.0 driver API) |" in md
    assert "| torch | 2.11.0+cu130 (CUDA 13.0) |" in md and "| CuPy | 14.2.0 (CUDA runtime 13.0) |" in md
    assert "| tests | failed | 12.3 | 200 | 39 passed, 1 failed |" in md
    assert "| solvers | skipped | 0.0 | 0 | not started |" in md
    assert "- `tests/test_kernels_gpu.py::test_x`: assert 1 \\| 2" in md and "- 2 x needs julia" in md
    assert "| fused (cupy) | 64 | 256 | float32 | 12.0 | 5.0 | 3500 | 85% | 6.00x |" in md
    assert "| torch.compile | 64 | 256 | float32 | - | - | - | - | no triton |" in md
    assert "Copy bandwidth measured in the same run (dst.copy_(src), 256 MiB): 4100 GB/s" in md
    assert "| qg | float32 | 512 | 64 | 120.0 | 60.0 | 2.00 | - | - |" in md
    assert "- note: a note" in md and "- note: skipped: budget" in md


def test_report_is_replaced_atomically(gpu_check, tmp_path, monkeypatch):
    out = tmp_path / "out"
    gpu_check.write_report(out, _fake_report(gpu_check))
    before = (out / "report.json").read_text()

    def broken_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(gpu_check.os, "replace", broken_replace)
    second = _fake_report(gpu_check)
    second["status"] = "passed"
    with pytest.raises(OSError, match="disk full"):
        gpu_check.write_report(out, second)
    assert (out / "report.json").read_text() == before  # the old report, whole
    assert sorted(path.name for path in out.iterdir()) == ["report.json", "report.md"]  # the temporary removed


def test_dry_run_writes_the_plan_without_a_gpu(tmp_path):
    out = tmp_path / "plan"
    result = _run("--dry-run", "--out", str(out), "--budget", "100", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.splitlines()[-1]
    assert last.startswith("gpu_check: dry-run in ") and last.endswith(f" s; report: {out / 'report.md'}")
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "dry-run" and report["exit_code"] == 0 and report["budget_s"] == 100
    assert [phase["name"] for phase in report["phases"]] == ["tests", "ddpm", "solvers", "cohesion"]
    assert all(phase["status"] == "dry-run" for phase in report["phases"])
    tests, ddpm, solvers, cohesion = report["phases"]
    assert "--cohesion-horizon" in cohesion["command"] and "100" in cohesion["command"]
    assert tests["selected"] >= 20 and tests["deselected"] >= 1 and "tests/test_kernels_gpu.py" in tests["files"]
    assert tests["limit_s"] <= 100 and all(phase["wall_s"] >= 0 for phase in report["phases"])
    assert "--solver-grids" in solvers["command"] and "64,128,256,512" in solvers["command"]
    assert "1,8,64" in solvers["command"] and "kolmogorov,qg" in solvers["command"]
    assert "--phase" in ddpm["command"] and "ddpm" in ddpm["command"]
    import torch

    assert report["environment"]["torch"] == torch.__version__
    assert (out / "report.md").read_text().startswith("# emu GPU check: DRY-RUN")
    assert (out / "tests.log").is_file()


# -- finding the GPU (faked: nvidia-smi on the PATH, torch and CuPy modules) and offline wheels ----------

def _fake_gpu(monkeypatch, tmp_path, *, smi_exit=0, cupy=True, torch_sees_it=True):
    import types

    import emu.cuda  # noqa: F401  (imported for real before torch is faked)

    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir(exist_ok=True)
    answer = ("NVIDIA H200, 580.159.03, 143771" if smi_exit == 0 else
              "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")
    smi.write_text(f'#!/bin/sh\necho "{answer}"\nexit {smi_exit}\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    properties = types.SimpleNamespace(name="NVIDIA H200", total_memory=143771 * 2**20, major=9, minor=0,
                                       multi_processor_count=132)
    cuda = types.SimpleNamespace(is_available=lambda: torch_sees_it, get_device_properties=lambda index: properties,
                                 device_count=lambda: 1)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.11.0+cu130", cuda=cuda,
                                                                    version=types.SimpleNamespace(cuda="13.0")))
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, runtimeGetVersion=lambda: 13000,
                                    driverGetVersion=lambda: 13000)
    fake_cupy = types.SimpleNamespace(__version__="14.2.0", cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy if cupy else None)  # None: `import cupy` fails
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_probe_reads_the_gpu_driver_and_versions(gpu_check, tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, tmp_path)
    probed = gpu_check.probe()
    assert probed["no_gpu"] == [] and probed["missing"] == []
    environment = probed["environment"]
    assert {key: environment[key] for key in ("gpu", "driver", "gpu_memory_mib", "compute_capability",
                                              "multiprocessors", "torch", "torch_cuda", "cupy", "cupy_cuda_runtime",
                                              "cuda_driver_api")} == {
        "gpu": "NVIDIA H200", "driver": "580.159.03", "gpu_memory_mib": 143771, "compute_capability": "9.0",
        "multiprocessors": 132, "torch": "2.11.0+cu130", "torch_cuda": "13.0", "cupy": "14.2.0",
        "cupy_cuda_runtime": "13.0", "cuda_driver_api": "13.0"}


def test_a_gpu_without_cupy_is_one_line_and_exit_3(gpu_check, tmp_path, monkeypatch, capsys):
    _fake_gpu(monkeypatch, tmp_path, cupy=False)
    probed = gpu_check.probe()
    assert probed["no_gpu"] == [] and probed["missing"] == ["CuPy is not installed"]
    line = gpu_check.one_line(probed)
    assert line.startswith("gpu_check: NVIDIA H200 found but the check cannot run, nothing run: CuPy is not installed")
    monkeypatch.setattr(gpu_check, "probe", lambda *arguments: probed)
    assert gpu_check.main(["--out", str(tmp_path / "report")]) == gpu_check.EXIT_CANNOT_RUN
    assert capsys.readouterr().out == line + "\n" and not (tmp_path / "report").exists()


def test_a_driver_that_does_not_answer_is_no_gpu(gpu_check, tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, tmp_path, smi_exit=9, torch_sees_it=False)
    probed = gpu_check.probe()
    assert probed["no_gpu"][:2] == [
        "no usable NVIDIA driver: nvidia-smi failed (NVIDIA-SMI has failed because it couldn't communicate with "
        "the NVIDIA driver.)", "torch 2.11.0+cu130 sees no CUDA device (torch.cuda.is_available() is False)"]
    assert gpu_check.one_line(probed).startswith("gpu_check: no usable GPU, nothing run: no usable NVIDIA driver")


def _wheel(folder: Path, distribution: str, module: str, text: str) -> Path:
    """A minimal pure-Python wheel of `distribution` holding `module`.py."""
    import base64
    import hashlib
    import zipfile

    info = f"{distribution}-0.1.dist-info"
    files = {f"{module}.py": text,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(content.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{distribution}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return path


def test_wheels_of_missing_distributions_are_installed_offline(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "gpu_check_fake_dependency", "gpu_check_fake_dependency", "ANSWER = 42\n")
    _wheel(wheels, "pytest", "not_really_pytest", "")  # installed already: left alone
    installed, error = gpu_check.install_wheels(wheels, tmp_path / "site")
    assert error is None and installed == ["gpu_check_fake_dependency-0.1-py3-none-any.whl"]
    assert (tmp_path / "site" / "gpu_check_fake_dependency.py").is_file()
    assert not (tmp_path / "site" / "not_really_pytest.py").exists()
    assert str(tmp_path / "site") == sys.path[0]
    import gpu_check_fake_dependency

    assert gpu_check_fake_dependency.ANSWER == 42
    sys.modules.pop("gpu_check_fake_dependency")
    (wheels / "broken-0.1-py3-none-any.whl").write_text("not a zip")
    installed, error = gpu_check.install_wheels(wheels, tmp_path / "site2")
    assert installed == [] and error.startswith(f"installing wheels from {wheels} failed: ")


def test_main_runs_the_phases_writes_the_report_and_exits_by_their_outcome(gpu_check, tmp_path, monkeypatch, capsys):
    """The whole command on a (faked) GPU machine: the tests phase runs for real on fake GPU tests."""
    suite = tmp_path / "suite"
    suite.mkdir()
    path = _fake_suite(suite, FAKE_TESTS)
    environment = {"gpu": "NVIDIA H200", "driver": "580.159.03", "torch": "2.11.0+cu130", "cupy": "14.2.0"}
    monkeypatch.setattr(gpu_check, "probe", lambda *arguments: {"environment": dict(environment), "no_gpu": [],
                                                                 "missing": [], "installed_wheels": []})
    out = tmp_path / "report"
    code = gpu_check.main(["--out", str(out), "--phases", "tests", "--test-paths", str(path), "--budget", "120"])
    assert code == gpu_check.EXIT_FAILED  # test_fails failed
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and report["exit_code"] == 1 and report["budget_s"] == 120
    assert report["environment"]["gpu"] == "NVIDIA H200" and "emu" in report["environment"]
    (tests,) = report["phases"]
    assert (tests["name"], tests["status"], tests["passed"], tests["failed"], tests["skipped"]) == ("tests", "failed",
                                                                                                    1, 1, 2)
    assert 0 < tests["wall_s"] < tests["limit_s"] <= 120
    md = (out / "report.md").read_text()
    assert md.startswith("# emu GPU check: FAILED") and "| GPU | NVIDIA H200 |" in md and "test_fails" in md
    assert "1 failed, 1 passed" in (out / "tests.log").read_text()
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("gpu_check: failed in ") and last.endswith(f" s; report: {out / 'report.md'}")
    # too little budget for any phase: skipped with a note, exit 4, the report says so
    code = gpu_check.main(["--out", str(out), "--phases", "tests,ddpm", "--test-paths", str(path), "--budget", "10"])
    assert code == gpu_check.EXIT_INCOMPLETE
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "incomplete" and [phase["status"] for phase in report["phases"]] == ["skipped"] * 2
    assert "ran out" in report["phases"][0]["notes"][0] and not (out / "tests.log").exists()
