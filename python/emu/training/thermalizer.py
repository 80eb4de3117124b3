"""Training the Thermalizer: a DDPM of single snapshots plus a noise-level classifier (paper eq. 8).

    python -m emu.cli train thermalizer --data data/ --preset small --epochs 20 --out th/

Each batch of normalised snapshots x_0 draws levels s uniformly over all T levels (training only on
low levels hurt in the paper) and fresh noise eps; the network sees x_s = sqrt(alpha_bar_s) x_0 +
sqrt(1 - alpha_bar_s) eps and is trained on

    loss = MSE(eps_hat(x_s), eps) + w * CrossEntropy(logits(x_s), s),      w = 1 (classifier_weight)

with AdamW (paper: lr 2e-5, weight decay 0.05, batch 64, ~50 epochs) and an exponential moving
average of the weights (decay 0.995) that validation and inference use. The loop (schedule, DDP,
AMP, checkpoints, resume) is `emu.training.loop.fit`, shared with the emulators.

Validation reports the noise MSE and cross-entropy on the validation split at fixed levels and
noise (so epochs compare), the classifier's exact-level accuracy, and its mean absolute level error
on states at levels below 50, the range the rollouts live in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from emu.data.loaders import Normalizer, Snapshots
from emu.data.well import split_files
from emu.diffusion import CosineSchedule, DDPMScheduler, add_noise, sample_levels
from emu.models import make_model
from emu.training import loop
from emu.training.trainer import dataset_info


@dataclass(frozen=True)
class ThermalizerTrainingConfig:
    """Settings of one thermalizer training run (stored in every checkpoint).

    Attributes:
        data: dataset folder made by `emu generate`; every stored snapshot of the training split is a sample.
        preset: "small" (CPU) or "paper" (53M parameters).
        num_levels: diffusion levels T of the cosine schedule.
        classifier_weight: w of the cross-entropy term.
        ema_decay: weight EMA decay (0 disables).
        epochs, batch_size, lr, weight_decay, schedule, amp, compile, seed, num_workers, device: as for emulators.
    """

    data: str
    preset: str = "small"
    num_levels: int = 1000
    classifier_weight: float = 1.0
    ema_decay: float = 0.995
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.05
    schedule: str = "cosine"
    amp: bool = False
    compile: bool = False
    seed: int = 0
    num_workers: int = 0
    device: str | None = None

    def __post_init__(self):
        loop.check_optimisation_settings(self)
        if self.preset not in ("small", "paper"):
            raise ValueError(f"preset must be 'small' or 'paper', got {self.preset!r}")
        if not (isinstance(self.num_levels, int) and self.num_levels >= 2):
            raise ValueError(f"num_levels must be an integer >= 2, got {self.num_levels!r}")
        if not self.classifier_weight >= 0:
            raise ValueError(f"classifier_weight must be >= 0, got {self.classifier_weight!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")


class DiffusionLoss(nn.Module):
    """x_0 -> MSE(eps_hat, eps) + w CE(logits, s) with uniform levels s and fresh noise (eq. 8).

    After each forward `terms` holds the two parts (floats) for the training log.
    """

    def __init__(self, network: nn.Module, schedule: CosineSchedule, classifier_weight: float = 1.0):
        super().__init__()
        self.network = network
        self.schedule = schedule
        self.classifier_weight = classifier_weight
        self.terms: dict[str, float] = {}

    def forward(self, clean: torch.Tensor, levels: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        if levels is None:
            levels = sample_levels(clean.shape[0], self.schedule.num_levels, device=clean.device)
        if noise is None:
            noise = torch.randn_like(clean)
        predicted_noise, logits = self.network(add_noise(self.schedule, clean, levels, noise))
        noise_mse = F.mse_loss(predicted_noise.float(), noise.float())
        cross_entropy = F.cross_entropy(logits.float(), levels)
        self.terms = {"noise_mse": float(noise_mse.detach()), "cross_entropy": float(cross_entropy.detach())}
        return noise_mse + self.classifier_weight * cross_entropy


@torch.no_grad()
def evaluate(network: nn.Module, valid_set: Snapshots, schedule: CosineSchedule, config: ThermalizerTrainingConfig,
             device) -> dict:
    """Validation noise MSE, cross-entropy, level accuracy and low-level error, at seeded levels and noise."""
    generator = torch.Generator().manual_seed(12345)
    objective = DiffusionLoss(network, schedule, config.classifier_weight)
    totals = {"valid_loss": 0.0, "valid_noise_mse": 0.0, "valid_cross_entropy": 0.0}
    correct, count, low_error, low_count = 0, 0, 0.0, 0
    for clean in DataLoader(valid_set, batch_size=config.batch_size):
        levels = torch.randint(0, schedule.num_levels, (clean.shape[0],), generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        clean, levels, noise = clean.to(device), levels.to(device), noise.to(device)
        loss = objective(clean, levels, noise)
        totals["valid_loss"] += float(loss) * clean.shape[0]
        totals["valid_noise_mse"] += objective.terms["noise_mse"] * clean.shape[0]
        totals["valid_cross_entropy"] += objective.terms["cross_entropy"] * clean.shape[0]
        correct += int((network.predict_level(add_noise(schedule, clean, levels, noise)) == levels).sum())
        count += clean.shape[0]
        low = torch.randint(0, 50, (clean.shape[0],), generator=generator).to(device)
        predicted = network.predict_level(add_noise(schedule, clean, low, noise))
        low_error += float((predicted - low).abs().float().sum())
        low_count += clean.shape[0]
    metrics = {key: value / max(count, 1) for key, value in totals.items()}
    metrics["valid_level_accuracy"] = correct / max(count, 1)
    metrics["valid_low_level_abs_error"] = low_error / max(low_count, 1)
    return metrics


def train_thermalizer(config: ThermalizerTrainingConfig, out, *, resume: bool = False, progress: bool = True,
                      echo: Callable[[str], None] = print) -> dict:
    """Trains (or resumes) a thermalizer; returns the last epoch's metrics."""
    context = loop.make_context(config.device)
    torch.manual_seed(config.seed + context.rank)  # levels and noise differ between DDP ranks
    info = dataset_info(config.data)
    normalizer = Normalizer.from_dataset(config.data)
    channels = len(info["channels"])
    train_set = Snapshots(config.data, "train", snapshots="all", normalizer=normalizer)
    valid_set = Snapshots(config.data, "valid", snapshots="all", normalizer=normalizer) if split_files(config.data, "valid") else None
    grid_size = train_set.shapes[0][-1]
    schedule = CosineSchedule(config.num_levels)
    network = make_model("thermalizer", config.preset, channels, channels, grid_size=grid_size,
                         num_levels=config.num_levels).to(context.device)
    job = loop.Job(
        module=network, objective=DiffusionLoss(network, schedule, config.classifier_weight), train_set=train_set,
        evaluate=lambda module: evaluate(module, valid_set, schedule, config, context.device) if valid_set is not None else {},
        extras={"model_config": network.config, "normalizer": normalizer.state_dict(), "dataset": info,
                "schedule": schedule.config},
        plot_keys=(("train_loss", "train"), ("valid_loss", "valid"), ("valid_noise_mse", "valid noise MSE"),
                   ("valid_cross_entropy", "valid level cross-entropy")))
    return loop.fit(job, config, context, out, kind="thermalizer", resume=resume, progress=progress,
                    ema_decay=config.ema_decay, echo=echo)


def load_thermalizer(path) -> tuple[nn.Module, DDPMScheduler, Normalizer, dict]:
    """(network in eval mode with the EMA weights, scheduler, normaliser, payload) of a thermalizer checkpoint."""
    payload = loop.load_checkpoint(path, "thermalizer")
    network = make_model(**payload["model_config"])
    network.load_state_dict(loop.inference_weights(payload))
    scheduler = DDPMScheduler(CosineSchedule.from_config(payload["schedule"]))
    return network.eval(), scheduler, Normalizer.from_state_dict(payload["normalizer"]), payload


def tuned_levels_path(checkpoint) -> Path:
    """Where `tune thermalizer` writes the best (s_init, s_stop): thermalizer_levels.json beside the checkpoint."""
    return Path(checkpoint).with_name("thermalizer_levels.json")


def read_tuned_levels(checkpoint) -> dict | None:
    """{'s_init': ..., 's_stop': ...} written by `tune thermalizer`, or None."""
    path = tuned_levels_path(checkpoint)
    return json.loads(path.read_text()) if path.exists() else None
