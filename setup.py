"""Build hook: copy the Julia package and the CUDA sources into the wheel.

`julia/`, `kernels/` and the top-level `Project.toml` live beside `python/` in the repository (the
product's shape), but an installed emu must still find them. `build_py` copies them into
`emu/_resources/` inside the build directory only; the source tree is never touched. An editable
install (`pip install -e .`) reads them straight from the repository instead (see
`emu.resources`). The wheel's `emu/juliapkg.json` is rewritten to point juliapkg at the copy.
"""

import json
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithResources(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "emu" / "_resources"
        for name in ("julia", "kernels"):
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, target / name, dirs_exist_ok=True)
        if (ROOT / "Project.toml").is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / "Project.toml", target / "Project.toml")
        point_juliapkg_at_resources(Path(self.build_lib) / "emu" / "juliapkg.json")


def point_juliapkg_at_resources(path: Path) -> None:
    """In the wheel, emu/juliapkg.json's local Julia package is `_resources/julia` beside it (in the
    repository it is `../../julia`, which an editable install uses as is)."""
    if not path.is_file():
        return
    deps = json.loads(path.read_text())
    for package in deps.get("packages", {}).values():
        if package.get("path") == "../../julia":
            package["path"] = "_resources/julia"
    path.write_text(json.dumps(deps, indent=4) + "\n")


setup(cmdclass={"build_py": BuildPyWithResources})
