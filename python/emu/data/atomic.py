"""Small files written atomically: a temporary file in the same folder, then a rename.

A reader (another shard, a resumed job, a user's `cat`) sees the old file or the new one, never half
of one; the temporary's name is unique, so concurrent writers of the same target cannot collide.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def default_file_mode() -> int:
    """The mode `open(path, "w")` would give a new file: 0o666 less the process umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomically(path, text: str) -> Path:
    """`text` to `path` via temp file + rename; returns the path."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, default_file_mode())  # mkstemp makes 0600; the result should read like any file
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def write_json_atomically(path, values: dict) -> Path:
    """JSON (indented, sorted keys, trailing newline) to `path` via temp file + rename; returns the path."""
    return write_text_atomically(path, json.dumps(values, indent=2, sort_keys=True) + "\n")
