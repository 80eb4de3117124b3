"""Cohesion's score network: a periodic UNet over a window of W noised frames, conditioned on diffusion time.

Architecture (small preset, C field channels, window W = 5; every number is a constructor argument):

    input x_t (B, W, C, N, N)   W consecutive frames, each noised at the same time t
      reshape                    frames stacked along channels                    (B, W*C, N, N)
      time embedding             t in [0, 1] -> 16 sinusoidal pairs
                                 [cos(pi k t), sin(pi k t)], k = 1..16           32
                                 Linear 32 -> 4E, act, Linear 4E -> E, act        E = embedding_dim (64)
                                 per residual block of width w: Linear E -> 2w    (b1, b2)
      UNet                       emu.models.unet.UNet(W*C, W*C): projection, encoder, middle,
                                 decoder; every residual block (encoder, middle and decoder)
                                 h = conv1(act(x)) + b1, h = conv2(act(h)) + b2, + shortcut(x)
      reshape                    back to frames                                   (B, W, C, N, N) -> eps_hat

Diffusion (a variance-preserving SDE; the schedule is emu.diffusion.vp.VPSchedule): a clean window
x_0 is perturbed as

    x_t = mu(t) x_0 + sigma(t) eps,   eps ~ N(0, I),   t ~ U(0, 1),

and the network is trained to predict the noise (eps-prediction, Ho et al. 2020):

    L = E_{t, x_0, eps} || eps_hat(x_t, t) - eps ||²,

so that the score of the perturbed window distribution is (Song et al. 2021)

    grad_x log p_t(x_t) ≈ -eps_hat(x_t, t) / sigma(t).

Why a window: Cohesion (like SDA, Rozet & Louppe 2023, whose window score network it reuses) learns
the score of short trajectory segments of W frames and composes the score of a whole sequence from
the windows' scores; the network therefore sees W frames at once (the frames' temporal coupling is
learned through the channel dimension) and predicts the noise of all of them.

Time input. The embedding reads t itself (not log SNR): SDA's TimeEmbedding exactly (16 frequencies
pi k on t in [0, 1], then Linear(32, 256), act, Linear(256, 64) at E = 64), here with emu's activation
(GELU by default, SDA's is SiLU), followed by one more activation before the per-block Linear layers
(as DDPM's `Dense(nonlinearity(temb))`). Each residual block gets its own Linear(E, 2w), split into
the biases after its two convs (the same mechanism SNS uses in its decoder, emu.models.sns); SDA
instead adds a projected embedding to each block's input. With all these Linear layers zero, the
network does not depend on t.

Fully convolutional in space: every layer is a circular convolution or acts per channel, so any grid
whose sides are multiples of `downsampling_factor` (4 for three levels) is accepted, and the network
commutes with periodic shifts by multiples of it (the biases are the same at every position).

Presets (`PRESETS`, `make_score_network`):

    small   hidden 16, multipliers (1, 2, 2), 2 blocks/level, 2 middle, E 64, no attention
    paper   hidden 64, multipliers (2, 2, 2), 2 blocks/level, 2 middle, E 64, no attention

"paper" is emu's reading: Cohesion publishes no code, and states a UNet with a temporal embedding
over windows of W = 5; emu takes the Thermalizer's/PDEArena's UNet at its paper size (the same
backbone as emu's other diffusion models) and SDA's embedding width 64 (SDA's Kolmogorov score
network has widths 96, 192, 384 with three blocks per level). Parameter counts (C = 1, W = 5; any
grid, 32² included, since nothing is sized by the grid; tests/test_score_model.py pins them):

    preset       total   UNet (5 -> 5 channels)   time MLP   bias Linears (8 encoder/middle + 9 decoder blocks)
    small      832,981                  724,885     24,896       83,200
    paper   46,507,589               45,825,413     24,896      657,280

References:
    Ho, Jain & Abbeel (2020), "Denoising diffusion probabilistic models" (eps-prediction).
    Song et al. (2021), "Score-based generative modeling through stochastic differential equations"
        (the VP SDE; score = -eps_hat / sigma).
    Rozet & Louppe (2023), "Score-based data assimilation" (SDA; the window score network and its
        time embedding, `sda/score.py`, which Cohesion reuses).
    Cohesion (arXiv 2504.14264), "Generative emulation of chaotic dynamics with coherent prior".
    Gupta & Brandstetter (2022), PDEArena's modern UNet (emu.models.unet).
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar, Sequence

import torch
from torch import nn

from emu.models.unet import Activation, UNet, make_activation

# SDA's TimeEmbedding: frequencies pi * (1..16) on t in [0, 1], so 32 sinusoidal features.
TIME_FREQUENCIES = 16


class SinusoidalTimeFeatures(nn.Module):
    """t (B,) in [0, 1] -> [cos(pi k t), sin(pi k t)] for k = 1..frequencies, (B, 2 * frequencies).

    The lowest frequency (k = 1) is a half period over [0, 1], so t = 0 and t = 1 are told apart;
    the highest resolves steps of about 1 / frequencies. No parameters.
    """

    def __init__(self, frequencies: int = TIME_FREQUENCIES):
        super().__init__()
        self.register_buffer("frequencies", math.pi * torch.arange(1, frequencies + 1, dtype=torch.float32),
                             persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = self.frequencies.to(t.device) * t.float()[:, None]
        return torch.cat((angles.cos(), angles.sin()), dim=-1)


class WindowScoreUNet(nn.Module):
    """eps_hat(x_t, t): (B, W, C, N, N) noised window and t (B,) in [0, 1] -> predicted noise (B, W, C, N, N).

    Args:
        channels: C, the fields per frame (1 for Kolmogorov vorticity, 2 for the two QG layers).
            The config records it as in_channels = out_channels (the registry's names).
        window: W, the consecutive frames the network sees and denoises at once (Cohesion: 5).
        embedding_dim: E, the width of the time embedding (after the MLP 32 -> 4E -> E).
        hidden_channels, channel_multipliers, blocks_per_level, middle_blocks, activation, attention,
            attention_heads: the UNet's (emu.models.unet.UNet), built with W*C channels in and out.

    `forward(x, t)`: t is one time per sample, shape (B,), or a 0-d tensor / float for the whole
    batch (what a sampler passes). `time_biases(t)` gives the per-block bias pairs (encoder and
    middle, decoder). `config` holds every constructor argument as a JSON-able dict (plus "arch" =
    "score" and "preset"); `score_network_from_config(config)` rebuilds it.
    """

    arch: ClassVar[str] = "score"

    def __init__(
        self,
        channels: int,
        *,
        window: int = 5,
        hidden_channels: int = 16,
        channel_multipliers: Sequence[int] = (1, 2, 2),
        blocks_per_level: int = 2,
        middle_blocks: int = 2,
        activation: Activation = "gelu",
        attention: bool = False,
        attention_heads: int = 4,
        embedding_dim: int = 64,
    ):
        super().__init__()
        for name, value in (("channels", channels), ("window", window), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.unet = UNet(window * channels, window * channels, hidden_channels=hidden_channels,
                         channel_multipliers=channel_multipliers, blocks_per_level=blocks_per_level,
                         middle_blocks=middle_blocks, activation=activation, attention=attention,
                         attention_heads=attention_heads)
        self.config = {
            "arch": self.arch, "preset": None, "in_channels": channels, "out_channels": channels, "window": window,
            **{key: value for key, value in self.unet.config.items()
               if key not in ("arch", "preset", "in_channels", "out_channels")},
            "embedding_dim": embedding_dim,
        }
        self.channels = self.in_channels = self.out_channels = channels
        self.window = window
        self.downsampling_factor = self.unet.downsampling_factor

        features = SinusoidalTimeFeatures()
        self.time_embedding = nn.Sequential(
            features, nn.Linear(2 * TIME_FREQUENCIES, 4 * embedding_dim), make_activation(activation),
            nn.Linear(4 * embedding_dim, embedding_dim), make_activation(activation),
        )
        # One Linear per residual block for both of its convs: output [b1, b2], each of the block's width.
        self.encoder_biases = nn.ModuleList(nn.Linear(embedding_dim, 2 * w) for w in self.unet.encoder_block_widths())
        self.decoder_biases = nn.ModuleList(nn.Linear(embedding_dim, 2 * w) for w in self.unet.decoder_block_widths())

    def bias_layers(self) -> list[nn.Linear]:
        """Every per-block Linear layer (encoder and middle, then decoder): zero them and t has no effect."""
        return [*self.encoder_biases, *self.decoder_biases]

    def _times(self, t, batch: int, reference: torch.Tensor) -> torch.Tensor:
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            t = torch.tensor(float(t))
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            # Integer tensors are refused: they are likely discrete levels (0..T-1), not times in [0, 1].
            raise ValueError(f"t must be diffusion times in [0, 1], a float or a floating-point tensor, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        t = t.to(reference.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must hold one diffusion time per sample, shape ({batch},), or be a single "
                             f"time (0-d) for the whole batch; got shape {tuple(t.shape)}")
        return t.float()

    def time_biases(self, t: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                     list[tuple[torch.Tensor, torch.Tensor]]]:
        """(encoder and middle biases, decoder biases): one (b1, b2) pair per block, each (B, width)."""
        embedding = self.time_embedding(t)
        encoder = [tuple(linear(embedding).chunk(2, dim=-1)) for linear in self.encoder_biases]
        decoder = [tuple(linear(embedding).chunk(2, dim=-1)) for linear in self.decoder_biases]
        return encoder, decoder

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """eps_hat (B, W, C, N, N) for the noised window x (B, W, C, N, N) at times t (B,) or 0-d."""
        if x.ndim != 5 or x.shape[1] != self.window or x.shape[2] != self.channels:
            raise ValueError(f"expected a window (batch, {self.window}, {self.channels}, N, N) "
                             f"(window, channels per frame), got {tuple(x.shape)}")
        if x.shape[-2] % self.downsampling_factor or x.shape[-1] % self.downsampling_factor:
            raise ValueError(f"the grid sides must be multiples of {self.downsampling_factor}, got {tuple(x.shape[-2:])}")
        batch = x.shape[0]
        times = self._times(t, batch, x)
        encoder_biases, decoder_biases = self.time_biases(times)
        stacked = x.reshape(batch, self.window * self.channels, *x.shape[-2:])
        bottleneck, skips = self.unet.encode(stacked, biases=encoder_biases)
        noise = self.unet.decode(bottleneck, skips, biases=decoder_biases)
        return noise.reshape(x.shape)


def score_from_noise(noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The score grad_x log p_t(x_t) = -eps_hat / sigma(t); sigma per sample (B,) or a scalar, broadcast."""
    sigma = torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device)
    if sigma.ndim == 1:
        sigma = sigma.reshape(-1, *([1] * (noise.ndim - 1)))
    return -noise / sigma


