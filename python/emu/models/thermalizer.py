"""The Thermalizer's network: a periodic UNet that predicts the noise and, from its bottleneck, the noise level.

Architecture (paper preset, one channel, grid 64; every number is a constructor argument):

    input (C_in, 64, 64)
      UNet encoder   projection, encoder and middle of emu.models.unet.UNet       512 x 16²  <- bottleneck
      UNet decoder   the UNet's decoder and output conv                           C_out x 64²  -> ε̂
      head           GELU, 3x3 circular conv 512 -> 512                           512 x 16²
                     GELU, 1x1 conv 512 -> head_channels = 16                      16 x 16²
                     flatten                                                      4096
                     Linear 4096 -> head_hidden (= num_levels = 1000), GELU       1000
                     Linear head_hidden -> num_levels = 1000                      1000       -> logits

The network is a DDPM denoiser without a time input: instead of being told the noise level s of
x_s = √ᾱ_s x_0 + √(1 − ᾱ_s) ε, it predicts both outputs of the Thermalizer paper's D_φ,

    D_φ^(1)(x_s) = ε̂ ≈ ε                   (the UNet's output, out_channels = in_channels)
    D_φ^(2)(x_s) = logits over s ∈ levels   (the head; ŝ = argmax, a categorical over num_levels)

trained on MSE(ε̂, ε) + CE(logits, s) (methods.md "Thermalizer"). Logit k stands for class k, i.e.
level k in whatever 0-based indexing the noise schedule uses: the network itself knows no schedule.

Classifier-only path. At every rollout step the Thermalizer only needs ŝ, so `classify` runs the
projection, encoder, middle blocks and head and never the decoder; the paper puts that at 60% of the
cost of a UNet emulator step. `classify(x)` equals `forward(x)[1]` exactly: both read the same
bottleneck through the same head.

Why a fixed grid. The head flattens the bottleneck before a Linear layer, so its weights are sized for
one grid: `grid_size` (square, H = W) is a constructor argument and the network refuses other inputs,
unlike the fully convolutional UNet and DRN. The bottleneck is grid_size / downsampling_factor on a
side, so grid_size must be a multiple of the UNet's downsampling factor (4 for three levels).

The head's activation is the UNet's `activation` ("gelu" in the paper and in every preset). The paper
describes "2 convolutional layers, with kernel size of 3"; methods.md (and emu) make the second one a
1x1 conv to 16 channels, which gives the paper's "length 4096 vector" from 512 x 16² all the same.
Both readings land on ≈53M (a 3x3 second conv adds 65,536 parameters).

Parameter counts (tests/test_thermalizer_model.py pins them; one channel in and out):

    preset  grid  UNet        head (conv, 1x1, Linear, Linear)                   total
    paper   64    45,820,801  2,359,808 + 8,208 + 4,097,000 + 1,001,000          53,286,817  (paper: 53M)
    small   64       723,729     36,928 + 1,040 + 1,048,832 +   257,000           2,067,529
    small   32       723,729     36,928 + 1,040 +   262,400 +   257,000           1,281,097

References:
    Pedersen, Zanna & Bruna (2025), "Thermalizer: stable autoregressive neural emulation of
    spatiotemporal chaos" (ICML; section 4.2 and appendix C: the noise-classifying head, 53M).
    Ho, Jain & Abbeel (2020), "Denoising diffusion probabilistic models" (ε-prediction).
    Gupta & Brandstetter (2022), PDEArena's modern UNet (emu.models.unet).
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

from emu.models.unet import Activation, UNet, circular_conv3x3, make_activation


def level_head(width: int, bottleneck_size: int, head_channels: int, hidden: int, num_levels: int,
               activation: Activation = "gelu") -> nn.Sequential:
    """The noise-level classifier head on a (B, width, n, n) bottleneck, n = bottleneck_size; -> (B, num_levels).

        act, 3x3 circular conv width -> width, act, 1x1 conv width -> head_channels, flatten,
        Linear head_channels * n² -> hidden, act, Linear hidden -> num_levels

    Shared by ThermalizerUNet (one head) and emu.models.sns.SNSUNet (one per noised frame); its
    Sequential indices (0 ... 7) are the state_dict keys of saved thermalizers.
    """
    # The head reads the bottleneck raw: the middle block's output is a residual sum that no
    # activation has touched yet, hence the leading activation (pre-activation, as in the UNet).
    return nn.Sequential(
        make_activation(activation),
        circular_conv3x3(width, width),
        make_activation(activation),
        nn.Conv2d(width, head_channels, kernel_size=1),
        nn.Flatten(),
        nn.Linear(head_channels * bottleneck_size**2, hidden),
        make_activation(activation),
        nn.Linear(hidden, num_levels),
    )


def check_head_arguments(num_levels: int, head_channels: int, head_hidden: int | None) -> None:
    """ValueError unless num_levels, head_channels and head_hidden (None: num_levels) are integers >= 1."""
    for name, value in (("num_levels", num_levels), ("head_channels", head_channels),
                        ("head_hidden", num_levels if head_hidden is None else head_hidden)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")


def check_grid_input(x: torch.Tensor, channels: int, grid_size: int, layout: str = "") -> None:
    """ValueError unless x is (batch, channels, grid_size, grid_size); `layout` describes the channels."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"expected input (batch, {channels}, {grid_size}, {grid_size}){layout}, got {tuple(x.shape)}")
    if tuple(x.shape[-2:]) != (grid_size, grid_size):
        # The fully convolutional UNet would accept it; the head's Linear layer would not, with a
        # shape error that names neither grid.
        raise ValueError(f"input grid {tuple(x.shape[-2:])} differs from grid_size "
                         f"({grid_size}, {grid_size}) the classifier head was built for")


