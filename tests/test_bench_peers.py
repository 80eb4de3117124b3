"""`emu bench`'s processes: the peer worker protocol, the side-environment options and --busy-cores
(no speed asserted; a stand-in peer that sleeps a known time per step)."""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import emu.bench as bench
from emu.backends import cpu_threads
from emu.bench import BusyCores, PeerWorker, process_state
from emu.cli import main

WORKER = Path(bench.__file__).with_name("bench_peers.py")


def test_worker_protocol_round_trip_with_the_sleep_peer():
    with PeerWorker("sleep", sys.executable) as peer:
        assert peer.version == "0" and peer.pid == peer.process.pid
        reply = peer.setup({"seconds_per_step": 0.004, "granularity": 5, "label": "napper"})
        assert reply["ok"] and peer.label == "napper" and peer.granularity == 5
        assert peer.threads["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", "unset")
        timing = peer.run(7)  # rounded up to whole granules
        assert timing.steps == 10
        assert 0.04 <= timing.seconds < 0.04 + 1.0  # slept 10 x 4 ms, timed inside the worker
        assert timing.cpu_seconds is not None and timing.cpu_seconds < timing.seconds
        with pytest.raises(RuntimeError, match="unknown op 'jump'"):
            peer.request({"op": "jump"})
        assert peer.run(5).steps == 5  # still serving after an error
        process = peer.process
    assert process.returncode == 0  # "quit" ended it


def test_worker_refuses_run_before_setup_and_dies_visibly():
    with PeerWorker("sleep", sys.executable) as peer:
        with pytest.raises(RuntimeError, match="run before setup"):
            peer.run(1)
        peer.process.kill()
        peer.process.wait()
        with pytest.raises((RuntimeError, OSError)):
            peer.run(1)


def test_worker_runs_as_a_module_and_as_a_file_without_emu(tmp_path):
    requests = "\n".join(json.dumps(r) for r in ({"op": "setup", "params": {"seconds_per_step": 0.001}},
                                                 {"op": "run", "steps": 3}, {"op": "quit"})) + "\n"
    module = subprocess.run([sys.executable, "-m", "emu.bench_peers", "sleep"], input=requests, capture_output=True,
                            text=True, timeout=120)
    replies = [json.loads(line) for line in module.stdout.splitlines()]
    assert module.returncode == 0, module.stderr
    assert [r.get("ok") for r in replies] == [True] * 4 and replies[0]["ready"] and replies[2]["steps"] == 3
    # A side environment has no emu: the file must work when `import emu` fails.
    fake = tmp_path / "emu"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('emu is not installed in this side environment')\n")
    as_file = subprocess.run([sys.executable, str(WORKER), "sleep"], input=requests, capture_output=True, text=True,
                             timeout=120, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert as_file.returncode == 0, as_file.stderr
    assert [json.loads(line)["ok"] for line in as_file.stdout.splitlines()] == [True] * 4
    nodes = list(ast.walk(ast.parse(WORKER.read_text())))
    imported = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom)}
    assert "emu" not in imported
    assert imported <= {"json", "math", "os", "sys", "time", "traceback", "numpy", "ctypes", "signal", "pyqg",
                        "pyfftw", "jax", "jax_cfd"}


