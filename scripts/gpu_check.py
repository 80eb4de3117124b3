#!/usr/bin/env python3
"""One GPU check: emu's GPU tests and GPU benchmarks in one command, one markdown + JSON report.

    python scripts/gpu_check.py --out gpu_check_report            # or scripts/gpu_check.sh --out ...
    python scripts/gpu_check.py --out gpu_check_report --budget 300 --phases tests,solvers
    python scripts/gpu_check.py --dry-run --out /tmp/plan         # no GPU needed: the plan, and its plumbing

On a machine with an NVIDIA GPU, torch built for CUDA and CuPy, four phases run, each in its own
process, killed (with everything it started) when its time is up:

  tests    pytest on the GPU tests: every test marked `gpu`, or skipped with a reason that says it
           needs a CUDA GPU, in the test files that have such tests (tests/test_kernels_gpu.py,
           tests/test_cupy_backend.py, ...): passed / failed / skipped counts, failures, skip reasons.
  ddpm     the fused DDPM step against the eager torch sequence and torch.compile (emu.bench_ddpm):
           GPU microseconds, GB/s and % of the copy bandwidth measured in the same run, 64^2 x batch
           64/256/1024 float32 by default.
  solvers  the solvers' cupy backend (fused kernels) against torch-CUDA (scripts/bench_gpu_solvers.py):
           Kolmogorov and QG, 64^2..512^2, batches 1/8/64, float32 by default.
  cohesion Cohesion's plan mode (stride-1 and stride-3 windows) against its autoregressive mode on the
           same horizon and members (emu.stabilizers.cohesion.forecast; the small networks with their
           initial weights, whose cost is that of trained ones): seconds per forecast and the speed-ups,
           the issue's goal being >= 10x; 8 trajectories x 100 frames at 64^2, 32 sampler steps.

A total budget (--budget, default 480 s) caps the whole run: each phase gets the smaller of its own
budget (tests 150 s, ddpm 120 s, solvers 120 s, cohesion 60 s by default) and what is left; a phase that would
start with less than 20 s left is skipped with a note; the solver and DDPM phases stop starting new
measurements before their time is up, so what they measured is kept. --out DIR receives report.md,
report.json (rewritten atomically, temp + rename, after every phase) and one log per phase.

Without a usable GPU it prints one line, `gpu_check: no usable GPU, nothing run: REASONS`, the
reasons being no driver, torch without CUDA, no CuPy, and exits 0 (3 with --require-gpu).

Exit codes: 0 every phase ran and passed (or: no GPU, one line); 1 a test failed or a phase broke;
2 bad arguments; 3 a GPU is there but something needed is missing (CuPy, torch's CUDA build, a
package emu needs), or no GPU and --require-gpu; 4 nothing failed but the budget cut phases short.

Packages: the project itself is used from this checkout (python/ goes first on the path; no install
needed). A package missing on an offline GPU machine (array-api-compat is missing from some CUDA
images) can be brought as wheels in --wheels DIR (default: .whl/ in the checkout when it exists),
downloaded where pip can reach PyPI:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux2014_x86_64 -d .whl array-api-compat==1.16.0

Wheels of distributions that are not installed are installed into a temporary folder (pip
--no-index --no-deps --target) that goes onto the path of every phase.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
SOURCES = REPO / "python"
TESTS = REPO / "tests"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANNOT_RUN, EXIT_INCOMPLETE = 0, 1, 2, 3, 4
DEFAULT_BUDGET = 480.0
PHASES = ("tests", "ddpm", "solvers", "cohesion")
PHASE_TITLES = {"tests": "GPU tests", "ddpm": "DDPM step: fused vs eager vs torch.compile",
                "solvers": "Solvers: cupy (fused) vs torch-CUDA",
                "cohesion": "Cohesion: plan (R = T) vs autoregressive (R = 1)"}
PHASE_BUDGETS = {"tests": 150.0, "ddpm": 120.0, "solvers": 120.0, "cohesion": 60.0}  # 450 s: 30 s of the 480 in hand
MIN_PHASE_SECONDS = 20.0  # a phase is not started with less time than this left
EXIT_MARGIN = 8.0  # seconds a phase process keeps in hand to write its results and exit
RESULTS_ENV = "GPU_CHECK_RESULTS"  # set for the pytest process: gpu_check is then its plugin
REQUIRED_MODULES = ("torch", "numpy", "h5py", "click", "array_api_compat", "tqdm", "pytest")
GPU_TEST_PATTERN = re.compile(r"mark\.gpu|needs a CUDA")
NEEDS_GPU_REASON = re.compile(r"\bneeds?\b.*\b(cuda|gpu)\b", re.IGNORECASE)
DONE = ("passed", "dry-run")  # phase statuses that count as complete and fine
BROKEN = ("failed", "error")


# -- phases and the budget ---------------------------------------------------------------------------

class Phase:
    """One part of the check. `run(limit_seconds)` returns a result dict with at least `status`
    (passed, failed, error, timeout, partial or dry-run) and `summary` (one line); anything else
    (counts, rows, notes) goes into report.json as it is."""

    def __init__(self, name: str, run: Callable[[float], dict], budget: float, title: str = ""):
        self.name, self.run, self.budget, self.title = name, run, budget, title


def run_phases(phases: list[Phase], budget: float, *, clock: Callable[[], float] = time.monotonic,
               min_seconds: float = MIN_PHASE_SECONDS, on_phase: Callable[[list[dict]], None] | None = None,
               echo: Callable[[str], None] = print) -> list[dict]:
    """Runs the phases in order within `budget` seconds in all; returns one result dict per phase.

    Each phase gets min(its budget, time left) as its limit; one that would start with less than
    `min_seconds` left is skipped with a note. A phase that raises is recorded as an error and the
    next one runs. `on_phase` sees the results so far after each phase (to write the report)."""
    started = clock()
    results: list[dict] = []
    for phase in phases:
        left = budget - (clock() - started)
        head = {"name": phase.name, "title": phase.title or PHASE_TITLES.get(phase.name, phase.name)}
        if left < min_seconds:
            results.append({**head, "status": "skipped", "wall_s": 0.0, "limit_s": 0.0, "budget_s": phase.budget,
                            "summary": f"not started: {max(left, 0):.0f} s of the {budget:g} s budget left",
                            "notes": [f"skipped: the total budget ({budget:g} s) ran out, {max(left, 0):.0f} s left; "
                                      f"a phase needs at least {min_seconds:g} s (raise --budget)"]})
            echo(f"gpu_check: {phase.name}: skipped, {max(left, 0):.0f} s of the budget left")
            if on_phase:
                on_phase(results)
            continue
        limit = min(phase.budget, left)
        echo(f"gpu_check: {phase.name}: starting, limit {limit:.0f} s")
        phase_start = clock()
        try:
            result = dict(phase.run(limit))
        except Exception as error:  # a broken phase must not lose the others' results
            result = {"status": "error", "summary": f"{type(error).__name__}: {error}",
                      "notes": [f"the phase raised {type(error).__name__}: {error}"]}
        wall = clock() - phase_start
        result.setdefault("status", "error")
        result.setdefault("summary", "")
        result.setdefault("notes", [])
        results.append({**head, "status": result.pop("status"), "wall_s": wall, "limit_s": limit,
                        "budget_s": phase.budget, **result})
        echo(f"gpu_check: {phase.name}: {results[-1]['status']} in {wall:.0f} s: {results[-1]['summary']}")
        if on_phase:
            on_phase(results)
    return results


def overall(results: list[dict]) -> tuple[str, int]:
    """(status, exit code) of the whole check from its phases' statuses."""
    statuses = [result["status"] for result in results]
    if any(status in BROKEN for status in statuses):
        return "failed", EXIT_FAILED
    if all(status in DONE for status in statuses):
        return ("dry-run" if "dry-run" in statuses else "passed"), EXIT_OK
    return "incomplete", EXIT_INCOMPLETE