# Keyword arguments of each preset (window and channels come from the data). The paper preset restates
# every value on purpose, so that a change of default never silently changes what "paper" means.
PRESETS: dict[str, dict] = {
    "small": {"hidden_channels": 16, "channel_multipliers": (1, 2, 2), "blocks_per_level": 2, "middle_blocks": 2,
              "activation": "gelu", "attention": False, "attention_heads": 4, "embedding_dim": 64},
    "paper": {"hidden_channels": 64, "channel_multipliers": (2, 2, 2), "blocks_per_level": 2, "middle_blocks": 2,
              "activation": "gelu", "attention": False, "attention_heads": 4, "embedding_dim": 64},
}


def make_score_network(preset: str | None, channels: int, **overrides) -> WindowScoreUNet:
    """WindowScoreUNet from `preset` ("small", "paper" or None: the constructor's defaults) with
    `overrides` (e.g. window=5) on top; ValueError for an unknown preset or argument."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"score network preset must be one of {sorted(PRESETS)} or None, got {preset!r}")
    allowed = ["window", *PRESETS["small"]]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown score network arguments {unknown}; allowed: {allowed}")
    network = WindowScoreUNet(channels, **{**(PRESETS[preset] if preset is not None else {}), **overrides})
    network.config["preset"] = preset
    return network


def score_network_from_config(config: dict) -> WindowScoreUNet:
    """Rebuilds the network from its `config` (e.g. a checkpoint's model_config)."""
    config = copy.deepcopy(dict(config))
    if config.pop("arch", "score") != "score":
        raise ValueError(f"not a score network config (arch {config.get('arch')!r})")
    preset = config.pop("preset", None)
    channels = config.pop("in_channels")
    if config.pop("out_channels", channels) != channels:
        raise ValueError("a score network's out_channels must equal its in_channels (the channels per frame)")
    network = WindowScoreUNet(channels, **config)
    network.config["preset"] = preset
    return network


__all__ = ["PRESETS", "SinusoidalTimeFeatures", "WindowScoreUNet", "make_score_network", "score_from_noise",
           "score_network_from_config"]
