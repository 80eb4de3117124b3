"""Deep Koopman autoencoder: Cohesion's coherent prior, rolled over a whole horizon in one call.

A nonlinear map x_{t+1} = F(x_t) on fields is replaced by a linear map on a learned latent space:

    z_t = φ(x_t)                  encoder φ: (C, N, N) -> R^d
    z_{t+1} = K z_t               Koopman operator K: a learned d x d matrix
    x̂_t = ψ(z_t)                  decoder ψ: R^d -> (C, N, N)

so a forecast of H steps from one state is x̂_k = ψ(K^k φ(x_0)), k = 0..H: one encode, H matrix
products and one batched decode of all H + 1 latents, with no network evaluation per step. That is
what Cohesion (2504.14264) uses as the "coherent prior" over the whole sequence that its diffusion
model then refines (trajectory planning, R = T). Training (emu.training.koopman) combines the three
losses of Lusch, Kutz & Brunton (2018): reconstruction ψ(φ(x)) ≈ x, multistep prediction
ψ(K^k φ(x_0)) ≈ x_k and latent linearity K^k φ(x_0) ≈ φ(x_k).

Architecture (fully periodic: every convolution and upsampling wraps around the domain):

    input (C, N, N)
      projection   3x3 circular conv C -> h                                   h x N²
      level i      ResidualBlock(w_{i-1} -> w_i), CircularDownsample(w_i)      w_i x (N / 2^{i+1})²
                   (w_{-1} = h, w_i = h * 2^i, i = 0 .. levels - 1)
      latent       activation, flatten, Linear w_last (N / 2^levels)² -> d
    decoder (the mirror)
      Linear d -> w_last (N / 2^levels)², reshape
      level i      CircularUpsample(w_i), ResidualBlock(w_i -> w_{i-1})       (coarsest level first)
      output       activation, 3x3 circular conv h -> C

The Linear layers are sized for one grid (`grid_size`, a multiple of 2^levels), and they break the
periodic translation equivariance of the convolutions (a Koopman latent is a global description of
the state, not a field).

Stability. A forecast over the whole horizon applies K hundreds of times; z_k = K^k z_0 grows like
ρ(K)^k where ρ is the spectral radius, so one eigenvalue of modulus 1.01 multiplies its mode by 20
over 300 steps and the decoder is then evaluated far outside the latents it was trained on: the
prior explodes, and the diffusion model is conditioned on garbage. With `stable=True` the operator is

    K = U diag(s) Vᵀ,   U = exp(A - Aᵀ), V = exp(B - Bᵀ) (orthogonal),   s = sigmoid(r) ∈ (0, 1)^d

(A, B strictly upper triangular, stored as their d(d-1)/2 entries; r a vector of d). This is a
singular value decomposition, so ||K||_2 = max s < 1, hence ρ(K) <= ||K||_2 < 1 and ||K^k z|| <= ||z||
for every k: the latent trajectory is bounded *by construction*, whatever the optimiser does, and
no penalty or projection step is needed. It covers every matrix with singular values in (0, 1) and
positive determinant (exp of a skew-symmetric matrix lies in SO(d); U = V = I at initialisation).
U, V and K are computed in float64 (a d x d matrix: negligible cost) and cast to the parameters'
dtype, so the bound holds to rounding of the final cast (tests measure ρ <= 1 + 1e-6 after training
that pulls K towards 1.5 I); `advance` applies K outside autocast, in float32, also under --amp.
Strict contraction means a long forecast relaxes towards ψ(0), a learned mean state: for a chaotic
flow beyond its predictability horizon, the coherent (ensemble mean) part does exactly that.
The skew-symmetric exponential is written out here rather than taken from
torch.nn.utils.parametrizations.orthogonal: parametrized modules refuse pickling (torch 2.13:
"Serialization of parametrized modules is only supported through state_dict()"), and writing it
out keeps the state_dict to three plain tensors and the float64 computation explicit.

`stable=False` learns K as a free matrix (initialised to 0.95 I like the stable one: near identity),
whose spectral radius may exceed 1: the baseline that shows why the constraint matters.

`config` holds every constructor argument (JSON-able) plus "arch" ("koopman") and "preset";
`KoopmanAutoencoder.from_config(config)` rebuilds the same architecture.

Parameter counts at 32², one channel (tests/test_koopman.py pins them):
    preset  structure                                                      total      of which
    small   latent 64, hidden 16, levels 3: widths 16, 32, 64,          389,697   132,160 Linear,
            bottleneck 64 x 4² = 1024                                              4,096 operator
    paper   latent 256, hidden 64, levels 3: widths 64, 128, 256,     6,209,793   2,101,504 Linear,
            bottleneck 256 x 4² = 4096                                             65,536 operator
The convolutions do not depend on the grid; the two Linear layers grow with it (4x per doubling of N).
The Cohesion paper gives no architecture numbers for its Koopman network; both presets are emu's
choices (the small one trains on a CPU; "paper" is a GPU-sized width with the same topology).

References:
    Lusch, Kutz & Brunton (2018), "Deep learning for universal linear embeddings of nonlinear
    dynamics", Nature Communications 9, 4950 (the deep Koopman autoencoder and its three losses).
    "Generative emulation of chaotic dynamics with coherent prior" (Cohesion, arXiv 2504.14264):
    a deep Koopman operator as the coherent prior of a diffusion model, rolled over the horizon.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from emu.models.unet import (
    Activation,
    CircularDownsample,
    CircularUpsample,
    ResidualBlock,
    circular_conv3x3,
    make_activation,
)

# Keyword arguments of each preset (grid_size is the data's, so no preset holds it). The Cohesion
# paper gives no numbers for its Koopman network: both are emu's choices.
PRESETS: dict[str, dict] = {
    "small": {"latent_dim": 64, "hidden_channels": 16, "levels": 3},
    "paper": {"latent_dim": 256, "hidden_channels": 64, "levels": 3},
}

# Singular values (stable) or diagonal (free) of K at initialisation: near identity, slightly contracting.
INITIAL_SCALE = 0.95


def _skew(entries: torch.Tensor, dim: int) -> torch.Tensor:
    """The d x d skew-symmetric matrix whose strict upper triangle holds `entries` (row-major)."""
    rows, cols = torch.triu_indices(dim, dim, offset=1, device=entries.device)
    upper = entries.new_zeros(dim, dim).index_put((rows, cols), entries)
    return upper - upper.T


class KoopmanAutoencoder(nn.Module):
    """Periodic convolutional autoencoder with a linear latent operator; see the module docstring.

    Args:
        channels: field channels C (1 for Kolmogorov vorticity, 2 for the QG layers); input and output.
        grid_size: side N of the square grid (the Linear layers are sized for it); a multiple of 2^levels.
        latent_dim: d, the dimension of the Koopman latent space.
        hidden_channels: width h after the input projection; level i has width h * 2^i.
        levels: residual block + downsampling pairs (and as many upsampling + block pairs).
        activation: "gelu", "silu" or "relu".
        stable: K = U diag(sigmoid(r)) Vᵀ with ρ(K) < 1 by construction (True), or a free matrix.

    Methods: `encode(x)` (..., C, N, N) -> (..., d); `decode(z)` (..., d) -> (..., C, N, N);
    `operator()` -> K (d, d); `advance(z, steps)` (B, d) -> (B, steps + 1, d), z_0 = z;
    `forecast(initial, horizon)` (B, C, N, N) -> (B, horizon + 1, C, N, N), entry k = ψ(K^k φ(x_0))
    (entry 0 is the reconstruction of `initial`, not `initial` itself). `forward(x)` = decode(encode(x)).
    """

    arch: ClassVar[str] = "koopman"

    def __init__(self, channels: int, *, grid_size: int, latent_dim: int = 64, hidden_channels: int = 16,
                 levels: int = 3, activation: Activation = "gelu", stable: bool = True):
        super().__init__()
        for name, value in (("channels", channels), ("grid_size", grid_size), ("latent_dim", latent_dim),
                            ("hidden_channels", hidden_channels), ("levels", levels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if grid_size % 2**levels:
            raise ValueError(f"grid_size must be a multiple of 2^levels = {2**levels} (levels={levels}), "
                             f"got {grid_size}")
        if not isinstance(stable, bool):
            raise ValueError(f"stable must be True or False, got {stable!r}")
        make_activation(activation)  # validate the name before building anything
        self.config = {"arch": self.arch, "preset": None, "channels": channels, "grid_size": grid_size,
                       "latent_dim": latent_dim, "hidden_channels": hidden_channels, "levels": levels,
                       "activation": activation, "stable": stable}
        self.channels, self.grid_size, self.latent_dim, self.stable = channels, grid_size, latent_dim, stable

        widths = [hidden_channels * 2**level for level in range(levels)]
        self.bottleneck_shape = (widths[-1], grid_size // 2**levels, grid_size // 2**levels)
        flat = math.prod(self.bottleneck_shape)

        self.projection = circular_conv3x3(channels, hidden_channels)
        encoder: list[nn.Module] = []
        width = hidden_channels
        for level_width in widths:
            encoder += [ResidualBlock(width, level_width, activation), CircularDownsample(level_width)]
            width = level_width
        self.encoder = nn.ModuleList(encoder)
        self.encoder_activation = make_activation(activation)
        self.to_latent = nn.Linear(flat, latent_dim)

        self.from_latent = nn.Linear(latent_dim, flat)
        decoder: list[nn.Module] = []
        for level in reversed(range(levels)):
            below = widths[level - 1] if level > 0 else hidden_channels
            decoder += [CircularUpsample(widths[level]), ResidualBlock(widths[level], below, activation)]
        self.decoder = nn.ModuleList(decoder)
        self.output_activation = make_activation(activation)
        self.output = circular_conv3x3(hidden_channels, channels)

        if stable:
            pairs = latent_dim * (latent_dim - 1) // 2
            self.left_generator = nn.Parameter(torch.zeros(pairs))    # U = exp(A - Aᵀ)
            self.right_generator = nn.Parameter(torch.zeros(pairs))   # V = exp(B - Bᵀ)
            logit = math.log(INITIAL_SCALE / (1 - INITIAL_SCALE))  # sigmoid(logit) = INITIAL_SCALE
            self.raw_singular_values = nn.Parameter(torch.full((latent_dim,), logit))
        else:
            self.matrix = nn.Parameter(INITIAL_SCALE * torch.eye(latent_dim))

    @classmethod
    def from_config(cls, config: dict) -> KoopmanAutoencoder:
        """Rebuilds the architecture from `model.config` (e.g. a checkpoint's model_config)."""
        if config.get("arch", cls.arch) != cls.arch:
            raise ValueError(f"not a {cls.arch!r} config (arch {config.get('arch')!r})")
        model = cls(**{key: value for key, value in config.items() if key not in ("arch", "preset")})
        model.config["preset"] = config.get("preset")
        return model

    # ------------------------------------------------------------------ operator
    def singular_values(self) -> torch.Tensor:
        """s = sigmoid(r) in (0, 1), the singular values of K (stable=True only)."""
        if not self.stable:
            raise ValueError("singular_values() exists only for stable=True (K is then U diag(s) Vᵀ)")
        return torch.sigmoid(self.raw_singular_values)

    def operator(self) -> torch.Tensor:
        """The Koopman matrix K (d, d); z_{t+1} = K z_t. Differentiable in the parameters."""
        if not self.stable:
            return self.matrix
        d = self.latent_dim
        dtype = self.raw_singular_values.dtype
        # float64 for the exponentials and the product, so that ||K||_2 <= 1 holds to the final cast.
        left = torch.linalg.matrix_exp(_skew(self.left_generator.double(), d))
        right = torch.linalg.matrix_exp(_skew(self.right_generator.double(), d))
        singular = torch.sigmoid(self.raw_singular_values.double())
        return ((left * singular) @ right.T).to(dtype)

    def advance(self, z: torch.Tensor, steps: int) -> torch.Tensor:
        """(B, d) latents -> (B, steps + 1, d): z, K z, K² z, ..., K^steps z."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if z.ndim != 2 or z.shape[-1] != self.latent_dim:
            raise ValueError(f"expected latents (batch, {self.latent_dim}), got {tuple(z.shape)}")
        # Outside autocast, in the operator's dtype (float32): under bfloat16 autocast the matmuls
        # would round K to 8 bits of mantissa, and ||K||_2 <= 1 would hold only to ~4e-3 per step.
        with torch.autocast(z.device.type, enabled=False):
            transposed = self.operator().T  # rows are latents: (K z)ᵀ = zᵀ Kᵀ
            states = [z.to(transposed.dtype)]
            for _ in range(steps):
                states.append(states[-1] @ transposed)
            return torch.stack(states, dim=1)

    # ------------------------------------------------------------------ autoencoder
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Fields (..., C, N, N) -> latents (..., d); any leading dimensions (batch, time) are kept."""
        expected = (self.channels, self.grid_size, self.grid_size)
        if x.ndim < 4 or tuple(x.shape[-3:]) != expected:
            raise ValueError(f"expected fields (batch, ..., {self.channels}, {self.grid_size}, {self.grid_size}) "
                             f"for this model (channels={self.channels}, grid_size={self.grid_size}), "
                             f"got {tuple(x.shape)}")
        leading = x.shape[:-3]
        h = self.projection(x.reshape(-1, *expected))
        for module in self.encoder:
            h = module(h)
        z = self.to_latent(self.encoder_activation(h).flatten(1))
        return z.reshape(*leading, self.latent_dim)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (..., d) -> fields (..., C, N, N); any leading dimensions are kept."""
        if z.ndim < 1 or z.shape[-1] != self.latent_dim:
            raise ValueError(f"expected latents (..., {self.latent_dim}), got {tuple(z.shape)}")
        leading = z.shape[:-1]
        h = self.from_latent(z.reshape(-1, self.latent_dim)).reshape(-1, *self.bottleneck_shape)
        for module in self.decoder:
            h = module(h)
        x = self.output(self.output_activation(h))
        return x.reshape(*leading, self.channels, self.grid_size, self.grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ψ(φ(x)) of fields (..., C, N, N)."""
        return self.decode(self.encode(x))

    def forecast(self, initial: torch.Tensor, horizon: int) -> torch.Tensor:
        """The whole horizon from one state: (B, C, N, N) -> (B, horizon + 1, C, N, N), entry k = ψ(K^k φ(x_0)).

        One encode, `horizon` latent matrix products and one decode of all (horizon + 1) B latents.
        """
        if initial.ndim != 4:
            raise ValueError(f"expected initial states (batch, {self.channels}, N, N), got {tuple(initial.shape)}")
        return self.decode(self.advance(self.encode(initial), horizon))


def make_koopman(preset: str | None, channels: int, grid_size: int, **overrides) -> KoopmanAutoencoder:
    """A KoopmanAutoencoder from `preset` ("small", "paper" or None: the constructor defaults) with
    `overrides` on top (they win); `config["preset"]` records the preset. ValueError, listing the
    allowed values, for an unknown preset or argument."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {preset!r}")
    allowed = ("latent_dim", "hidden_channels", "levels", "activation", "stable")
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown koopman arguments {unknown}; allowed: {list(allowed)}")
    model = KoopmanAutoencoder(channels, grid_size=grid_size, **{**(PRESETS[preset] if preset else {}), **overrides})
    model.config["preset"] = preset
    return model
