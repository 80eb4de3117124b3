"""Where the non-Python parts of emu live: the Julia package and the CUDA sources.

In a wheel they are copied into `emu/_resources/` (see setup.py); in a source checkout or an
editable install they are read from the repository root beside `python/`.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_path(name: str) -> Path:
    """Path of `julia`, `kernels` or `Project.toml`, wherever this emu was installed from."""
    for candidate in (_PACKAGE / "_resources" / name, _PACKAGE.parents[1] / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"emu resource {name!r} not found beside {_PACKAGE} (broken install?)")


def julia_package() -> Path:
    return resource_path("julia")


def kernels_dir() -> Path:
    return resource_path("kernels")
