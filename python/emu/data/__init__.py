"""HDF5 files: the emu run format (schema in `emu.data.hdf5`)."""

from emu.data.hdf5 import RestartState, SnapshotWriter, load_restart, read_config, read_run

__all__ = ["RestartState", "SnapshotWriter", "load_restart", "read_config", "read_run"]
