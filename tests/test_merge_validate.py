"""`data merge`, `data validate` and `data info` on the datasets users really hand them: an --out that
overlaps the input, a shard that was never made, a partial merge, a truncated copy, a text file named
*.hdf5, an empty folder, shards from an emu without the emu/fields links.

Datasets are tiny (16^2 solver, 8^2 saved, 3 snapshots) so each test takes a second or so; the
command-line checks look at the exit code and at stderr being one `Error:` line, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import emu.data.well
from emu.cli import main
from emu.data.loaders import TrajectoryWindows
from emu.data.well import SPLITS, merge_shards, read_trajectories, split_files
from emu.errors import UserError
from emu.generate import MANIFEST, PARTIAL_MERGE, GenerationPlan, generate
from emu.systems import make_config


@pytest.fixture(autouse=True)
def _not_under_a_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):  # `generate` would take its shard from these (torchrun)
        monkeypatch.delenv(name, raising=False)


def _plan(split=(1.0, 0.0, 0.0)) -> GenerationPlan:
    # 4 trajectories; with split (1, 0, 0) and 2 shards the training split spans both shard files
    return GenerationPlan(make_config("kolmogorov", grid_size=16), trajectories=4, length=3, interval=2,
                          spinup_steps=4, downsample=8, split=split, seed=5, batch=2)


def _shards(directory: Path, shards=(0, 1), num_shards: int = 2, split=(1.0, 0.0, 0.0)) -> GenerationPlan:
    plan = _plan(split)
    for shard in shards:
        generate(plan, directory, shard=shard, num_shards=num_shards)
    return plan


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    # a Python exception other than SystemExit would be a traceback for the user
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def _one_error_line(result) -> str:
    """The single `Error: ...` line a failed command must print on stderr (and nothing else there)."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def _tree(directory: Path) -> dict:
    return {p: (p.stat().st_mtime_ns if p.is_file() else None) for p in directory.rglob("*")}


# -- 1. --out must be a folder apart from the input -----------------------------------------------


@pytest.mark.parametrize("where, relation", [
    ("shards", "is the input folder"),
    ("shards/merged", "is inside the input folder"),
    ("shards/data/train", "is inside the input folder"),
    (".", "contains the input folder"),
])
def test_merge_refuses_an_out_that_overlaps_the_input(tmp_path, where, relation):
    parent = tmp_path / "parent"
    _shards(parent / "shards")
    before = _tree(parent)
    out = parent / where
    line = _one_error_line(_cli("data", "merge", parent / "shards", "--out", out))
    assert f"out: {out} {relation}" in line and "separate folder" in line, line
    assert _tree(parent) == before  # nothing written, nothing touched
    with pytest.raises(ValueError, match=relation):
        merge_shards(parent / "shards", out)
    assert _tree(parent) == before
    # the loaders still see each trajectory once
    assert len(TrajectoryWindows(parent / "shards", "train", unroll=1)) == 4 * 2


def test_merge_refuses_an_out_that_holds_other_dataset_files(tmp_path):
    _shards(tmp_path / "a")
    _shards(tmp_path / "b")
    line = _one_error_line(_cli("data", "merge", tmp_path / "a", "--out", tmp_path / "b"))
    assert "already holds dataset files that are not merged files" in line, line
    assert [f.name for f in split_files(tmp_path / "b", "train")] == [
        "train_shard00000-of-00002.hdf5", "train_shard00001-of-00002.hdf5"]


# -- 2. merge and validate follow the manifest ----------------------------------------------------


