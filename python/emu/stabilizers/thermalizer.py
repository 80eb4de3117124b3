"""The Thermalizer (Pedersen, Zanna & Bruna 2025): training, Algorithm 1, level calibration and tuning.

One home for the method, in three parts built on `emu.diffusion` (schedule, DDPM step, level
sampling and targets) and `emu.models` (ThermalizerUNet):

1. Training (paper eq. 8) `train_thermalizer`: a DDPM of single snapshots plus a noise-level head,

       loss = MSE(eps_hat(x_s), eps) + w * CE(logits(x_s), target(s)),   x_s = sqrt(ab_s) x_0 + sqrt(1 - ab_s) eps

   with the paper's choices as defaults (levels uniform over all T, one-hot target, every stored
   snapshot) and the options that make the head resolve low levels at small scale, each a stated
   deviation (`ThermalizerTrainingConfig`): `level_sampling="mixture"` (a fraction of each batch on
   levels < low_level_max), `level_target="gaussian"` (a target smoothed in log SNR,
   `emu.diffusion.levels`), `snapshot_stride` (decorrelated snapshots). Every epoch also logs the
   calibration numbers of part 3 on validation states.

2. Inference, Algorithm 1 (`thermalize`, batched): the head predicts s_hat per sample; samples with
   s_hat > s_init are re-noised with fresh noise to s_hat and denoised by s_hat - s_stop ancestral
   DDPM steps to level s_stop; others are left alone and cost only the head. A sample predicted
   above `runaway_level` is flagged and thermalized from `runaway_level` (the reference aborts the
   whole batch there; emu goes on and reports). Diagnostic variants: `fixed_level` (no classifier:
   every sample from that level) and `fresh_noise=False` (the reference's `forward_diff=False`:
   denoise the state as it is, as if it were at s_hat). `ThermalizerStabilizer` runs it inside
   rollouts through the `emu.stabilizers` protocol.

3. Levels: `calibrate` (predicted vs true level on held-out clean states noised to s = 0..100, and
   the denoiser check: noise clean states to s in {10, 30, 60}, thermalize to s_stop, MSE to the
   clean state against 1 - ab_{s_stop}), `automatic_levels` (s_init and s_stop from a calibration,
   no rollouts), `check_thermalizer` (`emu thermalizer check`: report, PNG, levels file) and
   `tune_thermalizer` (`emu tune thermalizer`: the paper's grid search by KE-spectrum match). Both
   write `thermalizer_levels.json` beside the checkpoint; its top-level (s_init, s_stop) is the pair
   the last of them chose, which rollouts use when no levels are given.

References: Pedersen, Zanna & Bruna (2025), "Thermalizer: stable autoregressive neural emulation of
spatiotemporal chaos" (ICML), Algorithm 1, eq. 8, appendix C; Ho et al. (2020) for the DDPM step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from emu.data.atomic import write_json_atomically
from emu.data.loaders import Normalizer, Snapshots
from emu.data.well import split_files
from emu.diffusion import CosineSchedule, DDPMScheduler, add_noise
from emu.models import make_model
from emu.stabilizers.base import RolloutHistory
from emu.stabilizers.levels import (PRESET_LEVEL_OPTIONS, LevelLoss, LevelTrainingSettings,  # noqa: F401
                                   fit_level_model, load_level_model, prepare_training)
from emu.training import loop

DEFAULT_LEVELS = {"s_init": 7, "s_stop": 4}  # the paper's Kolmogorov UNet pair, when nothing was calibrated
CALIBRATION_LEVELS = tuple(range(0, 101))
DENOISER_CHECK_LEVELS = (10, 30, 60)


# -- 2. Algorithm 1 ------------------------------------------------------------------------------------

class Thermalized(NamedTuple):
    """Result of one `thermalize` call (all per sample, batch first).

    state: the thermalized (or untouched) states.
    predicted_level: the classifier's argmax level s_hat before thermalization (int64; -1 in fixed-level mode).
    steps_applied: denoising steps taken (0 where s_hat <= s_init) (int64).
    runaway: s_hat > runaway_level (bool).
    """

    state: torch.Tensor
    predicted_level: torch.Tensor
    steps_applied: torch.Tensor
    runaway: torch.Tensor


def check_levels_pair(s_init: int, s_stop: int, num_levels: int) -> None:
    """ValueError naming the field unless 0 <= s_stop < s_init < num_levels (integers)."""
    if not (isinstance(s_stop, int) and 0 <= s_stop < num_levels):
        raise ValueError(f"s_stop must be an integer in [0, {num_levels - 1}], got {s_stop!r}")
    if not (isinstance(s_init, int) and s_stop < s_init < num_levels):
        raise ValueError(f"s_init must be an integer in [s_stop + 1 = {s_stop + 1}, {num_levels - 1}], got {s_init!r}")


def denoise_from(current: torch.Tensor, levels: torch.Tensor, s_stop: int,
                 predict_noise: Callable[[torch.Tensor], torch.Tensor], scheduler: DDPMScheduler,
                 generator: torch.Generator | None = None,
                 on_level: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Ancestral DDPM steps from per-sample `levels` down to `s_stop`; each sample joins at its own
    level and leaves at s_stop, so each iteration runs the network on the still-active samples only.
    `on_level(states, levels)` sees the batch after every iteration (the calibration records MSE)."""
    levels = levels.clone()
    current = current.clone()
    while True:
        active = torch.nonzero(levels > s_stop).flatten()
        if active.numel() == 0:
            return current
        subset = current[active]
        current[active] = scheduler.step(predict_noise(subset), levels[active], subset, generator)
        levels[active] -= 1
        if on_level is not None:
            on_level(current, levels)


