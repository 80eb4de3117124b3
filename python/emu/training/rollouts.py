"""`emu rollout`: batched autoregressive emulator rollouts written in the dataset's HDF5 layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from emu.data.loaders import Snapshots
from emu.data.well import EMU_GROUP, SPLITS, create_well_file, split_files
from emu.errors import UserError
from emu.training.loop import resolve_device
from emu.training.trainer import emulator_from_checkpoint, load_checkpoint


def require_split(directory, split: str) -> str:
    """`split` when the dataset folder has files of it; otherwise an error naming the splits that do.

    No fallback to another split: rolling out (or tuning) from the training data instead of held-out
    data that the user asked for would change what the numbers mean without saying so.
    """
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split_files(directory, split):
        return split
    with_data = [name for name in SPLITS if split_files(directory, name)]
    if not with_data:
        raise FileNotFoundError(f"{directory}: no dataset files under data/{{{','.join(SPLITS)}}}/*.hdf5 "
                                "(make a dataset with `emu generate`)")
    raise UserError(f"--split {split}: {directory} has no {split} trajectories (nothing in data/{split}/); "
                    f"splits with data: {', '.join(with_data)}; pass one of them with --split")


def rollout_to_file(checkpoint, init, out, *, trajectories: int = 4, steps: int = 100, split: str = "test",
                    divergence_threshold: float = 1e3, device: str | None = None, seed: int = 0,
                    progress: bool = True, stabilizer: str | None = None, thermalizer=None,
                    stabilizer_options: dict | None = None, s_init: int | None = None, s_stop: int | None = None,
                    runaway_level: int | None = None) -> dict:
    """Rolls the emulator of `checkpoint` out from the first snapshot of `trajectories` trajectories
    of the dataset `init` (split `split`, which must hold data: there is no fallback) for `steps` steps
    and streams the denormalised states into `out` (The Well layout, `emu` group with the per-step
    MSE against the solver where the dataset has the reference, in normalised units, and the step at
    which each trajectory diverged: RMS of the normalised state above `divergence_threshold` or
    non-finite; -1 if never). Divergence is flagged, never fatal: the rollout goes on.

    With `stabilizer` ("METHOD:CHECKPOINT", `emu.stabilizers.load_stabilizer`; `thermalizer=CKPT` is
    short for "thermalizer:CKPT") every emulator step is followed by the stabiliser's correction, and
    the file also holds its per-step record: for the Thermalizer (paper Algorithm 1, levels `s_init`,
    `s_stop`, default: the pair in thermalizer_levels.json beside the checkpoint, else 7 and 4)
    `emu/predicted_level` (the classifier's level before correction), `emu/denoising_steps` (steps
    applied, 0 when none) and `emu/runaway` (predicted level above `runaway_level`, default 100:
    flagged and corrected from `runaway_level`, never an abort); for SNS the same plus
    `emu/previous_level` and `emu/skipped` (`denoising_steps` counts network evaluations).
    `stabilizer_options` go to the method (`emu.stabilizers.OPTIONS`: thermalizer fixed_level,
    fresh_noise; sns path, activation_threshold, mode, runaway_level).
    """
    device = resolve_device(device)
    chosen = require_split(init, split)
    payload = load_checkpoint(checkpoint)
    emulator, normalizer = emulator_from_checkpoint(payload)
    emulator.to(device)
    if thermalizer is not None:
        if stabilizer is not None:
            raise UserError("--thermalizer CKPT is short for --stabilizer thermalizer:CKPT: give one of them")
        stabilizer = f"thermalizer:{thermalizer}"
    corrector = None
    if stabilizer is not None:
        from emu.stabilizers import load_stabilizer

        # Levels given here join the method's options (None: the method's default); a method that
        # takes no such option refuses it by name (emu.stabilizers.load_stabilizer).
        options = {**(stabilizer_options or {}),
                   **{name: value for name, value in (("s_init", s_init), ("s_stop", s_stop),
                                                      ("runaway_level", runaway_level)) if value is not None}}
        corrector = load_stabilizer(stabilizer, normalizer, device, seed=seed + 1, **options)
    frames = Snapshots(init, chosen, snapshots="all", normalizer=normalizer)
    available, stored_steps = frames.shapes[0][0], frames.shapes[0][1]
    if not (isinstance(trajectories, int) and 1 <= trajectories <= available):
        raise ValueError(f"trajectories must be in [1, {available}] (the first file of split {chosen!r}), got {trajectories!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    # One read per trajectory: a chunk holds a whole trajectory, so reading it frame by frame would
    # decompress it once per frame (8 x 3001 frames took > 10 minutes; this takes a second).
    reference = torch.stack([frames._read(0, t, slice(0, stored_steps))
                             for t in range(trajectories)])  # (batch, stored_steps, C, y, x), normalised
    dataset = payload["dataset"]
    channels = dataset["channels"]
    grid = reference.shape[-1]
    config = dataset["config"]
    extent = config.get("domain_extent", config.get("domain_length", 2 * np.pi))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.partial"
    mse = np.full((trajectories, steps + 1), np.nan)
    diverged = np.full(trajectories, -1, dtype=np.int64)
    handle = create_well_file(
        temporary, dataset_name=f"emu_rollout_{payload['model_config']['arch']}", channels=channels,
        n_trajectories=trajectories, n_steps=steps + 1, grid_size=grid, domain_extent=float(extent),
        snapshot_interval=dataset["snapshot_interval"], parameters={},
        emu_attributes={"config": json.dumps(config), "checkpoint": str(checkpoint), "split": chosen,
                        "kind": f"{corrector.name} emulator rollout" if corrector else "emulator rollout",
                        "model_config": json.dumps(payload["model_config"]), "divergence_threshold": divergence_threshold,
                        **(corrector.attributes if corrector else {})},
        trajectory_ids=np.arange(trajectories), trajectory_seeds=np.zeros(trajectories), steps_per_chunk=1)
    generator = torch.Generator(device=device).manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, unit="step", desc="rollout", dynamic_ncols=True)

    def write(step: int, state: torch.Tensor) -> None:
        normalised = state.detach().float().cpu()
        physical = normalizer.denormalise(normalised).numpy()
        for index, channel in enumerate(channels):
            handle["t0_fields"][channel][:, step] = np.swapaxes(physical[:, index], -1, -2)
        if step < stored_steps:
            mse[:, step] = ((normalised - reference[:, step]) ** 2).mean(dim=(1, 2, 3)).numpy()
        rms = normalised.pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()
        newly = (diverged < 0) & (~np.isfinite(rms) | (rms > divergence_threshold))
        diverged[newly] = step
        if bar is not None and step:
            bar.update(1)

    from emu.stabilizers import StepRecords
    from emu.training.emulator import rollout

    records = StepRecords(corrector.record_fields) if corrector else None
    try:
        rollout(emulator, reference[:, 0].to(device), steps, generator=generator, on_step=write,
                stabilizer=corrector, on_record=records.add if records else None)
    finally:
        if bar is not None:
            bar.close()
    group = handle[EMU_GROUP]
    group.attrs["completed"] = trajectories
    group.create_dataset("mse", data=mse)
    group.create_dataset("diverged_at", data=diverged)
    result = {"path": out, "mse": mse[:, :min(steps + 1, stored_steps)], "diverged_at": diverged, "split": chosen}
    if corrector is not None:
        record = records.arrays(trajectories, steps)
        for name, values in record.items():
            group.create_dataset(name, data=values)
        result.update(record)
    handle.close()
    os.replace(temporary, out)
    return result
