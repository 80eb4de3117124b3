"""Training-data generation: many short trajectories from spun-up random states, in The Well's format.

    plan = GenerationPlan(config, trajectories=1000, length=20, interval=5, spinup_steps=2000, ...)
    generate(plan, "data/", shard=0, num_shards=1)

Every trajectory has a global id; its initial condition is seeded from (seed, id) only, so any
subset of trajectories can be made anywhere (shards on other machines) and comes out the same. The
ids are split by range: train = [0, n_train), valid = [n_train, n_train + n_valid), test = the rest;
shard i of n makes the ids [floor(i N/n), floor((i+1) N/n)). Batches never straddle a file, so a
file's `completed` counter advances one consistent batch at a time; a killed run resumes at the
first incomplete batch (the partial one is redone). Files are written as hidden `.NAME.partial`
and renamed to `NAME.hdf5` when complete, so a reader never sees an inconsistent file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from emu.backends import get_backend
from emu.data.atomic import write_json_atomically
from emu.memory import check_memory, estimate_memory
from emu.data.well import SPLITS, create_well_file, finish_file, split_files, write_trajectories, write_well_statistics
from emu.errors import UserError
from emu.runs import snapshot_fields
from emu.solvers import StepperState, check_state, integrate, make_stepper
from emu.systems import SystemConfig, config_from_dict, make_equation
from emu.systems.base import ConfigError, require

MANIFEST = "emu_dataset.json"
PARTIAL_MERGE = "partial_merge"  # manifest key `data merge --allow-partial` adds: the shards it left out


@dataclass(frozen=True)
class GenerationPlan:
    """What defines a dataset; two runs into one folder must agree on all of it.

    Attributes:
        config: the solver config (grid, physics, dt).
        trajectories: total number of trajectories N over all shards and splits.
        length: snapshots per trajectory (the first is the spun-up state).
        interval: solver steps between snapshots.
        spinup_steps: solver steps from the random initial condition to the first snapshot.
        downsample: grid size of the saved fields (spectral truncation).
        split: fractions of (train, valid, test), summing to 1.
        seed: dataset seed; trajectory i starts from the seed derived from (seed, i).
        batch: trajectories stepped together (part of the plan: it fixes the batches a resume redoes).
        dtype: solver precision.
    """

    config: SystemConfig
    trajectories: int
    length: int
    interval: int
    spinup_steps: int
    downsample: int
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    seed: int = 0
    batch: int = 8
    dtype: str = "float64"

    def __post_init__(self):
        require(isinstance(self.trajectories, int) and self.trajectories >= 1, "trajectories", "an integer >= 1", self.trajectories)
        require(isinstance(self.length, int) and self.length >= 1, "length", "an integer >= 1", self.length)
        require(isinstance(self.interval, int) and self.interval >= 1, "interval", "an integer >= 1", self.interval)
        require(isinstance(self.spinup_steps, int) and self.spinup_steps >= 0, "spinup", ">= 0 (solver steps)", self.spinup_steps)
        require(isinstance(self.downsample, int) and 4 <= self.downsample <= self.config.grid_size and self.downsample % 2 == 0,
                "downsample", f"an even grid size between 4 and the solver grid {self.config.grid_size}", self.downsample)
        split = tuple(float(f) for f in self.split)
        require(len(split) == 3 and all(f >= 0 for f in split) and abs(sum(split) - 1) < 1e-6, "split",
                "three fractions >= 0 (train,valid,test) summing to 1", self.split)
        object.__setattr__(self, "split", split)
        require(isinstance(self.batch, int) and self.batch >= 1, "batch", "an integer >= 1", self.batch)
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)

    @property
    def split_counts(self) -> dict[str, int]:
        """Trajectories of each split: the fractions rounded, but every split with a fraction > 0
        gets at least one trajectory while there are enough (taken from the largest split), so a
        small dataset (the README's 6 trajectories at 0.9/0.05/0.05) still has a validation and a
        test trajectory instead of silently none."""
        n_train = round(self.trajectories * self.split[0])
        n_valid = min(round(self.trajectories * self.split[1]), self.trajectories - n_train)
        counts = [n_train, n_valid, self.trajectories - n_train - n_valid]  # as before: datasets keep their ids
        wanted = [index for index, fraction in enumerate(self.split) if fraction > 0]
        for index in wanted:
            if counts[index] == 0 and self.trajectories >= len(wanted):
                donor = max(wanted, key=lambda k: counts[k])
                counts[donor] -= 1
                counts[index] += 1
        return dict(zip(SPLITS, counts))

    @property
    def split_ranges(self) -> dict[str, tuple[int, int]]:
        """Global id range [start, stop) of each split: train, then valid, then test."""
        counts = self.split_counts
        edges = (0, counts["train"], counts["train"] + counts["valid"], self.trajectories)
        return {name: (edges[i], edges[i + 1]) for i, name in enumerate(SPLITS)}

    @property
    def snapshot_interval(self) -> float:
        return self.interval * self.config.dt

    def manifest(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["config"] = self.config.to_dict()
        values["split"] = list(self.split)
        return values

    @classmethod
    def from_manifest(cls, values: dict[str, Any]) -> "GenerationPlan":
        values = dict(values)
        values.pop("num_shards", None)  # the folder's manifest also records how it was sharded
        values.pop(PARTIAL_MERGE, None)  # and, after `data merge --allow-partial`, what it left out
        values["config"] = config_from_dict(values["config"])
        values["split"] = tuple(values["split"])
        return cls(**values)


def trajectory_seed(seed: int, trajectory_id: int) -> int:
    """The initial-condition seed of one trajectory, from (dataset seed, global id) alone."""
    return int(np.random.SeedSequence([seed, trajectory_id]).generate_state(1, dtype=np.uint32)[0])


def shard_range(trajectories: int, shard: int, num_shards: int) -> tuple[int, int]:
    return trajectories * shard // num_shards, trajectories * (shard + 1) // num_shards


def file_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}_shard{shard:05d}-of-{num_shards:05d}.hdf5"


@dataclass(frozen=True)
class Manifest:
    """A dataset folder's emu_dataset.json: the plan, how many shards make it, and the raw values."""

    path: Path
    plan: GenerationPlan
    num_shards: int
    values: dict[str, Any]


def read_manifest(directory) -> Manifest:
    """Reads DIR/emu_dataset.json, which says what a complete folder holds (merge and validate check
    the files against it: a missing shard is otherwise invisible)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; every dataset folder made by `emu generate` has one "
                                "(it records the plan and the number of shards)")
    try:
        values = json.loads(path.read_text())
        num_shards = values.get("num_shards", 1)
        require(isinstance(num_shards, int) and num_shards >= 1, "num_shards", "an integer >= 1", num_shards)
        plan = GenerationPlan.from_manifest(values)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path}: not a readable dataset manifest ({type(error).__name__}: {error})") from error
    return Manifest(path, plan, num_shards, values)


@dataclass(frozen=True)
class PlannedFile:
    """One file of a plan: shard `shard`'s part [first, stop) of the global trajectory ids of `split`."""

    split: str
    shard: int
    num_shards: int
    name: str
    first: int
    stop: int

    def describe(self) -> str:
        return (f"shard {self.shard} of {self.num_shards}, trajectories {self.first}-{self.stop - 1} of split "
                f"{self.split}; make it with generate --shard {self.shard} --num-shards {self.num_shards}")


def planned_files(plan: GenerationPlan, num_shards: int) -> list[PlannedFile]:
    """Every file `generate` writes for `plan` cut into `num_shards` shards, in shard order."""
    return [PlannedFile(split, shard, num_shards, file_name(split, shard, num_shards), int(ids[0]), int(ids[-1]) + 1)
            for shard in range(num_shards) for split, ids in _jobs(plan, shard, num_shards)]


def check_manifest(directory: Path, plan: GenerationPlan, num_shards: int = 1) -> None:
    """Writes the plan's manifest, or refuses if the folder already holds a different dataset (or
    the same one cut into another number of shards, whose trajectory ranges would overlap)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST
    wanted = json.loads(json.dumps(dict(plan.manifest(), num_shards=num_shards)))
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != wanted:
            def flat(values: dict) -> dict:  # config fields as config.NAME, so the message names them
                return {f"{key}.{inner}" if isinstance(value, dict) else key: inner_value
                        for key, value in values.items()
                        for inner, inner_value in (value.items() if isinstance(value, dict) else [(key, value)])}

            existing_flat, wanted_flat = flat(existing), flat(wanted)
            differences = sorted(key for key in set(existing_flat) | set(wanted_flat)
                                 if existing_flat.get(key) != wanted_flat.get(key))
            if "config.system" in differences:  # another system: its other fields say nothing more
                differences = [key for key in differences if not key.startswith("config.") or key == "config.system"]
            detail = "; ".join(f"{key}: folder has {existing_flat.get(key)!r}, asked {wanted_flat.get(key)!r}"
                               for key in differences)
            raise ConfigError(f"out: {directory} already holds a dataset made with other parameters "
                              f"({detail}); choose another --out or the same parameters to resume")
        return
    write_json_atomically(path, wanted)


def _jobs(plan: GenerationPlan, shard: int, num_shards: int):
    """(split, ids) of each file this shard writes."""
    start, stop = shard_range(plan.trajectories, shard, num_shards)
    for split, (low, high) in plan.split_ranges.items():
        low, high = max(low, start), min(high, stop)
        if high > low:
            yield split, np.arange(low, high)


def _parameters(config: SystemConfig) -> dict[str, float]:
    """The numeric config fields, as The Well's simulation parameters."""
    return {key: float(value) for key, value in config.to_dict().items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def generate_batch(equation, stepper, plan: GenerationPlan, ids: np.ndarray) -> np.ndarray:
    """Spins up and records the trajectories `ids`: (batch, length, channel, m, m) float64."""
    fields = np.stack([equation.initial_condition(1, seed=trajectory_seed(plan.seed, int(i)))[0] for i in ids])
    state = StepperState(equation.to_state(fields))
    check_state(equation, state.state_hat, 0)
    if plan.spinup_steps:
        state = integrate(stepper, state, plan.spinup_steps, save_every=plan.spinup_steps)
    snapshots = []
    for index in range(plan.length):
        if index:
            state = integrate(stepper, state, plan.interval, save_every=plan.interval)
        snapshot = snapshot_fields(equation, state.state_hat, plan.downsample)
        snapshots.append(snapshot if snapshot.ndim == 4 else snapshot[:, np.newaxis])
    return np.stack(snapshots, axis=1)


def generate(plan: GenerationPlan, out, *, shard: int = 0, num_shards: int = 1, backend: str = "numpy",
             device: str | None = None, progress: Callable[[int], None] | None = None,
             name: str | None = None) -> list[Path]:
    """Makes shard `shard` of `num_shards` of the dataset `plan` under `out`; resumes if started before.

    Returns the finished files. Raises `BlowUpError` (completed trajectories stay in the partial file;
    rerun to resume) and `ConfigError` for a folder that holds a different dataset.
    """
    require(isinstance(num_shards, int) and num_shards >= 1, "num_shards", "an integer >= 1", num_shards)
    require(isinstance(shard, int) and 0 <= shard < num_shards, "shard", f"an integer in [0, {num_shards})", shard)
    directory = Path(out)
    layers = 2 if plan.config.system == "qg" else 1
    held = plan.batch * plan.length * layers * plan.downsample**2 * 8  # a batch's snapshots before writing
    check_memory(estimate_memory(grid_size=plan.config.grid_size, layers=layers, batch=plan.batch, dtype=plan.dtype,
                                 output_size=plan.downsample, extra_bytes=held),
                 what=f"generating {plan.config.grid_size}^2 {plan.config.system} trajectories in batches of "
                      f"{plan.batch}", hint="use a smaller --grid, --batch or --length")
    # Reproducible FFT plans: a resumed or sharded run must equal an uninterrupted one bit for bit.
    # The backend comes first: one that cannot run here (julia without Julia) fails before anything is written.
    equation = make_equation(plan.config, get_backend(backend, device=device, dtype=plan.dtype, reproducible=True))
    check_manifest(directory, plan, num_shards)
    stepper = make_stepper(equation, plan.config.dt)
    name = name or f"emu_{plan.config.system}_{plan.config.preset}"
    finished = []
    for split, ids in _jobs(plan, shard, num_shards):
        folder = directory / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / file_name(split, shard, num_shards)
        partial = folder / f".{final.name}.partial"
        if final.exists():
            if progress:
                progress(len(ids))
            finished.append(final)
            continue
        handle = None
        if partial.exists():
            try:
                handle = h5py.File(partial, "r+")
                done = int(handle["emu"].attrs["completed"])
            except (OSError, KeyError):  # killed while the file was being created: start it again
                if handle is not None:
                    handle.close()
                handle = None
        if handle is None:
            seeds = [trajectory_seed(plan.seed, int(i)) for i in ids]
            handle = create_well_file(
                partial, dataset_name=name, channels=list(equation.field_names), n_trajectories=len(ids),
                n_steps=plan.length, grid_size=plan.downsample, domain_extent=equation.grid.domain_extent,
                snapshot_interval=plan.snapshot_interval, parameters=_parameters(plan.config),
                emu_attributes={"config": plan.config.to_json(), "plan": json.dumps(plan.manifest()),
                                "steps_per_snapshot": plan.interval, "seed": plan.seed, "split": split,
                                "shard": shard, "num_shards": num_shards, "backend": backend},
                trajectory_ids=ids, trajectory_seeds=np.array(seeds))
            done = 0
        if progress and done:
            progress(done)
        try:
            for first in range(done, len(ids), plan.batch):
                batch_ids = ids[first:first + plan.batch]
                write_trajectories(handle, first, generate_batch(equation, stepper, plan, batch_ids), split == "train")
                if progress:
                    progress(len(batch_ids))
        except BaseException:
            handle.close()
            raise
        finish_file(handle)
        os.replace(partial, final)
        finished.append(final)
    if split_files(directory, "train"):
        # From every finished training file present: the last shard to finish writes the full set.
        write_well_statistics(directory)
    return finished


def parse_model_time(text: str, system: str) -> float:
    """'10' -> 10 model time units (kolmogorov); qg needs a unit: '200d' (days), '3y' (360-day years)
    or '86400s' -> seconds. A bare number is refused for qg: its time unit is the second, so `--spinup
    10` would be ten seconds (less than one 3600 s step), which nobody means."""
    text = str(text).strip()
    factors = {"s": 1.0, "d": 86400.0, "y": 360 * 86400.0} if system == "qg" else {}
    allowed = ("a number with a unit: N d (days), N y (360-day years) or N s (seconds), e.g. 200d or 3y"
               if factors else "a number of model time units, e.g. 10")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in factors else (text, "")
    if factors and not unit:
        raise ConfigError(f"spinup must be {allowed} (qg's time unit is the second), got {text!r}")
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"spinup must be {allowed}, got {text!r}") from None
    return value * factors.get(unit, 1.0)


def spinup_steps(config: SystemConfig, spinup_time: float) -> int:
    require(math.isfinite(spinup_time) and spinup_time >= 0, "spinup", ">= 0", spinup_time)
    return int(math.ceil(spinup_time / config.dt - 1e-9))


__all__ = ["GenerationPlan", "generate", "trajectory_seed", "shard_range", "parse_model_time", "spinup_steps",
           "MANIFEST", "Manifest", "PlannedFile", "planned_files", "read_manifest"]
