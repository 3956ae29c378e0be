"""Files on disk: written whole or not at all, output folders checked before work starts,
and the trainer's progress file that the web UI polls.

Every output of the project goes through atomic_path: a reader (resume, the web UI, the
evaluation's cache, ComfyUI) never sees half a file, and a failed write leaves what was
there before untouched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import NotWritable

PROGRESS_FILE = "progress.json"  # step, total, loss, latest validation image: written by the trainer


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace_folder: bool = False) -> Iterator[Path]:
    """A temporary name beside `path`; what the block writes there (a file or a folder) becomes `path`.

    One os.replace at the end, on the same filesystem, so `path` is either what it was or the
    complete new thing. If the block raises, the temporary is removed and `path` is unchanged.
    The temporary is hidden (a leading dot) and carries the process id, so folder scanners skip
    it and several processes (the evaluation's shards) never share one.

    replace_folder: a folder written here replaces an existing folder `path` (removed just
    before the rename; os.replace cannot replace a non-empty folder). Without it an existing
    folder makes the rename fail with OSError, which is what a caller racing another process
    for the same cache folder wants.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        if replace_folder and tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8) to `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data, indent: int | None = None) -> Path:
    return write_text(path, json.dumps(data, indent=indent))


def check_writable(folder: str | os.PathLike, flag: str) -> Path:
    """Create `folder` if needed and prove a file can be written in it, before any model loads."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise NotWritable(f"{flag} {folder} is not writable ({e.strerror}); pick a writable folder") from None
    return folder


def write_progress(output_dir: str | os.PathLike, **fields) -> None:
    """The trainer's progress (step, total, loss, validation_image) for the web UI to poll."""
    write_json(Path(output_dir) / PROGRESS_FILE, fields)


def read_progress(output_dir: str | os.PathLike) -> dict:
    """The last progress written, or {} before the first step (never a half-written file)."""
    path = Path(output_dir) / PROGRESS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def sha256(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