def check_grid_size(grid_size: int, factor: int) -> None:
    """ValueError unless grid_size is a positive multiple of the UNet's downsampling factor."""
    if int(grid_size) != grid_size or grid_size < factor or grid_size % factor:
        raise ValueError(
            f"grid_size must be a positive multiple of the UNet's downsampling factor {factor} "
            f"(2**(len(channel_multipliers) - 1)), got {grid_size}")


class ThermalizerUNet(nn.Module):
    """UNet denoiser plus noise-level classifier; (B, C_in, N, N) -> (ε̂ (B, C_out, N, N), logits (B, L)).

    Args:
        in_channels: input fields (1 for Kolmogorov vorticity, 2 for the two QG layers).
        out_channels: predicted-noise fields; in_channels for a denoiser.
        grid_size: N, the side of the square input grid; a multiple of the UNet's downsampling
            factor 2**(len(channel_multipliers) - 1). The head's first Linear layer is sized for it.
        num_levels: L, the number of noise levels the head classifies (the schedule's T = 1000).
        head_hidden: width of the head's hidden Linear layer; None means num_levels (the paper).
        head_channels: channels of the 1x1 conv before flattening (16 in the paper: 16 x 16² = 4096).
        hidden_channels, channel_multipliers, blocks_per_level, middle_blocks, activation, attention,
            attention_heads: the UNet's (emu.models.unet.UNet); there is no time embedding. The
            Thermalizer paper uses no attention; the config records the two attention keys only when
            attention is on, so configs saved before they existed read the same.

    `forward(x)` gives (predicted_noise, logits); `classify(x)` the logits alone without running the
    decoder; `predict_level(x)` the argmax level per sample. `config` holds every constructor argument
    as a JSON-able dict (plus "arch" and "preset"); `emu.models.make_model(**model.config)` rebuilds it.
    """

    arch: ClassVar[str] = "thermalizer"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        grid_size: int,
        num_levels: int = 1000,
        head_hidden: int | None = None,
        head_channels: int = 16,
        hidden_channels: int = 64,
        channel_multipliers: Sequence[int] = (2, 2, 2),
        blocks_per_level: int = 2,
        middle_blocks: int = 2,
        activation: Activation = "gelu",
        attention: bool = False,
        attention_heads: int = 4,
    ):
        super().__init__()
        check_head_arguments(num_levels, head_channels, head_hidden)
        # The UNet validates its own arguments (and gives the downsampling factor grid_size must meet).
        self.unet = UNet(in_channels, out_channels, hidden_channels=hidden_channels,
                         channel_multipliers=channel_multipliers, blocks_per_level=blocks_per_level,
                         middle_blocks=middle_blocks, activation=activation, attention=attention,
                         attention_heads=attention_heads)
        factor = self.unet.downsampling_factor
        check_grid_size(grid_size, factor)
        # Without attention the attention keys are left out: the config (and every checkpoint's) then
        # reads exactly as before attention existed, and make_model's defaults rebuild the same network.
        skipped = {"arch", "preset", "in_channels", "out_channels"} | (
            set() if attention else {"attention", "attention_heads"})
        self.config = {
            "arch": self.arch, "preset": None, "in_channels": in_channels, "out_channels": out_channels,
            "grid_size": grid_size, "num_levels": num_levels, "head_hidden": head_hidden,
            "head_channels": head_channels,
            **{key: value for key, value in self.unet.config.items() if key not in skipped},
        }
        self.in_channels, self.out_channels = in_channels, out_channels
        self.grid_size, self.num_levels = grid_size, num_levels
        self.downsampling_factor = factor
        self.bottleneck_channels = self.unet.bottleneck_channels

        self.head = level_head(self.bottleneck_channels, grid_size // factor, head_channels,
                               num_levels if head_hidden is None else head_hidden, num_levels, activation)

    def _check_input(self, x: torch.Tensor) -> None:
        check_grid_input(x, self.in_channels, self.grid_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted noise ε̂ (B, C_out, N, N), noise-level logits (B, num_levels)) for x (B, C_in, N, N)."""
        self._check_input(x)
        bottleneck, skips = self.unet.encode(x)
        return self.unet.decode(bottleneck, skips), self.head(bottleneck)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Noise-level logits (B, num_levels): projection, encoder, middle and head; no decoder."""
        self._check_input(x)
        bottleneck, _ = self.unet.encode(x)
        return self.head(bottleneck)

    @torch.no_grad()
    def predict_level(self, x: torch.Tensor) -> torch.Tensor:
        """ŝ = argmax of the logits per sample, a LongTensor (B,); inference only (no gradients)."""
        return self.classify(x).argmax(dim=-1)
