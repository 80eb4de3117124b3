"""`emu data info` and `emu data validate`: what a dataset holds, and whether it is sound."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from emu.data.well import EMU_GROUP, SPLITS, split_files, statistics_from_sums


def _files(path) -> list[tuple[str, Path]]:
    path = Path(path)
    if path.is_file():
        with h5py.File(path, "r") as handle:
            split = handle[EMU_GROUP].attrs.get("split", "?") if EMU_GROUP in handle else "?"
        return [(str(split), path)]
    files = [(split, file) for split in SPLITS for file in split_files(path, split)]
    if not files:
        raise FileNotFoundError(f"{path}: no dataset files under data/{{train,valid,test}}/*.hdf5")
    return files


def _partial_files(path) -> list[Path]:
    path = Path(path)
    return sorted(path.glob("data/*/.*.partial")) if path.is_dir() else []


def describe(path) -> str:
    """A readable summary: system and config, splits with trajectories/steps/grid, statistics."""
    files = _files(path)
    lines = []
    with h5py.File(files[0][1], "r") as handle:
        group = handle[EMU_GROUP]
        config = json.loads(group.attrs["config"])
        channels = json.loads(group.attrs["channels"])
        lines.append(f"dataset {handle.attrs['dataset_name']} (The Well format), emu {group.attrs['emu_version']}")
        lines.append(f"system {config['system']} ({config['preset']}), solver grid {config['grid_size']}^2, dt {config['dt']:.4g}; "
                     f"snapshots every {group.attrs['snapshot_interval']:.4g} ({group.attrs['steps_per_snapshot']} steps), "
                     f"seed {group.attrs['seed']}")
        lines.append(f"channels: {', '.join(channels)}")
    count, total, squares = 0.0, 0.0, 0.0
    for split, file in files:
        with h5py.File(file, "r") as handle:
            group = handle[EMU_GROUP]
            shape = handle["t0_fields"][channels[0]].shape
            done = int(group.attrs["completed"])
            virtual = handle["t0_fields"][channels[0]].is_virtual
            lines.append(f"  {split:<5} {file.name}: {done}/{shape[0]} trajectories x {shape[1]} snapshots, "
                         f"{shape[2]}x{shape[3]} (x, y), {file.stat().st_size / 1e6:.1f} MB"
                         + (" [virtual: merged shards]" if virtual else ""))
            if split == "train":
                count += float(group.attrs["train_count"])
                total = total + group.attrs["train_sum"]
                squares = squares + group.attrs["train_sum_of_squares"]
    if count > 0:
        mean, std = statistics_from_sums(count, total, squares)
        for channel, m, s in zip(channels, mean, std):
            lines.append(f"  train statistics {channel}: mean {m:.4g}, std {s:.4g}")
    for partial in _partial_files(path):
        lines.append(f"  unfinished: {partial} (rerun generate to resume)")
    return "\n".join(lines)


def validate(path) -> tuple[list[str], str]:
    """Checks every file: complete, shapes agree, all values finite, stored training statistics equal
    to the data's. Reads one trajectory at a time (memory stays flat). Returns (problems, summary)."""
    problems: list[str] = []
    checked = 0
    reference_shape = None
    for split, file in _files(path):
        with h5py.File(file, "r") as handle:
            group = handle[EMU_GROUP]
            channels = json.loads(group.attrs["channels"])
            n_trajectories = int(handle.attrs["n_trajectories"])
            if int(group.attrs["completed"]) != n_trajectories:
                problems.append(f"{file}: {group.attrs['completed']} of {n_trajectories} trajectories completed")
            sums = np.zeros(len(channels))
            sums_of_squares = np.zeros(len(channels))
            count = 0
            for index, channel in enumerate(channels):
                dataset = handle["t0_fields"][channel]
                shape = dataset.shape[1:]
                if dataset.shape[0] != n_trajectories:
                    problems.append(f"{file}: {channel} holds {dataset.shape[0]} trajectories, n_trajectories says {n_trajectories}")
                if reference_shape is None:
                    reference_shape = shape
                elif shape != reference_shape:
                    problems.append(f"{file}: {channel} has (steps, x, y) = {shape}, other files {reference_shape}")
                for trajectory in range(dataset.shape[0]):
                    values = dataset[trajectory].astype(np.float64)
                    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
                    if bad:
                        problems.append(f"{file}: {channel} trajectory {trajectory} has {bad} NaN/inf values")
                    sums[index] += values.sum()
                    sums_of_squares[index] += (values**2).sum()
                    if index == 0:
                        count += values.size
                    checked += values.size
            if split == "train" and count:
                stored = group.attrs["train_sum"], group.attrs["train_sum_of_squares"]
                if not (np.allclose(stored[0], sums, rtol=1e-6, atol=1e-6 * np.sqrt(sums_of_squares))
                        and np.allclose(stored[1], sums_of_squares, rtol=1e-6)
                        and float(group.attrs["train_count"]) == count):
                    problems.append(f"{file}: stored training statistics do not match the data")
                if "train_mean" in group.attrs:
                    mean, std = statistics_from_sums(count, sums, sums_of_squares)
                    if not (np.allclose(group.attrs["train_mean"], mean, atol=1e-6 * std.max())
                            and np.allclose(group.attrs["train_std"], std, rtol=1e-6)):
                        problems.append(f"{file}: stored train_mean/train_std do not match the data")
    for partial in _partial_files(path):
        problems.append(f"unfinished file {partial}: rerun generate to complete it")
    summary = f"checked {checked} values in {len(_files(path))} file(s): " + ("OK" if not problems else f"{len(problems)} problem(s)")
    return problems, summary
