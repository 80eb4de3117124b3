"""Cohesion (arXiv 2504.14264): a coherent Koopman prior plus diffusion refinement, forecasting as
trajectory planning.

One home for the method's inference, built on its two trained parts and the shared diffusion core:

- the coherent prior: `emu.models.koopman.KoopmanAutoencoder` (`emu train koopman`) rolls the
  large-scale flow out over the whole horizon in one call, ubar_{0:T} = D(K^t E(u_0));
- the score model: `emu.models.score.WindowScoreUNet` (`emu train score`) scores windows of W
  consecutive frames; `emu.diffusion.compose_window_scores` composes the score of a sequence of any
  length from them (each frame from the window where it is most central);
- the sampler: `emu.diffusion.PredictorCorrectorSampler` (exponential-integrator predictor, Langevin
  corrector) on the continuous-time VP SDE with the cosine schedule (`emu.diffusion.VPSchedule`);
- the conditioning: `emu.diffusion.guided_eps_fn`, Tweedie-based Gaussian likelihood guidance
  toward y = A(prior) through an observation operator A (identity, spatial coarsening, or a mask of
  observed frames for partial priors).

Two modes, one API (`forecast`):

    plan            (R = T) the whole sequence u_{0:T} is denoised at once: one sampler run whose
                    every network call scores all T - W + 2 windows in one batch (stride 1), or
                    about (T + 1 - W)/s + 1 of them with windows of stride s (`window_stride`);
    autoregressive  (R = 1) window by window: T sampler runs, run k generating frame k in a window
                    whose earlier frames are the ones already generated, observed exactly; with
                    `frames_per_run` R up to W - 1, ceil(T / R) runs of R new frames each (no window
                    composition, so none of its energy loss; see the evidence).

Both observe the initial state u_0 in full (A = identity on frame 0) and the prior's frames through
A. With stride-1 windows the network evaluations are about the same in both modes (T windows x
steps x (1 + corrections)) and plan mode only batches them, which pays on a GPU; strided windows
(s = 3 for W = 5, still exact at t = 0 for first-order dynamics, `emu.diffusion.windows`) cut plan
mode's evaluations by s. Both are measured in the evidence, not assumed.

The prior's error grows with lead time: a Koopman forecast regresses to the mean as predictability is
lost (measured on the small Kolmogorov set: the RMS error of its 4 x 4 block means grows from 0.9 of
their 2.6 RMS at lead 0 to 2.4 by lead 20). A likelihood with one sigma_y = 0.1 then pulls every
sample's large scales onto a decayed field (the planned spectrum was 20x low at the largest
scales). `calibrate_prior_error` measures the prior's error per lead on held-out trajectories,
e_k = RMS(A(prior_k) - A(truth_k)), and the likelihood uses sigma_y,k = sqrt(sigma_y^2 + e_k^2) for
frame k (e_k held at its last measured value beyond the held-out trajectories' length), so guidance
fades where the prior has no skill left.

A third mode, "prior", returns the Koopman prior alone (no diffusion), the baseline the paper's
refinement is judged against.

`forecast_to_file` writes the result in the dataset's HDF5 layout (The Well), members after each
other per trajectory, with the timing of the prior and of the diffusion in the `emu` group.

References: Cohesion (arXiv 2504.14264), sections 2-4; Rozet & Louppe (2023), "Score-based data
assimilation" (window composition, guidance, the predictor-corrector sampler); Lusch, Kutz & Brunton
(2018) for the Koopman autoencoder.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from emu.diffusion import (
    CoarsenOperator,
    IdentityOperator,
    MaskOperator,
    PredictorCorrectorSampler,
    compose_window_scores,
    guided_eps_fn,
)

MODES = ("plan", "autoregressive", "prior")


@dataclass(frozen=True)
class CohesionSettings:
    """Sampler and guidance settings of one Cohesion forecast.

    Attributes:
        steps: predictor steps of the sampler from t = 1 to 0 (the paper: ~256).
        corrections: Langevin corrector steps after each predictor step.
        tau: the corrector's step size.
        strength: multiplier of the likelihood gradient (0: unconditional).
        observation_noise: sigma_y of the Gaussian likelihood (normalised units).
        prior_error: e_k, the RMS error of A(prior) at lead k = 0, 1, ... (`calibrate_prior_error`); the
            prior's frame k is then observed with noise sqrt(sigma_y^2 + e_k^2), e_k held at its last
            value beyond the tuple. None: sigma_y for every frame.
        gamma: weight of (sigma/mu)^2 in the likelihood's variance; None: 1, the scale of A A^T of every
            operator here ("coarsen:F" observes F x the block means, `NormalisedCoarsen`, so that
            the full frames observed beside the prior and the prior's means share one consistent gamma).
        operator: "identity", "coarsen:F" (F x F block means, scaled by F) or "frames:S" (a partial prior: every
            S-th frame of the prior observed in full, the others not at all).
        through_network: differentiate the likelihood through the network (SDA's default) or not.
        max_windows: at most this many windows per network call (memory; None: all at once).
        frames_per_run: autoregressive mode's R, the frames each sampler run generates, 1 <= R <= W - 1
            (1: frame by frame; W - 1: a window at a time, conditioned on one known frame).
        window_stride: plan mode's window spacing s, 1 <= s <= W (`emu.diffusion.compose_window_scores`);
            None: W - 2 (at least 1), the largest stride still exact at t = 0 for first-order dynamics
            (3 for W = 5: a third of the network calls, measured at the same quality as stride 1).
    """

    steps: int = 64
    corrections: int = 1
    tau: float = 0.5
    strength: float = 1.0
    observation_noise: float = 0.1
    gamma: float | None = None
    operator: str = "coarsen:4"
    through_network: bool = True
    max_windows: int | None = None
    prior_error: tuple[float, ...] | None = None
    window_stride: int | None = None
    frames_per_run: int = 1

    def __post_init__(self):
        checks = [
            (isinstance(self.steps, int) and self.steps >= 1, "steps", "an integer >= 1", self.steps),
            (isinstance(self.corrections, int) and self.corrections >= 0, "corrections", "an integer >= 0",
             self.corrections),
            (self.tau > 0, "tau", "> 0", self.tau),
            (self.strength >= 0, "strength", ">= 0", self.strength),
            (self.observation_noise >= 0, "observation_noise", ">= 0", self.observation_noise),
            (self.gamma is None or self.gamma >= 0, "gamma", ">= 0 or None", self.gamma),
            (self.max_windows is None or (isinstance(self.max_windows, int) and self.max_windows >= 1), "max_windows",
             "an integer >= 1 or None", self.max_windows),
            (self.prior_error is None or (len(self.prior_error) >= 1 and all(
                isinstance(e, (int, float)) and math.isfinite(e) and e >= 0 for e in self.prior_error)),
             "prior_error", "None or a non-empty sequence of finite numbers >= 0", self.prior_error),
            (self.window_stride is None or (isinstance(self.window_stride, int) and not isinstance(self.window_stride, bool)
                                            and self.window_stride >= 1),
             "window_stride", "None or an integer >= 1 (and <= the score window)", self.window_stride),
            (isinstance(self.frames_per_run, int) and not isinstance(self.frames_per_run, bool) and self.frames_per_run >= 1,
             "frames_per_run", "an integer >= 1 (and below the score window)", self.frames_per_run),
        ]
        for ok, name, allowed, value in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
        parse_operator(self.operator)
        if self.prior_error is not None:
            object.__setattr__(self, "prior_error", tuple(float(e) for e in self.prior_error))

    def stride_for(self, window: int) -> int:
        """Plan mode's window stride for a score network of `window` frames (checked against it)."""
        stride = max(1, window - 2) if self.window_stride is None else self.window_stride
        if stride > window:
            raise ValueError(f"window_stride must be in [1, {window}] (the score network's window), got {stride}")
        return stride

    def frame_noise(self, leads: torch.Tensor) -> torch.Tensor:
        """sigma_y,k of the prior's frames at leads k (int64): sqrt(sigma_y^2 + e_k^2), float64."""
        base = torch.full(leads.shape, float(self.observation_noise), dtype=torch.float64)
        if self.prior_error is None:
            return base
        errors = torch.tensor(self.prior_error, dtype=torch.float64)
        return (base.square() + errors[leads.clamp(max=len(errors) - 1)].square()).sqrt()

    @property
    def likelihood_gamma(self) -> float:
        return 1.0 if self.gamma is None else float(self.gamma)

    @property
    def network_evaluations_per_window(self) -> int:
        """Evaluations of each window by one sampler run: N predictor steps + (N - 1) x corrections
        (none at t = 0); the guidance adds one backward pass to each."""
        return self.steps + (self.steps - 1) * self.corrections


def parse_operator(spec: str):
    """'identity' | 'coarsen:F' | 'frames:S' -> make(frames, first) giving the operator on `frames`
    prior frames whose first is frame `first` of the forecast (frame 0, the initial state, is always
    observed in full); 'frames:S' observes the frames whose index is a multiple of S."""
    name, _, argument = str(spec).partition(":")
    if name == "identity" and not argument:
        return lambda frames, first=1: IdentityOperator()
    if name in ("coarsen", "frames") and argument.isdigit() and int(argument) >= 1:
        value = int(argument)
        if name == "coarsen":
            return lambda frames, first=1: NormalisedCoarsen(value)
        return lambda frames, first=1: MaskOperator(
            ((torch.arange(frames) + first) % value == 0).float().reshape(1, -1, 1, 1, 1))
    raise ValueError(f"operator must be 'identity', 'coarsen:F' or 'frames:S' (F, S integers >= 1), got {spec!r}")


class NormalisedCoarsen:
    """F x (the F x F block means): the block mean scaled so that A A^T = I, like the identity's.

    The likelihood's variance sigma_y^2 + gamma (sigma/mu)^2 has one gamma for all of A(x), and the
    consistent gamma is the scale of A A^T: 1 for the full frames observed beside the prior, 1/F^2 for
    plain block means. With both in one operator, a single gamma over- or under-weights one of them;
    with gamma = 1/F^2 the full frames' pull overshot by ~6x at sigma/mu = 0.3 and the autoregressive
    mode blew up (MSE 6e2 at frame 2, 1e29 at frame 8). Scaling the means by F (their noise, sigma_y/F
    for pixel noise sigma_y, back to sigma_y) makes gamma = 1 consistent for both.
    """

    def __init__(self, factor: int):
        self.factor = factor
        self.coarsen = CoarsenOperator(factor)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * self.coarsen(x)

    def __repr__(self) -> str:
        return f"NormalisedCoarsen({self.factor})"


class InitialAndPrior:
    """A(x) for sequences x (B, T + 1, C, y, x): frame 0 in full, concatenated (flattened) with the
    prior operator applied to frames 1..T, so one Gaussian likelihood holds both observations."""

    def __init__(self, operator, known: int = 1):
        self.operator, self.known = operator, known

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :self.known].flatten(1), self.operator(x[:, self.known:]).flatten(1)], dim=1)

    def entry_noise(self, like: torch.Tensor, known_noise: float, frame_noise: torch.Tensor) -> torch.Tensor:
        """sigma_y per entry of A(like) (like: (B, frames, ...)): `known_noise` on the known frames,
        frame_noise[j] on every entry of the j-th prior frame."""
        with torch.no_grad():
            per_frame = self.operator(like[:1, self.known:])[0, 0].numel()
        known = torch.full((like[0, :self.known].numel(),), float(known_noise), dtype=frame_noise.dtype)
        return torch.cat([known, frame_noise.repeat_interleave(per_frame)]).to(device=like.device, dtype=like.dtype)


