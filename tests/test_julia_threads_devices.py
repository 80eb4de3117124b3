"""The Julia bridge's start-up, threads, devices and GPU routing (issue 16), checked without Julia or a GPU.

  - import order: `emu.julia.start` never imports juliacall after torch (juliacall warns that may
    segfault) unless EMU_JULIA_AFTER_TORCH=warn; the CLI imports juliacall before torch;
  - threads: Julia gets emu's `--threads` count (1 by default) unless the user set one, and the Julia
    package plans its CPU FFTs on Julia's threads (FFTW.jl's `num_threads`) as Python's FFTWPlans do;
  - GPU DDPM: fused calls on CUDA tensors run emu's CuPy kernels (here: their host build, as in
    tests/test_kernels.py), Julia's only when asked or, with a warning, where CuPy cannot run;
  - `cuda:N`: the index reaches Julia (`make_problem`, `CUDA.device!`) and is range-checked;
  - the CUDA testset of julia/test/runtests.jl is reachable from Pkg.test().

The Julia side (devices.jl, problem.jl, the CUDA extension) is checked on fatou's syntax tree; the
behaviour itself is tested by julia/test/runtests.jl where Julia runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import emu.julia as bridge
import julia_structure as js
from emu.backends import BackendUnavailable
from test_kernels import host_kernels, host_launches  # noqa: F401  (fixtures: ddpm.cu built for the host)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "julia"
THREAD_VARIABLES = ("PYTHON_JULIACALL_THREADS", "PYTHON_JULIACALL_HANDLE_SIGNALS", "JULIA_NUM_THREADS",
                    "EMU_JULIA_AFTER_TORCH")


@pytest.fixture
def clean_environment(monkeypatch):
    """The variables `start` reads or sets, unset for the test and restored after it."""
    for name in THREAD_VARIABLES:
        monkeypatch.setenv(name, "placeholder")  # records the original value (or its absence) for restoring
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "_xoptions", {k: v for k, v in sys._xoptions.items() if k != "juliacall-threads"})


@pytest.fixture
def fresh_bridge(monkeypatch, clean_environment):
    """emu.julia as before its first start, with juliacall reported installed."""
    monkeypatch.setattr(bridge, "_MAIN", None)
    monkeypatch.setattr(bridge, "_FAILURE", None)
    monkeypatch.setattr(bridge, "_FUNCTIONS", {})
    monkeypatch.setattr(bridge, "_CUDA_HELPERS", None)
    monkeypatch.setattr(bridge, "_CPU_WRAP", None)
    monkeypatch.setattr(bridge, "juliacall_installed", lambda: True)
    original = sys.modules.pop("juliacall", None)
    yield
    # A fake juliacall imported by the test must not outlive it (later tests would "start" it).
    sys.modules.pop("juliacall", None)
    if original is not None:
        sys.modules["juliacall"] = original


FAKE_JULIACALL = textwrap.dedent("""
    # A stand-in for juliacall: records what the process looked like when it was imported, then
    # either fails as the real one does without Julia, or offers a `Main` whose seval echoes.
    import json, os, sys
    record = os.environ.get("FAKE_JULIACALL_RECORD")
    if record:
        with open(record, "w") as handle:
            json.dump({"torch_imported": "torch" in sys.modules,
                       "threads": os.environ.get("PYTHON_JULIACALL_THREADS"),
                       "handle_signals": os.environ.get("PYTHON_JULIACALL_HANDLE_SIGNALS")}, handle)
    if os.environ.get("FAKE_JULIACALL_FAIL"):
        raise Exception("could not find Julia 1.10.3 - 1.11")

    class _Main:
        def seval(self, code):
            return code

    Main = _Main()
