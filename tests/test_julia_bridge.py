"""The Python side of the julia backend (emu.julia): lazy start, exact failure messages, package data,
and the plumbing of simulate/generate/bench/DDPM through a Python stand-in for Julia.

Where no Julia runtime can start (our CI: no Julia, PYTHON_JULIAPKG_OFFLINE=yes) the CLI must fail
at once, say what to install or set, exit non-zero and write no file. The tests marked `julia` run the
real package through juliacall and are skipped, with the reason, when Julia cannot start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import emu.julia as bridge
from emu.backends import BackendUnavailable

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env_extra: dict | None = None, pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON_JULIAPKG_OFFLINE="yes", **(env_extra or {}))
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def _julia_could_start_here() -> bool:
    """Whether juliacall might find a Julia here (then the 'fails fast' tests do not apply)."""
    if not bridge.juliacall_installed():
        return False
    return bool(os.environ.get("PYTHON_JULIAPKG_EXE") or shutil.which("julia") or shutil.which("juliaup")
                or os.environ.get("PYTHON_JULIAPKG_OFFLINE", "").lower() != "yes")


# -- import isolation and failure messages ---------------------------------------------------------

def test_importing_emu_never_imports_juliacall():
    code = ("import sys, emu, emu.cli, emu.julia, emu.backends, emu.runs, emu.generate, emu.bench\n"
            "bad = [m for m in ('juliacall', 'juliapkg') if m in sys.modules]\n"
            "assert not bad, bad\n")
    result = _run(["-c", code])
    assert result.returncode == 0, result.stderr


@pytest.fixture
def fake_juliacall(tmp_path):
    """A `juliacall` whose import fails as the real one does offline without Julia (juliapkg raises a
    bare Exception), so the message path is tested where juliacall is not installed too."""
    package = tmp_path / "fake" / "juliacall"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent("""
        import os
        reason = os.environ.get("FAKE_JULIACALL_FAILURE", "offline")
        if reason == "offline":
            raise Exception("could not find Julia 1.10.3 - 1.11")
        if reason == "network":
            import urllib.error
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        if reason == "exe":
            raise Exception("juliapkg_exe=/bin/true is not a Julia executable.")
        raise RuntimeError(reason)
    """))
    return package.parent


OFFLINE_MESSAGE = (
    "Julia could not be started: juliacall found no Julia 1.10.3 - 1.11 on this machine and "
    "PYTHON_JULIAPKG_OFFLINE=yes forbids downloading one. Set PYTHON_JULIAPKG_EXE to the `julia` program of an "
    "installed Julia >= 1.10 (e.g. export PYTHON_JULIAPKG_EXE=$(which julia)), or unset PYTHON_JULIAPKG_OFFLINE so "
    "that `emu julia install` (python -m emu.cli julia install) installs Julia and emu's Julia packages once, with "
    "visible progress (several minutes).")
MISSING_MESSAGE = (
    "the julia backend needs juliacall, which is not installed: pip install -e \".[julia]\" (in a checkout of emu; "
    "pip install \"emu[julia]\" otherwise); then `emu julia install` (python -m emu.cli julia install) installs Julia "
    "and emu's Julia packages once, with visible progress (several minutes).")


def _one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", ["simulate", "generate", "bench"])
def test_cli_fails_fast_without_julia_and_writes_nothing(tmp_path, command):
    if _julia_could_start_here():
        pytest.skip("juliacall is installed and may find a Julia here (PYTHON_JULIAPKG_EXE, PATH or online)")
    out = tmp_path / ("run.h5" if command == "simulate" else "data")
    args = {"simulate": ["simulate", "--grid", "16", "--steps", "4", "--out", str(out), "--no-plot"],
            "generate": ["generate", "--grid", "16", "--trajectories", "2", "--length", "2", "--spinup", "0",
                         "--downsample", "16", "--out", str(out), "--no-progress"],
            "bench": ["bench", "--system", "kolmogorov", "--grid", "16", "--seconds", "0.1", "--no-peers"]}[command]
    started = time.perf_counter()
    result = _run(["-m", "emu.cli", *args, "--backend", "julia"])
    elapsed = time.perf_counter() - started
    assert result.returncode == 1, result.stdout + result.stderr
    expected = MISSING_MESSAGE if not bridge.juliacall_installed() else OFFLINE_MESSAGE
    assert f"Error: {expected}" in _one_line(result.stderr), result.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s to fail"
    assert not out.exists(), f"{out} was written by a run that could not start"
    assert "steps/s" not in result.stdout and "->" not in result.stdout


@pytest.mark.parametrize("reason,expected", [
    ("offline", OFFLINE_MESSAGE),
    ("network", "Julia could not be started: juliapkg could not download Julia or emu's Julia packages "
                "(URLError: <urlopen error [Errno -2] Name or service not known>). Set PYTHON_JULIAPKG_EXE"),
    ("exe", "PYTHON_JULIAPKG_EXE=/bin/true is not a Julia executable: point it at the `julia` program"),
])
def test_cli_names_the_reason_julia_cannot_start(tmp_path, fake_juliacall, reason, expected):
    out = tmp_path / "run.h5"
    env = {"FAKE_JULIACALL_FAILURE": reason}
    if reason == "exe":
        env["PYTHON_JULIAPKG_EXE"] = "/bin/true"
    result = _run(["-m", "emu.cli", "simulate", "--backend", "julia", "--grid", "16", "--steps", "4",
                   "--out", str(out), "--no-plot"], env, pythonpath=[fake_juliacall])
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in _one_line(result.stderr), result.stderr
    assert not out.exists()


def test_start_failure_is_remembered_and_fast(monkeypatch):
    monkeypatch.setattr(bridge, "_MAIN", None)
    monkeypatch.setattr(bridge, "_FAILURE", None)
    monkeypatch.setattr(bridge, "juliacall_installed", lambda: False)
    for _ in range(2):
        with pytest.raises(BackendUnavailable, match=r'pip install -e "\.\[julia\]"'):
            bridge.start()
    assert bridge._FAILURE is not None


def test_julia_status_and_install_without_juliacall(tmp_path):
    if bridge.juliacall_installed():
        pytest.skip("juliacall is installed here")
    status = _run(["-m", "emu.cli", "julia", "status"])
    assert status.returncode == 0, status.stderr
    assert "juliacall" in status.stdout and 'pip install -e ".[julia]"' in status.stdout
    assert "python/emu/juliapkg.json" in status.stdout
    install = _run(["-m", "emu.cli", "julia", "install"])
    assert install.returncode == 1 and 'pip install -e ".[julia]"' in install.stderr


# -- juliapkg.json: found by juliapkg, points at the package in a checkout and in the wheel --------

def _juliapkg_discovery() -> list[Path]:
    """juliapkg's rule (juliapkg.deps.deps_files): `juliapkg.json` in each sys.path entry and one
    folder down, plus setuptools' editable finders' folders. The real function when installed."""
    try:
        from juliapkg.deps import deps_files

        return [Path(f).resolve() for f in deps_files()]
    except ImportError:
        pass
    found = []
    for entry in sys.path:
        folder = Path(entry or os.getcwd())
        if folder.is_dir():
            found += [folder / "juliapkg.json", *folder.glob("*/juliapkg.json")]
    for finder in sys.meta_path:
        mapping = getattr(sys.modules.get(type(finder).__module__), "MAPPING", None)
        if isinstance(mapping, dict):
            for folder in map(Path, mapping.values()):
                found += [folder / "juliapkg.json", *folder.glob("*/juliapkg.json")]
    return [f.resolve() for f in found if f.is_file()]


def test_juliapkg_finds_emus_juliapkg_json():
    assert bridge.juliapkg_json().resolve() in _juliapkg_discovery()
    deps = json.loads(bridge.juliapkg_json().read_text())
    emu_entry = deps["packages"]["Emu"]
    assert (bridge.juliapkg_json().parent / emu_entry["path"]).resolve() == (ROOT / "julia").resolve()


def test_built_package_points_juliapkg_at_the_bundled_julia_package(tmp_path):
    """setup.py's build step rewrites the path to emu/_resources/julia (where the wheel has the package)."""
    source_before = (ROOT / "python" / "emu" / "juliapkg.json").read_text()
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    built = tmp_path / "emu" / "juliapkg.json"
    deps = json.loads(built.read_text())
    target = (built.parent / deps["packages"]["Emu"]["path"]).resolve()
    assert target == (tmp_path / "emu" / "_resources" / "julia").resolve()
    assert (target / "Project.toml").is_file() and (target / "src" / "Emu.jl").is_file()
    assert deps["packages"]["Emu"]["dev"] is True
    assert (ROOT / "python" / "emu" / "juliapkg.json").read_text() == source_before, "the source file was changed"


