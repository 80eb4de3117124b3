"""The emu run file: snapshots streamed to HDF5, written atomically, restartable.

Schema (one file = one run of one system; arrays C-ordered, x the last axis):

    /fields               (time, batch, [layer], y, x)  float32|float64  the saved field (vorticity
                          [1/time] for kolmogorov; PV of the upper and lower layer [1/s] for qg),
                          chunked one snapshot per chunk, gzip-compressed
    /time                 (time,)        float64   model time of each snapshot (system time unit)
    /step                 (time,)        int64     solver steps since the start of the first run
    /diagnostics/energy   (time, batch)  float64   kinetic energy (domain mean; thickness-weighted in qg)
    /diagnostics/enstrophy(time, batch)  float64
    /diagnostics/cfl      (time,)        float64   Courant number max|u| dt/dx over the batch
    /restart/state_hat    (batch, [layer], n, n//2+1) complex128  full-resolution spectral state of the
                          last snapshot; /restart/<history> the stepper's memory (AB3's previous
                          tendencies); attrs level, step, time. /restart is a soft link to one of
                          /restart_slots/{0,1} (format_version 2; version 1 files hold the group itself)
    attributes of /: format ("emu-run"), format_version, emu_version, system, config (JSON of the frozen
        config), field_names, field_units (JSON lists), solver_grid_size, grid_size (saved resolution),
        backend, device, dtype, seed, save_every, stepper, created (UTC ISO 8601), status ("running",
        then "complete", "blew_up", "interrupted", "failed"), message, writer_pid, writer_host,
        fftw_wisdom (the FFT plans used, see emu.backends.FFTWPlans); each dataset has `long_name`
        and `units`.

The file is written under a temporary name in the same folder (`.NAME.XXXX.tmp`) and renamed over
`path` when closed, so `path` never holds a half-written file; a run that stops early (blow-up,
Ctrl-C, SIGTERM, an error) still closes its file with the snapshots written so far and the matching
restart state. A run killed outright (kill -9, OOM, power) cannot close its file: the restart state
is therefore also saved while the run goes on (`SnapshotWriter.set_restart`, each snapshot at most
every `restart_interval` seconds) into the other of two slots, and the soft link /restart is moved
to it only once the slot is complete, so the temporary file always holds a consistent restart that
`--init` continues from (`unfinished_runs` finds such files).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import emu
from emu.data.atomic import default_file_mode
from emu.data.files import open_hdf5
from emu.errors import UserError

FORMAT = "emu-run"
FORMAT_VERSION = 2
STATUSES = ("complete", "blew_up", "interrupted", "failed")


@dataclass
class RestartState:
    """What a run needs to continue exactly: spectral state, stepper memory, counters (numpy)."""

    state_hat: np.ndarray
    history: dict[str, np.ndarray] = field(default_factory=dict)
    level: int = 0
    step: int = 0
    time: float = 0.0


class SnapshotWriter:
    """Streams snapshots of one run into an HDF5 file; memory stays flat however long the run.

    Use as a context manager; leaving the block by an exception closes the file with status
    "interrupted" (KeyboardInterrupt) or "failed" and re-raises. Call `close(status, message)` to set
    another status.

    Args:
        path: the final file name; the data go to a temporary file beside it until `close`.
        config: the system's frozen config (stored as JSON).
        field_names, field_units: names and units of the saved channels.
        snapshot_shape: shape of one snapshot, (batch, [layer], y, x).
        dtype: "float32" or "float64" for /fields.
        attrs: further root attributes (backend, device, seed, ...).
    """

    def __init__(self, path, *, config, field_names, field_units, snapshot_shape, dtype="float32",
                 attrs: dict[str, Any] | None = None, compression: str | None = "gzip"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(handle)
        os.chmod(temporary, default_file_mode())  # mkstemp makes 0600; the result should read like any file
        self.temporary = Path(temporary)
        self.file = h5py.File(self.temporary, "w")
        self.count = 0
        self.closed = False
        self._slot = 1  # the restart slot written last; the first restart goes to slot 0
        snapshot_shape = tuple(int(s) for s in snapshot_shape)
        batch = snapshot_shape[0]
        root = self.file.attrs
        root["format"] = FORMAT
        root["format_version"] = FORMAT_VERSION
        root["emu_version"] = emu.__version__
        root["system"] = config.system
        root["config"] = config.to_json()
        root["field_names"] = json.dumps(list(field_names))
        root["field_units"] = json.dumps(list(field_units))
        root["solver_grid_size"] = config.grid_size
        root["grid_size"] = snapshot_shape[-1]
        root["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        root["status"] = "running"
        root["message"] = ""
        root["writer_pid"] = os.getpid()
        root["writer_host"] = socket.gethostname()
        for key, value in (attrs or {}).items():
            root[key] = value
        fields = self.file.create_dataset(
            "fields", shape=(0,) + snapshot_shape, maxshape=(None,) + snapshot_shape, dtype=dtype,
            chunks=(1,) + snapshot_shape, compression=compression)
        fields.attrs["long_name"] = ", ".join(field_names)
        fields.attrs["units"] = ", ".join(field_units)
        fields.attrs["dimensions"] = json.dumps(["time", "batch"] + (["layer"] if len(snapshot_shape) == 4 else []) + ["y", "x"])
        self._time = self._series("time", (), np.float64, "model time", "system time unit")
        self._step = self._series("step", (), np.int64, "solver steps since the first run started", "1")
        diagnostics = self.file.create_group("diagnostics")
        self._energy = self._series("energy", (batch,), np.float64, "kinetic energy (domain mean)", "system units", diagnostics)
        self._enstrophy = self._series("enstrophy", (batch,), np.float64, "enstrophy (domain mean)", "system units", diagnostics)
        self._cfl = self._series("cfl", (), np.float64, "Courant number max|u| dt/dx", "1", diagnostics)
        self.fields = fields

    def _series(self, name, tail, dtype, long_name, units, group=None):
        group = self.file if group is None else group
        dataset = group.create_dataset(name, shape=(0,) + tail, maxshape=(None,) + tail, dtype=dtype,
                                       chunks=(1024,) + tail)
        dataset.attrs["long_name"] = long_name
        dataset.attrs["units"] = units
        return dataset

    def append(self, fields: np.ndarray, *, time: float, step: int, energy, enstrophy, cfl: float) -> None:
        """Appends one snapshot and its diagnostics, then flushes to disk."""
        index = self.count
        for dataset in (self.fields, self._time, self._step, self._energy, self._enstrophy, self._cfl):
            dataset.resize(index + 1, axis=0)
        self.fields[index] = fields
        self._time[index] = time
        self._step[index] = step
        self._energy[index] = energy
        self._enstrophy[index] = enstrophy
        self._cfl[index] = cfl
        self.count += 1
        self.file.flush()

    def set_restart(self, restart: RestartState) -> None:
        """Stores the state needed to continue the run exactly and flushes it to disk.

        The state goes into the slot not in use (datasets overwritten in place, so the file does not
        grow), then the soft link /restart is moved to it: a process killed halfway leaves the link
        on the previous, complete slot."""
        slot = 1 - self._slot
        group = self.file.require_group("restart_slots").require_group(str(slot))
        arrays = {"state_hat": restart.state_hat, **restart.history}
        for name in set(group) - set(arrays):
            del group[name]
        for name, value in arrays.items():
            value = np.asarray(value)
            if name in group and group[name].shape == value.shape and group[name].dtype == value.dtype:
                group[name][...] = value
            else:
                if name in group:
                    del group[name]
                group.create_dataset(name, data=value)
        group.attrs["level"] = int(restart.level)
        group.attrs["step"] = int(restart.step)
        group.attrs["time"] = float(restart.time)
        self.file.flush()  # the slot's data and attributes reach the file before the link moves
        if "restart" in self.file:
            del self.file["restart"]  # removes the link only
        self.file["restart"] = h5py.SoftLink(f"/restart_slots/{slot}")
        self.file.flush()
        self._slot = slot

    def close(self, status: str = "complete", message: str = "") -> Path:
        """Finishes the file and renames it onto `path` atomically; returns `path`."""
        if self.closed:
            return self.path
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        for dataset in (self.fields, self._time, self._step, self._energy, self._enstrophy, self._cfl):
            if dataset.shape[0] != self.count:  # an append cut short (a second Ctrl-C): drop its rows
                dataset.resize(self.count, axis=0)
        self.file.attrs["status"] = status
        self.file.attrs["message"] = message
        self.file.attrs["snapshots"] = self.count
        self.file.close()
        os.replace(self.temporary, self.path)
        self.closed = True
        return self.path

    def abort(self) -> None:
        """Discards the temporary file; `path` is left as it was."""
        if not self.closed:
            self.file.close()
            self.temporary.unlink(missing_ok=True)
            self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close("complete")
        elif not self.closed:
            status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            self.close(status, f"{exc_type.__name__}: {exc}")
        return False


def _open(path) -> h5py.File:
    handle = open_hdf5(path, "emu run file")
    if handle.attrs.get("format") != FORMAT:
        handle.close()
        raise UserError(f"{path} is not an emu run file (attribute format != {FORMAT!r}; "
                        "a dataset folder from `generate` is read with `emu data info`)")
    return handle


def unfinished_runs(path) -> list[dict[str, Any]]:
    """Temporary files of runs writing `path` that were killed (kill -9, OOM) before closing them.

    Returns one dict per file: temporary (Path), snapshots, restart_step (None when no restart state
    was saved), alive (its writer process still runs on this host: not stale). Files that cannot be
    opened are reported with snapshots None."""
    path = Path(path)
    found = []
    for temporary in sorted(path.parent.glob(f".{path.name}.*.tmp")):
        entry: dict[str, Any] = {"temporary": temporary, "snapshots": None, "restart_step": None, "alive": False}
        try:
            with h5py.File(temporary, "r") as handle:
                pid, host = int(handle.attrs.get("writer_pid", -1)), str(handle.attrs.get("writer_host", ""))
                entry["alive"] = host == socket.gethostname() and _process_alive(pid)
                entry["snapshots"] = int(handle["time"].shape[0]) if "time" in handle else 0
                if "restart" in handle and "state_hat" in handle["restart"]:
                    entry["restart_step"] = int(handle["restart"].attrs["step"])
        except OSError as error:  # locked by a live writer, or truncated
            entry["alive"] = "lock" in str(error).lower()
        found.append(entry)
    return found


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_config(path):
    """The frozen system config stored in an emu file."""
    from emu.systems import config_from_dict

    with _open(path) as handle:
        return config_from_dict(json.loads(handle.attrs["config"]))


def read_run(path, snapshots: slice | int | None = None) -> dict[str, Any]:
    """Reads a run file into numpy: fields (optionally a slice of snapshots), time, step, diagnostics
    and attributes (config as a dict)."""
    with _open(path) as handle:
        selection = slice(None) if snapshots is None else snapshots
        out = {
            "fields": handle["fields"][selection],
            "time": handle["time"][selection],
            "step": handle["step"][selection],
            "energy": handle["diagnostics/energy"][selection],
            "enstrophy": handle["diagnostics/enstrophy"][selection],
            "cfl": handle["diagnostics/cfl"][selection],
            "attrs": {key: handle.attrs[key] for key in handle.attrs},
        }
        out["config"] = json.loads(out["attrs"]["config"])
        return out


def load_restart(path) -> tuple[Any, RestartState]:
    """(config, RestartState) of the last snapshot of an emu file, for `--init`."""
    from emu.systems import config_from_dict

    with _open(path) as handle:
        if "restart" not in handle or "state_hat" not in handle["restart"]:
            raise UserError(f"{path} holds no restart state (group /restart is missing: the run was killed "
                            "before its first snapshot)")
        group = handle["restart"]
        history = {name: group[name][()] for name in group if name != "state_hat"}
        restart = RestartState(group["state_hat"][()], history, int(group.attrs["level"]),
                               int(group.attrs["step"]), float(group.attrs["time"]))
        return config_from_dict(json.loads(handle.attrs["config"])), restart
