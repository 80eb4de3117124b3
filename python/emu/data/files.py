"""Opening files a user hands to emu, with errors that name the file and say what is wrong.

h5py reports a text file, a truncated file or a missing object as a long OSError/KeyError trace
whose message rarely names the path. Everything emu reads from a user goes through `open_hdf5`, so
the CLI can print one line such as `data/x.hdf5: not a readable HDF5 file (truncated?)`.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from emu.errors import UserError


def open_hdf5(path, what: str = "HDF5 file", mode: str = "r") -> h5py.File:
    """Opens `path` with h5py; `what` names the expected kind in errors ("emu run file", "dataset file")."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {what}")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, expected an {what}")
    try:
        return h5py.File(path, mode)
    except OSError as error:
        reason = str(error)
        if "signature" in reason:
            reason = "no HDF5 signature: not an HDF5 file"
        elif "truncated" in reason or "eof" in reason.lower():
            reason = "truncated (the writer was killed, or the copy is incomplete)"
        raise UserError(f"{path}: not a readable {what} ({reason})") from error


def check_writable(path, option: str) -> None:
    """Fails now, not after the whole run, when `path` cannot be written: its folder is created if
    missing and a probe file is made and removed there. `option` names the CLI option in the error."""
    import os
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UserError(f"{option} {path}: cannot write there ({error.strerror or error})") from None
