"""Training loop for emulators: unrolled multistep loss, AdamW, checkpoints, resume, DDP via torchrun.

    python -m emu.cli train emulator --data data/ --arch drn --preset small --epochs 5 --out run/

Writes into `out`: `last.pt` and `best.pt` (model + optimizer + scheduler + normaliser + configs;
loadable with `torch.load(..., weights_only=True)`), `metrics.jsonl` (one line per epoch) and
`loss.png` (an `out` that already holds files needs `--resume` or `--overwrite`). Under
`torchrun --nproc-per-node N` the same command trains with
DistributedDataParallel (gloo on CPU, nccl on GPU); rank 0 writes the files. The loop itself
(optimiser, schedule, DDP, AMP, checkpoints, resume) is `emu.training.loop.fit`, shared with the
thermalizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from emu.data.loaders import Normalizer, TrajectoryWindows
from emu.data.well import EMU_GROUP, split_files
from emu.models import make_model
from emu.training import loop
from emu.training.emulator import ResidualEmulator, rollout, unrolled_loss



@dataclass(frozen=True)
class TrainingConfig(loop.OptimisationSettings):
    """Settings of one emulator training run: the shared optimisation settings (data, epochs,
    batch_size, lr, weight_decay, schedule, amp, compile, seed, num_workers, device; see
    `loop.OptimisationSettings`) plus

    Attributes:
        arch, preset: network ("unet" | "drn") and size ("small" | "paper").
        unroll: steps L of the multistep loss.
        noise: input noise tau (1e-5 DRN, 1e-4 UNet in the reference).
        rollout_trajectories: validation trajectories rolled out each epoch.
    """

    arch: str = "drn"
    preset: str = "small"
    unroll: int = 4
    noise: float = 1e-5
    rollout_trajectories: int = 4

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (isinstance(self.unroll, int) and self.unroll >= 1, "unroll", "an integer >= 1", self.unroll),
            (self.noise >= 0, "noise", ">= 0", self.noise),
            (isinstance(self.rollout_trajectories, int) and self.rollout_trajectories >= 1, "rollout_trajectories",
             "an integer >= 1", self.rollout_trajectories),
        ]
        for ok, field, allowed, value in checks:
            if not ok:
                raise ValueError(f"{field} must be {allowed}, got {value!r}")


class UnrolledLoss(nn.Module):
    """Wraps the emulator so that DistributedDataParallel sees the whole unrolled loss as one forward."""

    def __init__(self, emulator: ResidualEmulator):
        super().__init__()
        self.emulator = emulator

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return unrolled_loss(self.emulator, window)[0]


def load_checkpoint(path) -> dict:
    """Loads an emulator checkpoint safely (weights_only=True) and checks its format."""
    return loop.load_checkpoint(path, "emulator")


def emulator_from_checkpoint(payload: dict) -> tuple[ResidualEmulator, Normalizer]:
    """The emulator (eval mode, CPU) and the normaliser of a loaded checkpoint."""
    network = make_model(**payload["model_config"])
    emulator = ResidualEmulator(network, payload["training"]["noise"])
    emulator.load_state_dict(loop.inference_weights(payload))
    return emulator.eval(), Normalizer.from_state_dict(payload["normalizer"])


def dataset_info(directory) -> dict:
    """System config, channel names and snapshot interval of a dataset folder (from its first training file)."""
    import h5py

    files = split_files(directory, "train")
    if not files:
        raise FileNotFoundError(f"{directory}: no training files (expected {directory}/data/train/*.hdf5 from `emu generate`)")
    with h5py.File(files[0], "r") as handle:
        group = handle[EMU_GROUP]
        return {"config": json.loads(group.attrs["config"]), "channels": json.loads(group.attrs["channels"]),
                "snapshot_interval": float(group.attrs["snapshot_interval"])}



def prepare_training(settings) -> tuple[loop.Context, dict, Normalizer, int]:
    """(context, dataset info, training-split normaliser, field channels) of a training run on
    `settings.data` and `settings.device` (every trainer's first step; each seeds torch itself)."""
    context = loop.make_context(settings.device)
    info = dataset_info(settings.data)
    return context, info, Normalizer.from_dataset(settings.data), len(info["channels"])

def train_emulator(config: TrainingConfig, out, *, resume: bool = False, overwrite: bool = False,
                   progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Trains (or resumes, or with a larger `config.epochs` extends) an emulator into `out`; returns
    the last epoch's metrics. `out` must be empty or new unless `resume` or `overwrite` (see
    `loop.fit`, which also stops on NaN/inf and documents what resume does to the schedule)."""
    context, info, normalizer, channels = prepare_training(config)
    torch.manual_seed(config.seed)
    train_set = TrajectoryWindows(config.data, "train", unroll=config.unroll, normalizer=normalizer)
    valid_set = (TrajectoryWindows(config.data, "valid", unroll=config.unroll, normalizer=normalizer)
                 if split_files(config.data, "valid") else None)
    network = make_model(config.arch, config.preset, in_channels=channels, out_channels=channels)
    emulator = ResidualEmulator(network, config.noise).to(context.device)
    job = loop.Job(
        module=emulator, objective=UnrolledLoss(emulator), train_set=train_set,
        evaluate=lambda module: evaluate(module, valid_set, config, context.device) if valid_set is not None else {},
        extras={"model_config": network.config, "normalizer": normalizer.state_dict(), "dataset": info},
        plot_keys=(("train_loss", "train"), ("valid_loss", "valid"), ("valid_rollout_mse", "valid rollout MSE")))
    if valid_set is None and context.rank == 0:
        echo(f"note: {config.data} has no valid split: no validation metrics, and best.pt is the epoch with the "
             "lowest training loss")
    return loop.fit(job, config, context, out, kind="emulator", resume=resume, overwrite=overwrite,
                    progress=progress, echo=echo)


@torch.no_grad()
def evaluate(emulator: ResidualEmulator, valid_set: TrajectoryWindows, config: TrainingConfig, device) -> dict:
    """Validation unrolled loss (no input noise) and the MSE of short rollouts from the first snapshot
    of a few validation trajectories over their whole stored length (normalised units)."""
    emulator.eval()
    noise, emulator.noise = emulator.noise, 0.0
    try:
        loader = DataLoader(valid_set, batch_size=config.batch_size)
        total, batches = 0.0, 0
        for window in loader:
            total += float(unrolled_loss(emulator, window.to(device))[0])
            batches += 1
        trajectories = min(config.rollout_trajectories, valid_set.shapes[0][0])
        steps = valid_set.shapes[0][1]
        truth = torch.stack([valid_set._read(0, t, slice(0, steps)) for t in range(trajectories)]).to(device)
        predicted = rollout(emulator, truth[:, 0], steps - 1)
        mse = torch.mean((predicted - truth) ** 2, dim=(0, 2, 3, 4))
        return {"valid_loss": total / max(batches, 1), "valid_rollout_mse": float(mse[1:].mean()),
                "valid_rollout_final_mse": float(mse[-1])}
    finally:
        emulator.noise = noise
