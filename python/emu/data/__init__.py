"""HDF5 files: run files of `emu simulate` (`emu.data.hdf5`) and training datasets of `emu generate` in
The Well's format (`emu.data.well`), with torch loaders over them (`emu.data.loaders`, imports torch)."""

from emu.data.hdf5 import RestartState, SnapshotWriter, load_restart, read_config, read_run
from emu.data.well import dataset_statistics, merge_shards, read_trajectories, split_files

__all__ = ["RestartState", "SnapshotWriter", "load_restart", "read_config", "read_run", "dataset_statistics",
           "merge_shards", "read_trajectories", "split_files"]
