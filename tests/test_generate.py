"""`emu generate` and its datasets: round trip, resume after a stop or a kill, shards + merge, refusing a
different dataset in the same folder, and the `generate` / `data` commands.

Datasets are tiny (16^2-32^2 solver grids saved at 8^2, a few dozen spin-up steps) so the module stays
fast; every check compares values, not just that something was written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import emu.generate
from emu.backends import get_backend
from emu.cli import main
from emu.data.well import SPLITS, dataset_statistics, merge_shards, read_trajectories, split_files
from emu.generate import MANIFEST, GenerationPlan, generate, trajectory_seed
from emu.runs import snapshot_fields
from emu.solvers import make_stepper
from emu.systems import ConfigError, config_from_dict, make_config, make_equation

GRID, SAVED = 16, 8
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE")  # `generate` takes its shard from these (torchrun)


@pytest.fixture(autouse=True)
def _not_under_a_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _plan(system: str = "kolmogorov", **changes) -> GenerationPlan:
    values = dict(trajectories=6, length=4, interval=2, spinup_steps=24, downsample=SAVED,
                  split=(0.5, 0.25, 0.25), seed=7, batch=2)
    values.update(changes)
    return GenerationPlan(make_config(system, grid_size=GRID), **values)


def _independent_trajectory(plan: GenerationPlan, trajectory_id: int) -> np.ndarray:
    """Trajectory `trajectory_id` (time, channel, y, x) computed step by step, without emu.generate's
    batching or `integrate`: the seed, spin-up, snapshot interval and truncation it should use."""
    equation = make_equation(plan.config, get_backend("numpy", dtype=plan.dtype))
    stepper = make_stepper(equation, plan.config.dt)
    start = equation.initial_condition(1, seed=trajectory_seed(plan.seed, trajectory_id))
    state = stepper.init(equation.to_state(start))
    channels = len(equation.field_names)
    snapshots = []
    for index in range(plan.length):
        for _ in range(plan.spinup_steps if index == 0 else plan.interval):
            state = stepper.step(state)
        fields = snapshot_fields(equation, state.state_hat, plan.downsample)
        snapshots.append(fields.reshape(channels, plan.downsample, plan.downsample))
    return np.stack(snapshots)


def _contents(path: Path) -> dict:
    """Every dataset's values and every attribute of an HDF5 file, by name (for 'identical' checks)."""
    items = {}

    def attributes(name, obj):
        for key, value in obj.attrs.items():
            items[f"{name}@{key}"] = value

    def visit(name, obj):
        attributes(name, obj)
        if isinstance(obj, h5py.Dataset):
            items[name] = obj[()]

    with h5py.File(path, "r") as handle:
        attributes("/", handle)
        handle.visititems(visit)
    return items


def _assert_same_files(actual: list[Path], expected: list[Path]):
    assert [p.name for p in actual] == [p.name for p in expected]
    for a, b in zip(actual, expected):
        left, right = _contents(a), _contents(b)
        assert sorted(left) == sorted(right), f"{a} and {b} hold different objects"
        for key in left:
            assert np.array_equal(np.asarray(left[key]), np.asarray(right[key])), f"{a.name}: {key} differs"


def _dataset_files(directory: Path) -> list[Path]:
    return [f for split in SPLITS for f in split_files(directory, split)]


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    # a Python exception other than SystemExit would mean a traceback for the user
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


