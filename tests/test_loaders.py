"""torch loaders over emu datasets: windows and snapshots equal the stored data, normalisation, argument
checks, DataLoader workers, and the Normalizer's checkpoint round trip.

One tiny two-channel QG dataset (16^2 solver, 8^2 saved) serves the module: two channels of very
different scales make a wrong channel axis in the normalisation visible.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from emu.data.loaders import Normalizer, Snapshots, TrajectoryWindows
from emu.data.well import dataset_statistics, read_trajectories, split_files
from emu.generate import GenerationPlan, generate
from emu.systems import make_config

STEPS, SAVED = 6, 8


def _plan() -> GenerationPlan:
    # train 4 trajectories, valid 2, test 2; 6 snapshots each
    return GenerationPlan(make_config("qg", grid_size=16), trajectories=8, length=STEPS, interval=2, spinup_steps=20,
                          downsample=SAVED, split=(0.5, 0.25, 0.25), seed=11, batch=4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qg_dataset")
    generate(_plan(), directory)
    return directory


@pytest.fixture(scope="module")
def train(dataset) -> np.ndarray:
    """The stored training split in emu layout (trajectory, time, channel, y, x)."""
    (path,) = split_files(dataset, "train")
    return read_trajectories(path)


@pytest.fixture(scope="module")
def normalizer(dataset) -> Normalizer:
    return Normalizer.from_dataset(dataset)


def _stack(dataset_) -> torch.Tensor:
    return torch.stack([dataset_[i] for i in range(len(dataset_))])


def test_windows_equal_the_stored_data(dataset, train):
    assert train.shape == (4, STEPS, 2, SAVED, SAVED)
    for unroll, stride in ((1, 1), (2, 1), (2, 2), (5, 1), (1, 5)):
        windows = TrajectoryWindows(dataset, split="train", unroll=unroll, stride=stride)
        starts = list(range(0, STEPS - unroll, stride))
        assert len(windows) == 4 * len(starts)
        if (STEPS - unroll) % stride == 0:
            assert len(windows) == 4 * (STEPS - unroll) // stride
        for item in range(len(windows)):
            trajectory, start = divmod(item, len(starts))
            window = windows[item]
            assert window.dtype == torch.float32 and window.shape == (unroll + 1, 2, SAVED, SAVED)
            assert torch.equal(window, torch.from_numpy(train[trajectory, starts[start]:starts[start] + unroll + 1]))
    valid = TrajectoryWindows(dataset, split="valid", unroll=3)
    (valid_path,) = split_files(dataset, "valid")
    assert len(valid) == 2 * (STEPS - 3)
    assert torch.equal(valid[len(valid) - 1], torch.from_numpy(read_trajectories(valid_path)[1, STEPS - 4:]))


def test_windows_are_normalised_with_the_dataset_statistics(dataset, train, normalizer):
    mean, std, channels = dataset_statistics(dataset)
    assert normalizer.channels == channels == ["pv_upper", "pv_lower"]
    assert torch.allclose(normalizer.mean.double(), torch.from_numpy(mean), rtol=1e-6)
    assert torch.allclose(normalizer.std.double(), torch.from_numpy(std), rtol=1e-6)
    assert std[0] / std[1] > 10  # channels of different scales: a wrong axis would show below

    # unroll 2, stride 3 on 6 snapshots: windows [0, 3) and [3, 6) hold every snapshot exactly once
    windows = TrajectoryWindows(dataset, split="train", unroll=2, stride=3, normalizer=normalizer)
    assert len(windows) == 4 * 2
    values = _stack(windows).double()  # (window, time, channel, y, x)
    per_channel = values.transpose(0, 2).reshape(2, -1)
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(per_channel.std(dim=1, unbiased=False), torch.ones(2, dtype=torch.float64), rtol=1e-4)

    raw = TrajectoryWindows(dataset, split="train", unroll=2, stride=3)
    for item in range(len(windows)):
        physical = raw[item]
        assert torch.equal(windows[item], normalizer.normalise(physical))
        restored = normalizer.denormalise(windows[item])
        scale = physical.abs().amax(dim=(0, 2, 3), keepdim=True)
        assert torch.all((restored - physical).abs() <= 1e-5 * scale)


def test_snapshots(dataset, train, normalizer):
    first = Snapshots(dataset, split="train", snapshots="first")
    assert len(first) == 4
    assert torch.equal(_stack(first), torch.from_numpy(train[:, 0]))
    every = Snapshots(dataset, split="train", snapshots="all")
    assert len(every) == 4 * STEPS
    assert torch.equal(_stack(every), torch.from_numpy(train.reshape(4 * STEPS, 2, SAVED, SAVED)))
    third = Snapshots(dataset, split="train", snapshots=3)
    assert len(third) == 4 and torch.equal(_stack(third), torch.from_numpy(train[:, 3]))
    assert third[0].shape == (2, SAVED, SAVED) and third[0].dtype == torch.float32

    normalised = _stack(Snapshots(dataset, split="train", snapshots="all", normalizer=normalizer)).double()
    per_channel = normalised.transpose(0, 1).reshape(2, -1)
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(per_channel.std(dim=1, unbiased=False), torch.ones(2, dtype=torch.float64), rtol=1e-4)


@pytest.mark.parametrize("make, name", [
    (lambda d: TrajectoryWindows(d, unroll=0), "unroll"),
    (lambda d: TrajectoryWindows(d, unroll=STEPS), "unroll"),
    (lambda d: TrajectoryWindows(d, unroll=1.5), "unroll"),
    (lambda d: TrajectoryWindows(d, unroll=1, stride=0), "stride"),
    (lambda d: TrajectoryWindows(d, split="training"), "split"),
    (lambda d: Snapshots(d, snapshots="last"), "snapshots"),
    (lambda d: Snapshots(d, snapshots=STEPS), "snapshots"),
    (lambda d: Snapshots(d, snapshots=-1), "snapshots"),
    (lambda d: Snapshots(d, snapshots=True), "snapshots"),
    (lambda d: Snapshots(d, split="validation"), "split"),
    (lambda d: Snapshots(d, normalizer=Normalizer([0.0], [1.0], ["vorticity"])), "normalizer"),
    (lambda d: Normalizer([0.0], [1.0, 2.0], ["a"]), "std"),
    (lambda d: Normalizer([0.0, 1.0], [1.0, 0.0], ["a", "b"]), "std"),
])
def test_bad_arguments_are_refused(dataset, make, name):
    with pytest.raises(ValueError, match=name):
        make(dataset)


@pytest.mark.parametrize("make", [
    lambda d, n: TrajectoryWindows(d, split="train", unroll=3, normalizer=n),
    lambda d, n: Snapshots(d, split="train", snapshots="all", normalizer=n),
])
def test_dataloader_workers_give_the_same_items(dataset, normalizer, make):
    items = make(dataset, normalizer)
    items[0]  # the parent holds open HDF5 handles: forked workers must open their own
    serial = torch.cat(list(DataLoader(items, batch_size=5, shuffle=False, num_workers=0)))
    assert serial.shape[0] == len(items)
    parallel = torch.cat(list(DataLoader(items, batch_size=5, shuffle=False, num_workers=2)))
    assert torch.equal(parallel, serial)
    shuffled = torch.cat(list(DataLoader(items, batch_size=5, shuffle=True, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))))
    key = lambda batch: torch.sort(batch.double().flatten(1).sum(dim=1)).values  # noqa: E731
    assert torch.equal(key(shuffled), key(serial))


def test_sharded_dataset_reads_like_a_single_one(tmp_path, dataset):
    for shard in range(3):  # shards [0, 2), [2, 5), [5, 8): the training split spans two files
        generate(_plan(), tmp_path, shard=shard, num_shards=3)
    assert len(split_files(tmp_path, "train")) == 2
    for split in ("train", "valid", "test"):
        single = TrajectoryWindows(dataset, split=split, unroll=2)
        sharded = TrajectoryWindows(tmp_path, split=split, unroll=2)
        assert torch.equal(_stack(sharded), _stack(single))
    a, b = Normalizer.from_dataset(tmp_path), Normalizer.from_dataset(dataset)
    assert torch.allclose(a.mean, b.mean, rtol=1e-6, atol=1e-6 * float(b.std.max())) and torch.allclose(a.std, b.std)


def test_normalizer_state_dict_round_trip(tmp_path, normalizer):
    path = tmp_path / "normalizer.pt"
    torch.save({"normalizer": normalizer.state_dict()}, path)
    state = torch.load(path, weights_only=True)["normalizer"]
    restored = Normalizer.from_state_dict(state)
    assert restored.channels == normalizer.channels
    assert torch.equal(restored.mean, normalizer.mean) and torch.equal(restored.std, normalizer.std)
    x = torch.randn(3, 2, SAVED, SAVED, dtype=torch.float64) * normalizer.std.double().reshape(2, 1, 1)
    assert torch.equal(restored.normalise(x), normalizer.normalise(x))
    assert restored.normalise(x).dtype == torch.float64  # follows the input's precision

    buffer = io.BytesIO()  # a plain dict of lists also loads (written without tensors)
    torch.save({"mean": normalizer.mean.tolist(), "std": normalizer.std.tolist(), "channels": normalizer.channels}, buffer)
    buffer.seek(0)
    again = Normalizer.from_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(again.mean, normalizer.mean) and torch.equal(again.std, normalizer.std)
    # a saved state is a copy: changing the live normalizer later does not change it
    state = normalizer.state_dict()
    state["mean"] += 1
    assert not torch.equal(state["mean"], normalizer.mean)
