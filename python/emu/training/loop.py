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
  the shuffle order depends on (seed, epoch) only), refusing a checkpoint trained with other settings
  (each differing setting is named with both values). Only `epochs` may grow: a finished or stopped
  run then trains on up to the new total (see `fit`); `device` and `num_workers` say where the run
  executes, not what it computes, and may change too.
- an output folder that already holds files is refused unless `resume` (continue it) or `overwrite`
  (delete emu's own files there first) is given, so a second run never mixes its checkpoints and
  metrics with an earlier one's;
- a batch with NaN/inf values, a non-finite loss or non-finite gradients stop training at once with
  `NonFiniteTraining` (which epoch and batch, and what to check), before that step changes the
  weights; the checkpoints of earlier epochs stay as they were, and weights are checked to be finite
  before every save, so no checkpoint ever holds NaN weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import emu
from emu.backends import torch_device as resolve_device  # noqa: F401  (the one --device check)
from emu.data.atomic import default_file_mode
from emu.errors import UserError

# Files `fit` writes into its output folder (`overwrite=True` deletes exactly these, plus their
# temporaries and the tuned levels that `tune thermalizer` writes beside a checkpoint).
OWN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "loss.png", "thermalizer_levels.json")

# Settings that say where a run executes, not what it computes: a resumed run may change them.
EXECUTION_SETTINGS = ("device", "num_workers")

# Command-line spelling of the settings whose option name is not `--` + the field with dashes.
OPTION_NAMES = {"num_workers": "--workers", "compile": "--compile", "ema_decay": "--ema", "num_levels": "--levels"}


class NonFiniteTraining(UserError):
    """Training met NaN or inf (in a batch, the loss or the gradients) and stopped before that step
    changed the weights; the message says where, what was kept and what to check."""


@dataclass(frozen=True)
class OptimisationSettings:
    """The settings every training run shares (each trainer's config extends this; all are stored in
    every checkpoint and must match on --resume, except `epochs`, which may grow to extend the run,
    and `device`/`num_workers`, which only say where it runs).

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
        device: "cpu", "cuda", "cuda:N" or None (cuda when available); checked by `resolve_device`.
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
    device = resolve_device(device)
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
        os.chmod(temporary, default_file_mode())  # mkstemp makes 0600; a checkpoint should read like any file
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def load_checkpoint(path, kind: str) -> dict:
    """Loads a checkpoint safely (weights_only=True) and checks that it is an emu `kind` checkpoint.

    The one loader of every checkpoint a user hands to emu (rollout, resume, tune, thermalizer), so
    that a damaged or foreign file is one line naming it. A file holding pickled Python objects
    beyond tensors and plain containers is refused; torch's own message would advise loading it with
    weights_only=False, which runs whatever code the file carries, so it is not passed on (not even
    as the chained cause that --debug prints).
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses a file
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:  # noqa: BLE001 - whatever torch.load meets in a damaged file is the file's fault
        if isinstance(error, pickle.UnpicklingError) and "weights only load failed" in str(error).lower():
            raise UserError(f"refused: {path} is not a plain checkpoint (it holds pickled Python objects, "
                            "which emu never loads)") from None
        raise UserError(f"{path}: truncated or not a torch checkpoint ({type(error).__name__} while reading it); "
                        f"expected an emu {kind} checkpoint such as OUT/last.pt from `emu train {kind}`") from None
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


def _option(name: str) -> str:
    return OPTION_NAMES.get(name, "--" + name.replace("_", "-"))


def _comparable(settings: dict) -> dict:
    """Settings as stored in a checkpoint (JSON types), with the data path normalised ("data/" == "data")."""
    values = json.loads(json.dumps(settings))
    if isinstance(values.get("data"), str):
        values["data"] = os.path.normpath(values["data"])
    return values


