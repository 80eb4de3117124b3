"""The training loop shared by every emu model: AdamW, LR schedule, DDP, AMP, EMA, checkpoints, resume.

Each trainer (emulator: `trainer.py`, thermalizer: `thermalizer.py`) builds a `Job` (the module whose
weights are trained, the objective mapping a batch to a scalar loss, the training set and a
validation function) and hands it to `fit`, which owns everything else:

- AdamW with a cosine (to 0 over all epochs) or constant learning rate, stepped per batch;
- DistributedDataParallel under torchrun (gloo on CPU, nccl on GPU); rank 0 writes the files;
- bfloat16 autocast (`amp`) and `torch.compile` of the objective (`compile`);
- an exponential moving average of the weights when `ema_decay > 0` (torch.optim.swa_utils), which
  is what validation sees and what the checkpoint's `ema` entry holds;
- per epoch: `metrics.jsonl` (one JSON line), `loss.png`, `last.pt` and, when the validation score
  improved, `best.pt` (both written atomically: temp file + rename), loadable with
  `torch.load(..., weights_only=True)`;
- `resume=True` continues from `last.pt` exactly (weights, optimizer, scheduler, EMA, RNG state;
  the shuffle order depends on (seed, epoch) only), refusing a checkpoint trained with other settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import emu


@dataclass(frozen=True)
class OptimisationSettings:
    """The settings every training run shares (each trainer's config extends this; all are stored in
    every checkpoint and must match on --resume).

    Attributes:
        data: dataset folder made by `emu generate`.
        epochs, batch_size, lr, weight_decay: optimisation (AdamW).
        schedule: "constant" or "cosine" (cosine decay to 0 over all epochs).
        amp: bfloat16 autocast; compile: torch.compile the objective.
        seed: initialisation, shuffling and noise.
        max_grad_norm: clip the global gradient norm to this before each step (None: no clipping).
            Diffusion training uses it (1.0, as in diffusers' and the DDPM reference trainers): one
            bad batch of the level classifier's cross-entropy otherwise throws the head back to
            uniform logits (seen at lr 1e-3: cross-entropy 6.9 -> 9.6 in one epoch).
        num_workers: DataLoader workers.
        device: "cpu", "cuda" or None (cuda when available).
    """

    data: str
    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    schedule: str = "cosine"
    amp: bool = False
    compile: bool = False
    seed: int = 0
    num_workers: int = 0
    device: str | None = None
    max_grad_norm: float | None = None

    def __post_init__(self):
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "an integer >= 1", self.epochs),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size),
            (self.lr > 0, "lr", "> 0", self.lr),
            (self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay),
            (self.schedule in ("constant", "cosine"), "schedule", "'constant' or 'cosine'", self.schedule),
            (isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", "an integer >= 0",
             self.num_workers),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "> 0 or None",
             self.max_grad_norm),
        ]
        for ok, name, allowed, value in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass
class Context:
    """Where this process trains: device, rank and world size (1 without torchrun)."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1


def make_context(device: str | None) -> Context:
    """The device (cuda when available unless `device` says otherwise) and, under torchrun, the process group."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return Context(device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return Context(device, dist.get_rank(), dist.get_world_size())


@dataclass
class Job:
    """What `fit` trains.

    Attributes:
        module: holds every trained parameter; its state_dict is the checkpoint's "model".
        objective: batch -> scalar loss (wraps `module`; DDP wraps this). If it has a `terms` dict
            attribute after a forward (floats), their epoch means are logged as train_<name>.
        train_set: yields batches' items (tensors) for a DataLoader.
        evaluate: module -> dict of validation metrics (floats), called by rank 0... on every rank
            (cheap) with the EMA weights when there are any; "valid_loss" is the score for best.pt.
        extras: JSON-able/tensor entries stored in every checkpoint (model_config, normalizer, dataset ...).
        plot_keys: (metric, label) pairs drawn in loss.png.
    """

    module: nn.Module
    objective: nn.Module
    train_set: Dataset
    evaluate: Callable[[nn.Module], dict]
    extras: dict = field(default_factory=dict)
    plot_keys: tuple = (("train_loss", "train"), ("valid_loss", "valid"))


def save_atomically(payload: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written checkpoint."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def load_checkpoint(path, kind: str) -> dict:
    """Loads a checkpoint safely (weights_only=True) and checks that it is an emu `kind` checkpoint."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    expected = f"emu-{kind}"
    if not isinstance(payload, dict) or payload.get("format") != expected:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not an emu {kind} checkpoint (format {found!r}, expected {expected!r})")
    return payload


def inference_weights(payload: dict) -> dict:
    """The weights to run: the EMA average when the checkpoint has one, else the trained weights."""
    return payload.get("ema") or payload["model"]


def _plot_losses(history: list[dict], path: Path, keys) -> None:
    from emu.plotting import _pyplot, save_figure_atomically

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4))
    epochs = [row["epoch"] for row in history]
    for key, label in keys:
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


