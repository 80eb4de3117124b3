"""Datasets in The Well's HDF5 format (PolymathicAI/the_well, docs/data_format.md).

A dataset folder:

    DIR/emu_dataset.json                     the generation parameters (resume / refuse-mismatch)
    DIR/data/{train,valid,test}/NAME_shardIIIII-of-NNNNN.hdf5

One file per split and shard, each in The Well's layout so `the_well.data.WellDataset` reads it:
root attributes (dataset_name, grid_type, n_spatial_dims, n_trajectories, simulation_parameters and
one attribute per parameter), `dimensions` (time, x, y), `boundary_conditions` (periodic in x and y),
`scalars` (the simulation parameters), `t0_fields/<channel>` float32 (n_trajectories, n_steps, x, y)
chunked one trajectory per chunk and gzip-compressed, empty `t1_fields` and `t2_fields`.

Axis order: The Well stores (x, y); emu's arrays are (..., y, x), so writers transpose the last two
axes and readers transpose back (`read_trajectories`).

emu's own attributes live in the group `emu`: config (JSON of the frozen solver config),
snapshot_interval (model time between snapshots), steps_per_snapshot, seed, split, shard,
num_shards, emu_version, channels, completed (trajectories written so far; a file is complete when
completed == n_trajectories), the datasets trajectory_ids and trajectory_seeds, and the running
per-channel statistics of the training split of this file (count, sum, sum_of_squares; mean and
std) from which dataset-wide statistics are combined.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import emu
from emu.data.atomic import write_json_atomically

SPLITS = ("train", "valid", "test")
EMU_GROUP = "emu"


def _string_list(values) -> np.ndarray:
    return np.array([str(v).encode() for v in values], dtype=h5py.string_dtype())


def create_well_file(path, *, dataset_name: str, channels: list[str], n_trajectories: int, n_steps: int,
                     grid_size: int, domain_extent: float, snapshot_interval: float,
                     parameters: dict[str, float], emu_attributes: dict[str, Any],
                     trajectory_ids: np.ndarray, trajectory_seeds: np.ndarray,
                     steps_per_chunk: int | None = None) -> h5py.File:
    """Creates (and returns open, mode w) an empty Well-format file for `n_trajectories` trajectories.

    Chunks hold one whole trajectory by default; files written one time step at a time (rollouts)
    use `steps_per_chunk=1` so each step touches only its own chunks."""
    handle = h5py.File(path, "w")
    root = handle.attrs
    root["dataset_name"] = dataset_name
    root["grid_type"] = "cartesian"
    root["n_spatial_dims"] = 2
    root["n_trajectories"] = n_trajectories
    root["simulation_parameters"] = _string_list(parameters)
    for name, value in parameters.items():
        root[name] = value

    dimensions = handle.create_group("dimensions")
    dimensions.attrs["spatial_dims"] = _string_list(["x", "y"])
    coordinates = np.arange(grid_size) * (domain_extent / grid_size)
    time = dimensions.create_dataset("time", data=(np.arange(n_steps) * snapshot_interval).astype(np.float32))
    time.attrs["sample_varying"] = False
    time.attrs["time_varying"] = True
    for axis in ("x", "y"):
        dataset = dimensions.create_dataset(axis, data=coordinates.astype(np.float32))
        dataset.attrs["sample_varying"] = False
        dataset.attrs["time_varying"] = False

    boundaries = handle.create_group("boundary_conditions")
    for index, axis in enumerate(("x", "y")):
        group = boundaries.create_group(f"{axis}_periodic")
        group.attrs["associated_dims"] = _string_list([axis])
        group.attrs["associated_fields"] = _string_list([])
        group.attrs["bc_type"] = "PERIODIC"
        group.attrs["sample_varying"] = False
        group.attrs["time_varying"] = False
        mask = np.zeros(grid_size, dtype=bool)
        mask[0] = mask[-1] = True  # the_well reads an all-False mask as an OPEN boundary
        group.create_dataset("mask", data=mask)

    scalars = handle.create_group("scalars")
    scalars.attrs["field_names"] = _string_list(parameters)
    for name, value in parameters.items():
        dataset = scalars.create_dataset(name, data=np.float32(value))
        dataset.attrs["sample_varying"] = False
        dataset.attrs["time_varying"] = False

    fields = handle.create_group("t0_fields")
    fields.attrs["field_names"] = _string_list(channels)
    shape = (n_trajectories, n_steps, grid_size, grid_size)
    for channel in channels:
        dataset = fields.create_dataset(channel, shape=shape, dtype=np.float32,
                                        chunks=(1, steps_per_chunk or n_steps) + shape[2:], compression="gzip",
                                        compression_opts=4)
        dataset.attrs["dim_varying"] = np.array([True, True])
        dataset.attrs["sample_varying"] = True
        dataset.attrs["time_varying"] = True
    for order in ("t1_fields", "t2_fields"):
        handle.create_group(order).attrs["field_names"] = _string_list([])

    group = handle.create_group(EMU_GROUP)
    group.attrs["emu_version"] = emu.__version__
    group.attrs["channels"] = json.dumps(list(channels))
    group.attrs["completed"] = 0
    group.attrs["snapshot_interval"] = snapshot_interval
    for key, value in emu_attributes.items():
        group.attrs[key] = value
    group.create_dataset("trajectory_ids", data=np.asarray(trajectory_ids, dtype=np.int64))
    group.create_dataset("trajectory_seeds", data=np.asarray(trajectory_seeds, dtype=np.uint64))
    zeros = np.zeros(len(channels))
    for prefix in ("train", "train_delta"):
        for name in ("count", "sum", "sum_of_squares"):
            group.attrs[f"{prefix}_{name}"] = zeros if name != "count" else 0.0
    return handle


def write_trajectories(handle: h5py.File, first: int, fields: np.ndarray, train: bool) -> None:
    """Writes trajectories `first, first+1, ...` from emu-layout `fields` (batch, time, channel, y, x)
    and advances `completed` (and the training statistics when `train`), then flushes."""
    channels = json.loads(handle[EMU_GROUP].attrs["channels"])
    batch = fields.shape[0]
    for index, channel in enumerate(channels):
        handle["t0_fields"][channel][first:first + batch] = np.swapaxes(fields[:, :, index], -1, -2).astype(np.float32)
    group = handle[EMU_GROUP]
    if train:
        stored = fields.astype(np.float32).astype(np.float64)  # statistics of what the file holds
        axes = (0, 1, 3, 4)
        # Snapshots and one-step increments (the_well's mean_delta/std_delta, for residual models).
        for prefix, values in (("train", stored), ("train_delta", np.diff(stored, axis=1))):
            group.attrs[f"{prefix}_count"] = group.attrs[f"{prefix}_count"] + values[:, :, 0].size
            group.attrs[f"{prefix}_sum"] = group.attrs[f"{prefix}_sum"] + values.sum(axis=axes)
            group.attrs[f"{prefix}_sum_of_squares"] = group.attrs[f"{prefix}_sum_of_squares"] + (values**2).sum(axis=axes)
    group.attrs["completed"] = first + batch
    handle.flush()


def statistics_from_sums(count: float, total: np.ndarray, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per channel from running sums; std uses the population variance."""
    if count <= 0:
        raise ValueError("statistics: the training split holds no samples")
    mean = np.asarray(total) / count
    variance = np.maximum(np.asarray(squares) / count - mean**2, 0.0)
    return mean, np.sqrt(variance)


