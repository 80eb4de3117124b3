"""Every bad input fails before any work, with a message naming the field and what it allows.

Each case is checked twice: through the Python API (the exception type and its message) and through
the command line (non-zero exit, the same message, no traceback, and no file written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
from click.testing import CliRunner

from emu.backends import BackendUnavailable, get_backend
from emu.cli import main
from emu.runs import simulate
from emu.systems import ConfigError, make_config


def _run(tmp_path, config=None, **options):
    """runs.simulate on a small valid Kolmogorov setup unless `config`/`options` say otherwise."""
    config = config or make_config("kolmogorov", grid_size=32)
    return simulate(config, out=tmp_path / "out.h5", **dict(dict(steps=2, save_every=1, progress=False), **options))


def _cupy_can_run() -> bool:
    try:
        from emu.cuda import require_cupy

        require_cupy()
    except BackendUnavailable:
        return False
    return True


# What --backend cupy says on a machine where it cannot run: no CuPy (this repository's CI), or CuPy
# without a usable GPU.
try:
    import cupy  # noqa: F401

    _CUPY_MISSING = ["CuPy is installed but finds no usable CUDA device"]
except ImportError:
    _CUPY_MISSING = ["CuPy is not installed", 'pip install -e ".[gpu]"', "--backend torch/numpy"]


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available()


@dataclass
class Case:
    id: str
    api: Callable  # api(tmp_path) must raise `error`
    error: type
    cli: list[str]  # simulate options that must fail the same way
    fragments: list[str]  # in the API message and in the CLI output
    cli_fragments: list[str] | None = None  # when the CLI words it differently (click's own checks)
    marks: list = field(default_factory=list)


CASES = [
    Case("negative-viscosity", lambda t: make_config("kolmogorov", viscosity=-1e-3), ConfigError,
         ["--set", "viscosity=-1e-3"], ["viscosity must be >= 0", "-0.001"]),
    Case("negative-drag", lambda t: make_config("kolmogorov", drag=-0.1), ConfigError,
         ["--set", "drag=-0.1"], ["drag must be >= 0", "-0.1"]),
    Case("negative-bottom-drag", lambda t: make_config("qg", bottom_drag=-1e-7), ConfigError,
         ["--system", "qg", "--set", "bottom_drag=-1e-7"], ["bottom_drag must be >= 0", "-1e-07"]),
    Case("grid-not-power-of-two", lambda t: make_config("kolmogorov", grid_size=100), ConfigError,
         ["--grid", "100"], ["grid_size must be a power of two between 8 and 8192", "100"]),
    Case("grid-too-small", lambda t: make_config("qg", grid_size=4), ConfigError,
         ["--system", "qg", "--grid", "4"], ["grid_size must be a power of two between 8 and 8192", "got 4"]),
    Case("dt-zero", lambda t: make_config("kolmogorov", dt=0.0), ConfigError,
         ["--dt", "0"], ["dt must be > 0", "got 0.0"]),
    Case("dt-negative-qg", lambda t: make_config("qg", dt=-3600.0), ConfigError,
         ["--system", "qg", "--dt", "-3600"], ["dt must be > 0", "-3600"]),
    Case("dt-not-finite", lambda t: make_config("kolmogorov", dt=float("nan")), ConfigError,
         ["--dt", "nan"], ["dt must be a finite number", "nan"]),
    Case("unknown-preset", lambda t: make_config("kolmogorov", "re42"), ConfigError,
         ["--preset", "re42"], ["preset must be one of", "re1000", "re10000", "re42"]),
    Case("unknown-preset-qg", lambda t: make_config("qg", "eddies"), ConfigError,
         ["--system", "qg", "--preset", "eddies"], ["preset must be one of", "'eddy'", "'jet'", "eddies"]),
    Case("unknown-system", lambda t: make_config("navier"), ConfigError,
         ["--system", "navier"], ["system must be one of", "kolmogorov", "qg", "navier"],
         cli_fragments=["Invalid value for '--system'", "'navier' is not one of 'kolmogorov', 'qg'"]),
    Case("unknown-set-field", lambda t: make_config("kolmogorov", visc=1e-3), ConfigError,
         ["--set", "visc=1e-3"], ["unknown kolmogorov parameter(s) ['visc']", "allowed:", "'viscosity'"]),
    Case("viscosity-not-a-number", lambda t: make_config("kolmogorov", viscosity="abc"), ConfigError,
         ["--set", "viscosity=abc"], ["viscosity must be a finite number", "'abc'"]),
    Case("bad-qg-filter", lambda t: make_config("qg", filter="gaussian"), ConfigError,
         ["--system", "qg", "--set", "filter=gaussian"],
         ["filter must be one of ('exponential', 'sharp', 'none')", "gaussian"]),
    Case("beta-nan", lambda t: make_config("qg", beta=float("nan")), ConfigError,
         ["--system", "qg", "--set", "beta=NaN"], ["beta must be a finite number", "nan"]),
    Case("beta-infinite", lambda t: make_config("qg", beta=float("inf")), ConfigError,
         ["--system", "qg", "--set", "beta=Infinity"], ["beta must be a finite number", "inf"]),
    Case("beta-text", lambda t: make_config("qg", beta="nan"), ConfigError,
         ["--system", "qg", "--set", "beta=nan"], ["beta must be a finite number", "'nan'"]),
    Case("forcing-wavenumber-too-large", lambda t: make_config("kolmogorov", grid_size=32, forcing_wavenumber=11),
         ConfigError, ["--grid", "32", "--set", "forcing_wavenumber=11"],
         ["forcing_wavenumber must be an integer in [0, grid_size/3) = [0, 10)", "got 11"]),
    Case("batch-zero", lambda t: _run(t, batch=0), ConfigError,
         ["--batch", "0"], ["batch must be an integer >= 1", "got 0"]),
    Case("steps-negative", lambda t: _run(t, steps=-5), ConfigError,
         ["--steps", "-5"], ["steps must be an integer >= 0", "got -5"]),
    Case("save-every-zero", lambda t: _run(t, save_every=0), ConfigError,
         ["--save-every", "0"], ["save_every must be an integer >= 1", "got 0"]),
    Case("downsample-larger-than-grid", lambda t: _run(t, downsample=64), ConfigError,
         ["--grid", "32", "--downsample", "64"],
         ["downsample must be an even grid size between 4 and the solver grid 32", "got 64"]),
    Case("downsample-odd", lambda t: _run(t, downsample=15), ConfigError,
         ["--grid", "32", "--downsample", "15"], ["downsample must be an even grid size", "got 15"]),
    Case("perturb-negative", lambda t: _run(t, perturb=-0.1), ConfigError,
         ["--perturb", "-0.1"], ["perturb must be >= 0", "-0.1"]),
    Case("unknown-backend", lambda t: _run(t, backend="jax"), ValueError,
         ["--backend", "jax"], ["backend must be one of", "numpy", "torch", "jax"],
         cli_fragments=["Invalid value for '--backend'", "'jax' is not one of", "'numpy'", "'torch'"]),
    Case("backend-cupy", lambda t: _run(t, backend="cupy"), BackendUnavailable,
         ["--backend", "cupy"], _CUPY_MISSING,
         marks=[pytest.mark.skipif(_cupy_can_run(), reason="CuPy runs on this machine's GPU")]),
    Case("cupy-on-cpu", lambda t: _run(t, backend="cupy", device="cpu"), ValueError,
         ["--backend", "cupy", "--device", "cpu"], ["the cupy backend runs on 'cuda' or 'cuda:N'", "'cpu'"]),
    Case("backend-julia", lambda t: _run(t, backend="julia"), BackendUnavailable,
         ["--backend", "julia"], ["julia", "install"]),  # juliacall missing, or Julia cannot start here
    Case("unknown-dtype", lambda t: _run(t, dtype="float16"), ValueError,
         ["--dtype", "float16"], ["dtype must be one of", "float32", "float64", "float16"],
         cli_fragments=["Invalid value for '--dtype'", "'float16' is not one of"]),
    Case("cuda-without-gpu", lambda t: _run(t, backend="torch", device="cuda"), BackendUnavailable,
         ["--backend", "torch", "--device", "cuda"], ["--device cuda", "no CUDA device", "--device cpu"],
         marks=[pytest.mark.skipif(_torch_has_cuda(), reason="this machine has a CUDA GPU")]),
    Case("torch-unknown-device", lambda t: _run(t, backend="torch", device="tpu"), ValueError,
         ["--backend", "torch", "--device", "tpu"], ["device must be 'cpu', 'cuda' or 'cuda:N'", "'tpu'"]),
    Case("numpy-on-cuda", lambda t: _run(t, device="cuda"), ValueError,
         ["--backend", "numpy", "--device", "cuda"], ["device: the numpy backend runs on 'cpu' only", "'cuda'"]),
]


def _params():
    return [pytest.param(case, id=case.id, marks=case.marks) for case in CASES]


@pytest.mark.parametrize("case", _params())
def test_api_rejects_bad_input(case, tmp_path):
    with pytest.raises(case.error) as caught:
        case.api(tmp_path)
    message = str(caught.value)
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"
    assert list(tmp_path.iterdir()) == [], "a file was written before the input was checked"


def _invoke(tmp_path, options):
    options = list(options)
    if "--steps" not in options:
        options += ["--steps", "2"]
    if "--grid" not in options:
        options += ["--grid", "16"]
    args = ["simulate", "--no-progress", "--out", str(tmp_path / "out.h5"), "--plot", str(tmp_path / "out.png"), *options]
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("case", _params())
def test_cli_rejects_bad_input(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke(tmp_path, case.cli)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in result.output
    assert "Error: " in result.output
    for fragment in case.cli_fragments or case.fragments:
        assert fragment in result.output, f"{fragment!r} missing from {result.output!r}"
    assert list(tmp_path.iterdir()) == [], "a file was written before the input was checked"


# -- --init: the stored run constrains what may change --------------------------------------------

@pytest.fixture(scope="module")
def init_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "start.h5"
    simulate(make_config("kolmogorov", grid_size=16), out=path, steps=2, save_every=1, batch=2, progress=False)
    return path


@pytest.mark.parametrize("options, fragments", [
    (["--set", "visc=1e-3"], ["unknown kolmogorov parameter(s) ['visc']", "'viscosity'"]),
    (["--set", "viscosity=-1"], ["viscosity must be >= 0", "-1"]),
    (["--dt", "-0.1"], ["dt must be > 0", "-0.1"]),
    (["--grid", "32"], ["grid:", "16^2 grid", "--init continues on that grid"]),
    (["--batch", "3"], ["batch must be 2", "got 3"]),
], ids=["unknown-field", "bad-value", "bad-dt", "other-grid", "batch-mismatch"])
def test_cli_rejects_bad_changes_to_an_init_run(init_file, tmp_path, options, fragments):
    out = tmp_path / "continued.h5"
    result = CliRunner().invoke(main, ["simulate", "--init", str(init_file), "--steps", "2", "--no-progress",
                                       "--out", str(out), "--plot", str(tmp_path / "c.png"), *options])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, f"{fragment!r} missing from {result.output!r}"
    assert list(tmp_path.iterdir()) == []


def test_cli_set_needs_name_and_value(tmp_path):
    result = _invoke(tmp_path, ["--set", "viscosity"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--set" in result.output and "expected NAME=VALUE, got 'viscosity'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_init_file_must_exist(tmp_path):
    result = CliRunner().invoke(main, ["simulate", "--init", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "x.h5")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert list(tmp_path.iterdir()) == []


def test_get_backend_messages():
    with pytest.raises(ValueError, match=r"backend must be one of \('numpy', 'torch', 'cupy', 'julia'\), got 'jax'"):
        get_backend("jax")
    # No Julia on test machines: juliacall is missing (CI) or cannot start Julia offline.
    with pytest.raises(BackendUnavailable, match=r"julia backend needs juliacall|Julia could not be started"):
        get_backend("julia")
    if not _cupy_can_run():
        with pytest.raises(BackendUnavailable) as caught:
            get_backend("cupy")
        assert all(fragment in str(caught.value) for fragment in _CUPY_MISSING), str(caught.value)