# -- 1. round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("system, channels", [("kolmogorov", ["vorticity"]), ("qg", ["pv_upper", "pv_lower"])])
def test_round_trip(tmp_path, system, channels):
    plan = _plan(system)
    files = generate(plan, tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        f"data/{split}/{split}_shard00000-of-00001.hdf5" for split in SPLITS]
    assert list(tmp_path.glob("data/*/.*")) == []  # no partial files left
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert {key: manifest[key] for key in plan.manifest()} == json.loads(json.dumps(plan.manifest()))
    assert plan.split_ranges == {"train": (0, 3), "valid": (3, 5), "test": (5, 6)}

    for split, path in zip(SPLITS, files):
        low, high = plan.split_ranges[split]
        count = high - low
        data = read_trajectories(path)
        assert data.shape == (count, plan.length, len(channels), SAVED, SAVED)
        assert data.dtype == np.float32
        assert np.all(np.isfinite(data))

        with h5py.File(path, "r") as handle:
            assert handle.attrs["n_trajectories"] == count
            for index, channel in enumerate(channels):
                disk = handle["t0_fields"][channel]
                assert disk.shape == (count, plan.length, SAVED, SAVED) and disk.dtype == np.float32
                # The Well's (x, y) on disk is the transpose of emu's (y, x)
                assert np.array_equal(disk[()], np.swapaxes(data[:, :, index], -1, -2))
            first = handle["t0_fields"][channels[0]][()]
            assert not np.array_equal(first, data[:, :, 0])  # the fields are not symmetric: the check means something
            np.testing.assert_allclose(handle["dimensions/time"][()],
                                       np.arange(plan.length) * plan.interval * plan.config.dt, rtol=1e-6, atol=0)

            group = handle["emu"]
            assert config_from_dict(json.loads(group.attrs["config"])) == plan.config
            assert GenerationPlan.from_manifest(json.loads(group.attrs["plan"])) == plan
            assert group.attrs["seed"] == plan.seed and group.attrs["split"] == split
            assert group.attrs["steps_per_snapshot"] == plan.interval
            assert json.loads(group.attrs["channels"]) == channels
            assert group.attrs["completed"] == count
            assert np.array_equal(group["trajectory_ids"][()], np.arange(low, high))
            assert group["trajectory_seeds"][()].tolist() == [trajectory_seed(plan.seed, i) for i in range(low, high)]
            stored = {key: group.attrs[key] for key in group.attrs if key.startswith("train_")}

        # the first and last trajectory of the file, every snapshot, against a step-by-step computation
        for trajectory_id in (low, high - 1):
            expected = _independent_trajectory(plan, trajectory_id)
            actual = data[trajectory_id - low].astype(np.float64)
            scale = np.abs(expected).max(axis=(0, 2, 3), keepdims=True)
            assert np.all(np.abs(actual - expected) <= 1e-6 * scale), f"trajectory {trajectory_id} differs"

        if split == "train":
            values = data.astype(np.float64)
            mean, std = values.mean(axis=(0, 1, 3, 4)), values.std(axis=(0, 1, 3, 4))
            assert np.all(std > 0)
            assert stored["train_count"] == count * plan.length * SAVED * SAVED
            np.testing.assert_allclose(stored["train_std"], std, rtol=1e-6)
            np.testing.assert_allclose(stored["train_mean"], mean, rtol=1e-6, atol=1e-6 * std.max())
            combined_mean, combined_std, combined_channels = dataset_statistics(tmp_path)
            assert combined_channels == channels
            assert np.array_equal(combined_mean, stored["train_mean"])
            assert np.array_equal(combined_std, stored["train_std"])
        else:  # only the training split contributes statistics
            assert stored["train_count"] == 0 and "train_mean" not in stored


def test_trajectories_do_not_depend_on_batching(tmp_path):
    """A trajectory is a function of (seed, id) alone: batch size changes nothing in the saved values."""
    one = generate(_plan(batch=1), tmp_path / "one")
    many = generate(_plan(batch=4), tmp_path / "many")
    for a, b in zip(one, many):
        assert np.array_equal(read_trajectories(a), read_trajectories(b))


# -- 2. resume -------------------------------------------------------------------------------------