def test_merge_refuses_a_missing_shard_and_validate_reports_it(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "merged"
    _shards(shards, shards=(0,))  # shard 1 of 2 (trajectories 2-3) was never run
    line = _one_error_line(_cli("data", "merge", shards, "--out", out))
    assert "train_shard00001-of-00002.hdf5 (missing" in line and "--shard 1 --num-shards 2" in line, line
    assert "--allow-partial" in line
    assert not out.exists()
    with pytest.raises(UserError, match="1 of the 2 shard files"):
        merge_shards(shards, out)

    result = _cli("data", "validate", shards)
    assert result.exit_code == 1, result.output
    assert "train_shard00001-of-00002.hdf5: missing" in result.stderr, result.stderr
    assert "split train: 2 of the 4 planned trajectories" in result.stderr and "missing ids 2-3" in result.stderr
    info = _cli("data", "info", shards)
    assert info.exit_code == 0 and "incomplete:" in info.output and "train_shard00001" in info.output, info.output


def test_a_folder_without_its_manifest_cannot_be_merged_or_pass_validation(tmp_path):
    shards = tmp_path / "shards"
    _shards(shards)
    (shards / MANIFEST).unlink()
    line = _one_error_line(_cli("data", "merge", shards, "--out", tmp_path / "merged"))
    assert f"{shards / MANIFEST}: no such file" in line, line
    result = _cli("data", "validate", shards)
    assert result.exit_code == 1 and f"problem: {shards / MANIFEST}: no such file" in result.stderr, result.output


def test_partial_merge_is_recorded_and_reported_until_completed(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "merged"
    _shards(shards, shards=(0,))
    result = _cli("data", "merge", shards, "--out", out, "--allow-partial")
    assert result.exit_code == 0, result.output
    assert "warning: partial merge" in result.stderr and "train 2-3" in result.stderr, result.stderr
    (merged,) = split_files(out, "train")
    with h5py.File(merged, "r") as handle:
        group = handle["emu"]
        assert bool(group.attrs["partial"]) and int(group.attrs["planned_trajectories"]) == 4
        assert json.loads(group.attrs["missing_trajectory_ids"]) == [[2, 4]]
        assert [Path(p).name for p in json.loads(group.attrs["missing_shard_files"])] == ["train_shard00001-of-00002.hdf5"]
        assert handle.attrs["n_trajectories"] == 2 and list(group["trajectory_ids"][()]) == [0, 1]
    np.testing.assert_array_equal(read_trajectories(merged), read_trajectories(split_files(shards, "train")[0]))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest[PARTIAL_MERGE] == {"missing_shard_files": ["data/train/train_shard00001-of-00002.hdf5"],
                                       "missing_trajectory_ids": {"train": [[2, 4]]}}
    validation = _cli("data", "validate", out)
    assert validation.exit_code == 1 and "partial merge" in validation.stderr, validation.output
    assert str(merged) in validation.stderr

    # the missing shard made, the same --out merges complete: nothing partial is left behind
    _shards(shards, shards=(1,))
    assert _cli("data", "merge", shards, "--out", out).exit_code == 0
    assert (out / MANIFEST).read_text() == (shards / MANIFEST).read_text()
    with h5py.File(merged, "r") as handle:
        assert not handle["emu"].attrs["partial"] and handle.attrs["n_trajectories"] == 4
    validation = _cli("data", "validate", out)
    assert validation.exit_code == 0 and "OK" in validation.output, validation.output
    assert _cli("data", "validate", shards).exit_code == 0


def test_validate_reports_a_merged_folder_without_a_split_and_stray_files(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "merged"
    plan = _shards(shards, split=(0.5, 0.5, 0.0))
    assert _cli("data", "merge", shards, "--out", out).exit_code == 0
    assert _cli("data", "validate", out).exit_code == 0
    low, high = plan.split_ranges["valid"]
    (out / "data/valid/valid.hdf5").unlink()
    stray = shards / "data/train/train_shard00000-of-00003.hdf5"  # another sharding's file
    stray.write_bytes(split_files(shards, "train")[0].read_bytes())
    for folder, expected in ((out, f"valid.hdf5: missing (merged split valid, {high - low} trajectories)"),
                             (shards, f"{stray}: not part of the plan")):
        result = _cli("data", "validate", folder)
        assert result.exit_code == 1 and expected in result.stderr, result.output
    assert "not part of the plan" in _one_error_line(_cli("data", "merge", shards, "--out", tmp_path / "again"))


def test_merge_makes_every_split_visible_only_when_all_are_written(tmp_path, monkeypatch):
    shards, out = tmp_path / "shards", tmp_path / "merged"
    _shards(shards, split=(0.5, 0.5, 0.0))
    real = emu.data.well._write_merged_file

    def fail_on_valid(temporary, target_folder, split, *args):
        if split == "valid":
            raise OSError("disk full (simulated)")
        return real(temporary, target_folder, split, *args)

    monkeypatch.setattr(emu.data.well, "_write_merged_file", fail_on_valid)
    with pytest.raises(OSError, match="simulated"):
        merge_shards(shards, out)
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no merged train file, no temporaries


# -- 3. unreadable inputs: one line naming the file -----------------------------------------------


def _bad_input(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(argument for the command, the file the message must name)."""
    good = tmp_path / "good"
    _shards(good, shards=(0,), num_shards=1)
    (shard,) = split_files(good, "train")
    if kind == "empty folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", tmp_path / "empty"
    target = tmp_path / "bad" / "data" / "train" / shard.name
    target.parent.mkdir(parents=True)
    (tmp_path / "bad" / MANIFEST).write_text((good / MANIFEST).read_text())
    if "truncated" in kind:
        data = shard.read_bytes()
        target.write_bytes(data[:len(data) // 2])  # a copy cut short
    elif "text" in kind:
        target.write_text("train,vorticity\n1,2\n")
    elif "foreign" in kind:
        with h5py.File(target, "w") as handle:
            handle["x"] = np.zeros(3)
    return (target if kind.endswith("file") else tmp_path / "bad"), target


@pytest.mark.parametrize("kind", ["empty folder", "truncated file", "text file", "foreign HDF5 file",
                                  "folder with a truncated file", "folder with a text file"])
def test_info_and_validate_name_the_unreadable_file(tmp_path, kind):
    argument, named = _bad_input(tmp_path, kind)
    line = _one_error_line(_cli("data", "info", argument))
    assert str(named) in line, line
    result = _cli("data", "validate", argument)
    assert result.exit_code == 1, result.output
    if kind == "empty folder":
        assert str(named) in _one_error_line(result)
    else:  # a problem line naming the file
        assert any(line.startswith(f"problem: {named}") for line in result.stderr.splitlines()), result.stderr
    reason = {"truncated": "truncated", "text": "no HDF5 signature", "foreign": "not an emu dataset file"}
    assert any(word in result.stderr for key, word in reason.items() if key in kind) or kind == "empty folder"


def test_truncated_file_in_a_real_process_prints_one_line(tmp_path):
    argument, named = _bad_input(tmp_path, "truncated file")
    for command in ("info", "validate"):
        done = subprocess.run([sys.executable, "-m", "emu.cli", "data", command, str(argument)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and str(named) in done.stderr, done.stderr
        assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr


# -- 4. merged files and readers that open files through file objects -----------------------------


def test_merged_virtual_datasets_read_the_emu_fields_links(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "merged"
    _shards(shards)
    (merged,) = merge_shards(shards, out)
    with h5py.File(merged, "r") as handle:
        sources = handle["t0_fields/vorticity"].virtual_sources()
        assert [s.dset_name for s in sources] == ["emu/fields/vorticity"] * 2
        assert "fields" not in handle["emu"]  # so through a file object the source lookup fails, not recurses
    for shard in split_files(shards, "train"):
        with h5py.File(shard, "r") as handle:
            assert handle["emu/fields/vorticity"] == handle["t0_fields/vorticity"]  # one dataset, two names
    expected = np.concatenate([read_trajectories(f) for f in split_files(shards, "train")])
    np.testing.assert_array_equal(read_trajectories(merged), expected)
    windows = TrajectoryWindows(out, "train", unroll=2)
    np.testing.assert_array_equal(np.stack([windows[i].numpy() for i in range(len(windows))]), expected)


def test_merging_shards_without_the_links_warns_and_still_reads(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "merged"
    _shards(shards)
    for shard in split_files(shards, "train"):  # as an emu before the links wrote them
        with h5py.File(shard, "r+") as handle:
            del handle["emu/fields"]
    result = _cli("data", "merge", shards, "--out", out)
    assert result.exit_code == 0 and "older emu" in result.stderr and "--copy" in result.stderr, result.output
    expected = np.concatenate([read_trajectories(f) for f in split_files(shards, "train")])
    np.testing.assert_array_equal(read_trajectories(out / "data/train/train.hdf5"), expected)


def test_copy_merge_holds_the_fields_itself(tmp_path):
    shards = tmp_path / "shards"
    _shards(shards, split=(0.5, 0.5, 0.0))
    result = _cli("data", "merge", shards, "--out", tmp_path / "copy", "--copy")
    assert result.exit_code == 0 and "copied" in result.output, result.output
    for split in ("train", "valid"):
        (merged,) = split_files(tmp_path / "copy", split)
        with h5py.File(merged, "r") as handle:
            assert not handle["t0_fields/vorticity"].is_virtual and handle["emu"].attrs["merge_kind"] == "copy"
        expected = np.concatenate([read_trajectories(f) for f in split_files(shards, split)])
        np.testing.assert_array_equal(read_trajectories(merged), expected)
    (tmp_path / "copy_alone").mkdir()  # a copy needs no shard folder beside it
    (tmp_path / "copy").rename(tmp_path / "copy_alone" / "copy")
    assert _cli("data", "validate", tmp_path / "copy_alone" / "copy").exit_code == 0
    assert "[merged copy of shards]" in _cli("data", "info", tmp_path / "copy_alone" / "copy").output


def test_validate_names_virtual_sources_that_are_gone(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "merged"
    _shards(shards)
    merge_shards(shards, out)
    moved = tmp_path / "elsewhere" / "merged"
    moved.parent.mkdir()
    out.rename(moved)  # without the shard folder
    result = _cli("data", "validate", moved)
    assert result.exit_code == 1 and "do not exist" in result.stderr and "train_shard00000" in result.stderr, result.output

