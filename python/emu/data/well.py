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
std) from which dataset-wide statistics are combined, and `emu/fields/<channel>`: a second name (an
HDF5 hard link, no copy) of each `t0_fields/<channel>`, which `merge_shards` points its virtual
datasets at (see there for why).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

import emu
from emu.data.atomic import write_json_atomically, write_text_atomically
from emu.data.files import open_hdf5
from emu.errors import UserError

SPLITS = ("train", "valid", "test")
EMU_GROUP = "emu"
SHARD_FIELDS = f"{EMU_GROUP}/fields"  # hard links to t0_fields/<channel>: what merged virtual datasets read


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
    # Second names of the field datasets (hard links: no copy, no space), for `merge_shards`.
    shard_fields = handle.create_group(SHARD_FIELDS)
    for channel in channels:
        shard_fields[channel] = fields[channel]
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


def open_dataset_file(path) -> h5py.File:
    """Opens an emu dataset file for reading (through `open_hdf5`) and checks that it is one: an `emu`
    group with channels and completed, n_trajectories, and a `t0_fields` dataset per channel. Any
    other file (a text file, a truncated copy, someone else's HDF5) is refused with one message that
    names it, instead of a KeyError deep inside a reader."""
    handle = open_hdf5(path, "emu dataset file")
    problem = None
    group = handle.get(EMU_GROUP)
    if not isinstance(group, h5py.Group) or "channels" not in group.attrs or "completed" not in group.attrs:
        problem = "no `emu` group with channels and completed: not written by `emu generate` or `data merge`"
    elif "n_trajectories" not in handle.attrs:
        problem = "no n_trajectories attribute"
    else:
        try:
            channels = json.loads(group.attrs["channels"])
        except (TypeError, ValueError):
            channels = None
        if not isinstance(channels, list) or not channels:
            problem = f"emu/channels is not a JSON list of channel names: {group.attrs['channels']!r}"
        else:
            absent = [c for c in channels if not isinstance(handle.get(f"t0_fields/{c}"), h5py.Dataset)]
            if absent:
                problem = f"no dataset t0_fields/{absent[0]} although emu/channels lists it"
    if problem:
        handle.close()
        raise UserError(f"{path}: not an emu dataset file ({problem})")
    return handle


