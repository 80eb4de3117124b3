"""SNS's network: a periodic UNet with attention that denoises two frames and reads both their noise levels.

Architecture (paper preset, one field channel, grid 64; every number is a constructor argument):

    input (3C, 64, 64)   [x_anchor clean, x_prev noised at s2, x_cur noised at s1]  (anchor=False: 2C)
      UNet encoder   projection, encoder and middle of emu.models.unet.UNet(3C, 2C),
                     self-attention after each 16² block                          512 x 16²  <- bottleneck
      heads          two Thermalizer heads (emu.models.thermalizer.level_head),
                     one per noised frame: GELU, 3x3 conv 512 -> 512, GELU,
                     1x1 conv -> 16, flatten 4096, Linear -> 1000, GELU,
                     Linear -> 1000                                              2 x 1000   -> logits s2, s1
      conditioning   [softmax(logits s2), softmax(logits s1)]                     2000
                     Linear 2000 -> 1000, GELU, Linear 1000 -> 1000, GELU         1000       -> c
                     per decoder block of width w: Linear 1000 -> 2w              (b1, b2)
      UNet decoder   the UNet's decoder (attention in its 16² blocks), each block
                     h = conv1(act(x)) + b1, h = conv2(act(h)) + b2; output conv  2C x 64²  -> ε̂2, ε̂1

The network is the multi-noise-level denoising oracle of SNS. For a trajectory pair (x_{t-1}, x_t)
and independent noise levels s2, s1 of one DDPM schedule ᾱ, each frame is noised on its own,

    x_prev = √ᾱ_{s2} x_{t-1} + √(1 − ᾱ_{s2}) ε2,    x_cur = √ᾱ_{s1} x_t + √(1 − ᾱ_{s1}) ε1,

and, with no time input, the network predicts both noises and both levels:

    ε̂2, ε̂1 = the UNet's output, split into its first and last C channels (≈ ε2, ε1)
    logits s2, logits s1 = the two heads on the bottleneck (categoricals over num_levels)

trained on MSE(ε̂2, ε2) + MSE(ε̂1, ε1) + 0.1 CE(logits s2, s2) + 0.1 CE(logits s1, s1) (methods.md
"SNS"). The anchor, a clean state of the same system (the trajectory's initial state at inference),
is input only: the paper found it helps early training, and the trained model hardly depends on it.

Level conditioning. The decoder is told what the heads read: their softmax outputs, concatenated,
pass through a two-layer MLP whose output gives every decoder residual block one per-channel bias
after each of its two convs. The softmax is not detached, so the noise loss also trains the heads.
The logits come from the bottleneck alone, so `classify` runs the projection, encoder, middle blocks
and heads and never the decoder (what a refinement step needs to pick ŝ2, ŝ1), and equals
`forward(x)`'s logits exactly.

Why a fixed grid: as for the Thermalizer, the heads flatten the bottleneck before a Linear layer, so
`grid_size` is a constructor argument and other grids are refused. Why attention: the paper's QG noise
model "did not work well without" attention at the bottleneck; emu puts it after every block at the
coarsest level (emu.models.unet), on Kolmogorov too. The heads (Linear over flattened positions) are
not translation equivariant, so neither is the whole network; the UNet with fixed biases is (for
shifts by multiples of the downsampling factor).

Where emu differs from the paper (which states only the parameter count, 73,727,522, and the
UNet's shape; methods.md: "two Linear(1000,1000)+GELU layers and a per-block Linear(1000→C) that adds
a per-channel bias after each conv in the decoder blocks"): emu's reading is one MLP over both heads'
concatenated softmax (so its first layer is Linear(2000, 1000)), and one Linear per decoder block
that gives both convs' biases at once (1000 -> 2w, split in two). Attention follows all seven 16²
blocks, where the paper says only "attached to the bottleneck". emu's paper preset has 74,814,610
parameters, 1,087,088 (1.5%) more than the paper's; a first conditioning layer of 1000 inputs (one
softmax at a time, or their sum) instead of 2000 would account for 1,001,000 of them. The UNet is
the Thermalizer's (PDEArena's modern UNet, 45.8M without attention, 6,573,568 more with it), whose
own count the Thermalizer paper gives as 48M, so the remainder is within the readings' slack.

Parameter counts (tests/test_sns_model.py pins them):

    preset  grid  C  anchor  UNet + attention   two heads    conditioning   total
    paper   64    1  yes     52,396,098         14,932,032    7,486,480     74,814,610  (paper: 73,727,522)
    small   32    1  yes        829,058          1,114,736      726,080      2,669,874
    small   32    2  yes        829,780          1,114,736      726,080      2,670,596
    small   32    2  no         829,492          1,114,736      726,080      2,670,308

(conditioning: the MLP 2L -> hidden -> hidden plus the per-block Linear layers; small preset:
condition_hidden 256, head_hidden 256.)

References:
    "Towards Infinitely Long Neural Simulations: Self-Refining Neural Surrogate Models" (SNS; the
    multi-noise-level denoising oracle, appendix: the UNet with two heads, 73,727,522 parameters).
    Pedersen, Zanna & Bruna (2025), "Thermalizer" (ICML; the noise-level head, emu.models.thermalizer).
    Ho, Jain & Abbeel (2020), "Denoising diffusion probabilistic models" (ε-prediction).
    Gupta & Brandstetter (2022), PDEArena's modern UNet (emu.models.unet).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Sequence

import torch
from torch import nn

from emu.models.thermalizer import check_grid_input, check_grid_size, check_head_arguments, level_head
from emu.models.unet import Activation, UNet, make_activation


class SNSOutput(NamedTuple):
    """SNSUNet's outputs: ε̂ of both noised frames (B, C, N, N) and both heads' logits (B, num_levels)."""

    previous_noise: torch.Tensor
    current_noise: torch.Tensor
    previous_logits: torch.Tensor
    current_logits: torch.Tensor


class SNSUNet(nn.Module):
    """SNS denoiser; (B, G*C, N, N) -> SNSOutput(ε̂2, ε̂1 (B, C, N, N), logits s2, s1 (B, num_levels)).

    Args:
        channels: C, the fields per frame (1 for Kolmogorov vorticity, 2 for the two QG layers).
            The config records it as in_channels = out_channels, the registry's names.
        grid_size: N, the side of the square grid; a multiple of the UNet's downsampling factor
            2**(len(channel_multipliers) - 1). The heads' first Linear layers are sized for it.
        anchor: whether the input starts with a clean anchor frame (G = 3 frames) or not (G = 2).
        num_levels: L, the noise levels each head classifies (the schedule's T = 1000).
        head_hidden: width of each head's hidden Linear layer; None means num_levels (the paper).
        head_channels: channels of each head's 1x1 conv before flattening (16: 16 x 16² = 4096).
        condition_hidden: width of the conditioning MLP; None means num_levels (methods.md's 1000).
        hidden_channels, channel_multipliers, blocks_per_level, middle_blocks, activation, attention,
            attention_heads: the UNet's (emu.models.unet.UNet); attention on by default.

    `stack_inputs(anchor, previous, current)` builds the input; `forward(x)` gives an SNSOutput;
    `classify(x)` the two logits without running the decoder; `predict_levels(x)` their argmax.
    `config` holds every constructor argument as a JSON-able dict (plus "arch" and "preset");
    `emu.models.make_model(**model.config)` rebuilds it.
    """

    arch: ClassVar[str] = "sns"

    def __init__(
        self,
        channels: int,
        *,
        grid_size: int,
        anchor: bool = True,
        num_levels: int = 1000,
        head_hidden: int | None = None,
        head_channels: int = 16,
        condition_hidden: int | None = None,
        hidden_channels: int = 64,
        channel_multipliers: Sequence[int] = (2, 2, 2),
        blocks_per_level: int = 2,
        middle_blocks: int = 2,
        activation: Activation = "gelu",
        attention: bool = True,
        attention_heads: int = 4,
    ):
        super().__init__()
        if int(channels) != channels or channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {channels}")
        check_head_arguments(num_levels, head_channels, head_hidden)
        condition_width = num_levels if condition_hidden is None else condition_hidden
        if int(condition_width) != condition_width or condition_width < 1:
            raise ValueError(f"condition_hidden must be an integer >= 1, got {condition_hidden}")
        self.channels, self.anchor = channels, bool(anchor)
        self.frames = 3 if self.anchor else 2
        # One UNet for both frames: its output is [ε̂2, ε̂1] stacked along channels.
        self.unet = UNet(self.frames * channels, 2 * channels, hidden_channels=hidden_channels,
                         channel_multipliers=channel_multipliers, blocks_per_level=blocks_per_level,
                         middle_blocks=middle_blocks, activation=activation, attention=attention,
                         attention_heads=attention_heads)
        factor = self.unet.downsampling_factor
        check_grid_size(grid_size, factor)
        self.config = {
            "arch": self.arch, "preset": None, "in_channels": channels, "out_channels": channels,
            "grid_size": grid_size, "anchor": self.anchor, "num_levels": num_levels, "head_hidden": head_hidden,
            "head_channels": head_channels, "condition_hidden": condition_hidden,
            **{key: value for key, value in self.unet.config.items()
               if key not in ("arch", "preset", "in_channels", "out_channels")},
        }
        # in/out_channels are the field channels C per frame (the registry's names), not the UNet's.
        self.in_channels = self.out_channels = channels
        self.grid_size, self.num_levels = grid_size, num_levels
        self.downsampling_factor = factor
        self.bottleneck_channels = self.unet.bottleneck_channels

        hidden = num_levels if head_hidden is None else head_hidden
        self.previous_head, self.current_head = (
            level_head(self.bottleneck_channels, grid_size // factor, head_channels, hidden, num_levels, activation)
            for _ in range(2))
        self.condition = nn.Sequential(
            nn.Linear(2 * num_levels, condition_width), make_activation(activation),
            nn.Linear(condition_width, condition_width), make_activation(activation),
        )
        # One Linear per decoder block for both of its convs: output [b1, b2], each of the block's width.
        self.decoder_biases = nn.ModuleList(
            nn.Linear(condition_width, 2 * width) for width in self.unet.decoder_block_widths())

    def stack_inputs(self, anchor: torch.Tensor | None, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The network input [anchor, previous, current] (or [previous, current]) along channels.

        anchor: the clean anchor frame (B, C, N, N); None exactly when the model was built without one.
        previous, current: x_{t-1} noised at s2 and x_t noised at s1, each (B, C, N, N).
        """
        if (anchor is None) == self.anchor:
            raise ValueError("this model was built with anchor=True and needs an anchor frame" if self.anchor
                             else "this model was built with anchor=False; pass anchor=None")
        frames = [previous, current] if anchor is None else [anchor, previous, current]
        shapes = {tuple(frame.shape) for frame in frames}
        if len(shapes) != 1:
            raise ValueError(f"the frames must share one shape, got {[tuple(frame.shape) for frame in frames]}")
        return torch.cat(frames, dim=1)

    def _check_input(self, x: torch.Tensor) -> None:
        layout = ("; channels [anchor, previous, current]" if self.anchor else "; channels [previous, current]")
        check_grid_input(x, self.frames * self.channels, self.grid_size, f"{layout} x {self.channels}")

    def _heads(self, bottleneck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.previous_head(bottleneck), self.current_head(bottleneck)

    def decoder_biases_from_logits(self, previous_logits: torch.Tensor,
                                   current_logits: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (b1, b2) pair per decoder block, each (B, width), from the two heads' logits."""
        probabilities = torch.cat((previous_logits.softmax(dim=-1), current_logits.softmax(dim=-1)), dim=-1)
        condition = self.condition(probabilities)
        return [tuple(linear(condition).chunk(2, dim=-1)) for linear in self.decoder_biases]

    def forward(self, x: torch.Tensor) -> SNSOutput:
        """ε̂2, ε̂1 (B, C, N, N) and logits of s2, s1 (B, num_levels) for x (B, G*C, N, N)."""
        self._check_input(x)
        bottleneck, skips = self.unet.encode(x)
        previous_logits, current_logits = self._heads(bottleneck)
        biases = self.decoder_biases_from_logits(previous_logits, current_logits)
        noise = self.unet.decode(bottleneck, skips, biases=biases)
        previous_noise, current_noise = noise.split(self.channels, dim=1)
        return SNSOutput(previous_noise, current_noise, previous_logits, current_logits)

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of s2, logits of s1), each (B, num_levels): projection, encoder, middle, heads; no decoder."""
        self._check_input(x)
        bottleneck, _ = self.unet.encode(x)
        return self._heads(bottleneck)

    @torch.no_grad()
    def predict_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ŝ2, ŝ1): argmax of each head's logits, LongTensors (B,); inference only (no gradients)."""
        previous_logits, current_logits = self.classify(x)
        return previous_logits.argmax(dim=-1), current_logits.argmax(dim=-1)
