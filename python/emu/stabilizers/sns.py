"""SNS, the self-refining neural surrogate (Liu et al.): training, refinement, generation, the paths.

One home for the method, built on `emu.diffusion` (schedule, DDPM step), `emu.models.SNSUNet` and
the level options shared with the Thermalizer (`emu.stabilizers.levels`).

The object. For a pair of consecutive states (x_{t-1}, x_t) noised independently to levels (s2, s1),

    y_{t-1} = sqrt(ab_{s2}) x_{t-1} + sqrt(1 - ab_{s2}) eps_2,   y_t = sqrt(ab_{s1}) x_t + sqrt(1 - ab_{s1}) eps_1,

the network estimates both noises, E[eps_2 | y_{t-1}, y_t] and E[eps_1 | y_{t-1}, y_t] (the
multi-noise-level denoising oracle, paper eq. 2, equivalently the multi-noise-level score), and,
from its bottleneck, both levels (s2_hat, s1_hat): it is never told the levels. An optional clean
anchor frame far in the past (x_{t-lag} in training, the trajectory's initial state in rollouts)
is a third input group; the paper found it "substantially simplifies the optimization problem".

1. Training (paper eq. 4) `train_sns`: s1, s2 drawn independently over the schedule (uniform, or
   the Thermalizer's low-level mixture; `LevelTrainingSettings`),

       loss = MSE(eps_2_hat, eps_2) + MSE(eps_1_hat, eps_1) + w (CE(head_2, s2) + CE(head_1, s1)),   w = 0.1,

   on (anchor, previous, current) groups read by `emu.data.FrameGroups` from the dataset's own
   trajectories; the shared loop gives progress, metrics.jsonl, loss.png, checkpoints, resume, DDP,
   AMP, EMA (0.999) and gradient clipping (1.0).

2. Refinement (paper Algorithm 1) `refine`: per sample, predict (s2_hat, s1_hat) with the heads
   only; re-noise x_{t-1} to s2_hat and x_t to s1_hat with fresh noise; walk the (s2, s1) plane to
   (clean, clean) by ancestral DDPM steps along a monotone path; write back only x_t. Paths
   (`PATHS`, each a named function of the start point): "A" x_{t-1} to clean first, then x_t (the
   paper's best, the default); "B" the reverse; "C" lower the higher level to the lower one, then
   diagonal steps on both. A move that lowers one coordinate steps that frame with its own
   predicted noise and holds the other as it is; a diagonal move steps both with one network call.
   In emu's 0-based levels a frame at level s needs s + 1 steps to be clean (the last one, at
   level 0, is deterministic), so the paper's end point "(0, 0)" is (CLEAN, CLEAN) = (-1, -1) here
   and path A costs s2_hat + s1_hat + 2 network evaluations. `activation_threshold` skips samples
   whose two predicted levels are both below it (the paper: 5 on QG, none on Kolmogorov).
   Deviation, stated: a predicted level above `runaway_level` (default 200) is flagged and walked
   from `runaway_level`, so one garbage state cannot cost 2,000 network calls; NaN/inf states are
   flagged and left alone.

3. Standalone generation (paper Algorithm 2) `generate_next`: x_t from pure noise at the top level
   T - 1 down to clean, conditioned on the clean previous state: T network evaluations per
   emulator step (1,000 with the cosine schedule, ~100-500x a refinement), slow by design, for
   comparison only.

Theorem C.1 of the paper: with the exact multi-noise-level score every monotone path gives the same
joint distribution; tests/test_sns.py checks that with a closed-form Gaussian oracle.

References: Liu et al. (2025), "Towards Infinitely Long Neural Simulations: Self-Refining Neural
Surrogate Models for Dynamical Systems" (Algorithms 1 and 2, eq. 2-4, appendix B, Theorem C.1);
Ho et al. (2020) for the DDPM step; Pedersen, Zanna & Bruna (2025) for the head and Algorithm 1
that SNS generalises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from emu.data.loaders import FrameGroups, Normalizer
from emu.data.well import split_files
from emu.diffusion import CosineSchedule, DDPMScheduler, add_noise
from emu.models import make_model
from emu.stabilizers.base import RolloutHistory
from emu.stabilizers.levels import (LevelLoss, LevelTrainingSettings, fit_level_model, load_level_model,
                                   prepare_training)

CLEAN = -1  # path coordinate of a frame with no noise left (one step below DDPM level 0)


# -- traversal paths of the (s2, s1) plane ---------------------------------------------------------------

def path_a(previous_level: int, current_level: int) -> list[tuple[int, int]]:
    """(s2, s1) points from the start to (CLEAN, CLEAN): x_{t-1} to clean first, then x_t (paper's best)."""
    points = [(s2, current_level) for s2 in range(previous_level, CLEAN - 1, -1)]
    return points + [(CLEAN, s1) for s1 in range(current_level - 1, CLEAN - 1, -1)]


def path_b(previous_level: int, current_level: int) -> list[tuple[int, int]]:
    """x_t to clean first, then x_{t-1} (the reverse of path A)."""
    points = [(previous_level, s1) for s1 in range(current_level, CLEAN - 1, -1)]
    return points + [(s2, CLEAN) for s2 in range(previous_level - 1, CLEAN - 1, -1)]


def path_c(previous_level: int, current_level: int) -> list[tuple[int, int]]:
    """Lower the higher level to the lower one, then diagonal steps on both frames together."""
    s2, s1 = previous_level, current_level
    points = [(s2, s1)]
    while s2 != s1:
        s2, s1 = (s2 - 1, s1) if s2 > s1 else (s2, s1 - 1)
        points.append((s2, s1))
    while s2 > CLEAN:
        s2, s1 = s2 - 1, s1 - 1
        points.append((s2, s1))
    return points


PATHS: dict[str, Callable[[int, int], list[tuple[int, int]]]] = {"A": path_a, "B": path_b, "C": path_c}


def check_path(path: str) -> Callable[[int, int], list[tuple[int, int]]]:
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)} (A: previous frame first, the paper's best; "
                         f"B: current first; C: equalise, then diagonal), got {path!r}")
    return PATHS[path]