def _observation_noise(settings: CohesionSettings, operator: InitialAndPrior, like: torch.Tensor, first_lead: int):
    """The likelihood's sigma_y: the settings' number, or per entry with the prior's calibrated error
    at leads first_lead, first_lead + 1, ... for the prior frames of `like`."""
    if settings.prior_error is None:
        return settings.observation_noise
    leads = torch.arange(first_lead, first_lead + like.shape[1] - operator.known)
    return operator.entry_noise(like, settings.observation_noise, settings.frame_noise(leads))


def calibration_operator(spec: str):
    """The operator the prior's error is measured through: the prior operator's spatial part
    (identity for 'frames:S', whose observed frames are seen in full)."""
    parse_operator(spec)
    name, _, argument = str(spec).partition(":")
    return NormalisedCoarsen(int(argument)) if name == "coarsen" else IdentityOperator()


def calibrate_prior_error(koopman, normalizer, data, operator: str = "coarsen:4", *, split: str = "valid",
                          device=None, batch: int = 64) -> tuple[float, ...]:
    """e_k = RMS of A(prior_k) - A(truth_k) over every trajectory of the split and every entry, for leads
    k = 0 .. L - 1 (L: the split's trajectory length), the prior forecast from each trajectory's first
    frame; normalised units (the units of A(x) in the likelihood). Held-out data only: the default
    split is "valid", so the test trajectories a forecast is judged on are not used."""
    from emu.data.loaders import Snapshots

    A = calibration_operator(operator)
    frames = Snapshots(data, split, snapshots="all", normalizer=normalizer)
    squared, count = None, 0
    for file_index, (trajectories, length, *_) in enumerate(frames.shapes):
        for first in range(0, trajectories, batch):
            truth = torch.stack([frames._read(file_index, t, slice(0, length))
                                 for t in range(first, min(trajectories, first + batch))]).to(device)
            with torch.no_grad():
                prior = koopman.forecast(truth[:, 0], length - 1)
                error = (A(prior) - A(truth)).double().square().flatten(2).sum(dim=(0, 2))
            squared = error if squared is None else squared[:len(error)] + error[:len(squared)]
            count += truth.shape[0] * A(truth[:1, :1])[0, 0].numel()
    if squared is None:
        raise ValueError(f"{data}: split {split!r} holds no trajectories to calibrate the prior's error on")
    return tuple(float(v) for v in (squared / count).sqrt().cpu())


