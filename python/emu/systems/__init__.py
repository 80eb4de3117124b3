"""The two systems emu solves, each a frozen config plus an equation on a grid.

    make_config("kolmogorov", preset="re1000", grid_size=256)
    make_equation(config, backend)
"""

from __future__ import annotations

from typing import Any

from emu.systems.base import ConfigError, SystemConfig
from emu.systems.kolmogorov import KolmogorovConfig, KolmogorovEquation
from emu.systems.qg import QGConfig, QGEquation

SYSTEMS = {
    "kolmogorov": (KolmogorovConfig, KolmogorovEquation),
    "qg": (QGConfig, QGEquation),
}


def _lookup(system: str):
    if system not in SYSTEMS:
        raise ConfigError(f"system must be one of {tuple(SYSTEMS)}, got {system!r}")
    return SYSTEMS[system]


def make_config(system: str, preset: str | None = None, **overrides: Any) -> SystemConfig:
    """The config of `system` from `preset` (its default when None) with `overrides` applied."""
    config_class, _ = _lookup(system)
    return config_class.from_preset(preset, **overrides)


def config_from_dict(values: dict[str, Any]) -> SystemConfig:
    """Rebuilds a config from `to_dict()` output (e.g. the JSON stored in an emu file)."""
    config_class, _ = _lookup(values.get("system"))
    return config_class.from_dict(values)


def make_equation(config: SystemConfig, backend):
    """The equation object of `config`'s system on `backend`."""
    _, equation_class = _lookup(config.system)
    return equation_class(config, backend)


__all__ = ["SYSTEMS", "ConfigError", "KolmogorovConfig", "KolmogorovEquation", "QGConfig", "QGEquation",
           "make_config", "config_from_dict", "make_equation"]
