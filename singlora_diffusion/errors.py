"""The project's user errors: what a person can fix by changing a file, a flag or a request.

The edges (the `singlora` CLI, train_dreambooth.py, eval/evaluate.py, the web UI) print
a UserError as one line and exit 2. Anything else is a bug or a machine failure (CUDA
out of memory, a segfaulting kernel) and keeps its traceback.

Each type also subclasses the built-in error it refines, so `except ValueError` and
pytest.raises(FileNotFoundError) keep working for callers of the library.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can act on; the message names the file, key or flag and says what to do."""


class BadInput(UserError, ValueError):
    """A file, flag or request whose contents are wrong (NaN, a lying header, a contradictory setting)."""


class NotFound(UserError, FileNotFoundError):
    """A path or model the user named does not exist (or is not in the offline cache)."""


class NotWritable(UserError, PermissionError):
    """An output folder that cannot be written."""


class MissingDependency(UserError, ImportError):
    """An optional package a flag needs is not installed."""


class WriteError(UserError, OSError):
    """An output could not be written (full disk, file size limit); nothing complete was lost."""
