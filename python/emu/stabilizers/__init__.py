"""Stabilisers: methods that keep long emulator rollouts on the attractor, one module per method.

Each module holds its method's training objective, inference algorithm and level calibration or
tuning, built on the shared schedules and DDPM step (`emu.diffusion`) and networks (`emu.models`),
the way diffusers gives every method a pipeline over shared models and schedulers:

    thermalizer   Pedersen, Zanna & Bruna (2025): adaptive DDPM denoising toward the invariant measure
    sns           Liu et al. (2025): self-refining conditional diffusion over (previous, current) pairs
                  with a multi-noise-level oracle that predicts both noise levels itself

The rollout engine calls any of them through one protocol (`base.Stabilizer`):
`state, record = stabilizer.correct(state, history)`. `load_stabilizer("thermalizer:CKPT", ...)` is
the one door from a command-line spec (`rollout --stabilizer thermalizer:th/last.pt`,
`--stabilizer sns:sns/last.pt`). `levels` holds what both methods' level heads train with.

Layer: imports `emu.diffusion`, `emu.models`, `emu.data` and the shared training loop; the CLI and
the rollout code import this package, never the other way round.
"""

from __future__ import annotations

from emu.stabilizers.base import RolloutHistory, Stabilizer, StepRecords

METHODS = ("thermalizer", "sns")

# The options each method's `from_checkpoint` takes (a command line naming another method's option
# is refused by name instead of being ignored).
OPTIONS = {
    "thermalizer": ("s_init", "s_stop", "runaway_level", "fixed_level", "fresh_noise"),
    "sns": ("path", "activation_threshold", "runaway_level", "mode"),
}


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
    the method's (`OPTIONS`; None values are left to the method's defaults); another method's option
    is a ValueError naming it."""
    from pathlib import Path

    method, checkpoint = parse_spec(spec)
    options = {name: value for name, value in options.items() if value is not None}
    foreign = sorted(set(options) - set(OPTIONS[method]))
    if foreign:
        owners = sorted({other for name in foreign for other, names in OPTIONS.items() if name in names} - {method})
        raise ValueError(f"options {foreign} do not apply to {method} (they are {' and '.join(owners) or 'unknown'} "
                         f"options); {method} takes {', '.join(OPTIONS[method])}")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--stabilizer {spec}: no such checkpoint {checkpoint}")
    if method == "thermalizer":
        from emu.stabilizers.thermalizer import ThermalizerStabilizer

        return ThermalizerStabilizer.from_checkpoint(checkpoint, normalizer, device, seed=seed, **options)
    if method == "sns":
        from emu.stabilizers.sns import SNSStabilizer

        return SNSStabilizer.from_checkpoint(checkpoint, normalizer, device, seed=seed, **options)
    raise AssertionError(method)  # parse_spec admits only METHODS


__all__ = ["METHODS", "OPTIONS", "RolloutHistory", "Stabilizer", "StepRecords", "load_stabilizer", "parse_spec"]