def _ema_state(ema) -> dict | None:
    """The averaged weights in the module's own key names (AveragedModel prefixes them with 'module.')."""
    if ema is None:
        return None
    return ema.module.state_dict()


def fit(job: Job, config, context: Context, out, *, kind: str, resume: bool = False, progress: bool = True,
        ema_decay: float = 0.0, echo: Callable[[str], None] = print) -> dict:
    """Trains `job` for config.epochs epochs (see the module docstring); returns the last epoch's metrics."""
    out = Path(out)
    if context.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    device = context.device
    sampler = (DistributedSampler(job.train_set, num_replicas=context.world, rank=context.rank, seed=config.seed)
               if context.distributed else None)
    shuffle_generator = torch.Generator()
    loader = DataLoader(job.train_set, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=config.num_workers, drop_last=False, generator=shuffle_generator)
    objective = job.objective
    terms_source = job.objective
    if config.compile:
        objective = torch.compile(objective)
    if context.distributed:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(job.module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * max(1, len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
        if config.schedule == "cosine" else (lambda step: 1.0))
    ema = None
    if ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(job.module, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)

    settings = dataclasses.asdict(config)
    history: list[dict] = []
    first_epoch, best = 1, math.inf
    if resume and (out / "last.pt").exists():
        payload = load_checkpoint(out / "last.pt", kind)
        if payload["training"] != json.loads(json.dumps(settings)):
            raise ValueError(f"resume: {out / 'last.pt'} was trained with other settings; use another --out")
        job.module.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(payload["ema"])
            ema.n_averaged.fill_(payload["ema_updates"])
        torch.set_rng_state(payload["rng_state"])
        history, first_epoch, best = payload["history"], payload["epoch"] + 1, payload["best"]

    def checkpoint(epoch: int) -> dict[str, Any]:
        return {"format": f"emu-{kind}", "emu_version": emu.__version__, "epoch": epoch, **job.extras,
                "model": job.module.state_dict(), "ema": _ema_state(ema),
                "ema_updates": int(ema.n_averaged) if ema is not None else 0,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "training": settings,
                "history": history, "best": best, "rng_state": torch.get_rng_state()}

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp)
    metrics: dict = {}
    for epoch in range(first_epoch, config.epochs + 1):
        started = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        # The shuffle order depends on (seed, epoch) only, so a resumed run sees the same batches.
        shuffle_generator.manual_seed(config.seed * 100_003 + epoch)
        job.module.train()
        running, batches, term_sums = 0.0, 0, {}
        bar = None
        if progress and context.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loader), unit="batch", desc=f"epoch {epoch}/{config.epochs}", dynamic_ncols=True)
        for batch in loader:
            batch = batch.to(device)
            with autocast:
                loss = objective(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(job.module.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(job.module)
            running += float(loss.detach())
            for name, value in getattr(terms_source, "terms", {}).items():
                term_sums[name] = term_sums.get(name, 0.0) + value
            batches += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running / batches:.3e}")
        if bar is not None:
            bar.close()
        elapsed = max(time.perf_counter() - started, 1e-9)
        metrics = {"epoch": epoch, "train_loss": running / max(batches, 1),
                   **{f"train_{name}": value / max(batches, 1) for name, value in term_sums.items()},
                   "lr": scheduler.get_last_lr()[0], "seconds": elapsed,
                   "samples_per_second": len(job.train_set) / elapsed}
        evaluated = ema.module if ema is not None else job.module
        evaluated.eval()
        metrics.update(job.evaluate(evaluated))
        history.append(metrics)
        if context.rank == 0:
            score = metrics.get("valid_loss", metrics["train_loss"])
            best_now = score < best
            best = min(best, score)
            payload = checkpoint(epoch)
            save_atomically(payload, out / "last.pt")
            if best_now:
                save_atomically(payload, out / "best.pt")
            with open(out / "metrics.jsonl", "a") as stream:
                stream.write(json.dumps(metrics) + "\n")
            _plot_losses(history, out / "loss.png", job.plot_keys)
            echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return metrics
