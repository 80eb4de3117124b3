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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from emu.data.loaders import Normalizer, Snapshots
from emu.data.well import split_files
from emu.diffusion import CosineSchedule, DDPMScheduler, add_noise, check_levels_pair, sample_levels, thermalize
from emu.models import make_model
from emu.training import loop
from emu.training.trainer import dataset_info


@dataclass(frozen=True)
class ThermalizerTrainingConfig(loop.OptimisationSettings):
    """Settings of one thermalizer training run: the shared optimisation settings (see
    `loop.OptimisationSettings`; here batch 64, lr 2e-4 and gradient-norm clipping at 1 by default, every stored snapshot of the
    training split a sample) plus

    Attributes:
        preset: "small" (CPU) or "paper" (53M parameters).
        num_levels: diffusion levels T of the cosine schedule.
        classifier_weight: w of the cross-entropy term.
        ema_decay: weight EMA decay (0 disables).
    """

    batch_size: int = 64
    lr: float = 2e-4
    max_grad_norm: float | None = 1.0
    preset: str = "small"
    num_levels: int = 1000
    classifier_weight: float = 1.0
    ema_decay: float = 0.995

    def __post_init__(self):
        super().__post_init__()
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
        self.logits: torch.Tensor | None = None

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
        self.logits = logits.detach()  # validation reads the predicted levels from the same forward
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
        correct += int((objective.logits.argmax(dim=-1) == levels).sum())
        count += clean.shape[0]
        low = torch.randint(0, 50, (clean.shape[0],), generator=generator).to(device)
        predicted = network.predict_level(add_noise(schedule, clean, low, noise))
        low_error += float((predicted - low).abs().float().sum())
        low_count += clean.shape[0]
    metrics = {key: value / max(count, 1) for key, value in totals.items()}
    metrics["valid_level_accuracy"] = correct / max(count, 1)
    metrics["valid_low_level_abs_error"] = low_error / max(low_count, 1)
    return metrics


def train_thermalizer(config: ThermalizerTrainingConfig, out, *, resume: bool = False, overwrite: bool = False,
                      progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Trains (or resumes, or with a larger `config.epochs` extends) a thermalizer into `out`; returns
    the last epoch's metrics. Output folder, resume and NaN handling as in `loop.fit`."""
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
    if valid_set is None and context.rank == 0:
        echo(f"note: {config.data} has no valid split: no validation metrics, and best.pt is the epoch with the "
             "lowest training loss")
    return loop.fit(job, config, context, out, kind="thermalizer", resume=resume, overwrite=overwrite,
                    progress=progress, ema_decay=config.ema_decay, echo=echo)


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


class ThermalizerCorrection:
    """The per-step Thermalizer correction of a rollout (`rollout(..., correct=...)`) and its record.

    Each call runs `emu.diffusion.thermalize` with this object's levels and generator and keeps the
    predicted levels, denoising steps and runaway flags of every step for `record`.
    """

    def __init__(self, network: nn.Module, scheduler: DDPMScheduler, *, s_init: int, s_stop: int,
                 runaway_level: int = 100, generator: torch.Generator | None = None):
        check_levels_pair(s_init, s_stop, scheduler.num_levels)
        self.network, self.scheduler, self.generator = network, scheduler, generator
        self.s_init, self.s_stop, self.runaway_level = s_init, s_stop, runaway_level
        self.levels, self.steps, self.runaway = [], [], []
        self.attributes = {"s_init": s_init, "s_stop": s_stop, "runaway_level": runaway_level}

    @classmethod
    def from_checkpoint(cls, checkpoint, emulator_normalizer: Normalizer, device, *, s_init: int | None = None,
                        s_stop: int | None = None, runaway_level: int = 100, seed: int = 0) -> "ThermalizerCorrection":
        """Loads the thermalizer; levels default to the tuned pair beside it, else (7, 4). Refuses a
        thermalizer trained with other normalisation statistics than the emulator."""
        network, scheduler, normalizer, _ = load_thermalizer(checkpoint)
        if not (torch.allclose(normalizer.mean, emulator_normalizer.mean)
                and torch.allclose(normalizer.std, emulator_normalizer.std)):
            raise ValueError(f"thermalizer {checkpoint} was trained with other normalisation statistics than the "
                             "emulator: train both on the same dataset")
        tuned = read_tuned_levels(checkpoint) or {}
        correction = cls(network.to(device), scheduler, s_init=s_init if s_init is not None else tuned.get("s_init", 7),
                         s_stop=s_stop if s_stop is not None else tuned.get("s_stop", 4), runaway_level=runaway_level,
                         generator=torch.Generator(device=device).manual_seed(seed))
        correction.attributes["thermalizer"] = str(checkpoint)
        return correction

    def correct(self, state: torch.Tensor) -> torch.Tensor:
        result = thermalize(state, self.network.classify, lambda x: self.network(x)[0], self.scheduler,
                            s_init=self.s_init, s_stop=self.s_stop, runaway_level=self.runaway_level,
                            generator=self.generator)
        self.levels.append(result.predicted_level.cpu())
        self.steps.append(result.steps_applied.cpu())
        self.runaway.append(result.runaway.cpu())
        return result.state

    def record(self, trajectories: int, steps: int) -> dict:
        """(trajectories, steps + 1) arrays; entry 0 (the initial state) is -1 / 0 / False."""
        def stacked(values, fill, dtype):
            array = np.full((trajectories, steps + 1), fill, dtype=dtype)
            if values:
                array[:, 1:len(values) + 1] = torch.stack(values, dim=1).numpy()
            return array

        return {"predicted_level": stacked(self.levels, -1, np.int64),
                "denoising_steps": stacked(self.steps, 0, np.int64),
                "runaway": stacked(self.runaway, False, bool)}