def settings_differences(stored: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """'name (--option): V in the checkpoint, W now' for each setting that must match on resume and differs.

    A setting the checkpoint does not have (one added to emu after it was written) counts as its
    `defaults` value, the behaviour of the code that wrote it, so a run resumes when it is left there."""
    stored, current = _comparable(stored), _comparable(current)
    defaults = _comparable(defaults or {})
    missing = object()
    differences = []
    for name in sorted(set(stored) | set(current)):
        if name in EXECUTION_SETTINGS or name == "epochs":
            continue
        old, new = stored.get(name, defaults.get(name, missing)), current.get(name, missing)
        if old != new:
            def shown(value):
                return "(not set)" if value is missing else json.dumps(value)

            differences.append(f"{name} ({_option(name)}): {shown(old)} in the checkpoint, {shown(new)} now")
    return differences


def _is_own_temporary(name: str) -> bool:
    """A temporary of one of emu's files, left by a process killed while writing it (.last.pt.x1y2.tmp)."""
    return name.startswith(".") and any(name.startswith(f".{own}.") for own in OWN_FILES)


def prepare_output(out: Path, *, resume: bool, overwrite: bool, rank: int = 0,
                   echo: Callable[[str], None] = print) -> None:
    """Refuses an output folder that already holds files unless the run continues it (`resume`) or
    replaces it (`overwrite`, which deletes emu's own files there and says which). Without this a
    second run would overwrite the first one's checkpoints and append its epochs to the same
    metrics.jsonl, and the folder would describe neither run."""
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    present = sorted(p.name for p in out.iterdir() if not _is_own_temporary(p.name)) if out.is_dir() else []
    if resume:
        if not (out / "last.pt").is_file():
            raise UserError(f"--resume: {out / 'last.pt'} does not exist, so there is no run to continue"
                            + (f" ({out} holds {', '.join(present)})" if present else "")
                            + "; leave out --resume to start a new run")
        return
    if not present:
        return
    if not overwrite:
        raise UserError(f"--out {out} already holds {', '.join(present)}: pass --resume to continue that run, "
                        "--overwrite to delete emu's files there and start again, or another --out")
    removed = [name for name in OWN_FILES if (out / name).exists()]
    if rank == 0:
        for path in out.iterdir():
            if path.name in OWN_FILES or _is_own_temporary(path.name):
                path.unlink()
        kept = [name for name in present if name not in OWN_FILES]
        echo(f"--overwrite: deleted {', '.join(removed) or 'nothing of emu'} in {out}"
             + (f" (other files kept: {', '.join(kept)})" if kept else ""))


def _all_ranks(flags: torch.Tensor, context: "Context") -> torch.Tensor:
    """The element-wise minimum of `flags` over every DDP rank, so that all ranks stop together."""
    if context.distributed:
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return flags


def _finite_state(state: dict) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in state.values()
               if isinstance(value, torch.Tensor) and value.is_floating_point())