def python_without_jax_cfd(tmp_path) -> Path:
    """A 'python' (this one, wrapped) in which jax imports but jax_cfd does not."""
    shadow = tmp_path / "shadow"
    (shadow / "jax").mkdir(parents=True)
    (shadow / "jax" / "__init__.py").write_text("")
    (shadow / "jax_cfd").mkdir()
    (shadow / "jax_cfd" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'jax_cfd'\", name='jax_cfd')\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={shadow} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def test_jaxcfd_python_without_jax_cfd_is_a_clear_error(tmp_path):
    python = python_without_jax_cfd(tmp_path)
    result = CliRunner().invoke(main, ["bench", "--system", "kolmogorov", "--backend", "numpy", "--grid", "16",
                                       "--seconds", "0.05", "--jaxcfd-python", str(python)])
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert f"--jaxcfd-python {python}: jax-cfd is not usable there" in message
    assert "No module named 'jax_cfd'" in message
    assert f"{python} -m pip install 'jax[cpu]' jax-cfd" in message
    assert "steps/s" not in result.output  # failed before any timing
    missing = CliRunner().invoke(main, ["bench", "--system", "kolmogorov", "--grid", "16",
                                        "--jaxcfd-python", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1
    assert f"--jaxcfd-python {tmp_path / 'nowhere'}: no such executable" in " ".join(missing.output.split())
    with pytest.raises(bench.UserError, match="--jaxcfd-python"):
        PeerWorker("jaxcfd", str(python), option="--jaxcfd-python")


def test_pyqg_python_without_pyqg_names_the_option_and_the_side_environment(tmp_path):
    shadow = tmp_path / "shadow" / "pyqg"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'pyqg'\", name='pyqg')\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={shadow.parent} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    with pytest.raises(bench.UserError) as error:
        PeerWorker("pyqg", str(wrapper), option="--pyqg-python")
    message = str(error.value)
    assert message.startswith(f"--pyqg-python {wrapper}: pyqg is not usable there")
    assert "No module named 'pyqg'" in message and "scripts/pyqg_reference.py" in message


def test_lines_reader_keeps_what_follows_a_line_and_times_out():
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb", buffering=0) as stream:
        lines = bench._Lines(stream)
        os.write(write_end, b'{"a": 1}\n{"b": 2}\npart')
        assert lines.readline(5) == b'{"a": 1}\n' and lines.readline(5) == b'{"b": 2}\n'
        with pytest.raises(TimeoutError):
            lines.readline(0.05)
        os.write(write_end, b"ial\n")
        assert lines.readline(5) == b"partial\n"
        os.write(write_end, b"tail")
        os.close(write_end)
        assert lines.readline(5) == b"tail" and lines.readline(5) == b""


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_busy_cores_spin_only_while_loaded_and_leave_nothing_behind():
    with BusyCores(2, settle=0.02) as busy:
        pids = busy.pids
        assert len(pids) == 2 and len(set(pids)) == 2
        assert [process_state(pid) for pid in pids] == ["T", "T"]  # stopped while quiet
        before = [cpu_ticks(pid) for pid in pids]
        time.sleep(0.3)
        assert [cpu_ticks(pid) for pid in pids] == before  # no CPU at all while stopped
        with busy.loaded():
            assert all(process_state(pid) in ("R", "S") for pid in pids)
            time.sleep(0.5)
        assert [process_state(pid) for pid in pids] == ["T", "T"]
        assert all(after > start for after, start in zip((cpu_ticks(pid) for pid in pids), before))
        processes = list(busy.processes)
    assert all(process.returncode is not None for process in processes)
    assert [process_state(pid) for pid in pids] == [None, None]  # killed and reaped
    with pytest.raises(RuntimeError, match="boom"), BusyCores(1) as busy:
        pid = busy.pids[0]
        raise RuntimeError("boom")
    assert process_state(pid) is None
    with pytest.raises(ValueError, match="--busy-cores"):
        BusyCores(-1)


def spinners_of_this_process() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid() and any(part.endswith(b"bench_peers.py") for part in cmdline) and b"spin" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_bench_with_a_fake_peer_and_busy_cores(tmp_path, monkeypatch):
    """The whole solver table on a stand-in peer that sleeps 1 ms per step: rows, per-round stats,
    the FFT set of one QG step, the busy line, the JSON file, and no process left behind."""
    monkeypatch.setitem(bench.PEER_OPTIONS, "sleep", ("--sleep-python", "json", "", "sleep"))
    monkeypatch.setattr(bench, "peer_kind", lambda system: "sleep")
    lines = []
    rows = bench.run_benchmarks(system="qg", preset=None, backends=["numpy"], grids=[16], dtype="float64", batch=2,
                                seconds=0.15, peers=True, pyqg_python=None, device=None, rounds=3, busy_cores=1,
                                json_path=str(tmp_path / "bench.json"), echo=lines.append)
    output = "\n".join(lines)
    assert spinners_of_this_process() == []
    assert [row["solver"] for row in rows] == ["sleep", "emu numpy"]
    peer_row, emu_row = rows
    assert 0 < peer_row["steps_per_second"] <= 1000 * 1.01  # sleeping 1 ms a step can only be slower
    assert peer_row["rounds"] == 3 and peer_row["threads"]["OMP_NUM_THREADS"] == str(cpu_threads())  # emu's count
    for key in ("vs_peer", "step_over_fft", "loaded_over_quiet"):
        stats = emu_row[f"{key}_stats"]
        assert stats["rounds"] == 3 and len(stats["values"]) == 3
        assert stats["min"] <= stats["median"] <= stats["max"] and stats["min"] > 0
        assert stats["median"] == sorted(stats["values"])[1]
    assert emu_row["vs_peer"] == emu_row["vs_peer_stats"]["median"]
    assert emu_row["fft_set"] == "1 x inverse (3, 2, 2, 16, 9) + 1 x forward (2, 2, 2, 16, 16)"
    assert "threads: emu cpu_threads()=1" in output and "peer: sleep 0 in a worker process" in output
    assert "vs peer" in output and "step/FFT" in output and "loaded/quiet" in output
    assert "busy emu numpy 16:" in output and "with 1 busy process(es) (loaded/quiet" in output
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rounds"] == 3 and saved["busy_cores"] == 1 and [r["solver"] for r in saved["rows"]] == ["sleep", "emu numpy"]


def test_bench_cli_kolmogorov_fft_set_and_option_errors(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--system", "kolmogorov", "--backend", "numpy", "--grid", "16",
                                       "--seconds", "0.05", "--rounds", "2", "--no-peers"])
    assert result.exit_code == 0, result.output
    assert "5 x inverse (4, 1, 16, 9) + 5 x forward (1, 16, 16) per step" in result.output
    assert "OMP_NUM_THREADS=" in result.output and "cpu/wall" in result.output
    for args, expected in ((["--rounds", "0"], "--rounds"), (["--busy-cores", "-1"], "--busy-cores")):
        bad = CliRunner().invoke(main, ["bench", "--grid", "16", "--no-peers", *args])
        assert bad.exit_code == 2 and expected in bad.output
    mixed = CliRunner().invoke(main, ["bench", "--emulator", "drn", "--grid", "8", "--busy-cores", "1"])
    assert mixed.exit_code != 0 and "--busy-cores: for solver benchmarks only" in mixed.output