# -- processes ---------------------------------------------------------------------------------------

def run_command(command: list[str], *, limit: float, log_path: Path, env: dict | None = None,
                cwd: Path = REPO, echo: bool = True) -> tuple[int | None, float]:
    """Runs `command` in a new process group, its output appended to `log_path` (and echoed), killed
    with its whole group after `limit` seconds. Returns (exit code, or None when it was killed; wall s)."""
    started = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                                   start_new_session=True)

        def pump():
            for line in process.stdout:
                log.write(line)
                log.flush()
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=max(limit, 0.1))
        except subprocess.TimeoutExpired:
            kill_group(process)
            code = None
        except BaseException:  # Ctrl-C: take the phase's processes down with us
            kill_group(process)
            raise
        reader.join(timeout=5)
        if code is None:
            log.write(f"gpu_check: killed after {limit:.0f} s (its time limit)\n")
    return code, time.monotonic() - started


def kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group this check started for `process`, then SIGKILL after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, lines: int = 15) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_atomically(path: Path, text: str) -> None:
    """A temporary file beside `path`, then a rename: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600; the report is for everyone to read
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


# -- the GPU, the machine and the packages ------------------------------------------------------------

def nvidia_smi() -> tuple[dict | None, str | None]:
    """({name, driver, memory_mib} of GPU 0, None) from nvidia-smi, or (None, why not)."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None, "no NVIDIA driver (nvidia-smi not found)"
    try:
        answer = subprocess.run([executable, "--query-gpu=name,driver_version,memory.total",
                                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"nvidia-smi did not answer ({type(error).__name__})"
    first = (answer.stdout or answer.stderr).strip().splitlines()[:1]
    if answer.returncode != 0 or not first:
        said = first[0] if first else f"exit {answer.returncode}"
        return None, f"no usable NVIDIA driver: nvidia-smi failed ({said})"
    fields = [field.strip() for field in first[0].split(",")]
    info = {"name": fields[0], "driver": fields[1] if len(fields) > 1 else "?"}
    with contextlib.suppress(IndexError, ValueError):
        info["memory_mib"] = int(float(fields[2]))
    return info, None


def missing_modules(names=REQUIRED_MODULES) -> list[str]:
    """The modules of `names` that cannot be imported here."""
    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ValueError:  # in sys.modules without a spec: there
            return sys.modules.get(name) is None
    return [name for name in names if absent(name)]


def install_wheels(wheels: Path, target: Path) -> tuple[list[str], str | None]:
    """Installs the wheels in `wheels` whose distributions are not installed into `target`
    (offline: pip --no-index --no-deps). Returns (what was installed, error or None)."""
    chosen = []
    for wheel in sorted(wheels.glob("*.whl")):
        distribution = wheel.name.split("-")[0]
        try:
            importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            chosen.append(wheel)
    if not chosen:
        return [], None
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--target", str(target), *map(str, chosen)]
    answer = subprocess.run(command, capture_output=True, text=True)
    if answer.returncode != 0:
        last = (answer.stderr or answer.stdout).strip().splitlines()[-1:] or [f"exit {answer.returncode}"]
        return [], f"installing wheels from {wheels} failed: {last[0]}"
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return [wheel.name for wheel in chosen], None


def probe(wheels: Path | None = None, site: Path | None = None) -> dict:
    """What this machine has: GPU (nvidia-smi, torch, CuPy), versions, and what stops the check.

    Returns {"environment": {...}, "no_gpu": [reasons: no GPU to use here], "missing": [reasons: a
    GPU is there but something the check needs is not], "installed_wheels": [...]}."""
    environment: dict = {"python": platform.python_version(), "executable": sys.executable,
                         "host": platform.node(), "platform": platform.platform()}
    no_gpu: list[str] = []
    missing: list[str] = []
    installed: list[str] = []
    smi, smi_problem = nvidia_smi()
    if smi:
        environment["gpu"] = smi["name"]
        environment["driver"] = smi["driver"]
        if "memory_mib" in smi:
            environment["gpu_memory_mib"] = smi["memory_mib"]
    torch_sees_gpu = False
    try:
        import torch
    except ImportError as error:
        (missing if smi else no_gpu).append(f"torch is not installed ({error})")
    else:
        environment["torch"] = torch.__version__
        environment["torch_cuda"] = torch.version.cuda
        if torch.version.cuda is None:
            (missing if smi else no_gpu).append(f"torch {torch.__version__} is a CPU-only build")
        elif not torch.cuda.is_available():
            no_gpu.append(f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")
        else:
            torch_sees_gpu = True
            properties = torch.cuda.get_device_properties(0)
            environment.setdefault("gpu", properties.name)
            environment.setdefault("gpu_memory_mib", properties.total_memory // 2**20)
            environment["compute_capability"] = f"{properties.major}.{properties.minor}"
            environment["multiprocessors"] = properties.multi_processor_count
            environment["gpu_count"] = torch.cuda.device_count()
    if smi_problem and not torch_sees_gpu:
        no_gpu.insert(0, smi_problem)
    elif smi_problem:
        environment["driver"] = f"unknown ({smi_problem})"
    gpu_seen = bool(smi) or torch_sees_gpu
    # Wheels are installed only where there is a GPU to use them on (and something is missing).
    if gpu_seen and wheels is not None and wheels.is_dir() and missing_modules(REQUIRED_MODULES + ("cupy",)):
        installed, error = install_wheels(wheels, site or Path(tempfile.mkdtemp(prefix="gpu_check_site_")))
        if error:
            missing.append(error)
    environment["installed_wheels"] = installed
    try:
        import cupy
    except ImportError:
        (missing if gpu_seen else no_gpu).append("CuPy is not installed")
    except Exception as error:  # a CuPy built for another CUDA can fail at import
        missing.append(f"CuPy cannot be imported ({type(error).__name__}: {error})")
    else:
        environment["cupy"] = cupy.__version__
        try:
            count = cupy.cuda.runtime.getDeviceCount()
            environment["cupy_cuda_runtime"] = _cuda_version(cupy.cuda.runtime.runtimeGetVersion())
            environment["cuda_driver_api"] = _cuda_version(cupy.cuda.runtime.driverGetVersion())
        except Exception as error:  # CUDARuntimeError without a driver
            count = 0
            reason = f"CuPy {cupy.__version__} finds no CUDA device ({type(error).__name__})"
            (missing if gpu_seen else no_gpu).append(reason)
        else:
            if count < 1:
                (missing if gpu_seen else no_gpu).append(f"CuPy {cupy.__version__} finds no CUDA device")
    lacking = [name for name in missing_modules() if name != "torch"]
    if lacking:
        missing.append(f"missing Python packages: {', '.join(lacking)}")
    if not no_gpu and not missing:
        sys.path.insert(0, str(SOURCES))
        try:
            import emu.cuda  # noqa: F401  (this checkout's emu, as the phases will use it)
        except Exception as error:
            missing.append(f"this checkout's emu cannot be imported ({type(error).__name__}: {error})")
    if missing_modules(["pytest"]) == [] and "pytest" not in environment:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            environment["pytest"] = importlib.metadata.version("pytest")
    return {"environment": environment, "no_gpu": no_gpu, "missing": missing, "installed_wheels": installed}


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"


def emu_revision() -> str:
    """The checkout's commit (and whether files differ from it), or why it is not known."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"


def one_line(probed: dict) -> str:
    """The single line printed when the check cannot run here."""
    if probed["no_gpu"]:
        return f"gpu_check: no usable GPU, nothing run: {'; '.join(probed['no_gpu'] + probed['missing'])}"
    gpu = probed["environment"].get("gpu", "a GPU")
    return (f"gpu_check: {gpu} found but the check cannot run, nothing run: {'; '.join(probed['missing'])} "
            "(bring missing packages as wheels in .whl/: scripts/gpu_check.py --help)")


def phase_environment(extra_path: list[str]) -> dict:
    """The environment of every phase process: this checkout's emu and scripts first on the path."""
    env = dict(os.environ)
    parts = [str(SOURCES), str(SCRIPTS), *extra_path]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(parts), PYTHONUNBUFFERED="1", PYTHON_JULIAPKG_OFFLINE="yes",
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return env


# -- phase 1: the GPU tests (and gpu_check as the pytest plugin that picks and records them) ----------

def gpu_test_files(directory: Path = TESTS) -> list[Path]:
    """Test files with GPU tests in them (a `gpu` mark or a 'needs a CUDA ...' skip), this file's own
    tests left out."""
    return sorted(path for path in Path(directory).glob("test_*.py")
                  if path.name != "test_gpu_check.py" and GPU_TEST_PATTERN.search(path.read_text(errors="replace")))


def is_gpu_test(item) -> bool:
    """A pytest item that needs a GPU: marked `gpu`, or skipped unless there is a CUDA GPU (a skipif
    whose reason says it needs CUDA or a GPU; 'needs a machine without ...' does not count)."""
    if item.get_closest_marker("gpu") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if NEEDS_GPU_REASON.search(reason) and "without" not in reason.lower():
            return True
    return False


def _record(entry: dict) -> None:
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry) + "\n")


def pytest_collection_modifyitems(config, items):  # pytest hook (only with -p gpu_check)
    if not os.environ.get(RESULTS_ENV):
        return
    keep = [item for item in items if is_gpu_test(item)]
    drop = [item for item in items if not is_gpu_test(item)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    _record({"event": "collected", "selected": len(keep), "deselected": len(drop),
             "nodeids": [item.nodeid for item in keep]})


def pytest_collectreport(report):  # pytest hook
    if os.environ.get(RESULTS_ENV) and report.failed:
        _record({"event": "collect-error", "nodeid": report.nodeid, "message": _message(report)})


def pytest_runtest_logreport(report):  # pytest hook
    if not os.environ.get(RESULTS_ENV):
        return
    outcome = None
    if report.when == "setup" and not report.passed:
        outcome = "skipped" if report.skipped else "error"
    elif report.when == "call":
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        else:
            outcome = report.outcome
    elif report.when == "teardown" and report.failed:
        outcome = "error"
    if outcome:
        _record({"event": "test", "nodeid": report.nodeid, "when": report.when, "outcome": outcome,
                 "duration": round(report.duration, 4), "message": _message(report) if outcome != "passed" else ""})


def _message(report) -> str:
    """A failure's `E ...` lines (or its last line), or a skip's reason, in at most 400 characters."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")[:400]
    text = getattr(report, "longreprtext", "") or str(longrepr or "")
    errors = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    lines = errors[:3] or [line for line in text.splitlines() if line.strip()][-1:]
    return " | ".join(lines)[:400]


def summarize_tests(records: list[dict]) -> dict:
    """Counts, failures and skip reasons from the plugin's records."""
    tests = [record for record in records if record.get("event") == "test"]
    counts = Counter(record["outcome"] for record in tests)
    collected = [record for record in records if record.get("event") == "collected"]
    summary = {outcome: counts.get(outcome, 0) for outcome in ("passed", "failed", "skipped", "error", "xfailed",
                                                                "xpassed")}
    summary["selected"] = collected[-1]["selected"] if collected else None
    summary["deselected"] = collected[-1]["deselected"] if collected else None
    summary["collection_errors"] = [{"nodeid": r["nodeid"], "message": r["message"]} for r in records
                                    if r.get("event") == "collect-error"]
    summary["failures"] = [{"nodeid": r["nodeid"], "when": r["when"], "outcome": r["outcome"],
                            "message": r["message"]} for r in tests if r["outcome"] in ("failed", "error", "xpassed")]
    summary["skip_reasons"] = dict(Counter(r["message"] for r in tests if r["outcome"] == "skipped").most_common())
    summary["slowest"] = [{"nodeid": r["nodeid"], "seconds": r["duration"]}
                          for r in sorted(tests, key=lambda r: -r["duration"])[:5]]
    summary["ran"] = len({record["nodeid"] for record in tests})
    return summary


def tests_phase(limit: float, *, paths: list[Path], work: Path, log_path: Path, env: dict, cwd: Path = REPO,
                dry_run: bool = False, python: str = sys.executable) -> dict:
    """pytest on the GPU tests in `paths`, killed after `limit` s; what ran before is counted anyway."""
    results = work / "tests.jsonl"
    results.unlink(missing_ok=True)
    env = {**env, RESULTS_ENV: str(results)}
    command = [python, "-m", "pytest", "-p", "gpu_check", "-p", "no:cacheprovider", "-o", "addopts=",
               "-m", "not slow", "-q", "-rfE", "--continue-on-collection-errors", *map(str, paths)]
    if dry_run:
        command.insert(command.index("-q"), "--collect-only")
    if not paths:
        return {"status": "error", "summary": "no GPU test files found", "command": command,
                "notes": [f"no test file in {TESTS} has a gpu mark or a 'needs a CUDA' skip"]}
    code, _ = run_command(command, limit=limit, log_path=log_path, env=env, cwd=cwd)
    records = []
    with contextlib.suppress(OSError):
        for line in results.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    summary = summarize_tests(records)
    files = f"in {len(paths)} files"
    result = {"command": command, "exit_code": code, "files": [_relative(path) for path in paths], **summary,
              "notes": []}
    if dry_run:
        if code != 0 or summary["selected"] is None:
            result.update(status="error", summary=f"collection failed (pytest exit {code})")
            result["notes"].append("log tail: " + " / ".join(log_tail(log_path, 5)))
        else:
            result.update(status="dry-run", summary=f"would run {summary['selected']} GPU tests {files} "
                                                    f"({summary['deselected']} other tests there left out)")
        return result
    counts = (f"{summary['passed']} passed, {summary['failed']} failed, {summary['error']} errors, "
              f"{summary['skipped']} skipped of {summary['selected'] if summary['selected'] is not None else '?'} "
              f"selected {files}")
    if summary["collection_errors"]:
        counts += f", {len(summary['collection_errors'])} files failed to import"
    if code is None:
        status = "timeout"
        result["notes"].append(f"killed at its {limit:.0f} s limit after {summary['ran']} tests; "
                               "the counts are of the tests that finished")
    elif summary["failed"] or summary["error"] or summary["xpassed"] or summary["collection_errors"]:
        status = "failed"
    elif code not in (0, 5) or summary["selected"] is None:
        status = "error"
        result["notes"].append(f"pytest exited {code}; log tail: " + " / ".join(log_tail(log_path, 5)))
    elif not summary["selected"]:
        status = "error"
        result["notes"].append("no GPU tests were selected in the files found")
    else:
        status = "passed"
    result.update(status=status, summary=counts)
    return result


def _relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(REPO))
    return str(path)


# -- phases 2 and 3: the benchmarks, each in a process of its own (this script with --phase) ----------

def benchmark_phase(name: str, limit: float, *, options: list[str], work: Path, log_path: Path, env: dict,
                    dry_run: bool = False, python: str = sys.executable) -> dict:
    """Runs `gpu_check.py --phase NAME` for at most `limit` s and reads the rows it wrote (it rewrites
    its results file after each measurement, so a killed run keeps what it measured)."""
    out = work / f"{name}.json"
    out.unlink(missing_ok=True)
    inner = max(limit - EXIT_MARGIN, 1.0)
    command = [python, str(Path(__file__).resolve()), "--phase", name, "--phase-out", str(out),
               "--phase-seconds", f"{inner:.1f}", *options]
    if dry_run:
        return {"status": "dry-run", "summary": f"would run {' '.join(['--phase', name, *options])} "
                                                f"(its own deadline {inner:.0f} s, killed at {limit:.0f} s)",
                "command": command, "notes": []}
    code, _ = run_command(command, limit=limit, log_path=log_path, env=env)
    written = read_json(out) or {}
    result = {"command": command, "exit_code": code, "rows": written.get("rows", []),
              "notes": list(written.get("notes", [])), **written.get("extra", {})}
    if code is None:
        status = "timeout"
        result["notes"].append(f"killed at its {limit:.0f} s limit; {len(result['rows'])} measurements kept")
    elif code != 0 or not written:
        status = "error"
        result["notes"].append(f"the phase process exited {code}; log tail: " + " / ".join(log_tail(log_path, 8)))
    else:
        status = written.get("status", "passed")
    summary = {"ddpm": summarize_ddpm, "solvers": summarize_solvers, "cohesion": summarize_cohesion}[name](result["rows"])
    broken = summary.pop("broken")  # the GPU side (fused kernel, cupy backend) could not run
    result.update(summary)
    result["status"] = "failed" if broken and status in ("passed", "partial") else status
    return result


def summarize_ddpm(rows: list[dict]) -> dict:
    """One line and the issue's goal (fused >= 80% of copy and >= 3x eager at batch >= 256)."""
    fused = [row for row in rows if row.get("step") == "fused (cupy)"]
    timed = [row for row in fused if "fraction_of_copy" in row]
    broken = any("unavailable" in row for row in fused)
    if not timed:
        return {"summary": f"{len(rows)} rows, no fused measurement" + (" (the fused kernel could not run)"
                                                                      if broken else ""), "broken": broken}
    best = max(timed, key=lambda row: row["batch"])
    goal_rows = [row for row in timed if row["batch"] >= 256]
    goal = (all(row["fraction_of_copy"] >= 0.8 and row["speedup_vs_eager"] >= 3 for row in goal_rows)
            if goal_rows else None)
    compiled = [row for row in rows if row.get("step") == "torch.compile" and row.get("batch") == best["batch"]
                and "gpu_microseconds" in row]
    versus = f", {compiled[0]['gpu_microseconds'] / best['gpu_microseconds']:.2f}x torch.compile" if compiled else ""
    line = (f"fused {100 * best['fraction_of_copy']:.0f}% of copy ({best['gb_per_s']:.0f} of "
            f"{best['copy_gb_per_s']:.0f} GB/s), {best['speedup_vs_eager']:.2f}x eager{versus} at "
            f"{best['grid']}^2 x {best['batch']}")
    if goal is not None:
        line += f"; goal (>= 80% copy, >= 3x eager at batch >= 256) {'met' if goal else 'not met'}"
    return {"summary": line, "goal_met": goal, "copy_gb_per_s": best["copy_gb_per_s"], "broken": broken}


def summarize_solvers(rows: list[dict]) -> dict:
    """One line and the issue's goal (fused cupy >= torch-CUDA at 512^2)."""
    ratios = [row["cupy_over_torch"] for row in rows if row.get("cupy_over_torch")]
    broken = any(row.get("cupy_fused_steps_per_s") is None for row in rows)
    if not ratios:
        return {"summary": f"{len(rows)} cells, no cupy/torch ratio", "broken": broken or not rows}
    largest = max(row["grid"] for row in rows if row.get("cupy_over_torch"))
    at_largest = [row["cupy_over_torch"] for row in rows if row["grid"] == largest and row.get("cupy_over_torch")]
    ratios.sort()
    line = (f"{len(rows)} cells; cupy/torch median {ratios[len(ratios) // 2]:.2f}x (range {ratios[0]:.2f}-"
            f"{ratios[-1]:.2f}); at {largest}^2 {min(at_largest):.2f}-{max(at_largest):.2f}x")
    goal = min(at_largest) >= 1.0 if largest == 512 and at_largest else None
    if goal is not None:
        line += f"; goal (cupy >= torch-CUDA at 512^2) {'met' if goal else 'not met'}"
    return {"summary": line, "goal_met": goal, "broken": broken}


def summarize_cohesion(rows: list[dict]) -> dict:
    """One line and the issue's goal (plan >= 10x autoregressive on the same horizon and members)."""
    seconds = {row["mode"]: row["seconds"] for row in rows if "seconds" in row}
    broken = any("error" in row for row in rows)
    if "autoregressive" not in seconds or not any(mode.startswith("plan") for mode in seconds):
        return {"summary": f"{len(rows)} rows, no plan/autoregressive pair", "broken": broken or not rows}
    speedups = {mode: seconds["autoregressive"] / value for mode, value in seconds.items() if mode != "autoregressive"}
    best = max(speedups.values())
    line = ", ".join(f"{mode} {value:.2f}x" for mode, value in speedups.items())
    line += f" autoregressive's speed; goal (>= 10x) {'met' if best >= 10 else 'not met'}"
    return {"summary": line, "goal_met": best >= 10, "speedups": speedups, "broken": broken}


def cohesion_child(args, seconds: float, out: Path) -> int:
    """--phase cohesion: one warm-up, then plan (stride 1, stride 3) and autoregressive forecasts timed
    once each (the device synchronised), the rows written after each."""
    import torch

    from emu.diffusion import VPSchedule
    from emu.models.koopman import make_koopman
    from emu.models.score import make_score_network
    from emu.stabilizers.cohesion import CohesionSettings, forecast

    device = torch.device(args.device)
    torch.manual_seed(0)
    grid, horizon, batch = args.cohesion_grid, args.cohesion_horizon, 8
    koopman = make_koopman("small", 1, grid).to(device).eval()
    network = make_score_network("small", 1, window=5).to(device).eval()
    schedule = VPSchedule()
    initial = torch.randn(batch, 1, grid, grid, device=device)
    base = dict(steps=args.cohesion_steps, corrections=1, tau=0.1)
    runs = [("plan, stride 1", "plan", 1), ("plan, stride 3", "plan", 3), ("autoregressive", "autoregressive", None)]

    def timed(mode, stride, frames):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        forecast(koopman, network, schedule, initial, frames, mode=mode,
                 settings=CohesionSettings(**base, window_stride=stride), generator=torch.Generator(device).manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    rows, notes, started = [], [], time.monotonic()
    extra = {"grid": grid, "horizon": horizon, "trajectories": batch, "sampler_steps": args.cohesion_steps}
    for label, mode, stride in runs:
        timed(mode, stride, 5)  # warm-up: kernels, allocator
    for label, mode, stride in runs:
        if rows and time.monotonic() - started > seconds * 0.8:
            notes.append(f"time: {seconds:.0f} s ran out before {label}")
            break
        try:
            rows.append({"mode": label, "seconds": timed(mode, stride, horizon)})
        except Exception as error:  # out of memory and the like: the row says so
            rows.append({"mode": label, "error": f"{type(error).__name__}: {str(error)[:300]}"})
        print(rows[-1], flush=True)
        _write_phase(out, rows, notes, "running", extra)
    _write_phase(out, rows, notes, "passed" if len(rows) == len(runs) else "partial", extra)
    return 0


def ddpm_child(args, seconds: float, out: Path) -> int:
    """--phase ddpm: emu.bench_ddpm.run_ddpm_benchmarks one batch at a time, the rows written after each."""
    from emu.bench_ddpm import DEFAULT_BATCHES, DEFAULT_GRID, run_ddpm_benchmarks

    started = time.monotonic()
    batches = _integers(args.ddpm_batches) if args.ddpm_batches else list(DEFAULT_BATCHES)
    grid = args.ddpm_grid or DEFAULT_GRID
    rows, notes, longest, failed = [], [], 0.0, False
    for index, batch in enumerate(batches):
        if index and time.monotonic() - started + 1.5 * longest > seconds:
            notes.append(f"time: {seconds:.0f} s ran out; batches {batches[index:]} left out")
            _write_phase(out, rows, notes, "failed" if failed else "partial")
            return 0
        batch_start = time.monotonic()
        try:
            rows += run_ddpm_benchmarks(batches=[batch], grid=grid, dtype=args.ddpm_dtype, device=args.device,
                                        seconds=args.seconds, compile=not args.no_compile)
        except Exception as error:  # one batch breaking (out of memory, a kernel error) fails the phase, not the rest
            notes.append(f"batch {batch}: {type(error).__name__}: {str(error)[:300]}")
            failed = True
        longest = max(longest, time.monotonic() - batch_start)
        _write_phase(out, rows, notes, "running")
    _write_phase(out, rows, notes, "failed" if failed else "passed")
    return 0


def solvers_child(args, seconds: float, out: Path) -> int:
    """--phase solvers: bench_gpu_solvers.solver_rows over the matrix, the rows written after each cell."""
    import bench_gpu_solvers as bench

    solvers = bench.SOLVERS if args.solver_generic else bench.SOLVERS[:2]
    platform_name = bench.jax_device()
    rows: list[dict] = []
    extra = {"device": bench.device_name(), "jax_platform": platform_name,
             "solvers": [label for label, *_ in solvers], "seconds_per_measurement": args.seconds}

    def on_row(row):
        rows.append(row)
        print(bench.markdown_table([row], solvers, platform_name)[-1], flush=True)
        _write_phase(out, rows, [], "running", extra)

    print("\n".join(bench.markdown_table([], solvers, platform_name)), flush=True)
    systems, dtypes = _names(args.solver_systems), _names(args.solver_dtypes)
    grids, batches = _integers(args.solver_grids), _integers(args.solver_batches)
    extra["planned_cells"] = len(systems) * len(dtypes) * len(grids) * len(batches)

    def measure(*arguments):  # anything a cell raises (out of memory, a kernel error) becomes its note
        try:
            return bench.measure(*arguments)
        except Exception as error:
            return f"{type(error).__name__}: {str(error)[:300]}"

    measured, notes = bench.solver_rows(systems=systems, grids=grids, batches=batches, dtypes=dtypes,
                                        seconds=args.seconds, solvers=solvers, budget=seconds,
                                        platform=platform_name, on_row=on_row, measure=measure)
    _write_phase(out, measured, notes, "partial" if len(measured) < extra["planned_cells"] else "passed", extra)
    return 0


def _write_phase(out: Path, rows: list[dict], notes: list[str], status: str, extra: dict | None = None) -> None:
    write_atomically(out, json.dumps({"status": status, "rows": rows, "notes": notes, "extra": extra or {}},
                                     indent=1, default=str))


def _integers(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# -- the report ----------------------------------------------------------------------------------------

def build_report(*, environment: dict, results: list[dict], budget: float, started: float, wall: float,
                 status: str, exit_code: int | None, argv: list[str]) -> dict:
    return {"tool": "scripts/gpu_check.py", "format": 1, "status": status, "exit_code": exit_code,
            "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget, "wall_s": round(wall, 2), "command": argv, "environment": environment,
            "phases": results}


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    """report.json and report.md in `out`, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    write_atomically(out / "report.md", render_markdown(report))
    return out / "report.json", out / "report.md"


def render_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# emu GPU check: {report['status'].upper()}", "",
             f"{report['started']} on {env.get('host', '?')}; budget {report['budget_s']:g} s, "
             f"{report['wall_s']:.0f} s in all; exit code {report['exit_code']}.", "",
             "## Machine", "", "| | |", "|---|---|"]
    gpu = env.get("gpu", "?")
    details = [f"{env['gpu_memory_mib']} MiB" if "gpu_memory_mib" in env else None,
               f"compute capability {env['compute_capability']}" if "compute_capability" in env else None,
               f"{env['multiprocessors']} SMs" if "multiprocessors" in env else None]
    details = [detail for detail in details if detail]
    rows = [("GPU", gpu + (f" ({', '.join(details)})" if details else "")),
            ("driver", f"{env.get('driver', '?')}" + (f" (CUDA {env['cuda_driver_api']} driver API)"
                                                      if "cuda_driver_api" in env else "")),
            ("torch", f"{env.get('torch', 'not installed')}" + (f" (CUDA {env['torch_cuda']})" if env.get("torch_cuda")
                                                                else "")),
            ("CuPy", f"{env.get('cupy', 'not installed')}" + (f" (CUDA runtime {env['cupy_cuda_runtime']})"
                                                              if "cupy_cuda_runtime" in env else "")),
            ("Python", f"{env.get('python', '?')} ({env.get('executable', '?')})"),
            ("emu", env.get("emu", "?"))]
    if env.get("cannot_run_because"):
        rows.append(("no GPU run here", "; ".join(env["cannot_run_because"])))
    if env.get("installed_wheels"):
        rows.append(("wheels installed", ", ".join(env["installed_wheels"])))
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows]
    lines += ["", "## Phases", "", "| phase | status | wall s | limit s | summary |", "|---|---|---|---|---|"]
    for phase in report["phases"]:
        lines.append(f"| {phase['name']} | {phase['status']} | {phase['wall_s']:.1f} | {phase['limit_s']:.0f} | "
                     f"{_cell(phase.get('summary', ''))} |")
    for phase in report["phases"]:
        lines += ["", f"## {phase.get('title') or phase['name']}", ""]
        lines += SECTIONS.get(phase["name"], _generic_section)(phase)
        notes = phase.get("notes") or []
        if notes:
            lines += [""] + [f"- note: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _generic_section(phase: dict) -> list[str]:
    return [f"{phase['status']} in {phase['wall_s']:.1f} s (limit {phase['limit_s']:.0f} s): "
            f"{phase.get('summary', '')}"]


def _tests_section(phase: dict) -> list[str]:
    lines = _generic_section(phase)
    if phase.get("files"):
        lines += ["", "Files: " + ", ".join(f"`{name}`" for name in phase["files"])]
    for title, entries in (("Failures", phase.get("failures") or []),
                           ("Import errors", phase.get("collection_errors") or [])):
        if entries:
            lines += ["", f"{title}:", ""] + [f"- `{entry['nodeid']}`: {_cell(entry['message'])}" for entry in entries]
    if phase.get("skip_reasons"):
        lines += ["", "Skipped:", ""]
        lines += [f"- {count} x {_cell(reason)}" for reason, count in phase["skip_reasons"].items()]
    if phase.get("slowest"):
        lines += ["", "Slowest: " + ", ".join(f"`{entry['nodeid']}` {entry['seconds']:.1f} s"
                                            for entry in phase["slowest"])]
    return lines


def _ddpm_section(phase: dict) -> list[str]:
    lines = _generic_section(phase)
    rows = phase.get("rows") or []
    if rows:
        copies = sorted({f"{row['copy_gb_per_s']:.0f}" for row in rows if "copy_gb_per_s" in row})
        lines += ["", f"Copy bandwidth measured in the same run (dst.copy_(src), 256 MiB): {', '.join(copies)} GB/s. "
                      "GPU us: the device's time per call; wall us: what a Python loop sees.", "",
                  "| step | grid | batch | dtype | wall us | GPU us | GB/s | % copy | vs eager |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            if "gpu_microseconds" not in row:
                lines.append(f"| {row['step']} | {row['grid']} | {row['batch']} | {row['dtype']} | - | - | - | - | "
                             f"{_cell(row.get('unavailable', ''))} |")
                continue
            lines.append(f"| {row['step']} | {row['grid']} | {row['batch']} | {row['dtype']} | "
                         f"{row['wall_microseconds']:.1f} | {row['gpu_microseconds']:.1f} | {row['gb_per_s']:.0f} | "
                         f"{100 * row['fraction_of_copy']:.0f}% | {row['speedup_vs_eager']:.2f}x |")
    return lines


def _solvers_section(phase: dict) -> list[str]:
    lines = _generic_section(phase)
    rows = phase.get("rows") or []
    if rows:
        sys.path.insert(0, str(SCRIPTS))
        import bench_gpu_solvers as bench

        labels = phase.get("solvers") or [label for label, *_ in bench.SOLVERS[:2]]
        solvers = [solver for solver in bench.SOLVERS if solver[0] in labels]
        lines += ["", f"Steps/s of one whole-batch step, ~{phase.get('seconds_per_measurement', '?')} s per "
                      f"measurement, on {phase.get('device', '?')}; {len(rows)} of {phase.get('planned_cells', '?')} "
                      "cells.", ""]
        lines += bench.markdown_table(rows, solvers, phase.get("jax_platform"))
    return lines


def _cohesion_section(phase: dict) -> list[str]:
    lines = _generic_section(phase)
    rows = phase.get("rows") or []
    if rows:
        lines += ["", f"{phase.get('trajectories', '?')} trajectories x {phase.get('horizon', '?')} frames at "
                      f"{phase.get('grid', '?')}^2, {phase.get('sampler_steps', '?')} sampler steps, one run each:", "",
                  "| mode | seconds |", "|---|---|"]
        lines += [f"| {row['mode']} | {row['seconds']:.3f} |" if "seconds" in row else f"| {row['mode']} | {_cell(row.get('error'))} |"
                  for row in rows]
    return lines


SECTIONS: dict[str, Callable[[dict], list[str]]] = {"tests": _tests_section, "ddpm": _ddpm_section,
                                                     "solvers": _solvers_section, "cohesion": _cohesion_section}


# -- the command ---------------------------------------------------------------------------------------

def make_phases(names: list[str], args, *, work: Path, out: Path, env: dict) -> list[Phase]:
    """The real phases, in order, each with its own budget."""
    budgets = {"tests": args.tests_budget, "ddpm": args.ddpm_budget, "solvers": args.solvers_budget,
               "cohesion": args.cohesion_budget}
    common = ["--seconds", f"{args.seconds:g}", "--device", args.device]
    ddpm = common + ["--ddpm-dtype", args.ddpm_dtype]
    ddpm += ["--ddpm-batches", args.ddpm_batches] if args.ddpm_batches else []
    ddpm += ["--ddpm-grid", str(args.ddpm_grid)] if args.ddpm_grid else []
    ddpm += ["--no-compile"] if args.no_compile else []
    solvers = common + ["--solver-systems", args.solver_systems, "--solver-grids", args.solver_grids,
                        "--solver-batches", args.solver_batches, "--solver-dtypes", args.solver_dtypes]
    solvers += ["--solver-generic"] if args.solver_generic else []
    cohesion = ["--device", args.device, "--cohesion-grid", str(args.cohesion_grid), "--cohesion-horizon",
                str(args.cohesion_horizon), "--cohesion-steps", str(args.cohesion_steps)]
    options = {"ddpm": ddpm, "solvers": solvers, "cohesion": cohesion}
    paths = [Path(path).resolve() for path in args.test_paths] if args.test_paths else gpu_test_files()
    phases = []
    for name in names:
        log = out / f"{name}.log"
        log.unlink(missing_ok=True)
        if name == "tests":
            def run(limit, log=log):
                return tests_phase(limit, paths=paths, work=work, log_path=log, env=env, dry_run=args.dry_run)
        else:
            def run(limit, name=name, log=log):
                return benchmark_phase(name, limit, options=options[name], work=work, log_path=log, env=env,
                                       dry_run=args.dry_run)
        phases.append(Phase(name, run, budgets[name]))
    return phases


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check_report"),
                   help="folder for report.md, report.json and the phase logs (default: gpu_check_report)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole check (default 480)")
    p.add_argument("--phases", default=",".join(PHASES), help="which phases, in order (default tests,ddpm,solvers,cohesion)")
    p.add_argument("--tests-budget", type=float, default=PHASE_BUDGETS["tests"],
                   help="seconds at most for the tests (default 150)")
    p.add_argument("--ddpm-budget", type=float, default=PHASE_BUDGETS["ddpm"], help="(default 120)")
    p.add_argument("--solvers-budget", type=float, default=PHASE_BUDGETS["solvers"], help="(default 120)")
    p.add_argument("--cohesion-budget", type=float, default=PHASE_BUDGETS["cohesion"], help="(default 60)")
    p.add_argument("--cohesion-grid", type=int, default=64, help="Cohesion phase: points per side (default 64)")
    p.add_argument("--cohesion-horizon", type=int, default=100, help="Cohesion phase: frames (default 100)")
    p.add_argument("--cohesion-steps", type=int, default=32, help="Cohesion phase: sampler steps (default 32)")
    p.add_argument("--seconds", type=float, default=0.5, help="wall time per benchmark measurement (default 0.5)")
    p.add_argument("--device", default="cuda", help="torch device of the benchmarks (default cuda)")
    p.add_argument("--ddpm-batches", default=None, help="comma-separated (default emu.bench_ddpm's: 64,256,1024)")
    p.add_argument("--ddpm-grid", type=int, default=None, help="points per side (default 64)")
    p.add_argument("--ddpm-dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    p.add_argument("--solver-systems", default="kolmogorov,qg")
    p.add_argument("--solver-grids", default="64,128,256,512")
    p.add_argument("--solver-batches", default="1,8,64")
    p.add_argument("--solver-dtypes", default="float32", help="float32 and/or float64 (default float32)")
    p.add_argument("--solver-generic", action="store_true", help="also time CuPy without the fused kernels")
    p.add_argument("--test-paths", nargs="+", default=None, help="test files (default: those with GPU tests)")
    p.add_argument("--wheels", type=Path, default=None, help="offline wheels for missing packages (default .whl/)")
    p.add_argument("--require-gpu", action="store_true", help="exit 3, not 0, when there is no GPU")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: collect the GPU tests and write the report of what would run")
    # internal: one benchmark phase in this process (run_phases starts these)
    p.add_argument("--phase", choices=("ddpm", "solvers", "cohesion"), help=argparse.SUPPRESS)
    p.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--phase-seconds", type=float, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    if args.phase:  # a phase process
        if str(SCRIPTS) not in sys.path:
            sys.path.insert(0, str(SCRIPTS))
        child = {"ddpm": ddpm_child, "solvers": solvers_child, "cohesion": cohesion_child}[args.phase]
        return child(args, args.phase_seconds or 60.0, args.phase_out)
    names = _names(args.phases)
    if not names or any(name not in PHASES for name in names):
        p.error(f"--phases takes a comma-separated subset of {','.join(PHASES)}, got {args.phases!r}")
    for option in ("ddpm_batches", "solver_grids", "solver_batches"):
        try:
            values = _integers(getattr(args, option) or "1")
        except ValueError:
            values = []
        if not values or min(values) < 1:
            p.error(f"--{option.replace('_', '-')} takes comma-separated positive integers")
    if args.cohesion_grid < 8 or args.cohesion_grid % 8 or args.cohesion_horizon < 4 or args.cohesion_steps < 1:
        p.error("--cohesion-grid must be a multiple of 8, --cohesion-horizon >= 4 (the window of 5 frames) and "
                "--cohesion-steps >= 1")
    if args.budget <= 0 or args.seconds <= 0:
        p.error("--budget and --seconds must be positive")
    if not _names(args.solver_dtypes) or set(_names(args.solver_dtypes)) - {"float32", "float64"}:
        p.error(f"--solver-dtypes takes float32 and/or float64, got {args.solver_dtypes!r}")

    wall_start, clock_start = time.time(), time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    wheels = args.wheels or (REPO / ".whl")
    probed = probe(wheels if wheels.is_dir() else None, work / "site")
    if not args.dry_run and (probed["no_gpu"] or probed["missing"]):
        print(one_line(probed))
        shutil.rmtree(work, ignore_errors=True)
        return EXIT_CANNOT_RUN if (probed["missing"] and not probed["no_gpu"]) or args.require_gpu else EXIT_OK
    environment = probed["environment"]
    environment["emu"] = emu_revision()
    if probed["no_gpu"] or probed["missing"]:
        environment["cannot_run_because"] = probed["no_gpu"] + probed["missing"]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = phase_environment([str(work / "site")] if probed["installed_wheels"] else [])

    def save(results: list[dict], status: str = "running", code: int | None = None) -> None:
        write_report(out, build_report(environment=environment, results=results, budget=args.budget,
                                       started=wall_start, wall=time.monotonic() - clock_start, status=status,
                                       exit_code=code, argv=["scripts/gpu_check.py", *argv]))

    print(f"gpu_check: {environment.get('gpu', 'no GPU (dry run)')}, torch {environment.get('torch')}, "
          f"CuPy {environment.get('cupy', '-')}; budget {args.budget:g} s; report in {out}", flush=True)
    save([])
    left = args.budget - (time.monotonic() - clock_start)
    try:
        results = run_phases(make_phases(names, args, work=work, out=out, env=env), left, on_phase=save)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    status, code = overall(results)
    save(results, status, code)
    print(f"gpu_check: {status} in {time.monotonic() - clock_start:.0f} s; report: {out / 'report.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
