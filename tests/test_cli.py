"""The command line: `simulate` end to end, its summary and plot, and what signals leave behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from emu.cli import main
from emu.data import load_restart, read_config, read_run
from emu.plotting import plot_run
from emu.runs import simulate
from emu.systems import make_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _simulate(*args):
    result = CliRunner().invoke(main, ["simulate", "--no-progress", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def _assert_png(path: Path, minimum_bytes: int = 10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > minimum_bytes, f"{path} holds only {len(data)} bytes"


def test_simulate_writes_run_and_plot(tmp_path):
    out, png = tmp_path / "k.h5", tmp_path / "k.png"
    result = _simulate("--system", "kolmogorov", "--backend", "numpy", "--grid", 16, "--steps", 10,
                       "--out", out, "--plot", png)
    assert result.exit_code == 0, result.output
    run = read_run(out)
    assert run["fields"].shape == (11, 1, 16, 16)  # default save_every = max(1, steps // 100)
    assert run["attrs"]["status"] == "complete" and run["attrs"]["backend"] == "numpy"
    _assert_png(png)
    summary = result.output.strip().splitlines()[-1]
    assert "steps/s" in summary and "10 steps" in summary
    assert str(out) in summary and str(png) in summary and "11 snapshots" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.h5", "k.png"]  # no temporary files left


def test_simulate_defaults_to_files_named_after_the_system(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _simulate("--system", "qg", "--grid", 16, "--steps", 4)
    assert result.exit_code == 0, result.output
    assert read_run(tmp_path / "qg.h5")["fields"].shape == (5, 1, 2, 16, 16)
    _assert_png(tmp_path / "qg.png")


def test_no_plot_writes_only_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _simulate("--grid", 16, "--steps", 4, "--save-every", 2, "--out", "run.h5", "--no-plot")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]
    assert read_run(tmp_path / "run.h5")["step"].tolist() == [0, 2, 4]
    assert ".png" not in result.output.strip().splitlines()[-1]


def test_set_is_stored_in_the_file_config(tmp_path):
    out = tmp_path / "k.h5"
    result = _simulate("--grid", 16, "--steps", 2, "--set", "viscosity=0.01", "--set", "drag=0.2",
                       "--preset", "re5000", "--out", out, "--no-plot")
    assert result.exit_code == 0, result.output
    config = read_config(out)
    assert config.viscosity == 0.01 and config.drag == 0.2 and config.preset == "re5000"
    assert read_run(out)["config"]["viscosity"] == 0.01


def test_qg_with_torch_backend(tmp_path):
    out = tmp_path / "q.h5"
    result = _simulate("--system", "qg", "--backend", "torch", "--grid", 16, "--steps", 6, "--save-every", 3,
                       "--batch", 2, "--downsample", 8, "--out", out, "--no-plot")
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "steps/s" in result.output
    run = read_run(out)
    assert run["attrs"]["backend"] == "torch" and run["attrs"]["device"] == "cpu"
    assert run["fields"].shape == (3, 2, 2, 8, 8) and np.isfinite(run["fields"]).all()
    # Same physics as numpy: the two backends agree on this short run.
    numpy_run = simulate(make_config("qg", grid_size=16), out=tmp_path / "n.h5", steps=6, save_every=3, batch=2,
                         downsample=8, progress=False)
    expected = read_run(numpy_run.path)["fields"]
    assert np.abs(run["fields"] - expected).max() <= 1e-10 * np.abs(expected).max()


def test_init_continues_with_a_perturbed_ensemble(tmp_path):
    first, second = tmp_path / "first.h5", tmp_path / "second.h5"
    assert _simulate("--grid", 32, "--steps", 4, "--out", first, "--no-plot").exit_code == 0
    result = _simulate("--init", first, "--steps", 4, "--save-every", 2, "--batch", 3, "--perturb", 0.01,
                       "--out", second, "--no-plot")
    assert result.exit_code == 0, result.output
    run = read_run(second)
    assert run["step"].tolist() == [4, 6, 8] and run["fields"].shape == (3, 3, 32, 32)
    members = run["fields"][0]
    assert np.abs(members[0] - members[1]).max() > 1e-4 * np.abs(members).max()
    assert run["attrs"]["init"] == str(first)


def test_blow_up_exits_3_and_names_the_file(tmp_path):
    out = tmp_path / "blown.h5"
    result = _simulate("--grid", 32, "--dt", 0.5, "--steps", 20, "--out", out, "--plot", tmp_path / "blown.png")
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert "CFL" in result.output and str(out) in result.output and "blew_up" in result.output
    run = read_run(out)
    assert run["attrs"]["status"] == "blew_up" and run["fields"].shape[0] >= 1
    assert np.isfinite(run["fields"]).all()
    assert not (tmp_path / "blown.png").exists()


def test_simulate_puts_the_signal_handlers_back(tmp_path):
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    assert _simulate("--grid", 16, "--steps", 2, "--out", tmp_path / "k.h5", "--no-plot").exit_code == 0
    assert _simulate("--grid", 100, "--out", tmp_path / "bad.h5").exit_code == 1
    assert {signum: signal.getsignal(signum) for signum in before} == before


@pytest.mark.parametrize("command", [["--help"], ["simulate", "--help"], ["bench", "--help"]])
def test_help(command):
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    if command == ["simulate", "--help"]:
        for option in ("--system", "--backend", "--grid", "--steps", "--init", "--perturb", "--set", "--downsample"):
            assert option in result.output
    if command == ["bench", "--help"]:
        assert "steps/s" in result.output


def test_module_entry_point_runs_in_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, "-m", "emu.cli", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "simulate" in result.stdout and "bench" in result.stdout


# -- plots ------------------------------------------------------------------------------------------

def test_plot_run_on_a_two_layer_qg_file(tmp_path):
    result = simulate(make_config("qg", grid_size=16), out=tmp_path / "q.h5", steps=4, save_every=2, batch=2,
                      progress=False)
    png = plot_run(result.path, tmp_path / "plots" / "q.png", member=1)
    assert png == tmp_path / "plots" / "q.png"
    _assert_png(png)
    assert sorted(p.name for p in png.parent.iterdir()) == ["q.png"]


def test_plot_run_on_a_downsampled_file(tmp_path):
    result = simulate(make_config("kolmogorov", grid_size=32), out=tmp_path / "k.h5", steps=4, save_every=2,
                      downsample=16, progress=False)
    _assert_png(plot_run(result.path, tmp_path / "k.png"))


# -- signals: the output file is replaced atomically, and SIGTERM/SIGINT keep what was done --------

DEADLINE = 30.0


def _start_long_run(folder: Path, out: Path) -> subprocess.Popen:
    """A run that would take far longer than any test: it is stopped by a signal."""
    def default_sigint():  # a test runner in the background may start children with SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    command = [sys.executable, "-m", "emu.cli", "simulate", "--system", "kolmogorov", "--grid", "64",
               "--steps", "100000000", "--save-every", "5", "--no-progress", "--no-plot", "--out", str(out)]
    env = dict(os.environ, EMU_FFTW_PLANNER="FFTW_ESTIMATE")
    return subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint, env=env)


def _temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def _wait_until_writing(process: subprocess.Popen, out: Path, settle: float) -> Path:
    """Waits (up to DEADLINE) for the run's temporary file, then `settle` seconds more."""
    deadline = time.monotonic() + DEADLINE
    while not _temporaries(out):
        if process.poll() is not None:
            pytest.fail(f"the run ended early with {process.returncode}: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no temporary file appeared within {DEADLINE} s")
        time.sleep(0.02)
    time.sleep(settle)
    assert process.poll() is None, "the run ended on its own"
    return _temporaries(out)[0]


