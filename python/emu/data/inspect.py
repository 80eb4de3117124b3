"""`emu data info` and `emu data validate`: what a dataset holds, and whether it is sound.

A dataset folder is checked against its emu_dataset.json (the plan `generate` wrote): the files of a
missing shard leave no trace among the files that are there, so only the plan can tell that a folder
is incomplete. Files are opened through `open_dataset_file`, so a text file, a truncated copy or
another program's HDF5 file is named in one line instead of a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from emu.data.well import (EMU_GROUP, SPLITS, format_id_ranges, id_ranges, listing, open_dataset_file,
                           split_files, statistics_from_sums)
from emu.errors import UserError


def _files(path) -> list[tuple[str | None, Path]]:
    """(split, file) for a folder's dataset files; (None, file) for a single file (its split is read
    from the file once it is open, so that an unreadable file is reported by the caller)."""
    path = Path(path)
    if path.is_file():
        return [(None, path)]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such dataset folder or file")
    return [(split, file) for split in SPLITS for file in split_files(path, split)]


def _no_files(path) -> FileNotFoundError:
    unfinished = _partial_files(path)
    if unfinished:
        return FileNotFoundError(f"{path}: no finished dataset files yet; unfinished: {listing(unfinished)} "
                                 "(generate is running, or rerun it to resume)")
    return FileNotFoundError(f"{path}: no dataset files under data/{{train,valid,test}}/*.hdf5 (an empty folder, "
                             "or not a dataset folder made by `emu generate`)")


def _partial_files(path) -> list[Path]:
    path = Path(path)
    return sorted(path.glob("data/*/.*.partial")) if path.is_dir() else []


def _is_merged_folder(directory: Path, manifest) -> bool:
    from emu.generate import PARTIAL_MERGE

    return PARTIAL_MERGE in manifest.values or any((directory / "data" / s / f"{s}.hdf5").exists() for s in SPLITS)


def completeness_problems(directory) -> list[str]:
    """What a dataset folder lacks against its emu_dataset.json: planned files that are missing or
    unfinished, files the plan does not make, trajectory ids per split other than the plan's
    split_ranges, and a merge made with --allow-partial. Files that cannot be opened are skipped
    here (the per-file checks report them). A shard folder must hold every planned shard file; a
    `data merge` output folder one merged file per non-empty split."""
    from emu.generate import PARTIAL_MERGE, planned_files, read_manifest

    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, UserError) as error:
        return [f"{error} (so the folder cannot be checked for missing shards)"]
    plan, problems = manifest.plan, []
    merged = _is_merged_folder(directory, manifest)
    expected: dict[Path, str] = {}  # path -> what it should be, for messages
    if merged:
        for split, (low, high) in plan.split_ranges.items():
            if high > low:
                expected[directory / "data" / split / f"{split}.hdf5"] = f"merged split {split}, {high - low} trajectories"
    else:
        for item in planned_files(plan, manifest.num_shards):
            expected[directory / "data" / item.split / item.name] = item.describe()
    for path, what in expected.items():
        if not path.exists():
            partial = path.with_name(f".{path.name}.partial")
            problems.append(f"{path}: unfinished, {partial} exists ({what})" if partial.exists()
                            else f"{path}: missing ({what})")
    for split in SPLITS:
        for file in split_files(directory, split):
            if file not in expected:
                problems.append(f"{file}: not part of the plan in {manifest.path} ({manifest.num_shards} shard(s)); "
                                "another dataset's or another sharding's file?")
    if PARTIAL_MERGE in manifest.values:
        record = manifest.values[PARTIAL_MERGE]
        problems.append(f"{manifest.path}: records a partial merge (data merge --allow-partial) without "
                        f"{listing(record.get('missing_shard_files', []))}")
    for split, (low, high) in plan.split_ranges.items():
        ids = []
        for file in (f for f in expected if f.parent.name == split and f.exists()):
            try:
                with open_dataset_file(file) as handle:
                    group = handle[EMU_GROUP]
                    if "trajectory_ids" in group:
                        ids.extend(int(i) for i in group["trajectory_ids"][()])
                    if group.attrs.get("partial", False):
                        problems.append(f"{file}: partial merge (data merge --allow-partial): missing shard files "
                                        f"{listing(json.loads(group.attrs['missing_shard_files']))}, trajectory ids "
                                        f"{format_id_ranges(json.loads(group.attrs['missing_trajectory_ids']))}")
            except (UserError, OSError, ValueError):
                continue
        planned_ids = set(range(low, high))
        if sorted(ids) != sorted(planned_ids):
            absent = id_ranges(planned_ids - set(ids))
            extra = id_ranges(set(ids) - planned_ids)
            problems.append(f"split {split}: {len(ids)} of the {high - low} planned trajectories (ids {low}-{high - 1})"
                            + (f"; missing ids {format_id_ranges(absent)}" if absent else "")
                            + (f"; ids outside the plan {format_id_ranges(extra)}" if extra else "")
                            + (f"; {len(ids) - len(set(ids))} duplicated" if len(ids) != len(set(ids)) else ""))
    return problems


def _missing_virtual_sources(handle, file: Path, channels) -> list[str]:
    """Source files a merged file's virtual datasets point at that do not exist (HDF5 then silently
    returns the fill value). Relative names resolve against the merged file's folder."""
    missing = []
    for channel in channels:
        dataset = handle["t0_fields"][channel]
        if dataset.is_virtual:
            for source in dataset.virtual_sources():
                source_path = Path(source.file_name)
                resolved = source_path if source_path.is_absolute() else file.parent / source_path
                if not resolved.exists() and source.file_name not in missing:
                    missing.append(source.file_name)
    return missing


