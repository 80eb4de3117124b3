"""`emu tune thermalizer`: grid search of (s_init, s_stop) by KE-spectrum match (Thermalizer app. C.3).

For every pair with s_stop < s_init the emulator is rolled out with the Thermalizer's correction from
the same initial states (same seeds), the kinetic-energy spectrum of the second half of the rollout
is averaged per trajectory, and the pair is scored by the spectral distance to the solver's mean
spectrum over the dataset split, D = sum_k |S_solver(k) - S(k)| / S_solver(k) (emu.metrics.
spectral_similarity; lower is better), averaged over trajectories. Trajectories that blow up
(NaN) are counted and make a pair lose: a pair's score is inf if any trajectory is NaN. The best
pair goes to `thermalizer_levels.json` beside the thermalizer checkpoint (atomically), where
`rollout --thermalizer` finds it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from emu.data.atomic import write_json_atomically
from emu.data.loaders import Snapshots
from emu.diffusion import check_levels_pair
from emu.metrics import kinetic_energy_spectrum, spectral_similarity
from emu.training.emulator import rollout
from emu.training.loop import resolve_device
from emu.training.rollouts import require_split
from emu.training.thermalizer import ThermalizerCorrection, load_thermalizer, tuned_levels_path
from emu.training.trainer import emulator_from_checkpoint, load_checkpoint


def tune_thermalizer(emulator_checkpoint, thermalizer_checkpoint, init, *, s_inits=range(6, 11),
                     s_stops=range(2, 6), trajectories: int = 2, steps: int = 200, split: str = "test",
                     runaway_level: int = 100, seed: int = 0, device: str | None = None, write: bool = True,
                     progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Scores every (s_init, s_stop) pair; returns {"rows": [...], "best": {...}} and writes the best pair."""
    device = resolve_device(device)
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
        correction = ThermalizerCorrection(network, scheduler, s_init=s_init, s_stop=s_stop,
                                           runaway_level=runaway_level, generator=generator)

        def correct(state, correction=correction):
            if bar is not None:
                bar.update(1)
            return correction.correct(state)

        states = rollout(emulator, initial, steps, generator=generator, correct=correct)
        late = normalizer.denormalise(states[:, steps // 2:].float().cpu())
        spectra = kinetic_energy_spectrum(late.numpy(), config)[1].mean(axis=1)  # (trajectories, shells)
        similarity = spectral_similarity(spectra, reference)
        score = math.inf if similarity.num_nan else float(similarity.mean)
        rows.append({"s_init": s_init, "s_stop": s_stop, "score": score, "nan_trajectories": similarity.num_nan,
                     "denoising_steps_per_step": float(torch.stack(correction.steps).float().mean())})
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
        path = tuned_levels_path(thermalizer_checkpoint)
        write_json_atomically(path, result)
        echo(f"best (s_init, s_stop) = ({best['s_init']}, {best['s_stop']}) -> {path}")
    return result