@pytest.fixture
def long_run(tmp_path):
    processes = []

    def start(out):
        process = _start_long_run(tmp_path, out)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_sigkill_leaves_the_previous_file_untouched(tmp_path, long_run):
    out = tmp_path / "run.h5"
    out.write_bytes(b"sentinel: an earlier run's data\n" * 100)
    before = out.read_bytes()
    process = long_run(out)
    _wait_until_writing(process, out, settle=0.3)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=DEADLINE)
    assert process.returncode == -signal.SIGKILL
    assert out.read_bytes() == before
    others = sorted(p.name for p in tmp_path.iterdir() if p.name != "run.h5")
    assert len(others) <= 1 and all(name.startswith(".run.h5.") and name.endswith(".tmp") for name in others), others


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_closes_the_file_as_interrupted_and_restartable(tmp_path, long_run, signum):
    out = tmp_path / "run.h5"
    out.write_bytes(b"sentinel")
    process = long_run(out)
    _wait_until_writing(process, out, settle=1.0)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=DEADLINE)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and f"--init {out}" in stderr
    assert "Traceback" not in stderr
    assert not _temporaries(out)

    run = read_run(out)
    assert run["attrs"]["status"] == "interrupted" and "KeyboardInterrupt" in run["attrs"]["message"]
    count = run["fields"].shape[0]
    assert count >= 1 and run["attrs"]["snapshots"] == count
    assert len(run["time"]) == len(run["step"]) == run["energy"].shape[0] == run["cfl"].shape[0] == count
    assert run["step"].tolist() == list(range(0, 5 * count, 5))
    assert np.isfinite(run["fields"]).all()

    config, restart = load_restart(out)
    assert restart.step == run["step"][-1] and restart.time == pytest.approx(run["time"][-1], rel=1e-14)
    n = config.grid_size
    last = run["fields"][-1]
    assert np.abs(np.fft.irfft2(restart.state_hat, s=(n, n)) - last).max() <= 1e-10 * np.abs(last).max()

    continued = simulate(None, out=tmp_path / "continued.h5", init=out, steps=4, save_every=2, progress=False)
    assert continued.status == "complete"
    assert read_run(continued.path)["step"].tolist() == [restart.step, restart.step + 2, restart.step + 4]