def describe(path) -> str:
    """A readable summary: system and config, splits with trajectories/steps/grid, statistics, and
    for a folder what it lacks against its plan."""
    files = _files(path)
    if not files:
        raise _no_files(path)
    lines = []
    with open_dataset_file(files[0][1]) as handle:
        group = handle[EMU_GROUP]
        channels = json.loads(group.attrs["channels"])
        lines.append(f"dataset {handle.attrs.get('dataset_name', '?')} (The Well format), emu {group.attrs.get('emu_version', '?')}")
        if "config" in group.attrs:
            config = json.loads(group.attrs["config"])
            lines.append(f"system {config.get('system')} ({config.get('preset')}), solver grid {config.get('grid_size')}^2, "
                         f"dt {config.get('dt', float('nan')):.4g}; snapshots every {group.attrs['snapshot_interval']:.4g}"
                         + (f" ({group.attrs['steps_per_snapshot']} steps), seed {group.attrs['seed']}"
                            if "steps_per_snapshot" in group.attrs else ""))
        lines.append(f"channels: {', '.join(channels)}")
    count, total, squares = 0.0, 0.0, 0.0
    for split, file in files:
        with open_dataset_file(file) as handle:
            group = handle[EMU_GROUP]
            split = split or str(group.attrs.get("split", "?"))
            shape = handle["t0_fields"][channels[0]].shape
            done = int(group.attrs["completed"])
            virtual = handle["t0_fields"][channels[0]].is_virtual
            merged = "merged_from" in group.attrs
            lines.append(f"  {split:<5} {file.name}: {done}/{shape[0]} trajectories x {shape[1]} snapshots, "
                         f"{shape[2]}x{shape[3]} (x, y), {file.stat().st_size / 1e6:.1f} MB"
                         + (" [virtual: merged shards]" if virtual else " [merged copy of shards]" if merged else ""))
            if split == "train" and "train_count" in group.attrs:
                count += float(group.attrs["train_count"])
                total = total + group.attrs["train_sum"]
                squares = squares + group.attrs["train_sum_of_squares"]
    if count > 0:
        mean, std = statistics_from_sums(count, total, squares)
        for channel, m, s in zip(channels, mean, std):
            lines.append(f"  train statistics {channel}: mean {m:.4g}, std {s:.4g}")
    if Path(path).is_dir():
        for problem in completeness_problems(path):
            lines.append(f"  incomplete: {problem}")
    for partial in _partial_files(path):
        lines.append(f"  unfinished: {partial} (rerun generate to resume)")
    return "\n".join(lines)


def validate(path) -> tuple[list[str], str]:
    """Checks a folder against its plan (`completeness_problems`) and every file: readable, complete,
    shapes agree, virtual sources present, all values finite, stored training statistics equal to
    the data's. Reads one trajectory at a time (memory stays flat). Returns (problems, summary); a
    file that cannot be opened or read is a problem naming it, not an exception."""
    files = _files(path)
    folder = Path(path).is_dir()
    if not files and not (folder and (Path(path) / "emu_dataset.json").exists()):
        raise _no_files(path)
    problems: list[str] = completeness_problems(path) if folder else []
    checked = 0
    reference_shape = None
    for split, file in files:
        try:
            handle = open_dataset_file(file)
        except (UserError, OSError) as error:
            problems.append(str(error))
            continue
        with handle:
            group = handle[EMU_GROUP]
            split = split or str(group.attrs.get("split", "?"))
            channels = json.loads(group.attrs["channels"])
            n_trajectories = int(handle.attrs["n_trajectories"])
            if int(group.attrs["completed"]) != n_trajectories:
                problems.append(f"{file}: {group.attrs['completed']} of {n_trajectories} trajectories completed")
            unreachable = _missing_virtual_sources(handle, file, channels)
            if unreachable:
                problems.append(f"{file}: its virtual datasets read from {listing(unreachable)}, which do not exist "
                                f"(relative to {file.parent}): was the merged folder moved without the shard folder?")
                continue
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
                    try:
                        values = dataset[trajectory].astype(np.float64)
                    except OSError as error:  # a damaged chunk: report it and go on
                        problems.append(f"{file}: {channel} trajectory {trajectory} cannot be read ({error})")
                        count = -1  # the statistics cannot be checked
                        continue
                    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
                    if bad:
                        problems.append(f"{file}: {channel} trajectory {trajectory} has {bad} NaN/inf values")
                    sums[index] += values.sum()
                    sums_of_squares[index] += (values**2).sum()
                    if index == 0 and count >= 0:
                        count += values.size
                    checked += values.size
            if split == "train" and count > 0 and "train_sum" in group.attrs:
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
        if not any(str(partial) in problem for problem in problems):
            problems.append(f"unfinished file {partial}: rerun generate to complete it")
    summary = f"checked {checked} values in {len(files)} file(s): " + ("OK" if not problems else f"{len(problems)} problem(s)")
    return problems, summary
