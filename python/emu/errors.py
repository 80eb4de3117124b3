"""The errors a user can cause and fix, and how the command line reports them.

Every layer raises ordinary exceptions with a message that names the file, option or field and what
is allowed: `ConfigError` (a ValueError) for bad parameters, `FileNotFoundError`/`PermissionError`
for paths, `BackendUnavailable` for a missing backend or device, and `UserError` for everything
else a user can put right (a file of the wrong kind, a truncated checkpoint, conflicting options).
`emu.cli` turns all of them into one line on stderr and exit code 1 (`--debug` keeps the traceback);
anything else is a bug in emu and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message says which file or option and what is expected."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types the CLI reports as one line (imports nothing heavy)."""
    from emu.backends import BackendUnavailable

    return (UserError, ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
            NotADirectoryError, BackendUnavailable)


def one_line(error: BaseException) -> str:
    """The message of `error` on one line; OSErrors without a message get their strerror and file name."""
    text = str(error)
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{error.filename}: {error.strerror or text}"
    return " ".join(text.split()) or type(error).__name__