@torch.no_grad()
def thermalize(state: torch.Tensor, classify: Callable[[torch.Tensor], torch.Tensor] | None,
               predict_noise: Callable[[torch.Tensor], torch.Tensor], scheduler: DDPMScheduler, *, s_init: int,
               s_stop: int, runaway_level: int = 100, generator: torch.Generator | None = None,
               fixed_level: int | None = None, fresh_noise: bool = True) -> Thermalized:
    """One Thermalizer correction of a batch of normalised states (batch, C, y, x); see the module docstring.

    fixed_level: thermalize every sample from this level, without the classifier (a diagnostic that
        separates the denoiser from the classifier); s_init is then ignored.
    fresh_noise: False denoises the state as it is, as if it were at its predicted level (the
        reference code's forward_diff=False), instead of re-noising it to that level first.
    """
    batch = state.shape[0]
    if fixed_level is not None:
        if not (isinstance(fixed_level, int) and s_stop < fixed_level < scheduler.num_levels):
            raise ValueError(f"fixed_level must be an integer in [s_stop + 1 = {s_stop + 1}, "
                             f"{scheduler.num_levels - 1}], got {fixed_level!r}")
        predicted = torch.full((batch,), -1, dtype=torch.int64, device=state.device)
        start = torch.full((batch,), fixed_level, dtype=torch.int64, device=state.device)
        runaway = torch.zeros(batch, dtype=torch.bool, device=state.device)
        chosen = torch.arange(batch, device=state.device)
    else:
        check_levels_pair(s_init, s_stop, scheduler.num_levels)
        if not (isinstance(runaway_level, int) and s_init <= runaway_level < scheduler.num_levels):
            raise ValueError(f"runaway_level must be an integer in [s_init = {s_init}, {scheduler.num_levels - 1}], "
                             f"got {runaway_level!r}")
        predicted = classify(state).argmax(dim=-1).to(torch.int64)
        # A blown-up state (NaN/inf) gives NaN logits, whose argmax is level 0, "clean": record it as
        # the top level and a runaway instead, and leave it alone (no denoising brings NaN back).
        blown_up = ~torch.isfinite(state.flatten(1)).all(dim=1)
        predicted = torch.where(blown_up, torch.full_like(predicted, scheduler.num_levels - 1), predicted)
        runaway = predicted > runaway_level
        start = predicted.clamp(max=runaway_level)
        chosen = torch.nonzero((predicted > s_init) & ~blown_up).flatten()
    steps = torch.zeros(batch, dtype=torch.int64, device=state.device)
    if chosen.numel() == 0:
        return Thermalized(state, predicted, steps, runaway)
    state = state.clone()
    levels = start[chosen]
    if fresh_noise:
        noise = torch.randn(state[chosen].shape, generator=generator,
                            device=generator.device if generator else state.device, dtype=state.dtype).to(state.device)
        current = scheduler.add_noise(state[chosen], levels, noise)
    else:
        current = state[chosen]
    steps[chosen] = levels - s_stop
    state[chosen] = denoise_from(current, levels, s_stop, predict_noise, scheduler, generator)
    return Thermalized(state, predicted, steps, runaway)