# -- the plumbing, with a Python stand-in for the Julia package ------------------------------------

class FakeJulia:
    """Emu's Julia API implemented with emu's own numpy solver, taking arrays as the bridge hands
    them to Julia (dims reversed, same memory), so simulate/generate/bench run end to end."""

    def __init__(self):
        self.calls: list[str] = []

    def functions(self) -> dict:
        return {"make_problem": self.make_problem, "set_fields!": self.set_fields, "stepforward!": self.stepforward,
                "get_fields!": self.get_fields, "courant_number": self.courant_number,
                "all_finite": self.all_finite, "ddpm_step!": self.ddpm_step, "add_noise!": self.add_noise,
                "tweedie!": self.tweedie, "philox_normal!": self.philox_normal}

    def make_problem(self, config_json, batch, dtype, device, planner=None):
        from emu.backends import get_backend
        from emu.solvers import make_stepper
        from emu.systems import config_from_dict, make_equation

        assert isinstance(config_json, str) and isinstance(batch, int) and dtype in ("float32", "float64")
        assert device == "cpu"
        self.calls.append(f"make_problem(batch={batch}, planner={planner})")
        equation = make_equation(config_from_dict(json.loads(config_json)), get_backend("numpy", dtype=dtype))
        return {"equation": equation, "stepper": make_stepper(equation, equation.config.dt), "state": None}

    @staticmethod
    def _numpy_layout(julia_array: np.ndarray) -> np.ndarray:
        assert julia_array.flags.f_contiguous, "Julia arrays arrive column-major (dims reversed)"
        return julia_array.T

    def set_fields(self, problem, fields):
        self.calls.append("set_fields!")
        equation = problem["equation"]
        problem["state"] = problem["stepper"].init(equation.to_state(self._numpy_layout(fields)))

    def stepforward(self, problem, num_steps):
        self.calls.append(f"stepforward!({num_steps})")
        for _ in range(num_steps):
            problem["state"] = problem["stepper"].step(problem["state"])

    def get_fields(self, out, problem):
        self._numpy_layout(out)[...] = problem["equation"].fields(problem["state"].state_hat)
        return out

    def courant_number(self, problem):
        return problem["equation"].cfl(problem["state"].state_hat)

    def all_finite(self, problem):
        return bool(np.isfinite(problem["state"].state_hat).all())

    @staticmethod
    def _per_sample(vector, like):
        assert vector.dtype == np.float64 and vector.ndim == 1 and vector.size == like.shape[0]
        return vector.astype(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))

    def _noise(self, like, seed, offset):
        from emu.diffusion.philox import philox_normal

        assert isinstance(seed, np.uint64) and isinstance(offset, np.uint64)
        return philox_normal(like.shape, int(seed), int(offset), dtype=like.dtype)

    def ddpm_step(self, out, noisy, predicted_noise, rsa, c1, sigma, *rest):
        out, noisy, predicted_noise = map(self._numpy_layout, (out, noisy, predicted_noise))
        noise = self._noise(noisy, *rest) if len(rest) == 2 else self._numpy_layout(rest[0])
        out[...] = (self._per_sample(rsa, noisy) * (noisy - self._per_sample(c1, noisy) * predicted_noise)
                    + self._per_sample(sigma, noisy) * noise)

    def add_noise(self, out, clean, a, b, seed, offset):
        out, clean = map(self._numpy_layout, (out, clean))
        out[...] = self._per_sample(a, clean) * clean + self._per_sample(b, clean) * self._noise(clean, seed, offset)

    def tweedie(self, out, noisy, predicted_noise, a, b):
        out, noisy, predicted_noise = map(self._numpy_layout, (out, noisy, predicted_noise))
        out[...] = (noisy - self._per_sample(b, noisy) * predicted_noise) / self._per_sample(a, noisy)

    def philox_normal(self, out, seed, offset):
        out = self._numpy_layout(out)
        out[...] = self._noise(out, seed, offset)


