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
the shortcut a 1x1 conv where the width changes. Its two convs may take per-channel biases from outside
(`ResidualBlock.forward(x, biases)`, `UNet.decode(..., biases)`, `UNet.encode(x, biases)`): how SNS
(emu.models.sns) tells the decoder the noise levels its heads read off the bottleneck, and how the
window score network (emu.models.score) tells every block the diffusion time. `channel_multipliers` are cumulative, as in
PDEArena: level i has width hidden_channels * prod(multipliers[:i+1]), so (2, 2, 2) gives
64 -> 128 -> 256 -> 512, and there are len(multipliers) - 1 downsamplings (16² bottleneck at 64²).
Every skip (the projection and each encoder module's output) is consumed once by the decoder.

Attention (`attention=True`; off by default, and then every parameter and state_dict key is as
above). Every residual block at the coarsest level (that level's encoder blocks, the middle blocks
and the decoder blocks of that level: 2 + 2 + 3 = 7 by default, at 16² for a 64² input) is followed
by multi-head self-attention over its H*W positions, added residually:

    y = x + W_o · softmax(Q Kᵀ / √d) V,    Q, K, V = W_q, W_k, W_v · GroupNorm(1, C)(x)   (per head)

with 1x1 convolutions for W_q, W_k, W_v, W_o. Why: convolutions see a few cells at a time, while
attention couples every pair of positions in one layer, and at the coarsest level there are few
positions (256 at 16²), so that costs little. The SNS paper adds it at the bottleneck of its QG noise
model, which "did not work well without this addition". There is no positional encoding, so attention
is equivariant under any permutation of positions, and the network keeps its periodic translation
equivariance. GroupNorm(1, C) normalises each sample over all its channels and positions, so, unlike
batch statistics, it couples no two samples, and the residual path carries the unnormalised amplitude.

Periodicity. Every convolution pads circularly (the fields live on a doubly periodic domain), and so
does the upsampling: PyTorch's ConvTranspose2d only pads with zeros, so `CircularUpsample` pads its
input circularly by one coarse cell and crops the transposed conv's output to exactly the periodic
result. With that the network commutes with translations by multiples of its `downsampling_factor`
(2**(levels - 1) = 4 by default); strided convolutions break equivariance for other shifts.

Parameter count for one channel in and out, paper preset: 45,820,801 (methods.md's "≈46M"; the
Thermalizer paper quotes 48M); attention adds 4C² + 6C per attended block of width C (6,573,568
for the paper's seven blocks: six of width 512 and the decoder's last 16² block, 256). The reference code's transposed conv pads with zeros; emu's is
circular with the same weights, so the count is the same.

References:
    Gupta & Brandstetter (2022), "Towards multi-spatiotemporal-scale generalized PDE modeling"
    (PDEArena; `pdearena/modules/twod_unet.py`, the "modern UNet").
    Pedersen, Zanna & Bruna (2025), "Thermalizer: stable autoregressive neural emulation of
    spatiotemporal chaos" (ICML; this UNet with circular padding as emulator and as denoiser).
    Vaswani et al. (2017), "Attention is all you need" (scaled dot-product multi-head attention).
    "Towards Infinitely Long Neural Simulations: Self-Refining Neural Surrogate Models" (SNS;
    appendix: attention at the bottleneck of the QG model).
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


class SelfAttention2d(nn.Module):
    """Pre-norm multi-head self-attention over the H*W positions of a feature map, added residually.

        y = x + proj(attention(norm(x))),   attention = softmax(Q Kᵀ / √d) V per head, d = C / heads

    norm is GroupNorm(1, C) (per sample, over all channels and positions); q, k, v and proj are 1x1
    convolutions. No positional encoding: permuting the positions of x permutes those of y, so periodic
    translations commute with it. 4C² + 6C parameters. ValueError unless heads divides C.
    """

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if int(heads) != heads or heads < 1:
            raise ValueError(f"attention heads must be an integer >= 1, got {heads}")
        if channels % heads:
            raise ValueError(f"attention heads ({heads}) must divide the block's channels ({channels})")
        self.channels, self.heads = channels, heads
        self.norm = nn.GroupNorm(1, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (B, 3C, H, W) -> three (B, heads, H*W, C / heads): positions are the sequence.
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.heads, channels // self.heads, height * width)
        query, key, value = qkv.transpose(-1, -2).unbind(dim=1)
        attended = F.scaled_dot_product_attention(query, key, value)
        return x + self.proj(attended.transpose(-1, -2).reshape(batch, channels, height, width))


class ResidualBlock(nn.Module):
    """Pre-activation residual block without normalisation: conv(act(conv(act(x)))) + shortcut(x).

    No normalisation, as in PDEArena's and the Thermalizer's runs: group/batch statistics would couple
    the samples of a batch and rescale fields whose amplitude is physically meaningful.

    `forward(x, biases)` takes optional per-channel biases (b1, b2), each (B, out_channels), added
    after conv1 and after conv2 (SNS's noise-level conditioning):

        h = conv1(act(x)) + b1,   h = conv2(act(h)) + b2,   y = h + shortcut(x)

    With `attention_heads`, a SelfAttention2d of that many heads follows: y <- y + attention(norm(y)).
    """

    def __init__(self, in_channels: int, out_channels: int, activation: Activation = "gelu",
                 attention_heads: int | None = None):
        super().__init__()
        self.activation = make_activation(activation)
        self.conv1 = circular_conv3x3(in_channels, out_channels)
        self.conv2 = circular_conv3x3(out_channels, out_channels)
        # A 1x1 projection only where the width changes, so equal-width blocks stay exact identities
        # plus a correction (which is what makes deep stacks trainable).
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        # None registers no submodule, so blocks without attention keep their old state_dict keys.
        self.attention = None if attention_heads is None else SelfAttention2d(out_channels, attention_heads)

    def forward(self, x: torch.Tensor, biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.conv1(self.activation(x))
        if biases is not None:
            h = h + biases[0][..., None, None]
        h = self.conv2(self.activation(h))
        if biases is not None:
            h = h + biases[1][..., None, None]
        h = h + self.shortcut(x)
        return h if self.attention is None else self.attention(h)


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
        attention: self-attention after every residual block of the coarsest level (encoder, middle
            and decoder); False (the default) builds exactly the attention-free network.
        attention_heads: heads of each attention layer; must divide the width of every attended block.

    H and W must be multiples of `downsampling_factor`.

    `encode(x, biases=None)` returns the bottleneck (after the middle blocks; 512 x 16² at 64² input)
    and the skip list; `decode(bottleneck, skips, biases=None)` finishes the pass. A noise-level classifier head
    (Thermalizer, SNS) reads the bottleneck from `encode` alone and so never runs the decoder.
    `biases` is one (b1, b2) pair per decoder residual block, in the order decode visits them, each
    (B, width) with the widths `decoder_block_widths()` lists (what a conditioning network sizes
    its output layers by); `encode`'s `biases` likewise, one pair per encoder then middle residual
    block, with the widths `encoder_block_widths()` lists (how emu.models.score's time embedding
    reaches every block).

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
        attention: bool = False,
        attention_heads: int = 4,
    ):
        super().__init__()
        multipliers = tuple(int(m) for m in channel_multipliers)
        if not multipliers or min(multipliers) < 1:
            raise ValueError(f"channel_multipliers must be a non-empty sequence of ints >= 1, got {channel_multipliers}")
        for name, value, least in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                   ("hidden_channels", hidden_channels, 1), ("blocks_per_level", blocks_per_level, 1),
                                   ("middle_blocks", middle_blocks, 0), ("attention_heads", attention_heads, 1)):
            if int(value) != value or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value}")
        make_activation(activation)  # validate the name before building anything
        self.config = {
            "arch": self.arch, "preset": None, "in_channels": in_channels, "out_channels": out_channels,
            "hidden_channels": hidden_channels, "channel_multipliers": list(multipliers),
            "blocks_per_level": blocks_per_level, "middle_blocks": middle_blocks, "activation": activation,
            "attention": bool(attention), "attention_heads": attention_heads,
        }
        self.in_channels, self.out_channels = in_channels, out_channels
        self.downsampling_factor = 2 ** (len(multipliers) - 1)

        self.projection = circular_conv3x3(in_channels, hidden_channels)

        # Encoder: a flat list whose every output is a skip, as in PDEArena, so the decoder can
        # consume skips in reverse without bookkeeping per level.
        widths = [hidden_channels * math.prod(multipliers[: i + 1]) for i in range(len(multipliers))]
        coarsest = len(widths) - 1
        # Attention only at the coarsest level, where positions are fewest (its cost grows as (H*W)²).
        heads = attention_heads if attention else None
        encoder: list[nn.Module] = []
        width = hidden_channels
        for level, level_width in enumerate(widths):
            for _ in range(blocks_per_level):
                encoder.append(ResidualBlock(width, level_width, activation, heads if level == coarsest else None))
                width = level_width
            if level < len(widths) - 1:
                encoder.append(CircularDownsample(width))
        self.encoder = nn.ModuleList(encoder)
        self.middle = nn.ModuleList(ResidualBlock(width, width, activation, heads) for _ in range(middle_blocks))
        self.bottleneck_channels = width

        # Decoder: blocks_per_level + 1 blocks per level, each eating one skip; the extra block brings
        # the width down to the next level's, so the skip count (1 + encoder length) matches exactly.
        skip_widths = [hidden_channels] + [_width_after(m) for m in encoder]
        decoder: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            below = widths[level - 1] if level > 0 else hidden_channels
            for target in [width] * blocks_per_level + [below]:
                decoder.append(ResidualBlock(width + skip_widths.pop(), target, activation,
                                             heads if level == coarsest else None))
                width = target
            if level > 0:
                decoder.append(CircularUpsample(width))
        assert not skip_widths, "every skip must be consumed exactly once"
        self.decoder = nn.ModuleList(decoder)

        self.output_activation = make_activation(activation)
        self.output = circular_conv3x3(width, out_channels)

    def encode(self, x: torch.Tensor, biases: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(bottleneck after the middle blocks, skips in encoder order) for input (B, C_in, H, W).

        biases: None, or one (b1, b2) pair per residual block that encode visits (the encoder's, then
            the middle's), each (B, width) for the block's width in `encoder_block_widths()`; added
            after its two convs, as `decode`'s. A time embedding conditions every block this way
            (emu.models.score).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (batch, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.downsampling_factor or x.shape[-1] % self.downsampling_factor:
            raise ValueError(f"H and W must be multiples of {self.downsampling_factor}, got {tuple(x.shape[-2:])}")
        blocks = sum(isinstance(module, ResidualBlock) for module in self.encoder) + len(self.middle)
        if biases is not None and len(biases) != blocks:
            raise ValueError(f"biases must hold one (b1, b2) pair per encoder and middle block ({blocks}), "
                             f"got {len(biases)}")
        x = self.projection(x)
        skips = [x]
        block = 0
        for module in self.encoder:
            if isinstance(module, ResidualBlock):
                x = module(x, None if biases is None else biases[block])
                block += 1
            else:
                x = module(x)
            skips.append(x)
        for module in self.middle:
            x = module(x, None if biases is None else biases[block])
            block += 1
        return x, skips

    def encoder_block_widths(self) -> list[int]:
        """out_channels of each residual block `encode` visits, in order: the encoder's, then the middle's.

        Paper preset: [128, 128, 256, 256, 512, 512, 512, 512] (two per level, then two middle blocks).
        """
        return [module.conv2.out_channels for module in (*self.encoder, *self.middle)
                if isinstance(module, ResidualBlock)]

    def decoder_block_widths(self) -> list[int]:
        """out_channels of each decoder residual block, in the order `decode` visits them.

        Paper preset: [512, 512, 256, 256, 256, 128, 128, 128, 64] (three per level, coarsest first).
        """
        return [module.conv2.out_channels for module in self.decoder if isinstance(module, ResidualBlock)]

    def decode(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor],
               biases: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Output (B, C_out, H, W) from `encode`'s results; `skips` is read, not modified.

        biases: None, or one (b1, b2) pair per decoder residual block in visiting order, each
            (B, width) for the block's width in `decoder_block_widths()`; added after its two convs.
        """
        blocks = sum(isinstance(module, ResidualBlock) for module in self.decoder)
        if biases is not None and len(biases) != blocks:
            raise ValueError(f"biases must hold one (b1, b2) pair per decoder block ({blocks}), got {len(biases)}")
        x = bottleneck
        remaining = len(skips)
        block = 0
        for module in self.decoder:
            if isinstance(module, CircularUpsample):
                x = module(x)
            else:
                remaining -= 1
                x = module(torch.cat((x, skips[remaining]), dim=1), None if biases is None else biases[block])
                block += 1
        return self.output(self.output_activation(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))


def _width_after(module: nn.Module) -> int:
    """Output width of an encoder module (a residual block or a downsampling conv)."""
    if isinstance(module, ResidualBlock):
        return module.conv2.out_channels
    return module.conv.out_channels