# -- 1. training ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ThermalizerTrainingConfig(LevelTrainingSettings):
    """Settings of one thermalizer training run: the shared optimisation settings and level options
    (`emu.stabilizers.levels.LevelTrainingSettings`: batch 64, lr 2e-4, gradient-norm clipping at 1,
    level sampling, level target, snapshot stride), with the paper's classifier weight 1 and EMA
    0.995. preset "paper" is the 53M-parameter network, "small" the CPU one."""


class DiffusionLoss(nn.Module):
    """x_0 -> MSE(eps_hat, eps) + w * level loss, with fresh levels and noise per batch (eq. 8).

    The levels come from `sample_training_levels` (uniform, or the low-level mixture); the level loss
    is the cross-entropy against a one-hot target (paper) or a Gaussian-smoothed one. After each
    forward `terms` holds the parts (floats) for the training log and `logits` the head's output.
    """

    def __init__(self, network: nn.Module, schedule: CosineSchedule, classifier_weight: float = 1.0, *,
                 low_level_fraction: float = 0.0, low_level_max: int = 50, target_width: float | None = None):
        super().__init__()
        self.network = network
        self.schedule = schedule
        self.classifier_weight = classifier_weight
        self.levels = LevelLoss(schedule, low_level_fraction=low_level_fraction, low_level_max=low_level_max,
                                target_width=target_width)
        self.terms: dict[str, float] = {}
        self.logits: torch.Tensor | None = None

    @classmethod
    def from_config(cls, network: nn.Module, schedule: CosineSchedule,
                    config: ThermalizerTrainingConfig) -> "DiffusionLoss":
        objective = cls(network, schedule, config.classifier_weight)
        objective.levels = LevelLoss.from_settings(schedule, config)
        return objective

    def level_loss(self, logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return self.levels.loss(logits, levels)

    def forward(self, clean: torch.Tensor, levels: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        if levels is None:
            levels = self.levels.sample(clean.shape[0], clean.device)
        if noise is None:
            noise = torch.randn_like(clean)
        predicted_noise, logits = self.network(add_noise(self.schedule, clean, levels, noise))
        noise_mse = F.mse_loss(predicted_noise.float(), noise.float())
        level_loss = self.level_loss(logits, levels)
        self.terms = {"noise_mse": float(noise_mse.detach()), "cross_entropy": float(level_loss.detach())}
        self.logits = logits.detach()  # validation reads the predicted levels from the same forward
        return noise_mse + self.classifier_weight * level_loss


@torch.no_grad()
def evaluate(network: nn.Module, valid_set: Snapshots, schedule: CosineSchedule, config: ThermalizerTrainingConfig,
             device, calibration_states: int = 32) -> dict:
    """Validation noise MSE, level loss, level accuracy and low-level error at seeded levels and
    noise (so epochs compare), plus the calibration summary (`calibrate`) on the first
    `calibration_states` validation states."""
    generator = torch.Generator().manual_seed(12345)
    objective = DiffusionLoss.from_config(network, schedule, config).to(device)
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
    states = torch.stack([valid_set[i] for i in range(min(calibration_states, len(valid_set)))]).to(device)
    summary = calibrate(network, DDPMScheduler(schedule), states, levels=tuple(range(0, 21)), s_stop=4,
                        seed=12345)["summary"]
    metrics.update({f"valid_{key}": value for key, value in summary.items()})
    return metrics


def train_thermalizer(config: ThermalizerTrainingConfig, out, *, resume: bool = False, overwrite: bool = False,
                      progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Trains (or resumes, or with a larger `config.epochs` extends) a thermalizer into `out`; returns
    the last epoch's metrics. Output folder, resume and NaN handling as in `loop.fit`."""
    context, info, normalizer, channels = prepare_training(config)
    train_set = Snapshots(config.data, "train", snapshots="all", normalizer=normalizer, stride=config.snapshot_stride)
    valid_set = (Snapshots(config.data, "valid", snapshots="all", normalizer=normalizer, stride=config.snapshot_stride)
                 if split_files(config.data, "valid") else None)
    grid_size = train_set.shapes[0][-1]
    schedule = CosineSchedule(config.num_levels)
    network = make_model("thermalizer", config.preset, channels, channels, grid_size=grid_size,
                         num_levels=config.num_levels).to(context.device)
    return fit_level_model("thermalizer", network, DiffusionLoss.from_config(network, schedule, config).to(context.device),
                           train_set, valid_set, lambda module: evaluate(module, valid_set, schedule, config, context.device),
                           config, context, out, normalizer=normalizer, schedule=schedule, info=info,
                           plot_keys=(("valid_noise_mse", "valid noise MSE"), ("valid_cross_entropy", "valid level loss")),
                           resume=resume, overwrite=overwrite, progress=progress, echo=echo)


def load_thermalizer(path) -> tuple[nn.Module, DDPMScheduler, Normalizer, dict]:
    """(network in eval mode with the EMA weights, scheduler, normaliser, payload) of a thermalizer checkpoint."""
    return load_level_model(path, "thermalizer")


# -- 3. levels: calibration, automatic choice, grid search --------------------------------------------

def levels_path(checkpoint) -> Path:
    """thermalizer_levels.json beside the checkpoint, written by `thermalizer check` and `tune thermalizer`."""
    return Path(checkpoint).with_name("thermalizer_levels.json")


def read_levels(checkpoint) -> dict | None:
    """The levels file beside the checkpoint ({'s_init', 's_stop', 'source', ...}), or None."""
    path = levels_path(checkpoint)
    return json.loads(path.read_text()) if path.exists() else None


def write_levels(checkpoint, source: str, result: dict) -> Path:
    """Records `result` under `source` ("automatic" or "grid_search") and makes its pair the one
    rollouts use; the other source's entry is kept, so both can be compared."""
    existing = read_levels(checkpoint) or {}
    entries = {key: existing[key] for key in ("automatic", "grid_search") if key in existing}
    entries[source] = result
    return write_json_atomically(levels_path(checkpoint), {"s_init": int(result["s_init"]),
                                                           "s_stop": int(result["s_stop"]), "source": source,
                                                           **entries})


@torch.no_grad()
def calibrate(network: nn.Module, scheduler: DDPMScheduler, clean: torch.Tensor, *,
              levels=CALIBRATION_LEVELS, check_levels=DENOISER_CHECK_LEVELS, s_stop: int = 4, seed: int = 0,
              batch_size: int = 64) -> dict:
    """How well the head reads noise levels, and how well the denoiser removes noise.

    clean: held-out clean normalised states (N, C, y, x).
    Returns {"levels", "predicted" (len(levels), N) ints, "denoiser": [{"level", "s_stop", "mse",
    "expected", "mse_by_level"}], "summary": {...}} with summary
        clean_median_level   median s_hat on the clean states (goal: <= 3)
        clean_q95_level      95th percentile of s_hat on them (the automatic s_init's base)
        low_level_abs_error  mean |s_hat - s| over s <= 20
        denoiser_mse_sX      MSE to the clean state after noising to s = X and thermalizing to s_stop
    A perfect denoiser ends at x_{s_stop}, whose MSE to x_0 is (1 - sqrt(ab))^2 |x_0|^2 + (1 - ab)
    ~ 1 - ab_{s_stop} ("expected") only if the noise could be told from the clean state; ancestral
    steps draw a posterior sample, whose MSE to x_0 grows toward 2 x the posterior variance where it
    cannot. Each descent (run down to level 0) therefore also records, at every level k, the MSE of
    the Tweedie estimate E[x_0 | x_k] (one more network call per level), the part that denoising
    really improves: `automatic_levels` picks s_stop from it.
    """
    device = clean.device
    generator = torch.Generator(device=device).manual_seed(seed)
    predicted = np.zeros((len(levels), clean.shape[0]), dtype=np.int64)
    for row, level in enumerate(levels):
        for start in range(0, clean.shape[0], batch_size):
            part = clean[start:start + batch_size]
            noise = torch.randn(part.shape, generator=generator, device=device)
            noisy = scheduler.add_noise(part, torch.full((part.shape[0],), int(level), device=device), noise)
            predicted[row, start:start + part.shape[0]] = network.classify(noisy).argmax(dim=-1).cpu().numpy()
    levels_array = np.asarray(levels)
    alpha_bars = scheduler.schedule.alpha_bars.double().cpu().numpy()
    denoiser = []
    for level in check_levels:
        if level <= s_stop or level >= scheduler.num_levels:
            continue
        by_level, tweedie_by_level = {}, {}

        def record(states, current_levels, level=level):
            done = int(current_levels.max())
            by_level[done] = float(((states - clean) ** 2).mean())
            estimate = scheduler.tweedie(states, current_levels, network(states)[0])
            tweedie_by_level[done] = float(((estimate - clean) ** 2).mean())

        start_levels = torch.full((clean.shape[0],), int(level), dtype=torch.int64, device=device)
        noisy = scheduler.add_noise(clean, start_levels, torch.randn(clean.shape, generator=generator, device=device))
        record(noisy, start_levels)
        denoise_from(noisy, start_levels, 0, lambda x: network(x)[0], scheduler, generator, on_level=record)
        denoiser.append({"level": int(level), "s_stop": s_stop, "mse": by_level[s_stop],
                         "expected": float(1 - alpha_bars[s_stop]),
                         "mse_by_level": {int(k): v for k, v in sorted(by_level.items())},
                         "tweedie_mse_by_level": {int(k): v for k, v in sorted(tweedie_by_level.items())}})
    clean_row = predicted[list(levels).index(0)] if 0 in levels else None
    low = levels_array <= 20
    summary = {"low_level_abs_error": float(np.abs(predicted[low] - levels_array[low, None]).mean()) if low.any()
               else math.nan}
    if clean_row is not None:
        summary["clean_median_level"] = float(np.median(clean_row))
        summary["clean_q95_level"] = float(np.quantile(clean_row, 0.95))
    for entry in denoiser:
        summary[f"denoiser_mse_s{entry['level']}"] = entry["mse"]
    return {"levels": list(levels), "predicted": predicted, "denoiser": denoiser, "summary": summary}


def automatic_levels(calibration: dict, *, margin: int = 2, tolerance: float = 1.05, num_levels: int = 1000) -> dict:
    """(s_init, s_stop) from a calibration alone (no rollouts), replacing the paper's hand tuning.

    s_init = ceil(95th percentile of s_hat on clean held-out states) + `margin`: states the head reads
    as at most as noisy as most clean states are left alone; anything clearly noisier is corrected.
    s_stop: along the denoiser check's descent from the lowest checked level above s_init, the MSE of
    the Tweedie estimate E[x_0 | x_k] to the clean state falls with each step until the network
    cannot tell the remaining noise from the state; s_stop is the highest level below s_init whose
    Tweedie MSE is within `tolerance` of the lowest reached (further steps stop improving the
    estimate and only cost network calls).
    """
    s_init = int(math.ceil(calibration["summary"]["clean_q95_level"])) + margin
    s_init = max(1, min(s_init, num_levels - 1))
    candidates = [entry for entry in calibration["denoiser"] if entry["level"] > s_init] or calibration["denoiser"]
    if not candidates:
        raise ValueError("automatic levels need a denoiser check (calibrate with check_levels above s_init)")
    chosen = min(candidates, key=lambda entry: entry["level"])
    descent = chosen.get("tweedie_mse_by_level", chosen["mse_by_level"])
    usable = {level: mse for level, mse in descent.items() if level < s_init}
    rule = "tweedie"
    s_stop = max(0, s_init - 1)
    if usable:
        best = min(usable.values())
        s_stop = max(level for level, mse in usable.items() if mse <= tolerance * best)
    if not usable or best * tolerance >= usable[max(usable)]:
        # Descending never improved the estimate: the network cannot tell this noise from the state's
        # own small scales (seen at 32^2, where it draws new small scales instead of recovering the
        # old ones). The check then says nothing about s_stop; fall back to the ratio of the paper's
        # tuned pairs, (7, 4), (10, 5), (9, 4), (6, 3): s_stop ~ s_init / 2.
        s_stop, rule = s_init // 2, "half of s_init (no improving descent)"
    return {"s_init": s_init, "s_stop": int(min(s_stop, s_init - 1)), "margin": margin, "tolerance": tolerance,
            "clean_q95_level": calibration["summary"]["clean_q95_level"], "s_stop_rule": rule}


def held_out_states(directory, normalizer: Normalizer, count: int, split: str | None = None) -> tuple[torch.Tensor, str]:
    """Up to `count` clean normalised states from the valid split (else test), spread over trajectories."""
    from emu.training.rollouts import require_split

    chosen = require_split(directory, split) if split else next(
        (name for name in ("valid", "test") if split_files(directory, name)), None)
    if chosen is None:
        chosen = require_split(directory, "valid")
    frames = Snapshots(directory, chosen, snapshots="all", normalizer=normalizer)
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return torch.stack([frames[int(i)] for i in np.unique(picks)]), chosen


def check_thermalizer(checkpoint, data, *, states: int = 64, s_stop: int = 4, split: str | None = None,
                      device=None, plot: str | Path | None = None, write: bool = True, seed: int = 0,
                      echo: Callable[[str], None] = print) -> dict:
    """`emu thermalizer check`: calibration table, curve PNG and automatic levels for a checkpoint."""
    device = loop.resolve_device(device)
    network, scheduler, normalizer, _ = load_thermalizer(checkpoint)
    network.to(device)
    clean, chosen = held_out_states(data, normalizer, states, split)
    calibration = calibrate(network, scheduler, clean.to(device), s_stop=s_stop, seed=seed)
    levels = automatic_levels(calibration, num_levels=scheduler.num_levels)
    summary = calibration["summary"]
    echo(f"thermalizer {checkpoint}: {clean.shape[0]} clean {chosen} states of {data}")
    echo(f"{'true level':>11}{'median predicted':>18}{'q05':>6}{'q95':>6}")
    for row, level in enumerate(calibration["levels"]):
        if level in (0, 1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100):
            values = calibration["predicted"][row]
            echo(f"{level:>11}{np.median(values):>18.1f}{np.quantile(values, 0.05):>6.0f}{np.quantile(values, 0.95):>6.0f}")
    echo(f"median predicted level of clean states: {summary['clean_median_level']:.1f} (goal <= 3); "
         f"mean |s_hat - s| for s <= 20: {summary['low_level_abs_error']:.2f}")
    for entry in calibration["denoiser"]:
        echo(f"denoiser: noised to s = {entry['level']}, thermalized to s_stop = {entry['s_stop']}: MSE to clean "
             f"{entry['mse']:.4g} (a perfect denoiser: ~{entry['expected']:.4g})")
    echo(f"automatic levels: s_init = {levels['s_init']}, s_stop = {levels['s_stop']}")
    result = {"checkpoint": str(checkpoint), "data": str(data), "split": chosen, "states": int(clean.shape[0]),
              "summary": summary, "denoiser": calibration["denoiser"], "automatic": levels,
              "calibration": {"levels": calibration["levels"],
                              "median": np.median(calibration["predicted"], axis=1).tolist(),
                              "q05": np.quantile(calibration["predicted"], 0.05, axis=1).tolist(),
                              "q95": np.quantile(calibration["predicted"], 0.95, axis=1).tolist()}}
    if plot is not None:
        plot_calibration(result, plot)
        echo(f"calibration curve -> {plot}")
    if write:
        path = write_levels(checkpoint, "automatic", {**levels, "summary": summary})
        echo(f"(s_init, s_stop) = ({levels['s_init']}, {levels['s_stop']}) -> {path}")
    return result


def plot_calibration(result: dict, path) -> None:
    """Predicted vs true level (median and 5-95% band) with the identity, and the denoiser check."""
    from emu.plotting import _pyplot, save_figure_atomically

    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    calibration = result["calibration"]
    left.fill_between(calibration["levels"], calibration["q05"], calibration["q95"], alpha=0.3, label="5-95%")
    left.plot(calibration["levels"], calibration["median"], label="median predicted")
    left.plot(calibration["levels"], calibration["levels"], "k--", lw=1, label="ideal")
    left.axhline(result["automatic"]["s_init"], color="C3", lw=1, label=f"automatic s_init = {result['automatic']['s_init']}")
    left.set_xlabel("true level s (clean held-out states noised to s)")
    left.set_ylabel("predicted level")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for entry in result["denoiser"]:
        levels = sorted(int(k) for k in entry["mse_by_level"])
        right.plot(levels, [entry["mse_by_level"][k] for k in levels], label=f"from s = {entry['level']}")
    right.set_xscale("symlog", linthresh=1)
    right.set_yscale("log")
    right.set_xlabel("level reached while denoising")
    right.set_ylabel("MSE to the clean state")
    right.invert_xaxis()
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomically(figure, path)
    plt.close(figure)


class ThermalizerStabilizer:
    """The Thermalizer as an `emu.stabilizers` stabiliser: Algorithm 1 after every emulator step.

    Each call runs `thermalize` with this object's levels and generator and returns the per-sample
    record (predicted_level, denoising_steps, runaway) of the step.
    """

    name = "thermalizer"
    record_fields = {"predicted_level": (-1, np.int64), "denoising_steps": (0, np.int64), "runaway": (False, bool)}

    def __init__(self, network: nn.Module, scheduler: DDPMScheduler, *, s_init: int, s_stop: int,
                 runaway_level: int = 100, generator: torch.Generator | None = None, fixed_level: int | None = None,
                 fresh_noise: bool = True):
        if fixed_level is None:
            check_levels_pair(s_init, s_stop, scheduler.num_levels)
            runaway_level = max(runaway_level, s_init)
        self.network, self.scheduler, self.generator = network, scheduler, generator
        self.s_init, self.s_stop, self.runaway_level = s_init, s_stop, runaway_level
        self.fixed_level, self.fresh_noise = fixed_level, fresh_noise
        self.attributes = {"stabilizer": self.name, "s_init": s_init, "s_stop": s_stop,
                           "runaway_level": runaway_level, "fresh_noise": fresh_noise,
                           "fixed_level": -1 if fixed_level is None else fixed_level}

    @classmethod
    def from_checkpoint(cls, checkpoint, emulator_normalizer: Normalizer, device, *, s_init: int | None = None,
                        s_stop: int | None = None, runaway_level: int = 100, seed: int = 0,
                        fixed_level: int | None = None, fresh_noise: bool = True) -> "ThermalizerStabilizer":
        """Loads the thermalizer; levels default to the pair in thermalizer_levels.json beside it
        (from `thermalizer check` or `tune thermalizer`), else the paper's (7, 4). Refuses a
        thermalizer trained with other normalisation statistics than the emulator."""
        network, scheduler, normalizer, _ = load_thermalizer(checkpoint)
        if not (torch.allclose(normalizer.mean, emulator_normalizer.mean)
                and torch.allclose(normalizer.std, emulator_normalizer.std)):
            raise ValueError(f"thermalizer {checkpoint} was trained with other normalisation statistics than the "
                             "emulator: train both on the same dataset")
        stored = read_levels(checkpoint) or {}
        stabilizer = cls(network.to(device), scheduler,
                         s_init=s_init if s_init is not None else stored.get("s_init", DEFAULT_LEVELS["s_init"]),
                         s_stop=s_stop if s_stop is not None else stored.get("s_stop", DEFAULT_LEVELS["s_stop"]),
                         runaway_level=runaway_level, generator=torch.Generator(device=device).manual_seed(seed),
                         fixed_level=fixed_level, fresh_noise=fresh_noise)
        stabilizer.attributes["thermalizer"] = str(checkpoint)
        stabilizer.attributes["levels_source"] = ("given" if s_init is not None and s_stop is not None
                                                  else stored.get("source", "default"))
        return stabilizer

    def correct(self, state: torch.Tensor, history: RolloutHistory | None = None) -> tuple[torch.Tensor, dict]:
        result = thermalize(state, self.network.classify, lambda x: self.network(x)[0], self.scheduler,
                            s_init=self.s_init, s_stop=self.s_stop, runaway_level=self.runaway_level,
                            generator=self.generator, fixed_level=self.fixed_level, fresh_noise=self.fresh_noise)
        return result.state, {"predicted_level": result.predicted_level, "denoising_steps": result.steps_applied,
                              "runaway": result.runaway}


def tune_thermalizer(emulator_checkpoint, thermalizer_checkpoint, init, *, s_inits=range(6, 11),
                     s_stops=range(2, 6), trajectories: int = 2, steps: int = 200, split: str = "test",
                     runaway_level: int = 100, seed: int = 0, device: str | None = None, write: bool = True,
                     progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """`emu tune thermalizer`: grid search of (s_init, s_stop) by KE-spectrum match (paper app. C.3).

    For every pair with s_stop < s_init the emulator is rolled out with the Thermalizer from the same
    initial states (same seeds), the kinetic-energy spectrum of the second half is averaged per
    trajectory, and the pair is scored by the spectral distance to the solver's mean spectrum over
    the split, D = sum_k |S_solver(k) - S(k)| / S_solver(k) (`emu.metrics.spectral_similarity`; lower
    is better), averaged over trajectories; a pair with any NaN trajectory scores inf. The best pair
    goes to thermalizer_levels.json (source "grid_search"). Returns {"rows": [...], "s_init", ...}.
    """
    from emu.metrics import kinetic_energy_spectrum, spectral_similarity
    from emu.training.emulator import rollout
    from emu.training.rollouts import require_split
    from emu.training.trainer import emulator_from_checkpoint, load_checkpoint

    device = loop.resolve_device(device)
    chosen = require_split(init, split)
    payload = load_checkpoint(emulator_checkpoint)
    emulator, normalizer = emulator_from_checkpoint(payload)
    network, scheduler, _, _ = load_thermalizer(thermalizer_checkpoint)
    emulator.to(device), network.to(device)
    pairs = [(int(a), int(b)) for a in s_inits for b in s_stops if b < a]
    if not pairs:
        raise ValueError("no (s_init, s_stop) pair with s_stop < s_init in the given ranges")
    for s_init, s_stop in pairs:
        check_levels_pair(s_init, s_stop, scheduler.num_levels)
    if not (isinstance(steps, int) and steps >= 2):
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    frames = Snapshots(init, chosen, snapshots="all", normalizer=normalizer)
    available = frames.shapes[0][0]
    if not (isinstance(trajectories, int) and 1 <= trajectories <= available):
        raise ValueError(f"trajectories must be in [1, {available}], got {trajectories!r}")
    config = payload["dataset"]["config"]
    solver = torch.stack([frames[i] for i in range(len(frames))])
    reference = kinetic_energy_spectrum(normalizer.denormalise(solver).numpy(), config)[1].mean(axis=0)
    initial = torch.stack([frames._read(0, t, 0) for t in range(trajectories)]).to(device)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs) * steps, unit="step", desc="tune thermalizer", dynamic_ncols=True)
    rows = []
    for s_init, s_stop in pairs:
        generator = torch.Generator(device=device).manual_seed(seed)
        stabilizer = ThermalizerStabilizer(network, scheduler, s_init=s_init, s_stop=s_stop,
                                           runaway_level=runaway_level, generator=generator)
        applied = []

        def on_record(record, applied=applied):
            applied.append(record["denoising_steps"].float().mean())
            if bar is not None:
                bar.update(1)

        states = rollout(emulator, initial, steps, generator=generator, stabilizer=stabilizer, on_record=on_record)
        late = normalizer.denormalise(states[:, steps // 2:].float().cpu())
        spectra = kinetic_energy_spectrum(late.numpy(), config)[1].mean(axis=1)  # (trajectories, shells)
        similarity = spectral_similarity(spectra, reference)
        score = math.inf if similarity.num_nan else float(similarity.mean)
        rows.append({"s_init": s_init, "s_stop": s_stop, "score": score, "nan_trajectories": similarity.num_nan,
                     "denoising_steps_per_step": float(torch.stack(applied).mean())})
    if bar is not None:
        bar.close()
    best = min(rows, key=lambda row: row["score"])
    echo(f"{'s_init':>7}{'s_stop':>7}{'spectral distance':>19}{'NaN':>5}{'denoise steps/step':>20}")
    for row in rows:
        mark = "  <- best" if row is best else ""
        echo(f"{row['s_init']:>7}{row['s_stop']:>7}{row['score']:>19.4g}{row['nan_trajectories']:>5}"
             f"{row['denoising_steps_per_step']:>20.2f}{mark}")
    result = {"s_init": best["s_init"], "s_stop": best["s_stop"], "score": best["score"], "steps": steps,
              "trajectories": trajectories, "split": chosen, "emulator": str(emulator_checkpoint), "rows": rows}
    if write:
        path = write_levels(thermalizer_checkpoint, "grid_search", result)
        echo(f"best (s_init, s_stop) = ({best['s_init']}, {best['s_stop']}) -> {path}")
    return result
