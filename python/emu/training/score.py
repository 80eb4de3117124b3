"""Training Cohesion's window score network (emu.models.score) with the shared loop.

    from emu.training.score import ScoreTrainingConfig, train_score, load_score
    train_score(ScoreTrainingConfig(data="data/", preset="small", window=5, epochs=10), "runs/score")
    network, schedule, normalizer, payload = load_score("runs/score/best.pt")

Data: windows of W consecutive snapshots of one trajectory, (W, C, y, x) in normalised units, from
`emu.data.TrajectoryWindows(unroll=W - 1, stride=window_stride)` (every window start of every
trajectory; a stride > 1 decorrelates the samples).

Objective (denoising score matching with eps-prediction; Ho et al. 2020, Song et al. 2021, as SDA's
`VPSDE.loss`):

    t ~ U(0, 1) per window,   eps ~ N(0, I),   x_t = mu(t) x_0 + sigma(t) eps   (schedule.add_noise)
    L = mean over batch, frames, channels and cells of (eps_hat(x_t, t) - eps)²

`prediction="v"` (Salimans & Ho 2022) has the network predict v = mu eps - sigma x_0 instead, read
as the noise prediction eps_hat = sigma x_t + mu v_hat (exact, as mu² + sigma² = 1), and trains on
||v_hat - v||² = ||eps_hat - eps||² / mu². Why: with eps-prediction the Tweedie estimate
x0_hat = (x_t - sigma eps_hat) / mu multiplies the network's error by sigma/mu, 31 at t = 1 for
eta = 1e-3, so the large scales, decided at high noise, inherit it until the network has learned the
near-identity eps_hat ~ sigma x_t there; with v the error of x0_hat is sigma (v_hat - v), bounded, and
that identity is built in. Measured on the small Kolmogorov set (unconditional windows against the
data, `emu.stabilizers.cohesion.unconditional_check`): eps after 10 epochs 3x the data's RMS and 28x
its power at k = 1, v after 5 epochs 0.81x the RMS and 0.43-1.4x the power on every shell; after 40
epochs both are close (RMS 0.89x for v, 1.02x for eps; power 0.6-1.1x), so v mostly learns faster.
The network, checkpoints and samplers see eps_hat either way (`load_score` wraps a v network in
`VPredictionScore`).

With `stratified_time` (the default) the B times of a batch are stratified, t_i = (i + u_i) / B with
u_i ~ U(0, 1): each is still U(0, 1), so the expected loss is unchanged, but every batch covers the
whole range of noise levels, which lowers the variance of the batch loss and its gradient (the
loader shuffles, so a sample's stratum is independent of its data). The schedule is the VP SDE's
cosine schedule, emu.diffusion.vp.VPSchedule(eta) (methods.md "Cohesion": eta = 1e-3).

Validation (each epoch, with the EMA weights): the same loss on the valid split at seeded times
(stratified over the whole split) and noise (so epochs compare), `valid_loss`, and its parts over three bands of t ([0, 1/3), [1/3, 2/3),
[2/3, 1]) as `valid_noise_mse_low_t`, `_mid_t`, `_high_t` (low t, little noise, is where eps is
hardest to read and where the samples' fine scales are decided).

Checkpoints (`loop.fit`, kind "score": OUT/last.pt, best.pt, metrics.jsonl, loss.png) carry the
network config, the normaliser, the dataset info, the schedule config and the window: what
`load_score` needs to rebuild everything without the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from emu.data.loaders import Normalizer, Snapshots, TrajectoryWindows
from emu.data.well import split_files
from emu.diffusion.vp import VPSchedule
from emu.errors import UserError
from emu.models.score import (
    PRESETS,
    WindowScoreUNet,
    make_score_network,
    score_network_from_config,
)
from emu.training import loop
from emu.training.trainer import prepare_training

KIND = "score"
PREDICTIONS = ("eps", "v")
VALIDATION_SEED = 12345
T_BANDS = (("low_t", 0.0, 1 / 3), ("mid_t", 1 / 3, 2 / 3), ("high_t", 2 / 3, 1.0 + 1e-9))


@dataclass(frozen=True)
class ScoreTrainingConfig(loop.OptimisationSettings):
    """The shared optimisation settings (`loop.OptimisationSettings`; here batch 32, lr 2e-4 as SDA's
    Kolmogorov run, and gradient-norm clipping at 1 by default) plus

    Attributes:
        preset: score network size, "small" (CPU) or "paper" (emu.models.score.PRESETS).
        window: W, consecutive snapshots per training window (Cohesion: 5); at least 2 and at most
            the dataset's snapshots per trajectory (checked against the data by `train_score`).
        eta: the VP schedule's eta (alpha(t) = cos(acos(sqrt(eta)) t)², methods.md: 1e-3).
        ema_decay: weight EMA decay (0 disables); validation and `load_score` use the average.
        window_stride: distance between the starts of consecutive windows of one trajectory.
        stratified_time: stratify the diffusion times within each batch (module docstring).
        prediction: what the network predicts, "eps" (the noise) or "v" (mu eps - sigma x_0; module docstring).
    """

    batch_size: int = 32
    lr: float = 2e-4
    max_grad_norm: float | None = 1.0
    preset: str = "small"
    window: int = 5
    eta: float = 1e-3
    ema_decay: float = 0.999
    window_stride: int = 1
    stratified_time: bool = True
    prediction: str = "eps"

    def __post_init__(self):
        super().__post_init__()

        def integer(value, least):
            return isinstance(value, int) and not isinstance(value, bool) and value >= least

        checks = [
            (self.preset in PRESETS, "preset", " or ".join(repr(p) for p in PRESETS), self.preset),
            (integer(self.window, 2), "window", "an integer >= 2 (snapshots per training window)", self.window),
            (0 < self.eta < 1, "eta", "in (0, 1)", self.eta),
            (0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)", self.ema_decay),
            (integer(self.window_stride, 1), "window_stride", "an integer >= 1", self.window_stride),
            (isinstance(self.stratified_time, bool), "stratified_time", "True or False", self.stratified_time),
            (self.prediction in PREDICTIONS, "prediction", " or ".join(repr(p) for p in PREDICTIONS), self.prediction),
        ]
        for ok, name, allowed, value in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {value!r}")


def sample_times(batch: int, *, stratified: bool = True, device=None, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """(batch,) diffusion times, each U(0, 1); `stratified`: t_i = (i + u_i) / batch."""
    u = torch.rand(batch, generator=generator)
    t = (torch.arange(batch) + u) / batch if stratified else u
    return t.to(device)


class VPredictionScore(nn.Module):
    """eps_hat(x_t, t) = sigma(t) x_t + mu(t) v_hat(x_t, t) of a network that predicts v = mu eps - sigma x_0
    (the module docstring); it has the wrapped network's `window`, `channels` and `config`."""

    def __init__(self, network: WindowScoreUNet, schedule: VPSchedule):
        super().__init__()
        self.network, self.schedule = network, schedule
        self.window, self.channels, self.config = network.window, network.channels, network.config

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        mu, sigma = self.schedule.coefficients(t, x)
        return sigma * x + mu * self.network(x, t)