def finish_file(handle: h5py.File) -> None:
    """Stores mean/std of the file's training sums (when it has any) and closes it."""
    group = handle[EMU_GROUP]
    if group.attrs["train_count"] > 0:
        mean, std = statistics_from_sums(group.attrs["train_count"], group.attrs["train_sum"],
                                         group.attrs["train_sum_of_squares"])
        group.attrs["train_mean"] = mean
        group.attrs["train_std"] = std
    handle.close()


def split_files(directory, split: str) -> list[Path]:
    """The finished files of `split` under a dataset folder, in shard order."""
    folder = Path(directory) / "data" / split
    return sorted(folder.glob("*.hdf5")) if folder.is_dir() else []


def dataset_statistics(directory) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(mean, std, channels) of the training split, combined over every train file of the dataset."""
    files = split_files(directory, "train")
    if not files:
        raise FileNotFoundError(f"{directory}: no training files under data/train/")
    count, total, squares, channels = 0.0, 0.0, 0.0, None
    for path in files:
        with h5py.File(path, "r") as handle:
            group = handle[EMU_GROUP]
            channels = json.loads(group.attrs["channels"])
            count += float(group.attrs["train_count"])
            total = total + group.attrs["train_sum"]
            squares = squares + group.attrs["train_sum_of_squares"]
    mean, std = statistics_from_sums(count, total, squares)
    return mean, std, channels


def write_well_statistics(directory) -> Path:
    """Writes DIR/stats.yaml in the_well's format (mean, std, rms and their *_delta per field, over the
    training split) so `WellDataset(..., use_normalization=True, normalization_type=ZScoreNormalization)`
    works. JSON is valid YAML, so no YAML writer is needed. Atomic (temp + rename)."""
    directory = Path(directory)
    totals: dict[str, Any] = {}
    channels = None
    for path in split_files(directory, "train"):
        with h5py.File(path, "r") as handle:
            group = handle[EMU_GROUP]
            channels = json.loads(group.attrs["channels"])
            for prefix in ("train", "train_delta"):
                for name in ("count", "sum", "sum_of_squares"):
                    key = f"{prefix}_{name}"
                    totals[key] = totals.get(key, 0.0) + group.attrs[key]
    if channels is None:
        raise FileNotFoundError(f"{directory}: no training files under data/train/")
    statistics: dict[str, dict[str, float]] = {}
    for prefix, suffix in (("train", ""), ("train_delta", "_delta")):
        count = float(totals[f"{prefix}_count"])
        if count <= 0:  # one snapshot per trajectory: no increments
            continue
        mean, std = statistics_from_sums(count, totals[f"{prefix}_sum"], totals[f"{prefix}_sum_of_squares"])
        rms = np.sqrt(np.asarray(totals[f"{prefix}_sum_of_squares"]) / count)
        for name, values in (("mean", mean), ("std", std), ("rms", rms)):
            statistics[name + suffix] = {channel: float(v) for channel, v in zip(channels, values)}
    # The temporary's name is unique: shards may finish at the same time.
    return write_json_atomically(directory / "stats.yaml", statistics)


def read_trajectories(path, trajectories=slice(None), steps=slice(None)) -> np.ndarray:
    """Reads fields back in emu layout (trajectory, time, channel, y, x) as float32."""
    with h5py.File(path, "r") as handle:
        channels = json.loads(handle[EMU_GROUP].attrs["channels"])
        arrays = [handle["t0_fields"][c][trajectories, steps] for c in channels]
    return np.swapaxes(np.stack(arrays, axis=2), -1, -2)


def merge_shards(directory, out) -> list[Path]:
    """Joins the shard files of each split into one file per split under `out`, with HDF5 virtual
    datasets that point into the shard files (no copy of field data; relative paths, so the two
    folders can move together). Trajectory ids, seeds and the combined training statistics are
    stored in the merged files' `emu` group. Returns the merged files.

    h5py, emu's loaders and any HDF5 reader that opens files by name follow the virtual datasets.
    the_well's `WellDataset` opens files through fsspec file objects, through which HDF5 cannot
    reach the source files: point it at the shard folder instead (it reads several files per split
    natively); the fill value NaN makes a reader that cannot follow the links fail visibly."""
    directory, out = Path(directory), Path(out)
    merged = []
    for split in SPLITS:
        sources = split_files(directory, split)
        if not sources:
            continue
        target_folder = out / "data" / split
        target_folder.mkdir(parents=True, exist_ok=True)
        target = target_folder / f"{split}.hdf5"
        temporary = target_folder / f".{target.name}.partial"
        handles = [h5py.File(path, "r") for path in sources]
        try:
            channels = json.loads(handles[0][EMU_GROUP].attrs["channels"])
            for path, handle in zip(sources, handles):
                group = handle[EMU_GROUP]
                if int(group.attrs["completed"]) != int(handle.attrs["n_trajectories"]):
                    raise ValueError(f"merge: {path} is incomplete ({group.attrs['completed']} of "
                                     f"{handle.attrs['n_trajectories']} trajectories)")
                if json.loads(group.attrs["channels"]) != channels or \
                        handle["t0_fields"][channels[0]].shape[1:] != handles[0]["t0_fields"][channels[0]].shape[1:]:
                    raise ValueError(f"merge: {path} does not match {sources[0]} (channels or shape)")
            counts = [int(h.attrs["n_trajectories"]) for h in handles]
            total = sum(counts)
            with h5py.File(temporary, "w") as merged_handle:
                for key, value in handles[0].attrs.items():
                    merged_handle.attrs[key] = value
                merged_handle.attrs["n_trajectories"] = total
                for group in ("dimensions", "boundary_conditions", "scalars", "t1_fields", "t2_fields"):
                    handles[0].copy(group, merged_handle)
                fields = merged_handle.create_group("t0_fields")
                fields.attrs["field_names"] = handles[0]["t0_fields"].attrs["field_names"]
                for channel in channels:
                    reference = handles[0]["t0_fields"][channel]
                    layout = h5py.VirtualLayout(shape=(total,) + reference.shape[1:], dtype=reference.dtype)
                    offset = 0
                    for path, count in zip(sources, counts):
                        relative = os.path.relpath(path, target_folder)
                        layout[offset:offset + count] = h5py.VirtualSource(relative, f"t0_fields/{channel}",
                                                                           shape=(count,) + reference.shape[1:])
                        offset += count
                    # NaN fill: a reader that cannot reach the shard files sees NaN, never silent zeros.
                    dataset = fields.create_virtual_dataset(channel, layout, fillvalue=np.nan)
                    for key, value in reference.attrs.items():
                        dataset.attrs[key] = value
                group = merged_handle.create_group(EMU_GROUP)
                for key, value in handles[0][EMU_GROUP].attrs.items():
                    group.attrs[key] = value
                group.attrs["completed"] = total
                group.attrs["merged_from"] = json.dumps([os.path.relpath(p, target_folder) for p in sources])
                for name in ("trajectory_ids", "trajectory_seeds"):
                    group.create_dataset(name, data=np.concatenate([h[EMU_GROUP][name][()] for h in handles]))
                for prefix in ("train", "train_delta"):
                    for name in ("count", "sum", "sum_of_squares"):
                        key = f"{prefix}_{name}"
                        group.attrs[key] = sum(h[EMU_GROUP].attrs[key] for h in handles)
                if group.attrs["train_count"] > 0:
                    mean, std = statistics_from_sums(group.attrs["train_count"], group.attrs["train_sum"],
                                                     group.attrs["train_sum_of_squares"])
                    group.attrs["train_mean"], group.attrs["train_std"] = mean, std
        finally:
            for handle in handles:
                handle.close()
        os.replace(temporary, target)
        merged.append(target)
    if merged and split_files(out, "train"):
        write_well_statistics(out)
    return merged
