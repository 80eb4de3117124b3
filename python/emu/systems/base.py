"""What every system config shares: validation helpers, JSON round trip, presets.

A system config is a frozen dataclass holding the physical and numerical parameters of one system.
It validates itself on construction (a bad value fails before any work, with a message naming the
field and the allowed range) and is written as JSON into every HDF5 file and checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar


class ConfigError(ValueError):
    """An invalid parameter; the message names the field and its allowed range."""


def require(condition: bool, field: str, allowed: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{field} must be {allowed}, got {value!r}")


def require_finite(field: str, value: Any) -> None:
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            field, "a finite number", value)


def require_positive(field: str, value: Any) -> None:
    require_finite(field, value)
    require(value > 0, field, "> 0", value)


def require_nonnegative(field: str, value: Any) -> None:
    require_finite(field, value)
    require(value >= 0, field, ">= 0", value)


def require_power_of_two(field: str, value: Any, minimum: int = 8, maximum: int = 8192) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum and value & (value - 1) == 0
    require(ok, field, f"a power of two between {minimum} and {maximum}", value)


def require_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    require(value in choices, field, f"one of {choices}", value)


class SystemConfig:
    """Mixin for the frozen dataclass configs (`KolmogorovConfig`, `QGConfig`)."""

    system: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]]

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        values = dict(values)
        system = values.pop("system", cls.system)
        if system != cls.system:
            raise ConfigError(f"system must be {cls.system!r} for {cls.__name__}, got {system!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.system} parameter(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_preset(cls, preset: str | None = None, **overrides):
        """The named preset with `overrides` applied (None values are ignored)."""
        preset = preset or cls.default_preset
        require_choice("preset", preset, tuple(cls.presets))
        values = dict(cls.presets[preset], preset=preset)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
