"""Atomic file writes: a reader never sees a half-written file, and a crash leaves the old one intact."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ovseg_lab.errors import SetupError, disk_full_message, is_disk_full


def _process_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file (0644 under the usual umask 022)."""
    return 0o666 & ~_process_umask()


def mkstemp_beside(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``path``'s folder, with the mode an ordinary new file gets.

    mkstemp creates 0600 files: renamed onto the target, every record (metrics, configs, checkpoints) would be
    unreadable by the group on a shared cluster.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, new_file_mode())
    return fd, tmp


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of :func:`mkstemp_beside` under ``folder``: left by a process killed (SIGKILL)
    while it wrote, they are never renamed onto their target. Only for a folder whose owner is gone."""
    removed = []
    for path in Path(folder).rglob(".*.tmp*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# Less free space than this where a run starts: it would fail at its first checkpoint or record, minutes in
MIN_FREE_BYTES = 16 * 2**20


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """Before any work: ``folder`` (given by ``key``, e.g. ``hydra.run.dir`` or ``--output``) can be created and
    written, with some free space. Each problem is one :class:`SetupError` paragraph naming the key and the path:
    an existing file in its place, a read-only location, a full disk."""
    folder = Path(folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise SetupError(f"{key}={folder} is a file; give a folder (created if missing).")
    existing = folder
    while not existing.exists():  # the deepest part of the path that exists: what the folder is created in
        existing = existing.parent
    if not existing.is_dir():
        raise SetupError(f"{key}={folder} cannot be created: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SetupError(
            f"{key}={folder} cannot be written: {existing} is read-only for this user (or on a read-only file "
            f"system). Give a writable location ({key}=...) or change its permissions."
        )
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    if free < MIN_FREE_BYTES:
        raise SetupError(
            f"The disk is full: {free / 2**20:.1f} MiB free on the file system of {existing}, where {key}={folder} "
            f"would be written. Free some space, or give another location ({key}=...), then rerun."
        )


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(path, ".tmp" + path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as err:
        if is_disk_full(err, path.parent):
            raise SetupError(disk_full_message(path)) from err
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null (e.g. IoU of a class absent from the ground truth)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    return value


def write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    """Write ``data`` as JSON atomically; non-finite floats become null."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_json_safe(data), indent=indent) + "\n")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
