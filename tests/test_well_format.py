"""emu datasets open unchanged in The Well's own loader (`the_well.data.WellDataset`)."""

import numpy as np
import pytest
import torch

from emu.data.loaders import Normalizer, TrajectoryWindows
from emu.data.well import read_trajectories, split_files
from emu.generate import GenerationPlan, generate
from emu.systems import make_config

well_data = pytest.importorskip("the_well.data", reason="the-well is not installed (pip install the-well)")


def _dataset(tmp_path, system, num_shards=1, split=(0.5, 0.5, 0.0)):
    plan = GenerationPlan(make_config(system, grid_size=16), trajectories=4, length=5, interval=2,
                          spinup_steps=20, downsample=16, batch=2, split=split, seed=3)
    for shard in range(num_shards):
        generate(plan, tmp_path, shard=shard, num_shards=num_shards)
    return plan


@pytest.mark.parametrize("system", ["kolmogorov", "qg"])
def test_welldataset_returns_the_stored_windows(tmp_path, system):
    _dataset(tmp_path, system)
    dataset = well_data.WellDataset(path=str(tmp_path), well_split_name="train", n_steps_input=2,
                                    n_steps_output=1, use_normalization=False)
    stored = read_trajectories(split_files(tmp_path, "train")[0])  # (trajectory, time, channel, y, x)
    windows_per_trajectory = stored.shape[1] - 3 + 1
    assert len(dataset) == stored.shape[0] * windows_per_trajectory
    for index in range(len(dataset)):
        sample = dataset[index]
        trajectory, start = divmod(index, windows_per_trajectory)
        got = torch.cat([sample["input_fields"], sample["output_fields"]]).numpy()  # (time, x, y, channel)
        expected = np.moveaxis(np.swapaxes(stored[trajectory, start:start + 3], -1, -2), 1, -1)
        np.testing.assert_array_equal(got, expected)
    assert sample["boundary_conditions"].tolist() == [[2.0, 2.0], [2.0, 2.0]]  # periodic in x and y
    assert torch.allclose(sample["input_time_grid"][1:] - sample["input_time_grid"][:-1],
                          torch.tensor(2 * make_config(system, grid_size=16).dt, dtype=torch.float32))


def test_welldataset_reads_shard_files_and_zscore_matches_emus_normalizer(tmp_path):
    from the_well.data.normalization import ZScoreNormalization

    _dataset(tmp_path, "kolmogorov", num_shards=2, split=(0.75, 0.25, 0.0))  # train ids 0-2 over both shards
    assert len(split_files(tmp_path, "train")) == 2
    dataset = well_data.WellDataset(path=str(tmp_path), well_split_name="train", n_steps_input=1, n_steps_output=1,
                                    use_normalization=True, normalization_type=ZScoreNormalization)
    ours = TrajectoryWindows(tmp_path, "train", unroll=1, normalizer=Normalizer.from_dataset(tmp_path))
    assert len(dataset) == len(ours)
    for index in range(len(ours)):
        theirs = torch.cat([dataset[index]["input_fields"], dataset[index]["output_fields"]])  # (time, x, y, c)
        torch.testing.assert_close(theirs.permute(0, 3, 2, 1), ours[index], rtol=1e-5, atol=1e-5)


# WellDataset reads every sample of the train split of one folder and compares it with emu's loader; run
# in a subprocess because reading merged virtual datasets through file objects used to segfault.
_WELL_READER = r"""
import json, sys
import numpy as np, torch
from the_well.data import WellDataset
from emu.data.loaders import TrajectoryWindows

folder, reference = sys.argv[1], sys.argv[2]
ours = TrajectoryWindows(reference, "train", unroll=1)  # emu's reader on the shard folder
ours_here = TrajectoryWindows(folder, "train", unroll=1)  # ... and on the folder under test
expected = np.stack([ours[i].numpy() for i in range(len(ours))])
report = {"emu_equal": bool(np.array_equal(np.stack([ours_here[i].numpy() for i in range(len(ours_here))]), expected))}
try:
    dataset = WellDataset(path=folder, well_split_name="train", n_steps_input=1, n_steps_output=1,
                          use_normalization=False)
    samples = [torch.cat([dataset[i]["input_fields"], dataset[i]["output_fields"]]) for i in range(len(dataset))]
    got = torch.stack(samples).permute(0, 1, 4, 3, 2).numpy()  # (time, x, y, channel) -> (time, channel, y, x)
    report.update(error=None, equal=bool(got.shape == expected.shape and np.array_equal(got, expected)),
                  all_nan=bool(np.isnan(got).all()))
except Exception as error:  # noqa: BLE001 - the report says what it was
    report.update(error=f"{type(error).__name__}: {error}", equal=False, all_nan=False)
print(json.dumps(report))
"""


@pytest.mark.parametrize("layout", ["shards", "merged --copy", "merged (virtual)"])
def test_welldataset_on_shards_and_merged_folders(tmp_path, layout):
    import json
    import subprocess
    import sys

    from emu.data.well import merge_shards

    shards = tmp_path / "shards"
    _dataset(shards, "kolmogorov", num_shards=2, split=(1.0, 0.0, 0.0))  # the train split spans both shards
    folder = shards
    if layout != "shards":
        folder = tmp_path / "merged"
        if layout == "merged --copy":
            merge_shards(shards, folder, copy=True)
        else:
            merge_shards(shards, folder)
    done = subprocess.run([sys.executable, "-c", _WELL_READER, str(folder), str(shards)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"the reader died (signal {-done.returncode})\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["emu_equal"], report  # emu's own loader reads every layout
    if layout == "merged (virtual)":
        # HDF5 cannot follow virtual datasets through file objects: a loud error (or NaN), never other values
        assert report["error"] is not None or report["all_nan"], report
        assert not report["equal"]
    else:
        assert report["error"] is None and report["equal"], report