""")


@pytest.fixture
def fake_juliacall_path(tmp_path):
    package = tmp_path / "fake_juliacall" / "juliacall"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_JULIACALL)
    return package.parent


# -- 2. import order ---------------------------------------------------------------------------------

def test_start_refuses_to_import_juliacall_after_torch(fresh_bridge, fake_juliacall_path, monkeypatch, tmp_path):
    assert "torch" in sys.modules  # this module imports it, as emu.diffusion does
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_JULIACALL_RECORD", str(record))
    monkeypatch.syspath_prepend(str(fake_juliacall_path))
    with pytest.raises(BackendUnavailable) as caught:
        bridge.start()
    message = str(caught.value)
    for expected in ("torch is already imported", "may segfault", "import emu.julia; emu.julia.start()",
                     "before `import torch`", "EMU_JULIA_AFTER_TORCH=warn"):
        assert expected in message, message
    assert not record.exists(), "juliacall was imported after torch"
    assert "juliacall" not in sys.modules
    assert bridge._FAILURE is None, "setting EMU_JULIA_AFTER_TORCH and retrying must stay possible"


def test_start_after_torch_with_the_warn_policy_starts_and_warns(fresh_bridge, fake_juliacall_path, monkeypatch):
    monkeypatch.setenv("EMU_JULIA_AFTER_TORCH", "warn")
    monkeypatch.syspath_prepend(str(fake_juliacall_path))
    with pytest.warns(RuntimeWarning, match="EMU_JULIA_AFTER_TORCH=warn"):
        main = bridge.start()
    assert main is sys.modules["juliacall"].Main
    assert set(bridge._FUNCTIONS) == {name for name, _ in bridge.JULIA_CALLS}


def test_start_rejects_an_unknown_policy(fresh_bridge, monkeypatch):
    monkeypatch.setenv("EMU_JULIA_AFTER_TORCH", "ignore")
    with pytest.raises(ValueError, match=r"EMU_JULIA_AFTER_TORCH must be one of \('error', 'warn'\)"):
        bridge.start()


def test_a_juliacall_imported_by_the_user_is_used_as_is(fresh_bridge, fake_juliacall_path, monkeypatch):
    """Once juliacall is imported (by the user, first), `start` has no import-order decision to make."""
    monkeypatch.syspath_prepend(str(fake_juliacall_path))
    import juliacall

    assert bridge.start() is juliacall.Main


def _cli(args: list[str], fake: Path, record: Path, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(PYTHON_JULIAPKG_OFFLINE="yes", FAKE_JULIACALL_RECORD=str(record), FAKE_JULIACALL_FAIL="1",
               PYTHONPATH=os.pathsep.join([str(fake), env.get("PYTHONPATH", "")]), **env_extra)
    return subprocess.run([sys.executable, "-m", "emu.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120, check=False)


@pytest.mark.parametrize("command", ["simulate", "generate", "bench"])
def test_cli_imports_juliacall_before_torch_with_emus_threads(tmp_path, fake_juliacall_path, command):
    out = tmp_path / ("run.h5" if command == "simulate" else "data")
    args = {"simulate": ["simulate", "--grid", "16", "--steps", "4", "--out", str(out), "--no-plot"],
            "generate": ["generate", "--grid", "16", "--trajectories", "2", "--length", "2", "--spinup", "0",
                         "--downsample", "16", "--out", str(out), "--no-progress"],
            "bench": ["bench", "--system", "kolmogorov", "--grid", "16", "--seconds", "0.1", "--no-peers"]}[command]
    record = tmp_path / "record.json"
    result = _cli([*args, "--backend", "julia"], fake_juliacall_path, record)
    assert result.returncode == 1 and "found no Julia" in result.stderr, result.stdout + result.stderr
    seen = json.loads(record.read_text())
    assert seen == {"torch_imported": False, "threads": "1", "handle_signals": None}, seen


def test_cli_threads_option_becomes_julias_thread_count(tmp_path, fake_juliacall_path):
    record = tmp_path / "record.json"
    result = _cli(["simulate", "--threads", "2", "--grid", "16", "--steps", "4", "--out", str(tmp_path / "r.h5"),
                   "--no-plot", "--backend", "julia"], fake_juliacall_path, record)
    assert result.returncode == 1, result.stdout + result.stderr
    assert json.loads(record.read_text()) == {"torch_imported": False, "threads": "2", "handle_signals": "yes"}


# -- 1. threads ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("given,threads,handle_signals", [
    ({}, "1", None),                                                   # emu's default: one thread, Python's signals
    ({"cpu_threads": 3}, "3", "yes"),                                  # --threads 3
    ({"PYTHON_JULIACALL_THREADS": "auto"}, "auto", "yes"),             # the user's juliacall setting wins
    ({"PYTHON_JULIACALL_THREADS": "1", "cpu_threads": 4}, "1", None),
    ({"JULIA_NUM_THREADS": "4"}, None, "yes"),                         # Julia's own variable is left to Julia
    ({"cpu_threads": 2, "PYTHON_JULIACALL_HANDLE_SIGNALS": "no"}, "2", "no"),
    ({"xoption": "2"}, None, "yes"),                                   # python -X juliacall-threads=2
])
def test_julia_thread_defaults(clean_environment, monkeypatch, given, threads, handle_signals):
    import emu.backends

    given = dict(given)
    monkeypatch.setattr(emu.backends, "cpu_threads", lambda: given.pop("cpu_threads", 1))
    if "xoption" in given:
        monkeypatch.setattr(sys, "_xoptions", {**sys._xoptions, "juliacall-threads": given.pop("xoption")})
    for name, value in given.items():
        if name != "cpu_threads":
            monkeypatch.setenv(name, value)
    bridge._set_thread_defaults()
    assert os.environ.get("PYTHON_JULIACALL_THREADS") == threads
    assert os.environ.get("PYTHON_JULIACALL_HANDLE_SIGNALS") == handle_signals


def _calls(node, callee):
    """Every `(call callee ...)` under `node` (callee a symbol or a dotted pair like ['.', 'FFTW', 'x'])."""
    if not isinstance(node, list):
        return []
    found = [node] if node and node[0] == "call" and len(node) > 1 and node[1] == callee else []
    for child in node:
        found += _calls(child, callee)
    return found


def _function(tree, name):
    """The definition of function `name` (short or long form, with or without a docstring)."""
    for node in tree if isinstance(tree, list) else []:
        if isinstance(node, list) and node and node[0] in ("function", "function-=") and isinstance(node[1], list):
            signature = node[1]
            while isinstance(signature, list) and signature[0] == "where":
                signature = signature[1]
            if isinstance(signature, list) and signature[0] == "call" and signature[1] in (name, [".", "Emu", name]):
                return node
        found = _function(node, name)
        if found is not None:
            return found
    return None


@pytest.fixture(scope="module")
def julia_trees():
    if shutil.which("fatou") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("fatou is not installed but CI=true")
        pytest.skip("fatou (pip install fatou) is not installed")
    trees = {}
    for path in ("src/devices.jl", "src/problem.jl", "ext/EmuCUDAExt.jl"):
        tree, diagnostics = js.fatou_sexpr(PACKAGE / path)
        assert not diagnostics, diagnostics
        trees[path] = tree
    return trees


def test_julia_cpu_fft_plans_use_julias_threads_as_python_does(julia_trees):
    from emu.backends import FFTWPlans

    tree = julia_trees["src/devices.jl"]
    for planner, builder in (("plan_rfft", "rfft_plan"), ("plan_brfft", "brfft_plan")):
        definition = _function(tree, builder)
        assert definition is not None, f"devices.jl defines no {builder}"
        [plan_call] = _calls(definition, [".", "FFTW", planner])
        keywords = {k[1]: k[2] for p in plan_call if isinstance(p, list) and p[0] == "parameters" for k in p[1:]}
        assert "num_threads" in keywords, f"{builder}: FFTW.{planner} without num_threads runs on one thread"
        assert _calls(keywords["num_threads"], "fftw_threads"), keywords["num_threads"]
    threads = _function(tree, "fftw_threads")
    assert threads is not None and _calls(threads, [".", "Threads", "nthreads"]), "fftw_threads ignores julia -t N"
    assert "EMU_FFTW_THREADS" in str(threads), "fftw_threads must honour EMU_FFTW_THREADS as FFTWPlans does"
    [threshold] = [n for n in tree if isinstance(n, list) and n[0] == "const" and n[1][1] == "FFTW_THREADING_THRESHOLD"]
    value = threshold[1][2]
    assert value == ["call-i", "2", "^", "15"] and 2**15 == FFTWPlans.threading_threshold, value
    # FFTW.jl has had `num_threads` since 1.5: the package's compat must not admit older versions.
    compat = tomllib.loads((PACKAGE / "Project.toml").read_text())["compat"]["FFTW"]
    assert all(tuple(map(int, part.strip().lstrip("^~=").split(".")[:2])) >= (1, 5) for part in compat.split(",")), compat


# -- 4. cuda:N ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [(None, "cpu"), ("cpu", "cpu"), (" cpu ", "cpu"), ("cuda", "cuda:0"),
                                           ("cuda:0", "cuda:0"), ("cuda:3", "cuda:3")])
def test_solver_device_keeps_the_cuda_index(name, expected):
    assert bridge._solver_device(name) == expected


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA", "cuda:0:1"])
def test_solver_device_rejects_malformed_names(name):
    with pytest.raises(ValueError, match=r"--device must be 'cpu', 'cuda' or 'cuda:N'"):
        bridge._solver_device(name)


@pytest.fixture
def fake_cuda_julia(monkeypatch):
    """The bridge with a stand-in Julia whose CUDA.jl sees two GPUs; records calls in order."""
    calls = []
    current = {"device": 0}

    def select(index):
        calls.append(f"device!({index})")
        current["device"] = index

    def make_problem(config_json, batch, dtype, device, planner=None):
        calls.append(f"make_problem(device={device})")
        return {"device": device}

    functions = {name: (lambda *args, _name=name, **kw: calls.append(f"{_name} on GPU {current['device']}"))
                 for name, _ in bridge.JULIA_CALLS}
    functions["make_problem"] = make_problem
    monkeypatch.setattr(bridge, "_MAIN", object())
    monkeypatch.setattr(bridge, "_FAILURE", None)
    monkeypatch.setattr(bridge, "_FUNCTIONS", functions)
    monkeypatch.setattr(bridge, "_CUDA_HELPERS", bridge.CudaHelpers(
        wrap=lambda *args: calls.append("wrap"), synchronize=lambda: calls.append("CUDA.synchronize"),
        select=select, device_count=lambda: 2))
    return calls


def test_cuda_index_reaches_the_julia_problem(fake_cuda_julia):
    from emu.systems import make_config

    solver = bridge.JuliaSolver(make_config("kolmogorov", grid_size=16), batch=1, device="cuda:1")
    assert solver.problem == {"device": "cuda:1"} and solver.device == "cuda:1"
    assert bridge.JuliaSolver(make_config("kolmogorov", grid_size=16), batch=1, device="cuda").problem == {
        "device": "cuda:0"}
    fake_cuda_julia.clear()
    solver.synchronize()
    assert fake_cuda_julia == ["device!(1)", "CUDA.synchronize"]
    backend = bridge.julia_backend(device="cuda:1")
    assert backend.solver_device == "cuda:1" and backend.device == "cuda:1"


def test_cuda_index_past_the_last_gpu_is_refused_naming_the_gpus(fake_cuda_julia):
    from emu.systems import make_config

    message = r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0\.\.cuda:1"
    with pytest.raises(ValueError, match=message):
        bridge.JuliaSolver(make_config("kolmogorov", grid_size=16), batch=1, device="cuda:2")
    with pytest.raises(ValueError, match=message):
        bridge.julia_backend(device="cuda:2")
    assert not any(call.startswith("make_problem") for call in fake_cuda_julia)


def test_julia_gpu_kernel_runs_on_the_tensors_gpu(fake_cuda_julia, monkeypatch):
    """`_run_fused` on a CUDA output: that GPU made current, torch synchronised, the call, CUDA.jl synchronised."""

    class OnGPU1:  # stands in for a CUDA tensor (only its device is read for non-tensor arguments)
        device = torch.device("cuda:1")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: fake_cuda_julia.append(f"torch sync {device}"))
    bridge._run_fused("philox_normal!", OnGPU1(), np.uint64(1), np.uint64(2))
    assert fake_cuda_julia == ["device!(1)", "torch sync cuda:1", "philox_normal! on GPU 1", "CUDA.synchronize"]


def test_julia_devices_activate_the_problems_gpu(julia_trees):
    """make_device parses cuda:N as Python does; every bridge entry point activates the problem's
    device; the CUDA extension range-checks the index and calls CUDA.device!."""
    devices = julia_trees["src/devices.jl"]
    make_device = _function(devices, "make_device")
    assert make_device is not None and _calls(make_device, "activate!"), "make_device never selects the GPU"
    assert '"^(cpu|cuda(:[0-9]+)?)$"' in str(make_device).replace("'", '"'), "not the name rule of torch_device"
    problem = julia_trees["src/problem.jl"]
    for name in ("set_fields!", "stepforward!", "get_fields!", "courant_number", "all_finite", "Problem"):
        definition = _function(problem, name)
        assert definition is not None and _calls(definition, "activate!"), f"{name} does not activate its device"
    extension = julia_trees["ext/EmuCUDAExt.jl"]
    activate = _function(extension, "activate!")
    assert activate is not None, "EmuCUDAExt defines no Emu.activate!"
    assert _calls(activate, [".", "CUDA", "device!"]) and _calls(activate, [".", "CUDA", "devices"])
    assert "ArgumentError" in str(activate)


# -- 3. GPU DDPM calls run the CuPy kernels --------------------------------------------------------------

@pytest.fixture
def cupy_on_host(host_launches, monkeypatch):  # noqa: F811  (the fixture imported above)
    """CUDA-tensor routing on CPU tensors: emu.diffusion.fused launches ddpm.cu's host build
    (tests/test_kernels.py) and CuPy counts as usable; Julia cannot start, so any Julia call fails."""
    import emu.cuda

    monkeypatch.setattr(emu.cuda, "require_cupy", lambda: object())
    monkeypatch.setattr(bridge, "_MAIN", None)
    monkeypatch.setattr(bridge, "_FAILURE", "Julia is not reachable in this test")
    return host_launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_calls_on_gpu_tensors_run_the_cupy_kernels(cupy_on_host, dtype):
    from emu.diffusion.fused import fused_philox_normal

    generator = torch.Generator().manual_seed(4)
    noisy = torch.randn(3, 2, 5, 7, generator=generator, dtype=dtype)
    predicted = torch.randn(noisy.shape, generator=generator, dtype=dtype)
    rsa = torch.tensor([1.1, 1.2, 1.3], dtype=torch.float64)
    c2 = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).reshape(3, 1, 1, 1)
    sigma = 0.25  # a Python number, broadcast to the batch as on Julia's path
    seed, offset = 2**63 + 7, 5
    noise = fused_philox_normal(tuple(noisy.shape), seed, offset, dtype=dtype, device="cpu")
    cupy_on_host.clear()

    def per_sample(values):
        return torch.as_tensor(values, dtype=torch.float64).reshape(-1).expand(3).to(dtype).reshape(3, 1, 1, 1)

    expected = per_sample(rsa) * (noisy - per_sample(c2) * predicted) + per_sample(sigma) * noise
    got = bridge.fused_ddpm_step(noisy, predicted, rsa, c2, sigma, seed, offset)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(bridge.fused_ddpm_step_with_noise(noisy, predicted, rsa, c2, sigma, noise), expected,
                               rtol=0, atol=0)
    a, b = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64), torch.tensor([0.3, 0.5, 0.6], dtype=torch.float64)
    torch.testing.assert_close(bridge.fused_add_noise(noisy, a, b, seed, offset),
                               per_sample(a) * noisy + per_sample(b) * noise, rtol=0, atol=0)
    torch.testing.assert_close(bridge.fused_tweedie(noisy, predicted, a, b),
                               (noisy - per_sample(b) * predicted) / per_sample(a), rtol=0, atol=0)
    dtype_name = str(dtype).removeprefix("torch.")
    torch.testing.assert_close(bridge.philox_normal(tuple(noisy.shape), seed, offset, dtype=dtype_name), noise,
                               rtol=0, atol=0)
    suffix = {torch.float32: "f32", torch.float64: "f64"}[dtype]
    assert cupy_on_host == [f"ddpm_step_{suffix}", f"ddpm_step_noise_{suffix}", f"add_noise_philox_{suffix}",
                            f"tweedie_{suffix}", f"philox_normal_{suffix}"]
    with pytest.raises(ValueError, match="batch = 3"):
        bridge.fused_ddpm_step(noisy, predicted, torch.ones(2), c2, sigma, seed, offset)


def test_ddpm_step_with_the_julia_backend_on_gpu_tensors_runs_the_cupy_kernel(cupy_on_host, monkeypatch):
    from emu.diffusion import CosineSchedule, ddpm, ddpm_step

    monkeypatch.setattr(ddpm, "_require_julia", lambda: None)  # juliacall need not be installed for this route
    schedule = CosineSchedule(100)
    generator = torch.Generator().manual_seed(2)
    noisy = torch.randn(4, 1, 6, 6, generator=generator)
    predicted = torch.randn(noisy.shape, generator=generator)
    levels = torch.tensor([0, 5, 50, 99])
    got = ddpm_step(noisy, levels, predicted, schedule, backend="julia", seed=11, offset=3)
    reference = ddpm_step(noisy, levels, predicted, schedule, backend="torch", seed=11, offset=3)
    torch.testing.assert_close(got, reference, rtol=0, atol=0)
    assert cupy_on_host == ["ddpm_step_f32"]


def test_gpu_kernel_julia_and_a_missing_cupy_take_julias_kernel(cupy_on_host, monkeypatch):
    import emu.cuda

    noisy = torch.zeros(2, 4)
    arguments = (noisy, torch.zeros_like(noisy), torch.ones(2), torch.ones(2), torch.zeros(2), 1, 0)
    with pytest.raises(BackendUnavailable, match="Julia is not reachable"):
        bridge.fused_ddpm_step(*arguments, gpu_kernel="julia")

    def no_cupy():
        raise BackendUnavailable("CuPy is not installed (test).")

    monkeypatch.setattr(emu.cuda, "require_cupy", no_cupy)
    with (pytest.warns(RuntimeWarning, match=r"CuPy is not installed \(test\).*slower than torch's eager step"),
          pytest.raises(BackendUnavailable, match="Julia is not reachable")):
        bridge.fused_ddpm_step(*arguments)
    with pytest.raises(ValueError, match=r"gpu_kernel must be one of \('cupy', 'julia'\)"):
        bridge.fused_ddpm_step(*arguments, gpu_kernel="cuda")
    assert cupy_on_host == []


# -- 5. Pkg.test() reaches the CUDA testset ------------------------------------------------------------

def test_pkg_test_installs_cuda_for_the_tests_only():
    project = tomllib.loads((PACKAGE / "Project.toml").read_text())
    assert "CUDA" in project["targets"]["test"], "Pkg.test() would never install CUDA, so its testset never runs"
    assert "CUDA" in project["extras"] and "CUDA" in project["weakdeps"]
    assert "CUDA" not in project["deps"], "CUDA must stay a weak dependency for CPU users"
    runtests = (PACKAGE / "test" / "runtests.jl").read_text()
    assert 'if CUDA_WORKS\n        @testset "CUDA" begin' in runtests
    assert '@info "Skipping the CUDA tests: $CUDA_SKIP_REASON"' in runtests
