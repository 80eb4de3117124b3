"""torch Datasets over emu's HDF5 datasets: lazy, normalised, safe with DataLoader workers.

    normalizer = Normalizer.from_dataset("data/")          # per-channel training-split statistics
    windows = TrajectoryWindows("data/", split="train", unroll=3, normalizer=normalizer)
    frames = Snapshots("data/", split="train", snapshots="first", normalizer=normalizer)
    triplets = FrameGroups("data/", split="train", offsets=(-10, -1, 0), normalizer=normalizer)  # SNS
    loader = torch.utils.data.DataLoader(windows, batch_size=32, shuffle=True, num_workers=4)

Items are float32 tensors in emu's layout: a window is (unroll + 1, channel, y, x), a snapshot is
(channel, y, x), a frame group (len(offsets), channel, y, x). Files are opened on first use in each process (never shared across a fork), and only
the requested slices are read, so memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from emu.data.well import EMU_GROUP, SPLITS, dataset_statistics, open_dataset_file, split_files


class Normalizer:
    """x -> (x - mean) / std per channel; the channel axis is -3 (..., channel, y, x).

    Every model saves `state_dict()` with its checkpoint, so its inputs and outputs can be mapped
    back to physical units with `denormalise` without the dataset at hand.
    """

    def __init__(self, mean, std, channels: list[str]):
        self.mean = torch.as_tensor(np.asarray(mean, dtype=np.float64), dtype=torch.float32)
        self.std = torch.as_tensor(np.asarray(std, dtype=np.float64), dtype=torch.float32)
        self.channels = list(channels)
        if self.mean.shape != (len(self.channels),) or self.std.shape != (len(self.channels),):
            raise ValueError(f"mean and std must have one entry per channel {self.channels}")
        if not torch.all(self.std > 0):
            raise ValueError(f"std must be > 0 for every channel, got {self.std.tolist()}")

    @classmethod
    def from_dataset(cls, directory) -> "Normalizer":
        """Statistics of the training split of a dataset folder (combined over its shard files)."""
        mean, std, channels = dataset_statistics(directory)
        return cls(mean, std, channels)

    def _shaped(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._shaped(self.mean, x)) / self._shaped(self.std, x)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._shaped(self.std, x) + self._shaped(self.mean, x)

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "std": self.std.clone(), "channels": list(self.channels)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalizer":
        return cls(state["mean"].numpy() if torch.is_tensor(state["mean"]) else state["mean"],
                   state["std"].numpy() if torch.is_tensor(state["std"]) else state["std"], state["channels"])


class _H5Files(Dataset):
    """Shared machinery: the split's files, their shapes, and per-process lazy handles."""

    def __init__(self, directory, split: str, normalizer: Normalizer | None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.directory = Path(directory)
        self.files = split_files(self.directory, split)
        if not self.files:
            raise FileNotFoundError(f"{directory}: no finished files under data/{split}/ (run `emu generate`)")
        self.normalizer = normalizer
        self.shapes = []
        self.channels = None
        for path in self.files:
            with open_dataset_file(path) as handle:
                channels = json.loads(handle[EMU_GROUP].attrs["channels"])
                if self.channels is None:
                    self.channels = channels
                elif channels != self.channels:
                    raise ValueError(f"{path}: channels {channels} differ from {self.channels}")
                self.shapes.append(handle["t0_fields"][channels[0]].shape)  # (trajectories, steps, x, y)
        if normalizer is not None and normalizer.channels != self.channels:
            raise ValueError(f"normalizer channels {normalizer.channels} differ from the dataset's {self.channels}")
        self._handles: dict[int, tuple[h5py.File, list[h5py.Dataset]]] = {}
        self._pid = None

    def _fields(self, index: int) -> list[h5py.Dataset]:
        """The channels' datasets of file `index`, opened once per process. They stay open: each open
        h5py dataset has its own chunk cache, and reopening them per item decompressed a whole
        trajectory chunk for every window (measured 15x slower at 64^2 x 20 snapshots)."""
        if self._pid != os.getpid():  # a forked worker: never reuse the parent's HDF5 handles
            self._handles, self._pid = {}, os.getpid()
        if index not in self._handles:
            handle = open_dataset_file(self.files[index])
            self._handles[index] = (handle, [handle["t0_fields"][channel] for channel in self.channels])
        return self._handles[index][1]

    def _read(self, file_index: int, trajectory: int, steps) -> torch.Tensor:
        arrays = [dataset[trajectory, steps] for dataset in self._fields(file_index)]
        fields = torch.from_numpy(np.ascontiguousarray(np.swapaxes(np.stack(arrays, axis=-3), -1, -2)))
        return self.normalizer.normalise(fields) if self.normalizer is not None else fields

    def __getstate__(self):  # DataLoader workers (spawn) get no open handles
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state


class TrajectoryWindows(_H5Files):
    """Windows of `unroll + 1` consecutive snapshots, (unroll + 1, channel, y, x), for multistep training.

    Args:
        directory: a dataset folder made by `emu generate` (or `data merge`).
        split: "train", "valid" or "test".
        unroll: steps the emulator is unrolled; windows hold unroll + 1 snapshots.
        normalizer: applied to every item (None returns physical units).
        stride: distance between the starts of consecutive windows of one trajectory.
    """

    def __init__(self, directory, split: str = "train", unroll: int = 1, normalizer: Normalizer | None = None,
                 stride: int = 1):
        super().__init__(directory, split, normalizer)
        if not isinstance(unroll, int) or unroll < 1:
            raise ValueError(f"unroll must be an integer >= 1, got {unroll!r}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
        steps = self.shapes[0][1]
        if unroll + 1 > steps:
            raise ValueError(f"unroll must be at most {steps - 1}: trajectories hold {steps} snapshots, got {unroll}")
        self.unroll = unroll
        starts = np.arange(0, steps - unroll, stride)
        self.index = [(f, t, int(s)) for f, shape in enumerate(self.shapes) for t in range(shape[0]) for s in starts]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> torch.Tensor:
        file_index, trajectory, start = self.index[item]
        return self._read(file_index, trajectory, slice(start, start + self.unroll + 1))


class Snapshots(_H5Files):
    """Single snapshots (channel, y, x) for diffusion models.

    Args:
        snapshots: "first" (the first snapshot of each trajectory, as the Thermalizer paper), "all",
            or an integer k (snapshot k of each trajectory).
        stride: with "all", every stride-th snapshot (0, stride, 2 stride, ...): neighbouring
            snapshots are nearly the same state, so a stride decorrelates diffusion training samples.
    """

    def __init__(self, directory, split: str = "train", snapshots="first", normalizer: Normalizer | None = None,
                 stride: int = 1):
        super().__init__(directory, split, normalizer)
        steps = self.shapes[0][1]
        if not (isinstance(stride, int) and stride >= 1):
            raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
        if snapshots == "first":
            chosen = [0]
        elif snapshots == "all":
            chosen = list(range(0, steps, stride))
        elif isinstance(snapshots, int) and not isinstance(snapshots, bool) and 0 <= snapshots < steps:
            chosen = [snapshots]
        else:
            raise ValueError(f"snapshots must be 'first', 'all' or an integer in [0, {steps}), got {snapshots!r}")
        self.index = [(f, t, s) for f, shape in enumerate(self.shapes) for t in range(shape[0]) for s in chosen]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> torch.Tensor:
        file_index, trajectory, step = self.index[item]
        return self._read(file_index, trajectory, step)


class FrameGroups(_H5Files):
    """Groups of snapshots at fixed offsets from a current one, (len(offsets), channel, y, x).

    SNS trains on (anchor, previous, current) = snapshots (t - lag, t - 1, t), offsets (-lag, -1, 0);
    without an anchor on (t - 1, t), offsets (-1, 0). The groups are read from the same trajectory
    files as every other loader (no separate pair files).

    Args:
        offsets: strictly increasing integers ending at 0, relative to the current snapshot t.
        stride: distance between the current snapshots of consecutive groups of one trajectory
            (decorrelated samples, as `Snapshots`' stride); t runs over -offsets[0], -offsets[0] + stride, ...
    """

    def __init__(self, directory, split: str = "train", offsets=(-1, 0), normalizer: Normalizer | None = None,
                 stride: int = 1):
        super().__init__(directory, split, normalizer)
        offsets = tuple(offsets)
        if (not offsets or any(not isinstance(o, int) or isinstance(o, bool) for o in offsets) or offsets[-1] != 0
                or any(b <= a for a, b in zip(offsets, offsets[1:]))):
            raise ValueError(f"offsets must be strictly increasing integers ending at 0, e.g. (-10, -1, 0); got {offsets!r}")
        if not (isinstance(stride, int) and stride >= 1):
            raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
        steps = self.shapes[0][1]
        reach = -offsets[0]
        if reach >= steps:
            raise ValueError(f"offsets reach {reach} snapshots back, but trajectories hold {steps} snapshots: "
                             f"the earliest offset must be > -{steps}")
        self.offsets = offsets
        currents = range(reach, steps, stride)
        self.index = [(f, t, s) for f, shape in enumerate(self.shapes) for t in range(shape[0]) for s in currents]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> torch.Tensor:
        file_index, trajectory, current = self.index[item]
        # One slice read over the group's span, then the wanted frames: h5py reads a contiguous
        # slice of a chunked dataset faster than a point list.
        start = current + self.offsets[0]
        span = self._read(file_index, trajectory, slice(start, current + 1))
        return span[[offset - self.offsets[0] for offset in self.offsets]]
