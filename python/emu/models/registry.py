"""Named networks and presets: build a model by name, rebuild it from a checkpoint's config.

    model = make_model("unet", "paper", in_channels=1, out_channels=1)      # 45.8M parameters
    model = make_model("drn", "small", 2, 2, hidden_channels=16)           # preset + overrides
    thermalizer = make_model("thermalizer", "paper", 1, 1, grid_size=64)    # 53.3M; grid_size required
    same = make_model(**model.config)                                      # e.g. from a checkpoint

Every model keeps its constructor arguments in `model.config`, a JSON-able dict that also names the
architecture ("arch") and the preset it came from ("preset", None when built directly). A checkpoint
stores that dict beside the state dict; `make_model(**config)` then rebuilds the architecture exactly,
because the config spells out every argument and overrides always win over the preset.

Parameter counts (one channel in and out; tests/test_models.py and tests/test_thermalizer_model.py
pin them):

    arch         preset  structure                                                  parameters
    unet         paper   width 64, multipliers (2, 2, 2), 2 blocks/level, 2 middle  45,820,801
    unet         small   width 16, multipliers (1, 2, 2), 2 blocks/level, 2 middle     723,729
    drn          paper   32 channels, 4 blocks x 2 dilated stacks                      520,097
    drn          small   32 channels, 2 blocks x 1 dilated stack                       131,681
    thermalizer  paper   unet paper + head 512 x 16² -> 4096 -> 1000 -> 1000, grid 64  53,286,817
    thermalizer  small   unet small + head 64 x 16² -> 4096 -> 256 -> 1000, grid 64     2,067,529
                         (the same at grid 32: 64 x 8² -> 1024 -> 256 -> 1000)          1,281,097

The thermalizer (emu.models.thermalizer) is a UNet denoiser with a noise-level classifier head whose
Linear layer is sized for one grid, so it needs `grid_size`, which has no default: make_model raises
ValueError without it. Its small preset narrows the head's hidden layer to 256 (the paper's is
num_levels = 1000 wide) so that it trains on a CPU. `MODELS` lists the field-to-field networks
(emulators, which accept any grid); `THERMALIZERS` the noise-level networks; make_model builds both.

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
from emu.models.thermalizer import ThermalizerUNet
from emu.models.unet import UNet

Arch = Literal["unet", "drn", "thermalizer"]
Preset = Literal["small", "paper"]

# Two tables because the two kinds differ in contract, not only in name: an emulator maps a field to a
# field on any grid its downsampling allows (tests sweep MODELS with exactly that contract), while a
# thermalizer returns (noise, logits) and is built for one grid_size.
MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "drn": DilatedResNet}
THERMALIZERS: dict[str, type[nn.Module]] = {"thermalizer": ThermalizerUNet}
ARCHITECTURES: dict[str, type[nn.Module]] = {**MODELS, **THERMALIZERS}

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
    # No grid_size here: a preset names an architecture, the grid is the data's (and required).
    "thermalizer": {
        "paper": {"hidden_channels": 64, "channel_multipliers": (2, 2, 2), "blocks_per_level": 2, "middle_blocks": 2,
                  "num_levels": 1000, "head_hidden": None, "head_channels": 16},
        "small": {"hidden_channels": 16, "channel_multipliers": (1, 2, 2), "blocks_per_level": 2, "middle_blocks": 2,
                  "num_levels": 1000, "head_hidden": 256, "head_channels": 16},
    },
}


def make_model(arch: Arch, preset: Preset | None, in_channels: int, out_channels: int, **overrides) -> nn.Module:
    """Builds network `arch` from `preset` (None: the constructor's defaults) with `overrides` on top.

    Raises ValueError, listing the allowed values, for an unknown arch, preset or override name, and
    for a thermalizer built without `grid_size` (it has no default). The returned model's `config`
    records arch, preset and every constructor argument.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(MODELS)} (emulators) or {sorted(THERMALIZERS)}, got {arch!r}")
    if preset is not None and preset not in PRESETS[arch]:
        raise ValueError(f"preset for {arch!r} must be one of {sorted(PRESETS[arch])} or None, got {preset!r}")
    cls = ARCHITECTURES[arch]
    allowed = [name for name, parameter in inspect.signature(cls).parameters.items()
               if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {arch!r} arguments {unknown}; allowed: {allowed}")
    if arch in THERMALIZERS and "grid_size" not in overrides:
        # Caught here rather than as the constructor's TypeError, with the why and an example.
        raise ValueError(f"{arch!r} needs grid_size (the side of the square input grid, e.g. grid_size=64): "
                         "its classifier head is sized for one grid and there is no default")
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