NoisePredictor = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                          tuple[torch.Tensor, torch.Tensor]]


def traverse(previous: torch.Tensor, current: torch.Tensor, paths: list[list[tuple[int, int]]],
             predict_noise: NoisePredictor, scheduler: DDPMScheduler, *, anchor: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Walks every sample b of the noised pair (previous, current) along `paths[b]` (points (s2, s1),
    each move lowering one or both coordinates by 1) by ancestral DDPM steps; returns the pair.

    predict_noise(anchor, previous, current, s2, s1) -> (eps_previous, eps_current) for a subset of
    samples at levels (s2, s1) (the SNS network ignores the levels and reads them itself; an exact
    oracle needs them). Each iteration runs it once on the samples whose path goes on.
    """
    for points in {id(points): points for points in paths}.values():
        for (a2, a1), (b2, b1) in zip(points, points[1:]):
            if not (b2 in (a2, a2 - 1) and b1 in (a1, a1 - 1) and (b2, b1) != (a2, a1) and min(b2, b1) >= CLEAN):
                raise ValueError(f"a path must lower s2, s1 or both by 1 per move down to {CLEAN}; "
                                 f"got ({a2}, {a1}) -> ({b2}, {b1})")
    previous, current = previous.clone(), current.clone()
    device = previous.device
    # One (length, 2) tensor per distinct path object (a batch often shares one), padded with the end
    # point: per iteration the moves of all samples are then two tensor reads, not a Python loop.
    lengths = torch.tensor([len(points) for points in paths], device=device)
    longest = int(lengths.max()) if len(paths) else 1
    distinct: dict[int, int] = {}
    tables = []
    for points in paths:
        if id(points) not in distinct:
            distinct[id(points)] = len(tables)
            table = torch.tensor(points, dtype=torch.int64)
            tables.append(torch.cat([table, table[-1:].expand(longest - len(points), 2)]))
    table = torch.stack(tables).to(device)[torch.tensor([distinct[id(points)] for points in paths], device=device)]
    for index in range(longest - 1):
        rows = torch.nonzero(index + 1 < lengths).flatten()
        here, there = table[rows, index], table[rows, index + 1]
        part_previous, part_current = previous[rows], current[rows]
        eps_previous, eps_current = predict_noise(None if anchor is None else anchor[rows], part_previous,
                                                  part_current, here[:, 0], here[:, 1])
        for column, frame, part, eps in ((0, previous, part_previous, eps_previous),
                                         (1, current, part_current, eps_current)):
            moving = torch.nonzero(there[:, column] < here[:, column]).flatten()
            if moving.numel():
                frame[rows[moving]] = scheduler.step(eps[moving], here[moving, column], part[moving], generator)
    return previous, current


# -- refinement and generation ------------------------------------------------------------------------

class Refined(NamedTuple):
    """Result of one `refine` (or `generate_next`) call, all per sample.

    state: the refined current states (the emulator's where skipped or blown up).
    current_level, previous_level: the heads' s1_hat and s2_hat (int64; -1 for `generate_next`).
    evaluations: network evaluations of the walk (0 where skipped) (int64).
    skipped: both levels below the activation threshold (bool).
    runaway: a level above runaway_level, or a non-finite state (bool).
    """

    state: torch.Tensor
    current_level: torch.Tensor
    previous_level: torch.Tensor
    evaluations: torch.Tensor
    skipped: torch.Tensor
    runaway: torch.Tensor


def network_noise(network: nn.Module) -> NoisePredictor:
    """The SNS network as a `traverse` noise predictor (it reads the levels from the inputs itself)."""
    def predict(anchor, previous, current, previous_levels, current_levels):
        output = network(network.stack_inputs(anchor, previous, current))
        return output.previous_noise, output.current_noise

    return predict


def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


@torch.no_grad()
def refine(network: nn.Module, scheduler: DDPMScheduler, current: torch.Tensor, previous: torch.Tensor,
           anchor: torch.Tensor | None = None, *, path: str = "A", activation_threshold: int | None = None,
           runaway_level: int = 200, generator: torch.Generator | None = None) -> Refined:
    """One SNS refinement of the emulator's `current` states given the `previous` (corrected) states
    and the clean `anchor` (the trajectory's initial states; None for a network without anchor),
    all normalised (batch, C, y, x). See the module docstring, part 2."""
    make_path = check_path(path)
    top = scheduler.num_levels - 1
    if not (isinstance(runaway_level, int) and runaway_level >= 0):
        raise ValueError(f"runaway_level must be an integer >= 0, got {runaway_level!r}")
    runaway_level = min(runaway_level, top)
    if activation_threshold is not None and not (isinstance(activation_threshold, int) and activation_threshold >= 0):
        raise ValueError(f"activation_threshold must be an integer >= 0 or None, got {activation_threshold!r}")
    batch = current.shape[0]
    previous_level, current_level = network.predict_levels(network.stack_inputs(anchor, previous, current))
    blown_up = ~(torch.isfinite(current.flatten(1)).all(dim=1) & torch.isfinite(previous.flatten(1)).all(dim=1))
    # NaN logits argmax to level 0, "clean": record a blown-up pair at the top level instead.
    previous_level = torch.where(blown_up, torch.full_like(previous_level, top), previous_level)
    current_level = torch.where(blown_up, torch.full_like(current_level, top), current_level)
    runaway = blown_up | (previous_level > runaway_level) | (current_level > runaway_level)
    skipped = torch.zeros(batch, dtype=torch.bool, device=current.device)
    if activation_threshold is not None:
        skipped = (previous_level < activation_threshold) & (current_level < activation_threshold) & ~blown_up
    evaluations = torch.zeros(batch, dtype=torch.int64, device=current.device)
    chosen = torch.nonzero(~skipped & ~blown_up).flatten()
    state = current
    if chosen.numel():
        start_previous = previous_level[chosen].clamp(max=runaway_level)
        start_current = current_level[chosen].clamp(max=runaway_level)
        noisy_previous = scheduler.add_noise(previous[chosen], start_previous, _noise(previous[chosen], generator))
        noisy_current = scheduler.add_noise(current[chosen], start_current, _noise(current[chosen], generator))
        paths = [make_path(int(a), int(b)) for a, b in zip(start_previous.tolist(), start_current.tolist())]
        _, refined = traverse(noisy_previous, noisy_current, paths, network_noise(network), scheduler,
                              anchor=None if anchor is None else anchor[chosen], generator=generator)
        state = current.clone()
        state[chosen] = refined
        evaluations[chosen] = torch.tensor([len(points) - 1 for points in paths], device=current.device)
    return Refined(state, current_level, previous_level, evaluations, skipped, runaway)


@torch.no_grad()
def generate_next(network: nn.Module, scheduler: DDPMScheduler, previous: torch.Tensor,
                  anchor: torch.Tensor | None = None, *, generator: torch.Generator | None = None) -> Refined:
    """The paper's Algorithm 2: x_t from pure noise at level T - 1 down to clean, the clean `previous`
    held (path (CLEAN, T-1) -> (CLEAN, CLEAN)): T network evaluations per call."""
    top = scheduler.num_levels - 1
    batch = previous.shape[0]
    noise = _noise(previous, generator)
    paths = [[(CLEAN, level) for level in range(top, CLEAN - 1, -1)]] * batch
    _, state = traverse(previous, noise, paths, network_noise(network), scheduler, anchor=anchor, generator=generator)
    minus_one = torch.full((batch,), -1, dtype=torch.int64, device=previous.device)
    return Refined(state, minus_one, minus_one.clone(), torch.full_like(minus_one, top + 1),
                   torch.zeros(batch, dtype=torch.bool, device=previous.device),
                   ~torch.isfinite(state.flatten(1)).all(dim=1))


class SNSStabilizer:
    """SNS as an `emu.stabilizers` stabiliser: after every emulator step, `refine` (mode "refine",
    the paper's Algorithm 1) or `generate_next` (mode "generate", Algorithm 2: the emulator's output
    is replaced by a sample conditioned on the previous state). The anchor is the trajectory's
    initial state, the previous state the corrected state before this step (`RolloutHistory`).

    Record per sample and step: predicted_level (s1_hat of the current frame), previous_level
    (s2_hat), denoising_steps (network evaluations), skipped, runaway.
    """

    name = "sns"
    record_fields = {"predicted_level": (-1, np.int64), "previous_level": (-1, np.int64),
                     "denoising_steps": (0, np.int64), "skipped": (False, bool), "runaway": (False, bool)}

    def __init__(self, network: nn.Module, scheduler: DDPMScheduler, *, path: str = "A",
                 activation_threshold: int | None = None, runaway_level: int = 200, mode: str = "refine",
                 generator: torch.Generator | None = None):
        check_path(path)
        if mode not in ("refine", "generate"):
            raise ValueError(f"mode must be 'refine' (Algorithm 1) or 'generate' (Algorithm 2), got {mode!r}")
        self.network, self.scheduler, self.generator = network, scheduler, generator
        self.path, self.activation_threshold, self.runaway_level, self.mode = path, activation_threshold, runaway_level, mode
        self.anchored = bool(network.config.get("anchor", True))
        self.attributes = {"stabilizer": self.name, "path": path, "mode": mode, "runaway_level": runaway_level,
                           "activation_threshold": -1 if activation_threshold is None else activation_threshold,
                           "anchor": self.anchored}

    @classmethod
    def from_checkpoint(cls, checkpoint, emulator_normalizer: Normalizer, device, *, seed: int = 0,
                        **options) -> "SNSStabilizer":
        """Loads an SNS checkpoint; refuses one trained with other normalisation statistics."""
        network, scheduler, normalizer, _ = load_sns(checkpoint)
        if not (torch.allclose(normalizer.mean, emulator_normalizer.mean)
                and torch.allclose(normalizer.std, emulator_normalizer.std)):
            raise ValueError(f"SNS model {checkpoint} was trained with other normalisation statistics than the "
                             "emulator: train both on the same dataset")
        stabilizer = cls(network.to(device), scheduler, generator=torch.Generator(device=device).manual_seed(seed),
                         **options)
        stabilizer.attributes["sns"] = str(checkpoint)
        return stabilizer

    def correct(self, state: torch.Tensor, history: RolloutHistory) -> tuple[torch.Tensor, dict]:
        anchor = history.initial if self.anchored else None
        if self.mode == "generate":
            result = generate_next(self.network, self.scheduler, history.previous, anchor, generator=self.generator)
        else:
            result = refine(self.network, self.scheduler, state, history.previous, anchor, path=self.path,
                            activation_threshold=self.activation_threshold, runaway_level=self.runaway_level,
                            generator=self.generator)
        return result.state, {"predicted_level": result.current_level, "previous_level": result.previous_level,
                              "denoising_steps": result.evaluations, "skipped": result.skipped,
                              "runaway": result.runaway}


# -- training ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SNSTrainingConfig(LevelTrainingSettings):
    """Settings of one SNS training run: the shared optimisation settings and level options
    (`LevelTrainingSettings`: batch 64, lr 2e-4, clipping at 1, level sampling and target, snapshot
    stride) with the paper's head weight 0.1 and EMA 0.999, plus

    Attributes:
        anchor: give the network a clean anchor frame (False: inputs [x_{t-1}, x_t] only).
        anchor_lag: snapshots between the anchor and the current frame in training (the paper: 100
            emulator steps on QG; the trajectories must hold more than anchor_lag snapshots).
    The paper's lr is 5e-5 at batch 64 on 440,000 pairs over two GPU days; 2e-4 is emu's default for
    the CPU-sized presets, as for the Thermalizer.
    """

    classifier_weight: float = 0.1
    ema_decay: float = 0.999
    anchor: bool = True
    anchor_lag: int = 10

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.anchor, bool):
            raise ValueError(f"anchor must be True or False, got {self.anchor!r}")
        if not (isinstance(self.anchor_lag, int) and not isinstance(self.anchor_lag, bool) and self.anchor_lag >= 2):
            raise ValueError(f"anchor_lag must be an integer >= 2 (snapshots back from the current frame), "
                             f"got {self.anchor_lag!r}")

    @property
    def offsets(self) -> tuple[int, ...]:
        return (-self.anchor_lag, -1, 0) if self.anchor else (-1, 0)


class SNSLoss(nn.Module):
    """group (batch, G, C, y, x) = [anchor,] previous, current -> the loss of eq. 4 (module docstring),
    with fresh independent levels and noises per batch unless given. After each forward `terms`
    holds the parts (floats) and `logits` the heads' outputs (previous, current)."""

    def __init__(self, network: nn.Module, schedule: CosineSchedule, classifier_weight: float = 0.1, *,
                 levels: LevelLoss | None = None):
        super().__init__()
        self.network, self.schedule, self.classifier_weight = network, schedule, classifier_weight
        self.levels = levels if levels is not None else LevelLoss(schedule)
        self.terms: dict[str, float] = {}
        self.logits: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_config(cls, network: nn.Module, schedule: CosineSchedule, config: SNSTrainingConfig) -> "SNSLoss":
        return cls(network, schedule, config.classifier_weight, levels=LevelLoss.from_settings(schedule, config))

    def forward(self, group: torch.Tensor, previous_levels: torch.Tensor | None = None,
                current_levels: torch.Tensor | None = None, previous_noise: torch.Tensor | None = None,
                current_noise: torch.Tensor | None = None) -> torch.Tensor:
        anchored = group.shape[1] == 3
        if group.ndim != 5 or group.shape[1] not in (2, 3) or anchored != bool(self.network.config.get("anchor", True)):
            raise ValueError(f"group must be (batch, {3 if self.network.config.get('anchor', True) else 2}, C, y, x) "
                             f"for this network, got {tuple(group.shape)}")
        anchor = group[:, 0] if anchored else None
        previous, current = group[:, -2], group[:, -1]
        batch = group.shape[0]
        s2 = previous_levels if previous_levels is not None else self.levels.sample(batch, group.device)
        s1 = current_levels if current_levels is not None else self.levels.sample(batch, group.device)
        eps2 = previous_noise if previous_noise is not None else torch.randn_like(previous)
        eps1 = current_noise if current_noise is not None else torch.randn_like(current)
        output = self.network(self.network.stack_inputs(anchor, add_noise(self.schedule, previous, s2, eps2),
                                                        add_noise(self.schedule, current, s1, eps1)))
        noise_previous = F.mse_loss(output.previous_noise.float(), eps2.float())
        noise_current = F.mse_loss(output.current_noise.float(), eps1.float())
        level_previous = self.levels.loss(output.previous_logits, s2)
        level_current = self.levels.loss(output.current_logits, s1)
        self.terms = {"noise_mse_previous": float(noise_previous.detach()),
                      "noise_mse_current": float(noise_current.detach()),
                      "cross_entropy_previous": float(level_previous.detach()),
                      "cross_entropy_current": float(level_current.detach())}
        self.logits = (output.previous_logits.detach(), output.current_logits.detach())
        return noise_previous + noise_current + self.classifier_weight * (level_previous + level_current)


@torch.no_grad()
def evaluate(network: nn.Module, valid_set: FrameGroups, schedule: CosineSchedule, config: SNSTrainingConfig,
             device, clean_groups: int = 32) -> dict:
    """Validation loss and its parts at seeded levels and noise (so epochs compare), each head's
    mean |s_hat - s| for s < 50, and the median levels the heads give clean pairs (goal ~0)."""
    generator = torch.Generator().manual_seed(12345)
    objective = SNSLoss.from_config(network, schedule, config).to(device)
    totals: dict[str, float] = {}
    count, low_error, low_count = 0, {"previous": 0.0, "current": 0.0}, 0
    for group in DataLoader(valid_set, batch_size=config.batch_size):
        batch = group.shape[0]
        s2, s1 = (torch.randint(0, schedule.num_levels, (batch,), generator=generator) for _ in range(2))
        eps2, eps1 = (torch.randn(group[:, 0].shape, generator=generator) for _ in range(2))
        group, s2, s1, eps2, eps1 = (t.to(device) for t in (group, s2, s1, eps2, eps1))
        loss = objective(group, s2, s1, eps2, eps1)
        for key, value in {"valid_loss": float(loss), **{f"valid_{k}": v for k, v in objective.terms.items()}}.items():
            totals[key] = totals.get(key, 0.0) + value * batch
        count += batch
        low2, low1 = (torch.randint(0, 50, (batch,), generator=generator).to(device) for _ in range(2))
        anchor = group[:, 0] if group.shape[1] == 3 else None
        predicted2, predicted1 = network.predict_levels(network.stack_inputs(
            anchor, add_noise(schedule, group[:, -2], low2, eps2), add_noise(schedule, group[:, -1], low1, eps1)))
        low_error["previous"] += float((predicted2 - low2).abs().float().sum())
        low_error["current"] += float((predicted1 - low1).abs().float().sum())
        low_count += batch
    metrics = {key: value / max(count, 1) for key, value in totals.items()}
    for name, error in low_error.items():
        metrics[f"valid_low_level_abs_error_{name}"] = error / max(low_count, 1)
    clean = torch.stack([valid_set[i] for i in range(min(clean_groups, len(valid_set)))]).to(device)
    anchor = clean[:, 0] if clean.shape[1] == 3 else None
    predicted2, predicted1 = network.predict_levels(network.stack_inputs(anchor, clean[:, -2], clean[:, -1]))
    metrics["valid_clean_median_level_previous"] = float(predicted2.float().median())
    metrics["valid_clean_median_level_current"] = float(predicted1.float().median())
    return metrics


def train_sns(config: SNSTrainingConfig, out, *, resume: bool = False, overwrite: bool = False,
              progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Trains (or resumes, or with a larger `config.epochs` extends) an SNS model into `out`; returns
    the last epoch's metrics. Output folder, resume and NaN handling as in `loop.fit`."""
    context, info, normalizer, channels = prepare_training(config)
    train_set = FrameGroups(config.data, "train", offsets=config.offsets, normalizer=normalizer,
                            stride=config.snapshot_stride)
    valid_set = (FrameGroups(config.data, "valid", offsets=config.offsets, normalizer=normalizer,
                             stride=config.snapshot_stride) if split_files(config.data, "valid") else None)
    grid_size = train_set.shapes[0][-1]
    schedule = CosineSchedule(config.num_levels)
    network = make_model("sns", config.preset, channels, channels, grid_size=grid_size, anchor=config.anchor,
                         num_levels=config.num_levels).to(context.device)
    return fit_level_model("sns", network, SNSLoss.from_config(network, schedule, config).to(context.device),
                           train_set, valid_set, lambda module: evaluate(module, valid_set, schedule, config, context.device),
                           config, context, out, normalizer=normalizer, schedule=schedule, info=info,
                           extras={"anchor_lag": config.anchor_lag if config.anchor else None},
                           plot_keys=(("valid_noise_mse_current", "valid noise MSE, current"),
                                      ("valid_cross_entropy_current", "valid level loss, current")),
                           resume=resume, overwrite=overwrite, progress=progress, echo=echo)


def load_sns(path) -> tuple[nn.Module, DDPMScheduler, Normalizer, dict]:
    """(network in eval mode with the EMA weights, scheduler, normaliser, payload) of an SNS checkpoint."""
    return load_level_model(path, "sns")


def expected_evaluations(previous_level: int, current_level: int, path: str = "A") -> int:
    """Network evaluations of one refinement from (s2_hat, s1_hat) along `path` (cost planning)."""
    return len(check_path(path)(previous_level, current_level)) - 1


__all__ = ["CLEAN", "PATHS", "Refined", "SNSLoss", "SNSStabilizer", "SNSTrainingConfig", "evaluate",
           "expected_evaluations", "generate_next", "load_sns", "network_noise", "path_a", "path_b", "path_c",
           "refine", "train_sns", "traverse"]
