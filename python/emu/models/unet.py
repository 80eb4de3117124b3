"""The "modern UNet" of PDEArena, made periodic: emu's large emulator and the thermalizer's backbone.

Architecture (defaults; every number is a constructor argument):

    input (C_in, 64, 64)
      projection   3x3 conv C_in -> 64                                    64 x 64²
      level 0      2 residual blocks 64 -> 128,   strided 3x3 conv down    128 x 64² -> 32²
      level 1      2 residual blocks 128 -> 256,  strided 3x3 conv down    256 x 32² -> 16²
      level 2      2 residual blocks 256 -> 512   (no downsampling)        512 x 16²
      middle       2 residual blocks 512 -> 512                            512 x 16²  <- bottleneck
      decoder      per level, coarsest first: 2 residual blocks at the level's width and one that
                   reduces it by the level's multiplier, each fed [x, skip] concatenated; a 4x4
                   stride-2 transposed conv up between levels
      output       GELU, 3x3 conv 64 -> C_out                             C_out x 64²

A residual block is pre-activation without normalisation: h = conv(GELU(conv(GELU(x)))) + shortcut(x),
the shortcut a 1x1 conv where the width changes. `channel_multipliers` are cumulative, as in
PDEArena: level i has width hidden_channels * prod(multipliers[:i+1]), so (2, 2, 2) gives
64 -> 128 -> 256 -> 512, and there are len(multipliers) - 1 downsamplings (16² bottleneck at 64²).
Every skip (the projection and each encoder module's output) is consumed once by the decoder.

Periodicity. Every convolution pads circularly (the fields live on a doubly periodic domain), and so
does the upsampling: PyTorch's ConvTranspose2d only pads with zeros, so `CircularUpsample` pads its
input circularly by one coarse cell and crops the transposed conv's output to exactly the periodic
result. With that the network commutes with translations by multiples of its `downsampling_factor`
(2**(levels - 1) = 4 by default); strided convolutions break equivariance for other shifts.

Parameter count for one channel in and out, paper preset: 45,820,801 (methods.md's "≈46M"; the
Thermalizer paper quotes 48M). The reference code's transposed conv pads with zeros; emu's is
circular with the same weights, so the count is the same.

References:
    Gupta & Brandstetter (2022), "Towards multi-spatiotemporal-scale generalized PDE modeling"
    (PDEArena; `pdearena/modules/twod_unet.py`, the "modern UNet").
    Pedersen, Zanna & Bruna (2025), "Thermalizer: stable autoregressive neural emulation of
    spatiotemporal chaos" (ICML; this UNet with circular padding as emulator and as denoiser).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["gelu", "silu", "relu"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name; ValueError lists the allowed names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def circular_conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with one cell of periodic padding: 'same' size at stride 1, half at stride 2."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, padding_mode="circular")


class ResidualBlock(nn.Module):
    """Pre-activation residual block without normalisation: conv(act(conv(act(x)))) + shortcut(x).

    No normalisation, as in PDEArena's and the Thermalizer's runs: group/batch statistics would couple
    the samples of a batch and rescale fields whose amplitude is physically meaningful.
    """

    def __init__(self, in_channels: int, out_channels: int, activation: Activation = "gelu"):
        super().__init__()
        self.activation = make_activation(activation)
        self.conv1 = circular_conv3x3(in_channels, out_channels)
        self.conv2 = circular_conv3x3(out_channels, out_channels)
        # A 1x1 projection only where the width changes, so equal-width blocks stay exact identities
        # plus a correction (which is what makes deep stacks trainable).
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.activation(x))
        h = self.conv2(self.activation(h))
        return h + self.shortcut(x)


class CircularDownsample(nn.Module):
    """Halves the resolution with a learned stride-2 3x3 circular convolution (width unchanged)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = circular_conv3x3(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CircularUpsample(nn.Module):
    """Doubles the resolution with a 4x4 stride-2 transposed convolution on a periodic domain.

    PDEArena uses ConvTranspose2d(kernel 4, stride 2, padding 1), whose output is cropped from a
    zero-padded signal, so contributions that should wrap around the domain edge are lost. Here the
    input is first padded circularly by one coarse cell on every side; the transposed conv of the
    padded input then holds, in its central 2n x 2n window (crop 3 = 1 + 2 x 1 fine cells), every
    contribution, including the wrapped ones, exactly once. Same weights and count as PDEArena's.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (1, 1, 1, 1), mode="circular"))


class UNet(nn.Module):
    """PDEArena's modern UNet with circular padding everywhere; (B, C_in, H, W) -> (B, C_out, H, W).

    Args:
        in_channels: input fields (1 for Kolmogorov vorticity, 2 for the two QG layers).
        out_channels: output fields.
        hidden_channels: width after the input projection (64 in the papers).
        channel_multipliers: cumulative width factor of each level; len(...) levels and
            len(...) - 1 downsamplings. (2, 2, 2): 128, 256, 512 at 64², 32², 16².
        blocks_per_level: residual blocks per encoder level (the decoder has one more per level).
        middle_blocks: residual blocks at the bottleneck.
        activation: "gelu" (papers), "silu" or "relu".

    H and W must be multiples of `downsampling_factor`.

    `encode(x)` returns the bottleneck (after the middle blocks; 512 x 16² at 64² input) and the skip
    list; `decode(bottleneck, skips)` finishes the pass. A noise-level classifier head (Thermalizer,
    SNS) reads the bottleneck from `encode` alone and so never runs the decoder.

    `config` holds the constructor arguments as a JSON-able dict (plus "arch" and "preset");
    `emu.models.make_model(**model.config)` rebuilds the same architecture.
    """

    arch: ClassVar[str] = "unet"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        hidden_channels: int = 64,
        channel_multipliers: Sequence[int] = (2, 2, 2),
        blocks_per_level: int = 2,
        middle_blocks: int = 2,
        activation: Activation = "gelu",
    ):
        super().__init__()
        multipliers = tuple(int(m) for m in channel_multipliers)
        if not multipliers or min(multipliers) < 1:
            raise ValueError(f"channel_multipliers must be a non-empty sequence of ints >= 1, got {channel_multipliers}")
        for name, value, least in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                   ("hidden_channels", hidden_channels, 1), ("blocks_per_level", blocks_per_level, 1),
                                   ("middle_blocks", middle_blocks, 0)):
            if int(value) != value or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value}")
        make_activation(activation)  # validate the name before building anything
        self.config = {
            "arch": self.arch, "preset": None, "in_channels": in_channels, "out_channels": out_channels,
            "hidden_channels": hidden_channels, "channel_multipliers": list(multipliers),
            "blocks_per_level": blocks_per_level, "middle_blocks": middle_blocks, "activation": activation,
        }
        self.in_channels, self.out_channels = in_channels, out_channels
        self.downsampling_factor = 2 ** (len(multipliers) - 1)

        self.projection = circular_conv3x3(in_channels, hidden_channels)

        # Encoder: a flat list whose every output is a skip, as in PDEArena, so the decoder can
        # consume skips in reverse without bookkeeping per level.
        widths = [hidden_channels * math.prod(multipliers[: i + 1]) for i in range(len(multipliers))]
        encoder: list[nn.Module] = []
        width = hidden_channels
        for level, level_width in enumerate(widths):
            for _ in range(blocks_per_level):
                encoder.append(ResidualBlock(width, level_width, activation))
                width = level_width
            if level < len(widths) - 1:
                encoder.append(CircularDownsample(width))
        self.encoder = nn.ModuleList(encoder)
        self.middle = nn.ModuleList(ResidualBlock(width, width, activation) for _ in range(middle_blocks))
        self.bottleneck_channels = width

        # Decoder: blocks_per_level + 1 blocks per level, each eating one skip; the extra block brings
        # the width down to the next level's, so the skip count (1 + encoder length) matches exactly.
        skip_widths = [hidden_channels] + [_width_after(m) for m in encoder]
        decoder: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            below = widths[level - 1] if level > 0 else hidden_channels
            for target in [width] * blocks_per_level + [below]:
                decoder.append(ResidualBlock(width + skip_widths.pop(), target, activation))
                width = target
            if level > 0:
                decoder.append(CircularUpsample(width))
        assert not skip_widths, "every skip must be consumed exactly once"
        self.decoder = nn.ModuleList(decoder)

        self.output_activation = make_activation(activation)
        self.output = circular_conv3x3(width, out_channels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(bottleneck after the middle blocks, skips in encoder order) for input (B, C_in, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (batch, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.downsampling_factor or x.shape[-1] % self.downsampling_factor:
            raise ValueError(f"H and W must be multiples of {self.downsampling_factor}, got {tuple(x.shape[-2:])}")
        x = self.projection(x)
        skips = [x]
        for module in self.encoder:
            x = module(x)
            skips.append(x)
        for block in self.middle:
            x = block(x)
        return x, skips

    def decode(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Output (B, C_out, H, W) from `encode`'s results; `skips` is read, not modified."""
        x = bottleneck
        remaining = len(skips)
        for module in self.decoder:
            if isinstance(module, CircularUpsample):
                x = module(x)
            else:
                remaining -= 1
                x = module(torch.cat((x, skips[remaining]), dim=1))
        return self.output(self.output_activation(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))


def _width_after(module: nn.Module) -> int:
    """Output width of an encoder module (a residual block or a downsampling conv)."""
    if isinstance(module, ResidualBlock):
        return module.conv2.out_channels
    return module.conv.out_channels