def _window_eps(network) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda windows, t: network(windows, t)


def plan(network, schedule, prior: torch.Tensor, initial: torch.Tensor, settings: CohesionSettings, *,
         members: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """R = T: the whole sequence (B, T + 1, C, y, x) in one sampler run, guided toward the initial
    state (frame 0) and A(prior) (frames 1..T). Returns (members, B, T + 1, C, y, x)."""
    frames = prior.shape[1]
    window = network.window
    if frames < window:
        raise ValueError(f"the horizon + 1 = {frames} frames must be at least the score network's window {window}")
    stride = settings.stride_for(window)
    operator = InitialAndPrior(parse_operator(settings.operator)(frames - 1))
    observed = operator(torch.cat([initial[:, None], prior[:, 1:]], dim=1))
    eps = guided_eps_fn(lambda x, t: compose_window_scores(_window_eps(network), x, t, window,
                                                           stride=stride,
                                                           max_windows=settings.max_windows),
                        schedule, observed, operator, strength=settings.strength,
                        observation_noise=_observation_noise(settings, operator, prior, 1),
                        gamma=settings.likelihood_gamma, through_network=settings.through_network)
    sampler = PredictorCorrectorSampler(schedule, steps=settings.steps, corrections=settings.corrections,
                                        tau=settings.tau)
    samples = sampler.sample(eps, tuple(prior.shape), generator, members=members, dtype=prior.dtype,
                             device=prior.device)
    samples[:, :, 0] = initial  # the known state itself, not its (near-exact) reconstruction
    return samples


def autoregressive(network, schedule, prior: torch.Tensor, initial: torch.Tensor, settings: CohesionSettings, *,
                   members: int = 1, generator: torch.Generator | None = None,
                   on_frame: Callable[[int], None] | None = None) -> torch.Tensor:
    """R = settings.frames_per_run (1 by default): frames k .. k + R - 1 from one sampler run over a
    window of W frames ending at k + R - 1 (the first W frames while that is before W - 1; the last W
    at the end), whose frames before k are the ones already generated (observed exactly) and whose
    frames from k on are observed through A(prior); ceil(T / R) runs. Returns (members, B, T + 1, C, y, x)."""
    batch, frames = prior.shape[0], prior.shape[1]
    window = network.window
    if frames < window:
        raise ValueError(f"the horizon + 1 = {frames} frames must be at least the score network's window {window}")
    run = settings.frames_per_run
    if run > window - 1:
        raise ValueError(f"frames_per_run must be in [1, {window - 1}] (the window less one known frame), got {run}")
    make_operator = parse_operator(settings.operator)
    sampler = PredictorCorrectorSampler(schedule, steps=settings.steps, corrections=settings.corrections,
                                        tau=settings.tau)
    # Members are rows of one batch (member-major), as the sampler runs them.
    states = initial[None].repeat(members, 1, 1, 1, 1).reshape(members * batch, *initial.shape[1:])
    sequence = [states]
    repeated_prior = prior.repeat(members, 1, 1, 1, 1)
    for k in range(1, frames, run):
        new = min(run, frames - k)
        start = max(0, min(k + new - window, frames - window))
        known = k - start
        past = torch.stack(sequence[start:k], dim=1)
        operator = InitialAndPrior(make_operator(window - known, k), known=known)
        observed = torch.cat([past.flatten(1), operator.operator(repeated_prior[:, k:start + window]).flatten(1)], 1)
        noise = _observation_noise(settings, operator, repeated_prior[:, start:start + window], k)
        eps = guided_eps_fn(_window_eps(network), schedule, observed, operator, strength=settings.strength,
                            observation_noise=noise, gamma=settings.likelihood_gamma,
                            through_network=settings.through_network)
        window_samples = sampler.sample(eps, (members * batch, window, *prior.shape[2:]), generator,
                                        dtype=prior.dtype, device=prior.device)
        for offset in range(new):
            sequence.append(window_samples[:, known + offset])
            if on_frame is not None:
                on_frame(k + offset)
    return torch.stack(sequence, dim=1).reshape(members, batch, frames, *prior.shape[2:])


def unconditional_check(network, schedule, normalizer, data, *, split: str = "valid", windows: int = 16,
                        steps: int = 32, corrections: int = 1, tau: float = 0.1, seed: int = 0,
                        sequence_lengths: tuple[int, ...] = (5, 9, 17, 41), sequences: int = 8) -> dict:
    """How the score network's own distribution compares with held-out data, before any guidance.

    `windows` unconditional W-frame windows from the predictor-corrector sampler against the first W
    frames of every trajectory of the split, normalised units: the RMS of each, the RMS of the
    frame-to-frame difference of each (temporal coherence), and the ratio of their isotropic power
    spectra per integer shell (emu.metrics.power_spectrum; 1 is right). Then `sequences`
    unconditional sequences of each of `sequence_lengths` frames (>= W) sampled with the composed window
    score (stride 1), their RMS as "composed_sequences": a single window at W frames, and how much energy
    the composition loses the longer the sequence is (tests/test_vp_sampler.py has the Gaussian twin)."""
    from emu.data.loaders import Snapshots
    from emu.metrics import power_spectrum

    frames = Snapshots(data, split, snapshots="all", normalizer=normalizer)
    count, length = frames.shapes[0][:2]
    window = network.window
    if length < window:
        raise ValueError(f"{data}: the {split} trajectories hold {length} snapshots, fewer than the window {window}")
    truth = torch.stack([frames._read(0, t, slice(0, window)) for t in range(count)])
    sampler = PredictorCorrectorSampler(schedule, steps=steps, corrections=corrections, tau=tau)

    def rms(x):
        return float(x.double().square().mean().sqrt())

    with torch.no_grad():
        samples = sampler.sample(lambda x, t: network(x, t), (windows, *truth.shape[1:]),
                                 torch.Generator().manual_seed(seed))
        composed = [{"frames": n, "rms": rms(sampler.sample(
            lambda x, t: compose_window_scores(network, x, t, window), (sequences, n, *truth.shape[2:]),
            torch.Generator().manual_seed(seed)))} for n in sequence_lengths if n >= window]
    ratio = power_spectrum(samples.flatten(0, 1).numpy()).mean(0) / power_spectrum(truth.flatten(0, 1).numpy()).mean(0)
    return {"windows": windows, "steps": steps, "corrections": corrections, "tau": tau, "split": split,
            "sample_rms": rms(samples), "data_rms": rms(truth),
            "sample_frame_difference_rms": rms(samples[:, 1:] - samples[:, :-1]),
            "data_frame_difference_rms": rms(truth[:, 1:] - truth[:, :-1]),
            "power_ratio_per_shell": [float(v) for v in ratio], "composed_sequences": composed}


def window_evaluations(mode: str, horizon: int, window: int, settings: CohesionSettings) -> int:
    """Score-network evaluations of one W-frame window, per forecast trajectory and member: plan mode
    scores its strided windows once per sampler evaluation, autoregressive mode one window per run of
    R = frames_per_run frames."""
    if mode == "prior":
        return 0
    if mode == "plan":
        from emu.diffusion import strided_starts

        windows = strided_starts(horizon + 1, window, settings.stride_for(window)).numel()
    else:
        windows = -(-horizon // settings.frames_per_run)  # ceil(T / R) sampler runs of one window each
    return windows * settings.network_evaluations_per_window


def forecast(koopman, network, schedule, initial: torch.Tensor, horizon: int, *, mode: str = "plan",
             members: int = 1, settings: CohesionSettings | None = None, generator: torch.Generator | None = None,
             on_frame: Callable[[int], None] | None = None) -> tuple[torch.Tensor, dict]:
    """(members, B, horizon + 1, C, y, x) forecasts from normalised initial states (B, C, y, x), and
    the timings {"prior_seconds", "diffusion_seconds"}. mode: "plan", "autoregressive" or "prior"."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not (isinstance(horizon, int) and horizon >= 1):
        raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
    if not (isinstance(members, int) and members >= 1):
        raise ValueError(f"members must be an integer >= 1, got {members!r}")
    settings = settings or CohesionSettings()
    start = time.perf_counter()
    with torch.no_grad():
        prior = koopman.forecast(initial, horizon)
    timings = {"prior_seconds": time.perf_counter() - start, "diffusion_seconds": 0.0}
    if mode == "prior":
        prior = prior.clone()
        prior[:, 0] = initial  # the known state itself, as in the other modes
        return prior[None].repeat(members, 1, 1, 1, 1, 1), timings
    start = time.perf_counter()
    run = plan if mode == "plan" else autoregressive
    keywords = {"on_frame": on_frame} if mode == "autoregressive" else {}
    samples = run(network, schedule, prior, initial, settings, members=members, generator=generator, **keywords)
    timings["diffusion_seconds"] = time.perf_counter() - start
    return samples, timings


def forecast_to_file(koopman_checkpoint, score_checkpoint, init, out, *, horizon: int, mode: str = "plan",
                     members: int = 1, trajectories: int = 4, split: str = "test",
                     settings: CohesionSettings | None = None, calibrate_on=None, device=None, seed: int = 0,
                     progress: bool = True) -> dict:
    """`emu forecast`: forecasts from the first snapshot of `trajectories` trajectories of the dataset
    `init` (split `split`, which must hold data), written to `out` in the dataset's layout with
    n_trajectories = trajectories x members (trajectory-major: row b M + m is member m of trajectory
    b), the per-step MSE against the solver where the dataset has it (member-wise), and the timing.
    `score_checkpoint` may be None for mode "prior". `calibrate_on`: a dataset folder whose valid split
    calibrates the prior's error per lead (`calibrate_prior_error`, into settings.prior_error);
    None keeps settings.prior_error as given."""
    from emu.data.loaders import Snapshots
    from emu.data.well import EMU_GROUP, create_well_file, split_files
    from emu.errors import UserError
    from emu.training.koopman import load_koopman
    from emu.training.loop import resolve_device
    from emu.training.rollouts import require_split

    device = resolve_device(device)
    settings = settings or CohesionSettings()
    koopman, normalizer, koopman_payload = load_koopman(koopman_checkpoint)
    network = schedule = None
    if mode != "prior":
        if score_checkpoint is None:
            raise UserError(f"--mode {mode} needs --score CKPT (the window score network from `emu train score`)")
        from emu.training.score import load_score

        network, schedule, score_normalizer, _ = load_score(score_checkpoint)
        if not (torch.allclose(normalizer.mean, score_normalizer.mean) and torch.allclose(normalizer.std, score_normalizer.std)):
            raise ValueError(f"{score_checkpoint} and {koopman_checkpoint} were trained with other normalisation "
                             "statistics: train both on the same dataset")
        network.to(device)
    koopman.to(device)
    if mode == "plan":  # the stride used, in the file's settings
        settings = replace(settings, window_stride=settings.stride_for(network.window))
    if calibrate_on is not None and mode != "prior":
        if not split_files(calibrate_on, "valid"):
            raise UserError(f"--calibration-data {calibrate_on}: no valid trajectories (data/valid/ is empty) to "
                            "measure the prior's error on; pass a dataset folder that has them (the training data), "
                            "or --prior-error none")
        settings = replace(settings, prior_error=calibrate_prior_error(koopman, normalizer, calibrate_on,
                                                                       settings.operator, device=device))
    chosen = require_split(init, split)
    frames = Snapshots(init, chosen, snapshots="all", normalizer=normalizer)
    available, stored = frames.shapes[0][0], frames.shapes[0][1]
    if not (isinstance(trajectories, int) and 1 <= trajectories <= available):
        raise ValueError(f"trajectories must be in [1, {available}] (the first file of split {chosen!r}), got {trajectories!r}")
    reference = torch.stack([frames._read(0, t, slice(0, min(stored, horizon + 1))) for t in range(trajectories)])
    generator = torch.Generator(device=device).manual_seed(seed)
    bar = None
    if progress and mode == "autoregressive":
        from tqdm.auto import tqdm

        bar = tqdm(total=horizon, unit="frame", desc="forecast (autoregressive)", dynamic_ncols=True)
    try:
        samples, timings = forecast(koopman, network, schedule, reference[:, 0].to(device), horizon, mode=mode,
                                    members=members, settings=settings, generator=generator,
                                    on_frame=(lambda k: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    # (members, B, T + 1, ...) -> (B members, T + 1, ...), trajectory-major
    states = samples.transpose(0, 1).reshape(trajectories * members, horizon + 1, *samples.shape[3:]).float().cpu()
    dataset = koopman_payload["dataset"]
    config = dataset["config"]
    channels = dataset["channels"]
    extent = config.get("domain_extent", config.get("domain_length", 2 * np.pi))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.partial"
    attributes = {"config": json.dumps(config), "kind": f"cohesion forecast ({mode})", "mode": mode,
                  "members": members, "koopman": str(koopman_checkpoint), "score": str(score_checkpoint),
                  "split": chosen, "settings": json.dumps(asdict(settings)), **timings,
                  "seconds_per_frame": (timings["prior_seconds"] + timings["diffusion_seconds"]) / horizon,
                  "window_evaluations": window_evaluations(mode, horizon, network.window if network else 0, settings)
                  * trajectories * members}
    handle = create_well_file(temporary, dataset_name=f"emu_forecast_{mode}", channels=channels,
                              n_trajectories=trajectories * members, n_steps=horizon + 1, grid_size=states.shape[-1],
                              domain_extent=float(extent), snapshot_interval=dataset["snapshot_interval"],
                              parameters={}, emu_attributes=attributes,
                              trajectory_ids=np.repeat(np.arange(trajectories), members),
                              trajectory_seeds=np.zeros(trajectories * members))
    physical = normalizer.denormalise(states).numpy()
    for index, channel in enumerate(channels):
        handle["t0_fields"][channel][...] = np.swapaxes(physical[:, :, index], -1, -2)
    compared = reference.shape[1]
    truth = reference.repeat_interleave(members, dim=0)
    with np.errstate(invalid="ignore", over="ignore"):
        mse = ((states[:, :compared] - truth) ** 2).mean(dim=(2, 3, 4)).numpy()
    group = handle[EMU_GROUP]
    group.attrs["completed"] = trajectories * members
    group.create_dataset("mse", data=mse)
    diverged = np.array([int(np.argmax(~np.isfinite(row))) if not np.all(np.isfinite(row)) else -1
                         for row in states.flatten(2).sum(-1).numpy()], dtype=np.int64)
    group.create_dataset("diverged_at", data=diverged)
    handle.close()
    os.replace(temporary, out)
    return {"path": out, "mse": mse, "timings": timings, "split": chosen, "members": members, "settings": settings}


__all__ = ["MODES", "CohesionSettings", "InitialAndPrior", "autoregressive", "calibrate_prior_error",
           "calibration_operator", "forecast", "forecast_to_file", "parse_operator", "plan", "unconditional_check",
           "window_evaluations"]