def noise_predictor(network: WindowScoreUNet, schedule: VPSchedule, prediction: str = "eps") -> nn.Module:
    """The eps_hat(x_t, t) of a network trained with `prediction` ("eps": the network itself)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    return network if prediction == "eps" else VPredictionScore(network, schedule)


def objective_weights(schedule: VPSchedule, t: torch.Tensor, prediction: str = "eps") -> torch.Tensor:
    """Per-sample weights of the eps-space squared error in the training objective: 1 for "eps",
    1 / mu(t)² for "v" (||eps_hat - eps||² / mu² = ||v_hat - v||²); float64, t's shape."""
    return torch.ones_like(t, dtype=torch.float64) if prediction == "eps" else 1.0 / schedule.alpha(t).double()


class ScoreLoss(nn.Module):
    """window (B, W, C, y, x) -> MSE(eps_hat(x_t, t), eps) (prediction "eps") or the same divided by
    mu(t)², which is MSE(v_hat, v) (prediction "v"), with x_t = schedule.add_noise(window, t, eps) and
    fresh t ~ U(0, 1) (stratified within the batch unless `stratified=False`) and eps ~ N(0, I) unless
    given. After each forward `terms` holds {"noise_mse": float} (eps-space, for either prediction)."""

    def __init__(self, network: WindowScoreUNet, schedule: VPSchedule, *, stratified: bool = True,
                 prediction: str = "eps"):
        super().__init__()
        self.network, self.schedule, self.stratified = network, schedule, stratified
        self.prediction = prediction
        self.predictor = noise_predictor(network, schedule, prediction)
        self.terms: dict[str, float] = {}

    def forward(self, window: torch.Tensor, t: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        expected = f"(batch, {self.network.window}, {self.network.channels}, y, x)"
        if window.ndim != 5 or window.shape[1] != self.network.window or window.shape[2] != self.network.channels:
            raise ValueError(f"windows must be {expected} for this network (window, channels per frame), "
                             f"got {tuple(window.shape)}")
        batch = window.shape[0]
        if t is None:
            t = sample_times(batch, stratified=self.stratified, device=window.device)
        if t.shape != (batch,):
            raise ValueError(f"t must hold one diffusion time per window, shape ({batch},), got {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn_like(window)
        if noise.shape != window.shape:
            raise ValueError(f"noise must have the windows' shape {tuple(window.shape)}, got {tuple(noise.shape)}")
        noised = self.schedule.add_noise(window, t, noise)
        per_window = (self.predictor(noised, t).float() - noise.float()).square().flatten(1).mean(dim=1)
        noise_mse = per_window.mean()
        self.terms = {"noise_mse": float(noise_mse.detach())}
        if self.prediction == "eps":
            return noise_mse
        return (per_window * objective_weights(self.schedule, t, self.prediction).to(per_window)).mean()


@torch.no_grad()
def evaluate(network: WindowScoreUNet, valid_set: TrajectoryWindows, schedule: VPSchedule, config: ScoreTrainingConfig,
             device) -> dict:
    """Validation loss (the training objective) at seeded times and noise, overall, and the eps-space
    noise MSE per band of t (a band without windows, possible only below 3 validation windows, is left
    out). The times are stratified over the whole validation set in a seeded random order, so every
    band holds about a third of the windows."""
    predictor = noise_predictor(network, schedule, config.prediction)
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    times = sample_times(len(valid_set), generator=generator)[torch.randperm(len(valid_set), generator=generator)]
    network.eval()
    total, count = 0.0, 0
    band_sums = {name: 0.0 for name, _, _ in T_BANDS}
    band_counts = {name: 0 for name, _, _ in T_BANDS}
    for window in DataLoader(valid_set, batch_size=config.batch_size):
        batch = window.shape[0]
        t = times[count:count + batch]
        noise = torch.randn(window.shape, generator=generator)
        window, t, noise = window.to(device), t.to(device), noise.to(device)
        predicted = predictor(schedule.add_noise(window, t, noise), t).float()
        per_window = ((predicted - noise.float()) ** 2).flatten(1).mean(dim=1).cpu()
        total += float((per_window * objective_weights(schedule, t.cpu(), config.prediction)).sum())
        count += batch
        for name, low, high in T_BANDS:
            inside = (t.cpu() >= low) & (t.cpu() < high)
            band_sums[name] += float(per_window[inside].sum())
            band_counts[name] += int(inside.sum())
    metrics = {"valid_loss": total / max(count, 1)}
    for name, _, _ in T_BANDS:
        if band_counts[name]:
            metrics[f"valid_noise_mse_{name}"] = band_sums[name] / band_counts[name]
    return metrics


def snapshots_per_trajectory(data, split: str) -> int:
    """Snapshots stored per trajectory in a split (of its first file, as TrajectoryWindows reads them)."""
    return Snapshots(data, split, "first").shapes[0][1]


def check_window(data, window: int, splits=("train", "valid")) -> None:
    """UserError unless every present split's trajectories hold at least `window` snapshots."""
    for split in splits:
        if split != "train" and not split_files(data, split):
            continue
        steps = snapshots_per_trajectory(data, split)
        if window > steps:
            raise UserError(f"--window {window}: the {split} trajectories of {data} hold {steps} snapshots each, "
                            f"so a window can hold at most {steps}; pass --window {steps} or less, or generate "
                            "longer trajectories")


def train_score(config: ScoreTrainingConfig, out, *, resume: bool = False, overwrite: bool = False,
                progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Trains (or resumes, or with a larger `config.epochs` extends) a window score network into `out`;
    returns the last epoch's metrics. Output folder, resume and NaN handling as in `loop.fit`."""
    check_window(config.data, config.window)
    context, info, normalizer, channels = prepare_training(config)
    unroll = config.window - 1
    train_set = TrajectoryWindows(config.data, "train", unroll=unroll, normalizer=normalizer,
                                  stride=config.window_stride)
    valid_set = (TrajectoryWindows(config.data, "valid", unroll=unroll, normalizer=normalizer,
                                   stride=config.window_stride) if split_files(config.data, "valid") else None)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    network = make_score_network(config.preset, channels, window=config.window)
    torch.manual_seed(config.seed + context.rank)  # times and noise differ between DDP ranks
    factor = network.downsampling_factor
    grid = tuple(train_set.shapes[0][-2:])
    if grid[0] % factor or grid[1] % factor:
        raise UserError(f"{config.data}: grid {grid[0]}x{grid[1]} is not a multiple of the {config.preset!r} score "
                        f"network's downsampling factor {factor}")
    network = network.to(context.device)
    schedule = VPSchedule(eta=config.eta)
    job = loop.Job(
        module=network, objective=ScoreLoss(network, schedule, stratified=config.stratified_time,
                                            prediction=config.prediction),
        train_set=train_set,
        evaluate=lambda module: evaluate(module, valid_set, schedule, config, context.device) if valid_set is not None else {},
        extras={"model_config": network.config, "normalizer": normalizer.state_dict(), "dataset": info,
                "schedule": schedule.config, "window": config.window, "prediction": config.prediction},
        plot_keys=(("train_loss", "train"), ("valid_loss", "valid"),
                   ("valid_noise_mse_low_t", "valid, t < 1/3")))
    if valid_set is None and context.rank == 0:
        echo(f"note: {config.data} has no valid split: no validation metrics, and best.pt is the epoch with the "
             "lowest training loss")
    return loop.fit(job, config, context, out, kind=KIND, resume=resume, overwrite=overwrite, progress=progress,
                    ema_decay=config.ema_decay, echo=echo)


def load_score(path) -> tuple[nn.Module, VPSchedule, Normalizer, dict]:
    """(noise prediction eps_hat(x_t, t) in eval mode with the inference (EMA) weights: the network, or
    for prediction "v" the network in `VPredictionScore`; VPSchedule, normaliser, payload) of an emu
    score checkpoint written by `train_score`."""
    payload = loop.load_checkpoint(path, KIND)
    network = score_network_from_config(payload["model_config"])
    network.load_state_dict(loop.inference_weights(payload))
    schedule = VPSchedule.from_config(payload["schedule"])
    predictor = noise_predictor(network, schedule, payload.get("prediction", "eps"))
    return predictor.eval(), schedule, Normalizer.from_state_dict(payload["normalizer"]), payload


__all__ = ["PREDICTIONS", "ScoreLoss", "ScoreTrainingConfig", "VPredictionScore", "check_window", "evaluate",
           "load_score", "noise_predictor", "objective_weights", "sample_times", "snapshots_per_trajectory",
           "train_score"]