@pytest.fixture
def fake_julia(monkeypatch):
    fake = FakeJulia()
    monkeypatch.setattr(bridge, "_MAIN", object())
    monkeypatch.setattr(bridge, "_FAILURE", None)
    monkeypatch.setattr(bridge, "_FUNCTIONS", fake.functions())
    monkeypatch.setattr(bridge, "as_julia", lambda array: array.T)  # what Julia sees: the same memory, dims reversed
    return fake


@pytest.mark.parametrize("system,grid,steps,save_every", [("kolmogorov", 16, 12, 5), ("qg", 16, 9, 4)])
def test_simulate_through_the_bridge_equals_the_numpy_run(tmp_path, fake_julia, system, grid, steps, save_every):
    import h5py

    from emu.runs import simulate
    from emu.systems import make_config

    config = make_config(system, grid_size=grid)
    runs = {}
    for backend in ("numpy", "julia"):
        result = simulate(config, out=tmp_path / f"{backend}.h5", backend=backend, steps=steps, save_every=save_every,
                          batch=2, seed=3, progress=False)
        assert result.status == "complete"
        with h5py.File(result.path) as handle:
            runs[backend] = (handle["fields"][...], handle["time"][...])
    fields_numpy, time_numpy = runs["numpy"]
    fields_julia, time_julia = runs["julia"]
    np.testing.assert_array_equal(time_julia, time_numpy)
    scale = np.abs(fields_numpy).max()
    assert np.abs(fields_julia - fields_numpy).max() <= 1e-10 * scale
    # The state stays in "Julia" between checks: one set_fields!, then chunks up to each check.
    assert fake_julia.calls.count("set_fields!") == 1
    chunks = [int(c[len("stepforward!("):-1]) for c in fake_julia.calls if c.startswith("stepforward!")]
    assert sum(chunks) == steps and max(chunks) == min(save_every, steps)


