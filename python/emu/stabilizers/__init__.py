"""Stabilisers: methods that keep long emulator rollouts on the attractor, one module per method.

Each module holds its method's training objective, inference algorithm and level calibration or
tuning, built on the shared schedules and DDPM step (`emu.diffusion`) and networks (`emu.models`),
the way diffusers gives every method a pipeline over shared models and schedulers:

    thermalizer   Pedersen, Zanna & Bruna (2025): adaptive DDPM denoising toward the invariant measure

The rollout engine calls any of them through one protocol (`base.Stabilizer`):
`state, record = stabilizer.correct(state, history)`. `load_stabilizer("thermalizer:CKPT", ...)` is
the one door from a command-line spec (`rollout --stabilizer thermalizer:th/last.pt`).

Layer: imports `emu.diffusion`, `emu.models`, `emu.data` and the shared training loop; the CLI and
the rollout code import this package, never the other way round.
"""

from __future__ import annotations

from emu.stabilizers.base import RolloutHistory, Stabilizer, StepRecords

METHODS = ("thermalizer",)


def parse_spec(spec: str) -> tuple[str, str]:
    """'thermalizer:th/last.pt' -> ('thermalizer', 'th/last.pt'); a clear error otherwise."""
    method, separator, checkpoint = str(spec).partition(":")
    if not separator or method not in METHODS or not checkpoint:
        raise ValueError(f"--stabilizer must be METHOD:CHECKPOINT with METHOD one of {', '.join(METHODS)}, "
                         f"e.g. thermalizer:th/last.pt; got {spec!r}")
    return method, checkpoint


def load_stabilizer(spec: str, normalizer, device, *, seed: int = 0, **options) -> Stabilizer:
    """The stabiliser named by `spec` (METHOD:CHECKPOINT), on `device`, for states normalised by
    `normalizer` (the emulator's; a checkpoint trained on other statistics is refused). `options` are
    the method's (thermalizer: s_init, s_stop, runaway_level, fixed_level, fresh_noise)."""
    from pathlib import Path

    method, checkpoint = parse_spec(spec)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--stabilizer {spec}: no such checkpoint {checkpoint}")
    if method == "thermalizer":
        from emu.stabilizers.thermalizer import ThermalizerStabilizer

        return ThermalizerStabilizer.from_checkpoint(checkpoint, normalizer, device, seed=seed, **options)
    raise AssertionError(method)  # parse_spec admits only METHODS


__all__ = ["METHODS", "RolloutHistory", "Stabilizer", "StepRecords", "load_stabilizer", "parse_spec"]
