"""Training of the deep Koopman autoencoder (Cohesion's coherent prior) with the shared loop.

    config = KoopmanTrainingConfig(data="data/", preset="small", horizon=8, epochs=20)
    train_koopman(config, "runs/koopman")            # last.pt, best.pt, metrics.jsonl, loss.png
    model, normalizer, payload = load_koopman("runs/koopman/best.pt")
    prior = model.forecast(normalizer.normalise(x0), horizon=100)   # (B, 101, C, N, N), normalised

The loss (Lusch, Kutz & Brunton 2018) on a window x_0..x_L of L + 1 = horizon + 1 consecutive
normalised snapshots, with z_t = φ(x_t) and ψ the decoder:

    reconstruction  = mean_t    MSE(ψ(z_t), x_t)                 t = 0..L (every frame)
    prediction      = mean_k    MSE(ψ(K^k z_0), x_k)             k = 1..L (from the first frame only)
    linearity       = mean_k    MSE(K^k z_0, z_k)                k = 1..L (in the latent space)
    loss = reconstruction_weight * reconstruction + prediction_weight * prediction
           + linearity_weight * linearity

(each MSE is the mean over its elements, so the mean over t or k of equal-sized terms is the MSE
over all of them). Lusch et al.'s L∞ term and their auxiliary eigenvalue network are left out: the
operator here is a plain matrix, stable by construction (emu.models.koopman).

Validation: the same loss and its terms on the valid split (valid_loss scores best.pt), plus the
prediction MSE at the last step k = L alone (valid_prediction_final_mse), the hardest target of a
window. Everything is in normalised units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from emu.data.loaders import Normalizer, TrajectoryWindows
from emu.data.well import split_files
from emu.models.koopman import PRESETS, KoopmanAutoencoder, make_koopman
from emu.training import loop
from emu.training.trainer import prepare_training

KIND = "koopman"


@dataclass(frozen=True)
class KoopmanTrainingConfig(loop.OptimisationSettings):
    """The shared optimisation settings (`loop.OptimisationSettings`; here batch 32 and lr 1e-3 by
    default) plus

    Attributes:
        preset: network size, "small" (CPU) or "paper" (emu.models.koopman.PRESETS).
        latent_dim: Koopman latent dimension d (None: the preset's).
        horizon: multistep length L of the loss (windows of L + 1 snapshots).
        stable: spectral radius < 1 by construction (True) or a free operator (False).
        reconstruction_weight, prediction_weight, linearity_weight: weights of the three loss terms
            (each >= 0, not all 0).
        ema_decay: weight EMA decay (0, the default, disables it); validation and load_koopman use
            the EMA weights when it is on.
    """

    batch_size: int = 32
    lr: float = 1e-3
    preset: str = "small"
    latent_dim: int | None = None
    horizon: int = 8
    stable: bool = True
    reconstruction_weight: float = 1.0
    prediction_weight: float = 1.0
    linearity_weight: float = 1.0
    ema_decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()

        def integer(value, least):
            return isinstance(value, int) and not isinstance(value, bool) and value >= least

        def weight(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0

        weights = (self.reconstruction_weight, self.prediction_weight, self.linearity_weight)
        checks = [
            (self.preset in PRESETS, "preset", " or ".join(repr(p) for p in sorted(PRESETS)), self.preset),
            (self.latent_dim is None or integer(self.latent_dim, 1), "latent_dim", "an integer >= 1 or None",
             self.latent_dim),
            (integer(self.horizon, 1), "horizon", "an integer >= 1", self.horizon),
            (isinstance(self.stable, bool), "stable", "True or False", self.stable),
            (weight(self.reconstruction_weight), "reconstruction_weight", ">= 0", self.reconstruction_weight),
            (weight(self.prediction_weight), "prediction_weight", ">= 0", self.prediction_weight),
            (weight(self.linearity_weight), "linearity_weight", ">= 0", self.linearity_weight),
            (not all(weight(w) for w in weights) or any(w > 0 for w in weights), "the loss weights",
             "not all 0 (nothing would be trained)", weights),
            (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)",
             self.ema_decay),
        ]
        for ok, name, allowed, value in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {value!r}")


class KoopmanLoss(nn.Module):
    """The three-term Koopman loss (module docstring) of windows (batch, L + 1, C, N, N); L = window
    length - 1. After each forward, `terms` holds the unweighted reconstruction, prediction and
    linearity MSEs and the prediction MSE at the last step (floats), and `per_step` the prediction
    MSE at each k = 1..L (a detached tensor)."""

    def __init__(self, model: KoopmanAutoencoder, *, reconstruction_weight: float = 1.0,
                 prediction_weight: float = 1.0, linearity_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.weights = (float(reconstruction_weight), float(prediction_weight), float(linearity_weight))
        self.terms: dict[str, float] = {}
        self.per_step: torch.Tensor | None = None

    @classmethod
    def from_config(cls, model: KoopmanAutoencoder, config: KoopmanTrainingConfig) -> KoopmanLoss:
        return cls(model, reconstruction_weight=config.reconstruction_weight,
                   prediction_weight=config.prediction_weight, linearity_weight=config.linearity_weight)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        if window.ndim != 5 or window.shape[1] < 2:
            raise ValueError(f"expected windows (batch, L + 1 >= 2, channel, y, x), got {tuple(window.shape)}")
        model = self.model
        steps = window.shape[1] - 1
        encoded = model.encode(window)                       # (B, L + 1, d)
        advanced = model.advance(encoded[:, 0], steps)[:, 1:]  # K^k z_0, k = 1..L
        # One decoder call for the L + 1 reconstructions and the L predictions.
        decoded = model.decode(torch.cat((encoded, advanced), dim=1))
        reconstructed, predicted = decoded[:, :steps + 1], decoded[:, steps + 1:]
        reconstruction = F.mse_loss(reconstructed, window)
        per_step = torch.mean((predicted - window[:, 1:]) ** 2, dim=(0, 2, 3, 4))
        prediction = per_step.mean()
        linearity = F.mse_loss(advanced, encoded[:, 1:])
        w_reconstruction, w_prediction, w_linearity = self.weights
        loss = w_reconstruction * reconstruction + w_prediction * prediction + w_linearity * linearity
        self.per_step = per_step.detach()
        self.terms = {"reconstruction": float(reconstruction.detach()), "prediction": float(prediction.detach()),
                      "linearity": float(linearity.detach()), "prediction_final": float(per_step[-1].detach())}
        return loss


def load_checkpoint(path) -> dict:
    """Loads a Koopman checkpoint safely (weights_only=True) and checks its format."""
    return loop.load_checkpoint(path, KIND)


def load_koopman(path) -> tuple[KoopmanAutoencoder, Normalizer, dict]:
    """(model in eval mode on the CPU with the inference weights: the EMA average when the run kept
    one, normaliser, payload) of a checkpoint written by `train_koopman`."""
    payload = load_checkpoint(path)
    model = KoopmanAutoencoder.from_config(payload["model_config"])
    model.load_state_dict(loop.inference_weights(payload))
    return model.eval(), Normalizer.from_state_dict(payload["normalizer"]), payload


def build_model(config: KoopmanTrainingConfig, channels: int, grid_size: int) -> KoopmanAutoencoder:
    """The network `config` asks for, on a grid of side `grid_size` with `channels` fields."""
    overrides = {"stable": config.stable}
    if config.latent_dim is not None:
        overrides["latent_dim"] = config.latent_dim
    return make_koopman(config.preset, channels, grid_size, **overrides)


def train_koopman(config: KoopmanTrainingConfig, out, *, resume: bool = False, overwrite: bool = False,
                  progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Trains (or resumes, or with a larger `config.epochs` extends) a Koopman autoencoder into `out`;
    returns the last epoch's metrics. `out` must be empty or new unless `resume` or `overwrite` (see
    `loop.fit`, which also stops on NaN/inf). Checkpoints (format "emu-koopman") carry model_config,
    the normaliser and the dataset info; `load_koopman` reads them."""
    context, info, normalizer, channels = prepare_training(config)
    torch.manual_seed(config.seed)
    train_set = TrajectoryWindows(config.data, "train", unroll=config.horizon, normalizer=normalizer)
    valid_set = (TrajectoryWindows(config.data, "valid", unroll=config.horizon, normalizer=normalizer)
                 if split_files(config.data, "valid") else None)
    _, _, size_x, size_y = train_set.shapes[0]
    if size_x != size_y:
        raise ValueError(f"{config.data}: the Koopman autoencoder needs a square grid, got {size_y} x {size_x}")
    model = build_model(config, channels, size_x).to(context.device)
    job = loop.Job(
        module=model, objective=KoopmanLoss.from_config(model, config), train_set=train_set,
        evaluate=lambda module: evaluate(module, valid_set, config, context.device) if valid_set is not None else {},
        extras={"model_config": model.config, "normalizer": normalizer.state_dict(), "dataset": info},
        plot_keys=(("train_loss", "train"), ("valid_loss", "valid"),
                   ("valid_prediction_final_mse", f"valid prediction MSE at step {config.horizon}")))
    if valid_set is None and context.rank == 0:
        echo(f"note: {config.data} has no valid split: no validation metrics, and best.pt is the epoch with the "
             "lowest training loss")
    return loop.fit(job, config, context, out, kind=KIND, resume=resume, overwrite=overwrite, progress=progress,
                    ema_decay=config.ema_decay, echo=echo)


@torch.no_grad()
def evaluate(model: KoopmanAutoencoder, valid_set: TrajectoryWindows, config: KoopmanTrainingConfig, device) -> dict:
    """The training loss and its terms on the valid split (means over its windows, normalised units)
    and the prediction MSE at the window's last step (valid_prediction_final_mse)."""
    model.eval()
    objective = KoopmanLoss.from_config(model, config)
    sums: dict[str, float] = {}
    windows = 0
    for window in DataLoader(valid_set, batch_size=config.batch_size):
        batch = window.shape[0]
        sums["loss"] = sums.get("loss", 0.0) + float(objective(window.to(device))) * batch
        for name, value in objective.terms.items():
            sums[name] = sums.get(name, 0.0) + value * batch
        windows += batch
    metrics = {f"valid_{name}": value / max(windows, 1) for name, value in sums.items()}
    metrics["valid_prediction_final_mse"] = metrics.pop("valid_prediction_final")
    return metrics