def test_generate_through_the_bridge_equals_the_numpy_dataset(tmp_path, fake_julia):
    import h5py

    from emu.generate import GenerationPlan, generate
    from emu.systems import make_config

    plan = GenerationPlan(make_config("kolmogorov", grid_size=16), trajectories=3, length=3, interval=4,
                          spinup_steps=6, downsample=16, batch=2, split=(1.0, 0.0, 0.0), seed=5)
    data = {}
    for backend in ("numpy", "julia"):
        [path] = generate(plan, tmp_path / backend, backend=backend)
        with h5py.File(path) as handle:
            data[backend] = handle["t0_fields"]["vorticity"][...]
    # Stored as float32: round-off differences in float64 may flip the last float32 bit.
    np.testing.assert_allclose(data["julia"], data["numpy"], rtol=0, atol=1e-6 * np.abs(data["numpy"]).max())
    assert "make_problem(batch=2, planner=FFTW_ESTIMATE)" in fake_julia.calls  # reproducible plans for datasets
    assert "make_problem(batch=1, planner=FFTW_ESTIMATE)" in fake_julia.calls  # the last, smaller batch


def test_julia_cannot_continue_a_multistep_history(tmp_path, fake_julia):
    from emu.runs import simulate
    from emu.systems import make_config
    from emu.systems.base import ConfigError

    first = simulate(make_config("qg", grid_size=16), out=tmp_path / "a.h5", backend="numpy", steps=4, save_every=2,
                     progress=False)
    with pytest.raises(ConfigError, match="cannot continue a multistep run"):
        simulate(None, init=first.path, out=tmp_path / "b.h5", backend="julia", steps=2, save_every=2, progress=False)
    # A Julia run's own file restarts (level 0, no history): valid with any backend.
    second = simulate(make_config("qg", grid_size=16), out=tmp_path / "c.h5", backend="julia", steps=4, save_every=2,
                      progress=False)
    for backend in ("julia", "numpy"):
        result = simulate(None, init=second.path, out=tmp_path / f"d_{backend}.h5", backend=backend, steps=2,
                          save_every=2, progress=False)
        assert result.status == "complete"


