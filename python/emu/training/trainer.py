"""Training loop for emulators: unrolled multistep loss, AdamW, checkpoints, resume, DDP via torchrun.

    python -m emu.cli train emulator --data data/ --arch drn --preset small --epochs 5 --out run/

Writes into `out`: `last.pt` and `best.pt` (model + optimizer + scheduler + normaliser + configs;
loadable with `torch.load(..., weights_only=True)`), `metrics.jsonl` (one line per epoch) and
`loss.png`. Under `torchrun --nproc-per-node N` the same command trains with
DistributedDataParallel (gloo on CPU, nccl on GPU); rank 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import emu
from emu.data.loaders import Normalizer, TrajectoryWindows
from emu.data.well import EMU_GROUP, split_files
from emu.models import make_model
from emu.training.emulator import ResidualEmulator, rollout, unrolled_loss

CHECKPOINT_FORMAT = "emu-emulator"


@dataclass(frozen=True)
class TrainingConfig:
    """Settings of one training run (all stored in every checkpoint).

    Attributes:
        data: dataset folder made by `emu generate`.
        arch, preset: network ("unet" | "drn") and size ("small" | "paper").
        unroll: steps L of the multistep loss.
        noise: input noise tau (1e-5 DRN, 1e-4 UNet in the reference).
        epochs, batch_size, lr, weight_decay: optimisation (AdamW).
        schedule: "constant" or "cosine" (cosine decay to 0 over all epochs).
        amp: bfloat16 autocast; compile: torch.compile the network.
        seed: initialisation, shuffling and noise.
        num_workers: DataLoader workers.
        rollout_trajectories: validation trajectories rolled out each epoch.
        device: "cpu", "cuda" or None (cuda when available).
    """

    data: str
    arch: str = "drn"
    preset: str = "small"
    unroll: int = 4
    noise: float = 1e-5
    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    schedule: str = "cosine"
    amp: bool = False
    compile: bool = False
    seed: int = 0
    num_workers: int = 0
    rollout_trajectories: int = 4
    device: str | None = None

    def __post_init__(self):
        checks = [
            (isinstance(self.unroll, int) and self.unroll >= 1, "unroll", "an integer >= 1", self.unroll),
            (self.noise >= 0, "noise", ">= 0", self.noise),
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "an integer >= 1", self.epochs),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size),
            (self.lr > 0, "lr", "> 0", self.lr),
            (self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay),
            (self.schedule in ("constant", "cosine"), "schedule", "'constant' or 'cosine'", self.schedule),
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


def _save_atomically(payload: dict, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def load_checkpoint(path) -> dict:
    """Loads an emulator checkpoint safely (weights_only=True) and checks its format."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an emu emulator checkpoint")
    return payload


def emulator_from_checkpoint(payload: dict) -> tuple[ResidualEmulator, Normalizer]:
    network = make_model(**payload["model_config"])
    emulator = ResidualEmulator(network, payload["training"]["noise"])
    emulator.load_state_dict(payload["model"])
    return emulator.eval(), Normalizer.from_state_dict(payload["normalizer"])


def _dataset_info(directory) -> dict:
    import h5py

    with h5py.File(split_files(directory, "train")[0], "r") as handle:
        group = handle[EMU_GROUP]
        return {"config": json.loads(group.attrs["config"]), "channels": json.loads(group.attrs["channels"]),
                "snapshot_interval": float(group.attrs["snapshot_interval"])}


def _plot_losses(history: list[dict], path: Path) -> None:
    from emu.plotting import _pyplot, save_figure_atomically

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4))
    epochs = [row["epoch"] for row in history]
    for key, label in (("train_loss", "train"), ("valid_loss", "valid"), ("valid_rollout_mse", "valid rollout MSE")):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            axis.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=label)
    axis.set_yscale("log")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss (normalised units)")
    axis.legend()
    axis.grid(alpha=0.3)
    save_figure_atomically(figure, path)
    plt.close(figure)


def train_emulator(config: TrainingConfig, out, *, resume: bool = False, progress: bool = True,
                   echo: Callable[[str], None] = print) -> dict:
    """Trains (or resumes) an emulator; returns the last epoch's metrics."""
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    info = _dataset_info(config.data)
    normalizer = Normalizer.from_dataset(config.data)
    channels = len(info["channels"])
    train_set = TrajectoryWindows(config.data, "train", unroll=config.unroll, normalizer=normalizer)
    valid_files = split_files(config.data, "valid")
    valid_set = TrajectoryWindows(config.data, "valid", unroll=config.unroll, normalizer=normalizer) if valid_files else None
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=config.seed) if distributed else None
    shuffle_generator = torch.Generator()
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=config.num_workers, drop_last=False, generator=shuffle_generator)

    network = make_model(config.arch, config.preset, in_channels=channels, out_channels=channels)
    emulator = ResidualEmulator(network, config.noise).to(device)
    objective = UnrolledLoss(emulator)
    if config.compile:
        objective = torch.compile(objective)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(emulator.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * max(1, len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
        if config.schedule == "cosine" else (lambda step: 1.0))

    history: list[dict] = []
    first_epoch, best = 1, math.inf
    if resume and (out / "last.pt").exists():
        payload = load_checkpoint(out / "last.pt")
        if payload["training"] != json.loads(json.dumps(dataclasses.asdict(config))):
            raise ValueError(f"resume: {out / 'last.pt'} was trained with other settings; use another --out")
        emulator.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        torch.set_rng_state(payload["rng_state"])
        history, first_epoch, best = payload["history"], payload["epoch"] + 1, payload["best"]

    def checkpoint(epoch: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "emu_version": emu.__version__, "epoch": epoch,
                "model_config": network.config, "model": emulator.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "normalizer": normalizer.state_dict(), "training": dataclasses.asdict(config),
                "dataset": info, "history": history, "best": best, "rng_state": torch.get_rng_state()}

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp)
    metrics: dict = {}
    for epoch in range(first_epoch, config.epochs + 1):
        started = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        # The shuffle order depends on (seed, epoch) only, so a resumed run sees the same batches.
        shuffle_generator.manual_seed(config.seed * 100_003 + epoch)
        emulator.train()
        running, batches = 0.0, 0
        bar = None
        if progress and rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loader), unit="batch", desc=f"epoch {epoch}/{config.epochs}", dynamic_ncols=True)
        for window in loader:
            window = window.to(device)
            with autocast:
                loss = objective(window)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
            batches += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running / batches:.3e}")
        if bar is not None:
            bar.close()
        metrics = {"epoch": epoch, "train_loss": running / max(batches, 1), "lr": scheduler.get_last_lr()[0],
                   "seconds": time.perf_counter() - started, "samples_per_second": len(train_set) / max(time.perf_counter() - started, 1e-9)}
        metrics.update(evaluate(emulator, valid_set, config, device) if valid_set is not None else {})
        history.append(metrics)
        if rank == 0:
            score = metrics.get("valid_loss", metrics["train_loss"])
            best_now = score < best
            best = min(best, score)
            payload = checkpoint(epoch)
            _save_atomically(payload, out / "last.pt")
            if best_now:
                _save_atomically(payload, out / "best.pt")
            with open(out / "metrics.jsonl", "a") as stream:
                stream.write(json.dumps(metrics) + "\n")
            _plot_losses(history, out / "loss.png")
            echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return metrics


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