def test_resume_after_interrupt_gives_the_uninterrupted_dataset(tmp_path, monkeypatch):
    plan = _plan(trajectories=10, split=(0.6, 0.2, 0.2), batch=2)  # train 6 (3 batches), valid 2, test 2
    reference = generate(plan, tmp_path / "reference")
    out = tmp_path / "resumed"
    original = emu.generate.generate_batch
    calls, at_interrupt = [], {}

    def interrupted(equation, stepper, plan_, ids):
        calls.append(ids.tolist())
        if len(calls) == 3:
            at_interrupt["files"] = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
            raise KeyboardInterrupt
        return original(equation, stepper, plan_, ids)

    monkeypatch.setattr(emu.generate, "generate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(plan, out)
    assert calls == [[0, 1], [2, 3], [4, 5]]
    partial = out / "data/train/.train_shard00000-of-00001.hdf5.partial"
    assert at_interrupt["files"] == sorted([MANIFEST, partial.relative_to(out).as_posix()])
    assert list(out.glob("data/*/*.hdf5")) == []  # nothing visible before it is complete
    with h5py.File(partial, "r") as handle:  # the two finished batches are saved and correct
        assert handle["emu"].attrs["completed"] == 4
    assert np.array_equal(read_trajectories(partial, slice(0, 4)), read_trajectories(reference[0], slice(0, 4)))

    calls.clear()
    monkeypatch.setattr(emu.generate, "generate_batch",
                        lambda *args: calls.append(args[3].tolist()) or original(*args))
    resumed = generate(plan, out)
    assert calls == [[4, 5], [6, 7], [8, 9]]  # only the unfinished work is redone
    assert not partial.exists()
    _assert_same_files(resumed, reference)


def _generate_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "emu.cli", "generate", "--system", "kolmogorov", "--backend", "numpy",
            "--grid", "32", "--downsample", str(SAVED), "--trajectories", "16", "--length", "3", "--interval", "2",
            "--spinup", "4", "--batch", "2", "--split", "0.5,0.25,0.25", "--seed", "3", "--out", str(out),
            "--no-progress"]


def _completed(partial: Path) -> int:
    """The `completed` counter of a file another process is writing, or -1 when it cannot be read now."""
    try:
        with h5py.File(partial, "r", locking=False) as handle:
            return int(handle["emu"].attrs["completed"])
    except Exception:  # noqa: BLE001 - mid-write, the file may be unreadable for a moment
        return -1