def test_bench_times_the_julia_solver(fake_julia):
    from emu.bench import run_benchmarks

    lines = []
    rows = run_benchmarks(system="kolmogorov", preset=None, backends=["julia"], grids=[16], dtype="float64", batch=1,
                          seconds=0.05, peers=False, pyqg_python=None, device=None, echo=lines.append)
    assert rows and rows[0]["solver"] == "emu julia" and rows[0]["steps_per_second"] > 0
    assert any(c == "stepforward!(10)" for c in fake_julia.calls)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_kernels_cross_the_bridge_in_numpys_layout(fake_julia, dtype):
    import torch

    from emu.diffusion.philox import philox_normal

    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(3, 2, 4, 6, generator=generator, dtype=getattr(torch, dtype))
    predicted = torch.randn(noisy.shape, generator=generator, dtype=noisy.dtype)
    rsa = torch.tensor([1.1, 1.2, 1.3], dtype=torch.float64)
    c1 = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).reshape(3, 1, 1, 1)
    sigma = 0.5
    seed, offset = 2**63 + 5, 7
    noise = torch.from_numpy(philox_normal(tuple(noisy.shape), seed, offset, dtype=dtype))
    expected = (rsa.reshape(3, 1, 1, 1).to(noisy.dtype) * (noisy - c1.to(noisy.dtype) * predicted)
                + torch.tensor(sigma, dtype=noisy.dtype) * noise)
    got = bridge.fused_ddpm_step(noisy, predicted, rsa, c1, sigma, seed, offset)
    assert got.shape == noisy.shape and got.dtype == noisy.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(bridge.fused_ddpm_step_with_noise(noisy, predicted, rsa, c1, sigma, noise), expected,
                               rtol=0, atol=0)
    torch.testing.assert_close(bridge.philox_normal(tuple(noisy.shape), seed, offset, dtype=dtype), noise, rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch = 3"):
        bridge.fused_ddpm_step(noisy, predicted, torch.ones(2), c1, sigma, seed, offset)
    with pytest.raises(ValueError, match="seed"):
        bridge.fused_ddpm_step(noisy, predicted, rsa, c1, sigma, -1, offset)


# -- the real Julia package (skipped where Julia cannot start) -------------------------------------

@pytest.fixture(scope="module")
def julia_runtime():
    # pytest has imported torch while collecting the other test modules, so `start` would refuse to
    # import juliacall after it: these tests accept juliacall's warning (EMU_JULIA_AFTER_TORCH=warn).
    previous = os.environ.get("EMU_JULIA_AFTER_TORCH")
    os.environ["EMU_JULIA_AFTER_TORCH"] = "warn"
    try:
        return bridge.start()
    except BackendUnavailable as error:
        pytest.skip(f"Julia cannot start here: {error}")
    finally:
        if previous is None:
            os.environ.pop("EMU_JULIA_AFTER_TORCH", None)
        else:
            os.environ["EMU_JULIA_AFTER_TORCH"] = previous


@pytest.mark.julia
@pytest.mark.parametrize("system", ["kolmogorov", "qg"])
@pytest.mark.parametrize("dtype,tolerance", [("float64", 1e-10), ("float32", 1e-4)])
def test_julia_solver_matches_the_python_solver(julia_runtime, system, dtype, tolerance):
    from emu.backends import get_backend
    from emu.solvers import make_stepper
    from emu.systems import make_config, make_equation

    config = make_config(system, grid_size=32)
    equation = make_equation(config, get_backend("numpy", dtype=dtype, reproducible=True))
    stepper = make_stepper(equation, config.dt)
    fields = equation.initial_condition(2, seed=1)
    solver = bridge.JuliaSolver(config, batch=2, dtype=dtype, reproducible=True)
    solver.set_fields(fields)
    state = stepper.init(equation.to_state(fields))
    for _ in range(20):
        state = stepper.step(state)
    solver.step(20)
    expected = equation.fields(state.state_hat)
    got = solver.fields()
    assert got.dtype == np.dtype(dtype) and got.shape == expected.shape
    assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()
    assert solver.all_finite()
    assert abs(solver.courant_number() - equation.cfl(state.state_hat)) <= tolerance * equation.cfl(state.state_hat)


@pytest.mark.julia
def test_julia_fused_ddpm_step_matches_the_reference(julia_runtime):
    import torch

    from emu.diffusion.philox import philox_normal

    noisy = torch.randn(2, 1, 8, 8, dtype=torch.float32)
    predicted = torch.randn_like(noisy)
    rsa, c1, sigma = torch.tensor([1.01, 1.2]), torch.tensor([0.05, 0.3]), torch.tensor([0.1, 0.0])
    noise = torch.from_numpy(philox_normal((2, 1, 8, 8), 11, 3))
    expected = (rsa.reshape(2, 1, 1, 1) * (noisy - c1.reshape(2, 1, 1, 1) * predicted)
                + sigma.reshape(2, 1, 1, 1) * noise)
    torch.testing.assert_close(bridge.fused_ddpm_step(noisy, predicted, rsa, c1, sigma, 11, 3), expected,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bridge.philox_normal((2, 1, 8, 8), 11, 3), noise, rtol=0, atol=0)


@pytest.mark.julia
def test_cli_simulate_with_julia_writes_a_complete_file(julia_runtime, tmp_path):
    out = tmp_path / "k.h5"
    result = _run(["-m", "emu.cli", "simulate", "--backend", "julia", "--grid", "32", "--steps", "20",
                   "--out", str(out), "--no-plot", "--no-progress"], {"PYTHON_JULIAPKG_OFFLINE": "yes"})
    assert result.returncode == 0, result.stderr
    import h5py

    with h5py.File(out) as handle:
        assert handle.attrs["status"] in ("complete", b"complete")
