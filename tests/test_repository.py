"""The repository's promises: README commands, Julia sources that lint, resources in the wheel."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "\npip install -e . && python -m emu.cli simulate\n" in readme
    assert '\npip install -e ".[test]" && python -m pytest\n' in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci and "README.md" in ci


def test_readme_says_how_to_get_the_cpu_torch_before_the_first_command():
    readme = (ROOT / "README.md").read_text()
    hint = readme.find("pip install torch==2.13.0")
    assert hint != -1 and hint < readme.index("\npip install -e . && python -m emu.cli simulate\n")


def test_every_cli_command_is_in_the_readme():
    from emu.cli import main

    readme = (ROOT / "README.md").read_text()
    for command in main.commands:
        assert f"python -m emu.cli {command}" in readme, f"README lacks an example of `{command}`"


def _julia_files() -> list[str]:
    """julia/**/*.jl and scripts/*.jl, the Julia code CI lints; fatou must be there in CI (CI=true)."""
    if shutil.which("fatou") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail('fatou is not installed but CI=true: pip install -e ".[test]" installs it')
        pytest.skip("fatou (Julia linter, pip install fatou) is not installed")
    files = sorted(str(p) for p in (ROOT / "julia").rglob("*.jl")) + sorted(str(p) for p in (ROOT / "scripts").glob("*.jl"))
    assert files, "julia/ holds no .jl files"
    return files


def test_julia_sources_lint_clean():
    result = subprocess.run(["fatou", "lint", "--color", "never", *_julia_files()], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_julia_sources_are_formatted():
    result = subprocess.run(["fatou", "format", "--check", "--color", "never", *_julia_files()], capture_output=True,
                            text=True)
    assert result.returncode == 0, "run `fatou format julia scripts/*.jl`:\n" + result.stdout[-3000:] + result.stderr


def test_wheel_ships_julia_package_and_kernels(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    wheel = next(tmp_path.glob("emu-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "emu/_resources/julia/src/Emu.jl" in names
    assert "emu/_resources/julia/Project.toml" in names
    assert "emu/_resources/kernels/README.md" in names
    assert "emu/_resources/Project.toml" in names
    assert "emu/cli.py" in names


def test_resources_are_found_from_the_installed_package():
    from emu.resources import julia_package, kernels_dir

    assert (julia_package() / "src" / "Emu.jl").is_file()
    assert (kernels_dir() / "README.md").is_file()