def dataset_statistics(directory) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(mean, std, channels) of the training split, combined over every train file of the dataset."""
    files = split_files(directory, "train")
    if not files:
        raise FileNotFoundError(f"{directory}: no training files under data/train/")
    count, total, squares, channels = 0.0, 0.0, 0.0, None
    for path in files:
        with open_dataset_file(path) as handle:
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
        with open_dataset_file(path) as handle:
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
    with open_dataset_file(path) as handle:
        channels = json.loads(handle[EMU_GROUP].attrs["channels"])
        arrays = [handle["t0_fields"][c][trajectories, steps] for c in channels]
    return np.swapaxes(np.stack(arrays, axis=2), -1, -2)


def id_ranges(ids) -> list[list[int]]:
    """Sorted integer ids as [start, stop) runs: [0, 1, 2, 5] -> [[0, 3], [5, 6]] (short messages)."""
    runs: list[list[int]] = []
    for value in sorted(int(i) for i in ids):
        if runs and value == runs[-1][1]:
            runs[-1][1] = value + 1
        else:
            runs.append([value, value + 1])
    return runs


def format_id_ranges(ranges) -> str:
    return ", ".join(f"{start}" if stop == start + 1 else f"{start}-{stop - 1}" for start, stop in ranges)


def listing(items, limit: int = 5) -> str:
    """The first `limit` items joined with ', ', then 'and N more' (messages stay one readable line)."""
    items = [str(item) for item in items]
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_merge_folders(directory: Path, out: Path) -> None:
    """Refuses an --out that is the input folder, lies inside it or contains it. Merged files beside
    or around the shards are found by every reader of the folder next to the shards they point at
    (each trajectory read twice), and copying the manifest onto itself fails half-way."""
    source, target = directory.resolve(), out.resolve()
    if target == source:
        where = "is the input folder"
    elif source in target.parents:
        where = f"is inside the input folder {directory}"
    elif target in source.parents:
        where = f"contains the input folder {directory}"
    else:
        return
    raise ValueError(f"out: {out} {where}; the merged files must go to a separate folder (loaders would read each "
                     f"trajectory twice, from the shards and from the merged files), e.g. --out {source.name}_merged "
                     f"beside {directory}")


def _check_merge_output(out: Path, manifest) -> None:
    """Refuses an --out that holds files `data merge` did not write, or the merge of another dataset:
    merging overwrites the split files there."""
    foreign = [f for split in SPLITS for f in split_files(out, split) if f.name != f"{split}.hdf5"]
    if foreign:
        raise ValueError(f"out: {out} already holds dataset files that are not merged files ({listing(foreign)}); "
                         "choose an empty folder")
    from emu.generate import MANIFEST, PARTIAL_MERGE

    existing = out / MANIFEST
    if existing.exists():
        try:
            values = json.loads(existing.read_text())
        except (OSError, ValueError):
            values = None
        if not isinstance(values, dict) or {k: v for k, v in values.items() if k != PARTIAL_MERGE} != manifest.values:
            raise ValueError(f"out: {out} holds another dataset ({existing} differs from {manifest.path}); "
                             "choose another --out")


def _shard_sources(present: list) -> list[h5py.File]:
    """Opens and checks the present shard files of one split: complete, the trajectory ids the plan
    gives them, the same channels and (steps, x, y). Returns the open handles (caller closes them)."""
    handles = []
    try:
        for item, path in present:
            handle = open_dataset_file(path)
            handles.append(handle)
            group = handle[EMU_GROUP]
            completed, count = int(group.attrs["completed"]), int(handle.attrs["n_trajectories"])
            if completed != count:
                raise ValueError(f"merge: {path} is incomplete ({completed} of {count} trajectories); "
                                 "rerun generate for it")
            ids = group["trajectory_ids"][()] if "trajectory_ids" in group else None
            if ids is None or not np.array_equal(ids, np.arange(item.first, item.stop)):
                raise ValueError(f"merge: {path} holds trajectory ids "
                                 f"{format_id_ranges(id_ranges(ids)) if ids is not None else 'none'}, but the "
                                 f"plan in emu_dataset.json gives it {item.first}-{item.stop - 1}")
            channels = json.loads(group.attrs["channels"])
            reference = handles[0]
            reference_channels = json.loads(reference[EMU_GROUP].attrs["channels"])
            if channels != reference_channels or \
                    handle["t0_fields"][channels[0]].shape[1:] != reference["t0_fields"][channels[0]].shape[1:]:
                raise ValueError(f"merge: {path} does not match {present[0][1]} (channels or (steps, x, y))")
    except BaseException:
        for handle in handles:
            handle.close()
        raise
    return handles


def _write_merged_file(temporary: Path, target_folder: Path, split: str, present: list, left_out: list,
                       planned_count: int, copy: bool, warn: Callable[[str], None]) -> None:
    """Writes the merged file of one split to `temporary` (renamed by the caller once every split is
    written). `present`/`left_out` are (PlannedFile, path) pairs of the shard files merged / missing."""
    handles = _shard_sources(present)
    try:
        first = handles[0]
        channels = json.loads(first[EMU_GROUP].attrs["channels"])
        counts = [int(h.attrs["n_trajectories"]) for h in handles]
        total = sum(counts)
        paths = [path for _, path in present]
        with h5py.File(temporary, "w") as merged:
            for key, value in first.attrs.items():
                merged.attrs[key] = value
            merged.attrs["n_trajectories"] = total
            for group_name in ("dimensions", "boundary_conditions", "scalars", "t1_fields", "t2_fields"):
                first.copy(group_name, merged)
            fields = merged.create_group("t0_fields")
            fields.attrs["field_names"] = first["t0_fields"].attrs["field_names"]
            older_shards = []
            for channel in channels:
                reference = first["t0_fields"][channel]
                shape = (total,) + reference.shape[1:]
                if copy:
                    dataset = fields.create_dataset(channel, shape=shape, dtype=reference.dtype,
                                                    chunks=reference.chunks, compression=reference.compression,
                                                    compression_opts=reference.compression_opts)
                    offset = 0
                    for handle in handles:  # one trajectory at a time: memory stays flat
                        source = handle["t0_fields"][channel]
                        for index in range(source.shape[0]):
                            dataset[offset + index] = source[index]
                        offset += source.shape[0]
                else:
                    layout = h5py.VirtualLayout(shape=shape, dtype=reference.dtype)
                    offset = 0
                    for path, handle, count in zip(paths, handles, counts):
                        # The link emu/fields/<channel>, not t0_fields/<channel>: see merge_shards.
                        alias = f"{SHARD_FIELDS}/{channel}"
                        if alias in handle and handle[alias] == handle[f"t0_fields/{channel}"]:
                            source_name = alias
                        else:
                            source_name = f"t0_fields/{channel}"
                            if path not in older_shards:
                                older_shards.append(path)
                        relative = os.path.relpath(path, target_folder)
                        layout[offset:offset + count] = h5py.VirtualSource(relative, source_name,
                                                                           shape=(count,) + reference.shape[1:])
                        offset += count
                    # NaN fill: a reader that cannot reach the shard files sees NaN, never silent zeros.
                    dataset = fields.create_virtual_dataset(channel, layout, fillvalue=np.nan)
                for key, value in reference.attrs.items():
                    dataset.attrs[key] = value
            if older_shards:
                warn(f"{listing(older_shards)}: made by an older emu without the {SHARD_FIELDS} links, so the merged "
                     f"virtual datasets of split {split} name t0_fields in the shards; a reader that opens files through "
                     "Python file objects (the_well's WellDataset) crashes on such a file: point it at the shard "
                     "folder, or merge with --copy")
            group = merged.create_group(EMU_GROUP)
            for key, value in first[EMU_GROUP].attrs.items():
                group.attrs[key] = value
            group.attrs["completed"] = total
            group.attrs["merged_from"] = json.dumps([os.path.relpath(p, target_folder) for p in paths])
            group.attrs["merge_kind"] = "copy" if copy else "virtual"
            # What an --allow-partial merge left out, so a reader (and `data validate`) can tell.
            missing_ids = id_ranges(i for item, _ in left_out for i in range(item.first, item.stop))
            group.attrs["partial"] = bool(left_out)
            group.attrs["planned_trajectories"] = planned_count
            group.attrs["missing_shard_files"] = json.dumps([os.path.relpath(p, target_folder) for _, p in left_out])
            group.attrs["missing_trajectory_ids"] = json.dumps(missing_ids)
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


def merge_shards(directory, out, *, allow_partial: bool = False, copy: bool = False,
                 warn: Callable[[str], None] | None = None) -> list[Path]:
    """Joins the shard files of each split into one file per split under `out`, with HDF5 virtual
    datasets that point into the shard files (no copy of field data; relative paths, so the two
    folders can move together), or with `copy` a full copy of the fields. Trajectory ids, seeds and
    the combined training statistics are stored in the merged files' `emu` group, the input's
    emu_dataset.json is copied beside them. Returns the merged files.

    Manifest-driven: every shard file the folder's emu_dataset.json plans must be there and complete
    (a missing shard would otherwise make a smaller dataset that looks whole). Missing ones are
    refused, naming them, unless `allow_partial`: then the others are merged, the merged files'
    `emu` group (partial, missing_shard_files, missing_trajectory_ids, planned_trajectories) and the
    copied manifest (key partial_merge) record what is missing, and `warn` says so. `out` must be a
    folder apart from `directory` (neither inside the other). Each merged file is written under a
    temporary name and all are renamed only when every split is written.

    h5py, emu's loaders and any HDF5 reader that opens files by name follow the virtual datasets.
    A reader that opens files through Python file objects cannot: HDF5 opens a virtual dataset's
    source files with the file access properties of the file holding it, and h5py's file-object
    driver then hands it that same file object, whatever the source's name. So the "source file" is
    the merged file itself; if the virtual datasets named the shards' `t0_fields/<channel>`, the
    merged file's own virtual dataset of that name would be its own source, and HDF5 recurses until
    the stack overflows (the segfault the_well's `WellDataset`, which opens files through fsspec,
    showed). They therefore name `emu/fields/<channel>`, a hard link every shard file has and the
    merged file has not: through a file object the read fails with an HDF5 error (or yields the NaN
    fill value, depending on the HDF5 version) instead of crashing. Point `WellDataset` at the shard
    folder (it reads several files per split natively), or merge with `copy`.
    """
    from emu.generate import MANIFEST, PARTIAL_MERGE, planned_files, read_manifest  # emu.generate imports this module

    directory, out = Path(directory), Path(out)
    if warn is None:
        def warn(message: str) -> None:
            warnings.warn(message, stacklevel=3)
    _check_merge_folders(directory, out)
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory}: not a dataset folder")
    manifest = read_manifest(directory)
    if PARTIAL_MERGE in manifest.values or any((directory / "data" / s / f"{s}.hdf5").exists() for s in SPLITS):
        raise ValueError(f"{directory}: holds the output of `data merge`, not shard files; merge the shard folder "
                         "it was made from")
    planned = planned_files(manifest.plan, manifest.num_shards)
    expected = {directory / "data" / item.split / item.name for item in planned}
    strays = [f for split in SPLITS for f in split_files(directory, split) if f not in expected]
    if strays:
        raise ValueError(f"{directory}: {listing(strays)} not part of the plan in {manifest.path} "
                         f"({manifest.num_shards} shard(s)); move them away and merge again")
    _check_merge_output(out, manifest)

    present, missing = [], []
    for item in planned:
        path = directory / "data" / item.split / item.name
        if path.exists():
            present.append((item, path))
        else:
            unfinished = path.with_name(f".{path.name}.partial").exists()
            missing.append((item, path, "unfinished: generate is running or was stopped" if unfinished else "missing"))
    if missing and not allow_partial:
        raise UserError(f"merge: {len(missing)} of the {len(planned)} shard files planned in {manifest.path} are not "
                        "there: " + listing(f"{path} ({reason}; {item.describe()})" for item, path, reason in missing)
                        + ". Make them first, or pass --allow-partial to merge the others (recorded as partial)")
    if not present:
        raise FileNotFoundError(f"{directory}: none of the {len(planned)} shard files planned in {manifest.path} "
                                "exist; nothing to merge")
    missing_ids = {split: id_ranges(i for item, _, _ in missing if item.split == split for i in range(item.first, item.stop))
                   for split in SPLITS}
    if missing:
        warn(f"partial merge: {len(missing)} of {len(planned)} shard files are missing "
             f"({listing(path.name for _, path, _ in missing)}), so trajectory ids "
             + "; ".join(f"{split} {format_id_ranges(r)}" for split, r in missing_ids.items() if r)
             + f" are left out; recorded in the merged files and {out / MANIFEST}, and `data validate` reports it")

    written: list[tuple[Path, Path]] = []  # (temporary, target)
    try:
        for split in SPLITS:
            sources = [(item, path) for item, path in present if item.split == split]
            if not sources:
                continue
            left_out = [(item, path) for item, path, _ in missing if item.split == split]
            low, high = manifest.plan.split_ranges[split]
            folder = out / "data" / split
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{split}.hdf5"
            temporary = folder / f".{target.name}.merging"
            written.append((temporary, target))
            _write_merged_file(temporary, folder, split, sources, left_out, high - low, copy, warn)
        for temporary, target in written:  # every split written: make them visible
            os.replace(temporary, target)
    except BaseException:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
        raise
    merged = [target for _, target in written]
    for split in SPLITS:  # a split this merge has no file for: drop an earlier merge's file of it
        stale = out / "data" / split / f"{split}.hdf5"
        if stale not in merged:
            stale.unlink(missing_ok=True)
    if missing:
        record = {"missing_shard_files": [str(path.relative_to(directory)) for _, path, _ in missing],
                  "missing_trajectory_ids": {split: r for split, r in missing_ids.items() if r}}
        write_json_atomically(out / MANIFEST, dict(manifest.values, **{PARTIAL_MERGE: record}))
    else:
        write_text_atomically(out / MANIFEST, manifest.path.read_text())
    if split_files(out, "train"):
        write_well_statistics(out)
    else:
        (out / "stats.yaml").unlink(missing_ok=True)
    return merged
