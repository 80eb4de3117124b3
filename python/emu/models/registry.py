"""Named networks and presets: build a model by name, rebuild it from a checkpoint's config.

    model = make_model("unet", "paper", in_channels=1, out_channels=1)      # 45.8M parameters
    model = make_model("drn", "small", 2, 2, hidden_channels=16)           # preset + overrides
    thermalizer = make_model("thermalizer", "paper", 1, 1, grid_size=64)    # 53.3M; grid_size required
    sns = make_model("sns", "paper", 1, 1, grid_size=64)                    # 74.8M; in = out = C per frame
    same = make_model(**model.config)                                      # e.g. from a checkpoint

Every model keeps its constructor arguments in `model.config`, a JSON-able dict that also names the
architecture ("arch") and the preset it came from ("preset", None when built directly). A checkpoint
stores that dict beside the state dict; `make_model(**config)` then rebuilds the architecture exactly,
because the config spells out every argument and overrides always win over the preset.

Parameter counts (one channel in and out; tests/test_models.py, tests/test_thermalizer_model.py and
tests/test_sns_model.py pin them):

    arch         preset  structure                                                  parameters
    unet         paper   width 64, multipliers (2, 2, 2), 2 blocks/level, 2 middle  45,820,801
    unet         small   width 16, multipliers (1, 2, 2), 2 blocks/level, 2 middle     723,729
    drn          paper   32 channels, 4 blocks x 2 dilated stacks                      520,097
    drn          small   32 channels, 2 blocks x 1 dilated stack                       131,681
    thermalizer  paper   unet paper + head 512 x 16² -> 4096 -> 1000 -> 1000, grid 64  53,286,817
    thermalizer  small   unet small + head 64 x 16² -> 4096 -> 256 -> 1000, grid 64     2,067,529
                         (the same at grid 32: 64 x 8² -> 1024 -> 256 -> 1000)          1,281,097
    sns          paper   unet paper (3 -> 2 channels) + attention at 16², two heads,   74,814,610
                         conditioning 2000 -> 1000 -> 1000 -> decoder biases, grid 64
    sns          small   unet small + attention, two heads 64 x 8² -> 1024 -> 256       2,669,874
                         -> 1000, conditioning 2000 -> 256 -> 256, grid 32

The thermalizer (emu.models.thermalizer) is a UNet denoiser with a noise-level classifier head whose
Linear layer is sized for one grid, so it needs `grid_size`, which has no default: make_model raises
ValueError without it. Its small preset narrows the head's hidden layer to 256 (the paper's is
num_levels = 1000 wide) so that it trains on a CPU. `MODELS` lists the field-to-field networks
(emulators, which accept any grid); `THERMALIZERS` the noise-level networks; make_model builds both.

SNS (emu.models.sns) denoises a pair of frames, [anchor, previous, current] in and the noise of the
last two out, with one noise-level head per noised frame; it too needs `grid_size`. Its in_channels
is the field channels C of one frame and out_channels must equal it (the UNet inside sees 3C in and
2C out); `SNS_NETWORKS` lists it. Its presets carry attention at the coarsest level (the SNS paper's
QG model "did not work well without" it); its small preset narrows the heads and the conditioning MLP
to 256.

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
from emu.models.sns import SNSUNet
from emu.models.thermalizer import ThermalizerUNet
from emu.models.unet import UNet

Arch = Literal["unet", "drn", "thermalizer", "sns"]
Preset = Literal["small", "paper"]

# One table per contract, not only per name: an emulator maps a field to a field on any grid its
# downsampling allows (tests sweep MODELS with exactly that contract), a thermalizer returns (noise,
# logits) and is built for one grid_size, and SNS takes stacked frames and returns an SNSOutput.
MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "drn": DilatedResNet}
THERMALIZERS: dict[str, type[nn.Module]] = {"thermalizer": ThermalizerUNet}
SNS_NETWORKS: dict[str, type[nn.Module]] = {"sns": SNSUNet}
ARCHITECTURES: dict[str, type[nn.Module]] = {**MODELS, **THERMALIZERS, **SNS_NETWORKS}
# Networks with a Linear layer over the flattened bottleneck, hence built for one grid.
NEEDS_GRID_SIZE = frozenset(THERMALIZERS) | frozenset(SNS_NETWORKS)

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
    # The thermalizer's UNets and heads, with attention and the conditioning MLP; anchor stays the default.
    "sns": {
        "paper": {"hidden_channels": 64, "channel_multipliers": (2, 2, 2), "blocks_per_level": 2, "middle_blocks": 2,
                  "num_levels": 1000, "head_hidden": None, "head_channels": 16, "condition_hidden": None,
                  "attention": True, "attention_heads": 4},
        "small": {"hidden_channels": 16, "channel_multipliers": (1, 2, 2), "blocks_per_level": 2, "middle_blocks": 2,
                  "num_levels": 1000, "head_hidden": 256, "head_channels": 16, "condition_hidden": 256,
                  "attention": True, "attention_heads": 4},
    },
}


def make_model(arch: Arch, preset: Preset | None, in_channels: int, out_channels: int, **overrides) -> nn.Module:
    """Builds network `arch` from `preset` (None: the constructor's defaults) with `overrides` on top.

    Raises ValueError, listing the allowed values, for an unknown arch, preset or override name, for
    a thermalizer or SNS network built without `grid_size` (it has no default), and for SNS with
    out_channels != in_channels (both are the field channels of one frame). The returned model's
    `config` records arch, preset and every constructor argument.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(MODELS)} (emulators), {sorted(THERMALIZERS)} "
                         f"(thermalizers) or {sorted(SNS_NETWORKS)} (self-refining), got {arch!r}")
    if preset is not None and preset not in PRESETS[arch]:
        raise ValueError(f"preset for {arch!r} must be one of {sorted(PRESETS[arch])} or None, got {preset!r}")
    cls = ARCHITECTURES[arch]
    allowed = [name for name, parameter in inspect.signature(cls).parameters.items()
               if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {arch!r} arguments {unknown}; allowed: {allowed}")
    if arch in NEEDS_GRID_SIZE and "grid_size" not in overrides:
        # Caught here rather than as the constructor's TypeError, with the why and an example.
        raise ValueError(f"{arch!r} needs grid_size (the side of the square input grid, e.g. grid_size=64): "
                         "its classifier head is sized for one grid and there is no default")
    kwargs = {**(PRESETS[arch][preset] if preset is not None else {}), **overrides}
    if arch in SNS_NETWORKS:
        # SNS predicts the noise of the frames it is given: one channel count for input and output.
        if out_channels != in_channels:
            raise ValueError(f"{arch!r} needs out_channels == in_channels (the field channels of one frame; "
                             f"it predicts the noise of its noised input frames), got {in_channels} and {out_channels}")
        model = cls(in_channels, **kwargs)
    else:
        model = cls(in_channels, out_channels, **kwargs)
    model.config["preset"] = preset
    return model


def model_config(model: nn.Module) -> dict:
    """A deep copy of the model's JSON-able config, for a checkpoint; `make_model(**config)` rebuilds it."""
    return copy.deepcopy(model.config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