def fit(job: Job, config, context: Context, out, *, kind: str, resume: bool = False, overwrite: bool = False,
        progress: bool = True, ema_decay: float = 0.0, echo: Callable[[str], None] = print) -> dict:
    """Trains `job` for config.epochs epochs (see the module docstring); returns the last epoch's metrics.

    With `resume`, `config.epochs` may be larger than the epochs of the run in `out/last.pt` (finished
    or not): training continues from last.pt up to the new total, and the checkpoint stores the new
    total. The cosine schedule is then recomputed over the new total of steps: at the step where the
    run stopped the learning rate becomes lr * (1 + cos(pi * done / new_total)) / 2, so a finished
    run (learning rate 0) restarts at that higher value (half of --lr when the epochs double) and
    decays to 0 again at the new last epoch; the constant schedule is unchanged. An `epochs` smaller
    than the epochs already done is refused.
    """
    out = Path(out)
    prepare_output(out, resume=resume, overwrite=overwrite, rank=context.rank, echo=echo)
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
    saved_epoch = None  # the epoch that out/last.pt holds, for the message when training must stop
    if resume:
        path = out / "last.pt"
        payload = load_checkpoint(path, kind)
        defaults = {field.name: field.default for field in dataclasses.fields(config)
                    if field.default is not dataclasses.MISSING}
        differences = settings_differences(payload["training"], settings, defaults)
        if differences:
            raise UserError(f"--resume: {path} was trained with other settings: {'; '.join(differences)}. "
                            "Pass the checkpoint's values (only --epochs may grow), or train into another --out")
        done, planned = payload["epoch"], payload["training"]["epochs"]
        if config.epochs < done:
            raise UserError(f"--epochs {config.epochs}: {path} has already trained {done} epochs; pass --epochs "
                            f"{done} or more to continue it (more epochs extend the run)")
        job.module.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        # The schedule is a function of (step, new total): set the rate it gives at the step reached
        # now, not the stored one, which belongs to the old total (0 at the end of a finished run).
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        if ema is not None:
            ema.module.load_state_dict(payload["ema"])
            ema.n_averaged.fill_(payload["ema_updates"])
        torch.set_rng_state(payload["rng_state"])
        history, first_epoch, best = payload["history"], done + 1, payload["best"]
        saved_epoch = done
        if config.epochs == done and context.rank == 0:
            echo(f"{path} has already trained {done} of {config.epochs} epochs: nothing to do "
                 "(pass a larger --epochs to train on)")
        elif config.epochs != planned and context.rank == 0:
            echo(f"extending {path} from {planned} to {config.epochs} epochs (continuing after epoch {done}): "
                 + (f"the cosine schedule is recomputed over {config.epochs} epochs, so the learning rate goes "
                    f"from {payload['optimizer']['param_groups'][0]['lr']:.3g} to "
                    f"{optimizer.param_groups[0]['lr']:.3g} now and decays to 0 at epoch {config.epochs}"
                    if config.schedule == "cosine" else f"the learning rate stays {config.lr:.3g}"))

    def checkpoint(epoch: int) -> dict[str, Any]:
        return {"format": f"emu-{kind}", "emu_version": emu.__version__, "epoch": epoch, **job.extras,
                "model": job.module.state_dict(), "ema": _ema_state(ema),
                "ema_updates": int(ema.n_averaged) if ema is not None else 0,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "training": settings,
                "history": history, "best": best, "rng_state": torch.get_rng_state()}

    def stop(epoch: int, batch_index: int | None, problem: str, advice: str):
        kept = (f"{out / 'last.pt'} still holds epoch {saved_epoch}" if saved_epoch is not None
                else "no checkpoint was written")
        where = (f"at epoch {epoch}, batch {batch_index} of {len(loader)}" if batch_index is not None
                 else f"at the end of epoch {epoch}")
        consequence = "the weights were not updated with it" if batch_index is not None else "this epoch is not saved"
        raise NonFiniteTraining(f"training stopped {where}: {problem}; {consequence} and {kept}. {advice}")

    data_hint = f"check the data with `emu data validate {config.data}`"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp)
    metrics: dict = history[-1] if history else {}
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
            batch_finite = torch.isfinite(batch).all()
            with autocast:
                loss = objective(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gradients = [p.grad for p in job.module.parameters() if p.grad is not None]
            if config.max_grad_norm is not None:
                gradient_norm = torch.nn.utils.clip_grad_norm_(job.module.parameters(), config.max_grad_norm)
            else:
                gradient_norm = torch.nn.utils.get_total_norm(gradients) if gradients else loss.new_zeros(())
            # One flag per check, reduced over the DDP ranks: a NaN on one rank stops all of them.
            flags = _all_ranks(torch.stack([batch_finite, torch.isfinite(loss.detach()),
                                            torch.isfinite(gradient_norm)]).to(device, torch.int32), context)
            batch_ok, loss_ok, gradients_ok = (bool(flag) for flag in flags.cpu())
            loss_value = float(loss.detach())
            if not batch_ok:
                stop(epoch, batches + 1, f"the batch holds NaN or inf values (the loss is {loss_value:.4g})",
                     f"The training data is damaged: {data_hint}.")
            if not (loss_ok and gradients_ok):
                problem = (f"the loss is {loss_value:.4g}" if not loss_ok
                           else f"the gradients are not finite (norm {float(gradient_norm):.4g}, loss {loss_value:.4g})")
                stop(epoch, batches + 1, f"{problem} on finite data: the optimisation diverged",
                     f"Lower --lr (now {config.lr:g}), clip gradients with --max-grad-norm, or {data_hint}.")
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(job.module)
            running += loss_value
            for name, value in getattr(terms_source, "terms", {}).items():
                term_sums[name] = term_sums.get(name, 0.0) + value
            batches += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running / batches:.3e}")
        if bar is not None:
            bar.close()
        if not (_finite_state(job.module.state_dict()) and (ema is None or _finite_state(ema.module.state_dict()))):
            stop(epoch, None, "the weights are not finite after the optimizer steps",
                 f"Lower --lr (now {config.lr:g}) or clip gradients with --max-grad-norm.")
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
            if not math.isfinite(score):
                echo(f"warning: epoch {epoch}: the validation loss is {score} with finite weights, so best.pt is not "
                     f"updated; the validation split may hold NaN or inf: {data_hint}")
            best_now = score < best
            best = min(best, score)
            payload = checkpoint(epoch)
            save_atomically(payload, out / "last.pt")
            saved_epoch = epoch
            if best_now:
                save_atomically(payload, out / "best.pt")
            with open(out / "metrics.jsonl", "a") as stream:
                stream.write(json.dumps(metrics) + "\n")
            _plot_losses(history, out / "loss.png", job.plot_keys)
            echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return metrics