def test_resume_after_kill_gives_the_uninterrupted_dataset(tmp_path):
    # generate asks for reproducible (FFTW_ESTIMATE) plans itself, so three separate processes must
    # agree bit for bit even when the environment asks for MEASURE plans elsewhere.
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env["EMU_FFTW_PLANNER"] = "FFTW_MEASURE"
    reference_dir, out = tmp_path / "reference", tmp_path / "killed"
    reference = subprocess.Popen(_generate_command(reference_dir), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(_generate_command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    partial = out / "data/train/.train_shard00000-of-00001.hdf5.partial"
    try:
        deadline = time.monotonic() + 120
        while _completed(partial) < 1:
            assert victim.poll() is None, f"generate ended before it could be killed:\n{victim.communicate()[0]}"
            assert time.monotonic() < deadline, "no trajectory completed within 120 s"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert partial.exists() and list(out.glob("data/*/*.hdf5")) == []
    killed_at = _completed(partial)
    assert 1 <= killed_at < 8

    resumed = subprocess.run(_generate_command(out), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    try:
        output, _ = reference.communicate(timeout=300)
    finally:
        if reference.poll() is None:
            reference.kill()
    assert reference.returncode == 0, output
    assert list(out.glob("data/*/.*")) == []
    _assert_same_files(_dataset_files(out), _dataset_files(reference_dir))
    result = _cli("data", "validate", out)
    assert result.exit_code == 0 and "OK" in result.output, result.output


# -- 3. shards and merge ---------------------------------------------------------------------------


def test_shards_merged_equal_a_single_run(tmp_path, monkeypatch):
    # shards [0, 3), [3, 6), [6, 10) cut through train [0, 5) and valid [5, 8)
    plan = _plan(trajectories=10, split=(0.5, 0.3, 0.2), batch=2)
    single = generate(plan, tmp_path / "single")
    parent = tmp_path / "parent"
    written = [f for shard in range(3) for f in generate(plan, parent / "shards", shard=shard, num_shards=3)]
    assert sorted(f.name for f in written) == ["test_shard00002-of-00003.hdf5", "train_shard00000-of-00003.hdf5",
                                               "train_shard00001-of-00003.hdf5", "valid_shard00001-of-00003.hdf5",
                                               "valid_shard00002-of-00003.hdf5"]
    merged = merge_shards(parent / "shards", parent / "merged")
    result = _cli("data", "merge", parent / "shards", "--out", parent / "merged_cli")
    assert result.exit_code == 0 and "virtual" in result.output, result.output
    assert (parent / "merged_cli" / MANIFEST).read_text() == (parent / "shards" / MANIFEST).read_text()
    merged_cli = _dataset_files(parent / "merged_cli")

    def check(merged_files):
        assert [f.name for f in merged_files] == [f"{split}.hdf5" for split in SPLITS]
        for split, merged_file, single_file in zip(SPLITS, merged_files, single):
            low, high = plan.split_ranges[split]
            assert np.array_equal(read_trajectories(merged_file), read_trajectories(single_file))
            with h5py.File(merged_file, "r") as handle:
                assert all(handle["t0_fields"][c].is_virtual for c in handle["t0_fields"])
                assert handle.attrs["n_trajectories"] == high - low
                assert handle["emu"].attrs["completed"] == high - low
                assert np.array_equal(handle["emu/trajectory_ids"][()], np.arange(low, high))
                with h5py.File(single_file, "r") as reference:
                    assert np.array_equal(handle["emu/trajectory_seeds"][()], reference["emu/trajectory_seeds"][()])
                    if split == "train":
                        for key in ("train_count", "train_sum", "train_sum_of_squares", "train_mean", "train_std"):
                            np.testing.assert_allclose(handle["emu"].attrs[key], reference["emu"].attrs[key],
                                                       rtol=1e-12, atol=1e-12 * reference["emu"].attrs["train_std"].max())

    check(merged)
    check(merged_cli)
    expected_mean, expected_std, _ = dataset_statistics(tmp_path / "single")
    for folder in ("shards", "merged"):
        mean, std, _ = dataset_statistics(parent / folder)
        np.testing.assert_allclose(std, expected_std, rtol=1e-12)
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-12, atol=1e-12 * expected_std.max())
    assert "[virtual: merged shards]" in _cli("data", "info", parent / "merged").output
    assert _cli("data", "validate", parent / "merged").exit_code == 0

    # The shard and merged folders move together: the virtual datasets' relative paths still resolve.
    shutil.move(parent, tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    check(_dataset_files(tmp_path / "moved" / "merged"))
    # ...while a merged file moved away from its shards no longer reaches them (so the check above is real)
    lonely = elsewhere / "a" / "b"
    lonely.mkdir(parents=True)
    shutil.copy(tmp_path / "moved/merged/data/train/train.hdf5", lonely)
    try:
        values = read_trajectories(lonely / "train.hdf5")
    except (OSError, RuntimeError):
        values = None
    assert values is None or not np.array_equal(values, read_trajectories(single[0]))


# -- 4. refusing a different dataset in the same folder --------------------------------------------


@pytest.mark.parametrize("field, change", [
    ("trajectories", dict(trajectories=7)),
    ("seed", dict(seed=8)),
    ("length", dict(length=5)),
    ("batch", dict(batch=3)),
    ("config.viscosity", "viscosity"),
])
def test_other_parameters_into_the_same_folder_are_refused(tmp_path, monkeypatch, field, change):
    base = _plan()
    files = generate(base, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    contents = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    if change == "viscosity":
        other = dataclasses.replace(base, config=base.config.replace(viscosity=2e-3))
    else:
        other = dataclasses.replace(base, **change)
    with pytest.raises(ConfigError) as error:
        generate(other, tmp_path)
    message = str(error.value)
    assert f"{field}: folder has" in message and message.count("folder has") == 1, message
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing touched

    # the same parameters (a fresh but equal plan) are accepted: resuming a finished dataset does no work
    monkeypatch.setattr(emu.generate, "generate_batch", lambda *args: pytest.fail("a finished dataset was redone"))
    assert generate(_plan(), tmp_path) == files
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == contents
    assert {p: p.stat().st_mtime_ns for p in files} == {p: before[p] for p in files}  # data files not rewritten


def test_another_shard_count_into_the_same_folder_is_refused(tmp_path):
    plan = _plan()
    generate(plan, tmp_path, shard=0, num_shards=2)
    with pytest.raises(ConfigError, match="num_shards: folder has 2, asked 3"):
        generate(plan, tmp_path, shard=0, num_shards=3)  # its trajectory ranges would overlap shard 0's
    assert [f.name for f in _dataset_files(tmp_path)] == ["train_shard00000-of-00002.hdf5"]


def test_cli_takes_the_shard_from_a_launcher(tmp_path):
    args = ["generate", "--grid", GRID, "--downsample", SAVED, "--trajectories", 4, "--length", 2,
            "--spinup", "0.3", "--split", "1,0,0", "--out", tmp_path, "--no-progress"]
    for rank in (1, 0):
        result = CliRunner().invoke(main, [str(a) for a in args], env={"RANK": str(rank), "WORLD_SIZE": "2"})
        assert result.exit_code == 0, result.output
    files = _dataset_files(tmp_path)
    assert [f.name for f in files] == [f"train_shard0000{i}-of-00002.hdf5" for i in (0, 1)]
    plan = GenerationPlan.from_manifest(json.loads((tmp_path / MANIFEST).read_text()))
    single = generate(plan, tmp_path / "single")
    assert np.array_equal(np.concatenate([read_trajectories(f) for f in files]), read_trajectories(single[0]))


def test_cli_refuses_other_parameters_and_resumes_the_same(tmp_path):
    args = ["generate", "--grid", GRID, "--downsample", SAVED, "--trajectories", 4, "--length", 3,
            "--spinup", "0.3", "--out", tmp_path, "--no-progress"]
    first = _cli(*args)
    assert first.exit_code == 0, first.output
    for extra, field in ((["--seed", 1], "seed: folder has 0, asked 1"),
                         (["--set", "viscosity=0.002"], "config.viscosity: folder has 0.001, asked 0.002")):
        result = _cli(*args, *extra)
        assert result.exit_code != 0 and field in result.output, result.output
    again = _cli(*args)
    assert again.exit_code == 0 and again.output == first.output


# -- 6. the command line ---------------------------------------------------------------------------


def test_cli_generate_info_validate(tmp_path):
    out = tmp_path / "data"
    result = _cli("generate", "--system", "kolmogorov", "--backend", "numpy", "--trajectories", 6, "--length", 5,
                  "--grid", 64, "--downsample", 32, "--out", out, "--spinup", "0.1", "--no-progress")
    assert result.exit_code == 0, result.output
    files = _dataset_files(out)
    assert [f.name for f in files] == ["train_shard00000-of-00001.hdf5", "valid_shard00000-of-00001.hdf5",
                                       "test_shard00000-of-00001.hdf5"]
    # 6 x (0.9, 0.05, 0.05) -> 4, 1, 1: every split with a fraction > 0 gets one (5, 0, 1 before)
    assert read_trajectories(files[0]).shape == (4, 5, 1, 32, 32)
    assert read_trajectories(files[1]).shape == (1, 5, 1, 32, 32)
    assert read_trajectories(files[2]).shape == (1, 5, 1, 32, 32)
    assert "6 trajectories x 5 snapshots" in result.output and str(files[0]) in result.output

    info = _cli("data", "info", out)
    assert info.exit_code == 0, info.output
    assert "4/4 trajectories x 5 snapshots" in info.output and "1/1 trajectories" in info.output
    assert "channels: vorticity" in info.output and "train statistics vorticity: mean" in info.output
    validate = _cli("data", "validate", out)
    assert validate.exit_code == 0 and "OK" in validate.output, validate.output

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    with h5py.File(broken / "data/test/test_shard00000-of-00001.hdf5", "r+") as handle:
        handle["t0_fields/vorticity"][0, 2, 3, 4] = np.nan
    result = _cli("data", "validate", broken)
    assert result.exit_code == 1 and "NaN" in result.output and "test_shard00000" in result.output, result.output
    assert _cli("data", "validate", out).exit_code == 0  # the original is untouched


@pytest.mark.parametrize("args, field", [
    (["--split", "0.5,0.5"], "split"),
    (["--split", "a,b,c"], "split"),
    (["--trajectories", "0"], "trajectories"),
    (["--shard", "3", "--num-shards", "2"], "shard"),
    (["--spinup", "abc"], "spinup"),
    (["--downsample", "128"], "downsample"),
    (["--length", "0"], "length"),
])
def test_cli_generate_rejects_bad_input(tmp_path, args, field):
    result = _cli("generate", "--grid", 64, "--trajectories", 4, "--length", 2, "--spinup", "0.1",
                  "--out", tmp_path / "data", "--no-progress", *args)
    assert result.exit_code != 0
    assert re.search(rf"\b{field} must be", result.output), result.output
    assert not list(tmp_path.glob("data/data/*/*")), "no data is written for a bad command"
