"""Named networks and presets: build a model by name, rebuild it from a checkpoint's config.

    model = make_model("unet", "paper", in_channels=1, out_channels=1)      # 45.8M parameters
    model = make_model("drn", "small", 2, 2, hidden_channels=16)           # preset + overrides
    same = make_model(**model.config)                                      # e.g. from a checkpoint

Every model keeps its constructor arguments in `model.config`, a JSON-able dict that also names the
architecture ("arch") and the preset it came from ("preset", None when built directly). A checkpoint
stores that dict beside the state dict; `make_model(**config)` then rebuilds the architecture exactly,
because the config spells out every argument and overrides always win over the preset.

Parameter counts (one channel in and out; tests/test_models.py pins them):

    arch  preset  structure                                                  parameters
    unet  paper   width 64, multipliers (2, 2, 2), 2 blocks/level, 2 middle  45,820,801
    unet  small   width 16, multipliers (1, 2, 2), 2 blocks/level, 2 middle     723,729
    drn   paper   32 channels, 4 blocks x 2 dilated stacks                      520,097
    drn   small   32 channels, 2 blocks x 1 dilated stack                       131,681

The small presets keep each architecture's topology (three UNet levels and the 16² bottleneck at 64²
input; the full dilation sequence) so that what is tested on a CPU is the same kind of network as the
one trained on a GPU; only width and depth shrink.
"""

from __future__ import annotations

import copy
import inspect
from typing import Literal

from torch import nn

from emu.models.drn import DilatedResNet
from emu.models.unet import UNet

Arch = Literal["unet", "drn"]
Preset = Literal["small", "paper"]

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "drn": DilatedResNet}

# Keyword arguments of each preset. The paper presets restate the constructor defaults on purpose, so
# that a change of default never silently changes what "paper" means.
PRESETS: dict[str, dict[str, dict]] = {
    "unet": {
        "paper": {"hidden_channels": 64, "channel_multipliers": (2, 2, 2), "blocks_per_level": 2, "middle_blocks": 2},
        "small": {"hidden_channels": 16, "channel_multipliers": (1, 2, 2), "blocks_per_level": 2, "middle_blocks": 2},
    },
    "drn": {
        "paper": {"hidden_channels": 32, "num_blocks": 4, "stacks_per_block": 2},
        "small": {"hidden_channels": 32, "num_blocks": 2, "stacks_per_block": 1},
    },
}


def make_model(arch: Arch, preset: Preset | None, in_channels: int, out_channels: int, **overrides) -> nn.Module:
    """Builds network `arch` from `preset` (None: the constructor's defaults) with `overrides` on top.

    Raises ValueError, listing the allowed values, for an unknown arch, preset or override name.
    The returned model's `config` records arch, preset and every constructor argument.
    """
    if arch not in MODELS:
        raise ValueError(f"arch must be one of {sorted(MODELS)}, got {arch!r}")
    if preset is not None and preset not in PRESETS[arch]:
        raise ValueError(f"preset for {arch!r} must be one of {sorted(PRESETS[arch])} or None, got {preset!r}")
    cls = MODELS[arch]
    allowed = [name for name, parameter in inspect.signature(cls).parameters.items()
               if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {arch!r} arguments {unknown}; allowed: {allowed}")
    kwargs = {**(PRESETS[arch][preset] if preset is not None else {}), **overrides}
    model = cls(in_channels, out_channels, **kwargs)
    model.config["preset"] = preset
    return model


def model_config(model: nn.Module) -> dict:
    """A deep copy of the model's JSON-able config, for a checkpoint; `make_model(**config)` rebuilds it."""
    return copy.deepcopy(model.config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
