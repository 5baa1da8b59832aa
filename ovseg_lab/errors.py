"""User-facing errors.

A :class:`SetupError` means the run cannot start or continue because of something the user can fix
(missing data or weights, a bad file, an incompatible config). Entry points print its message as one
paragraph and exit non-zero, without a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path


class SetupError(RuntimeError):
    """Something the user must fix; the message says what and how."""


class DataError(SetupError):
    """A data file or folder is missing or malformed; the message names it."""


class FolderOfAnotherRun(SetupError):
    """The folder holds another run's records, or a live run's lock: nothing of this command may be written there
    (not even error.txt)."""


class RunFolderBusy(FolderOfAnotherRun):
    """Another live run holds the run folder."""


def _worker_original(err: SetupError) -> SetupError:
    """``err`` as raised inside a DataLoader worker, not torch's re-raise of it.

    torch re-raises a worker's exception in the main process as ``type(err)("Caught DataError in DataLoader worker
    process 0.\\nOriginal Traceback (most recent call last): ... ovseg_lab.errors.DataError: <message>")``: the user
    (and error.txt) got 15 lines of worker traceback around our one paragraph. The message is the text after the
    last ``<module>.<class>: `` of that traceback."""
    text = str(err)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return err
    marker = f"{type(err).__module__}.{type(err).__qualname__}: "
    at = text.rfind(marker)
    if at < 0:
        return err
    return type(err)(text[at + len(marker) :].strip())


def user_error(err: BaseException) -> SetupError | None:
    """The :class:`SetupError` behind ``err``, if any.

    Hydra wraps whatever a ``_target_`` raises in ``InstantiationException("Error in call to target ...")``: a
    missing ``clip.weights`` file or BERT offline would reach the user (and error.txt, which make_table quotes)
    as that wrapper (``raise ... from e``): its ``__cause__`` chain still holds our own one-paragraph error. (Not
    ``__context__``: an unrelated bug raised while a SetupError was being handled must keep its traceback.)
    A SetupError re-raised by torch from a DataLoader worker is unwrapped to its own message.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, SetupError):
            return _worker_original(err)
        seen.add(id(err))
        err = err.__cause__
    return None


# permission denied / read-only file system: the output location, which the user can change
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def as_user_error(err: BaseException, where: object = "the output folder") -> SetupError | None:
    """The user-facing error behind ``err``: a (wrapped) SetupError, a full disk or an unwritable output location
    as one; None for a bug. ``where``: the folder named when the error does not carry a file name."""

    setup = user_error(err)
    if setup is not None:
        return setup
    filename = getattr(err, "filename", None) or where
    if is_disk_full(err):
        return SetupError(disk_full_message(filename))
    if isinstance(err, OSError) and err.errno in UNWRITABLE:
        return SetupError(
            f"Cannot use {filename}: {err.strerror} (a read-only output location, or a file this user may not read). "
            "Point the output elsewhere (hydra.run.dir=... / paths.log_dir=... / --output ...) or fix the "
            "permissions, then rerun."
        )
    return None


def is_disk_full(err: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """ENOSPC, or what torch.save's C++ writer says instead ("unexpected pos"), with the folder really (nearly) full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if "No space left" in text:
        return True
    if "unexpected pos" in text and folder is not None:
        try:
            return shutil.disk_usage(folder).free < 64 * 2**20
        except OSError:
            return False
    return False


def disk_full_message(path: str | os.PathLike) -> str:
    folder = Path(path).parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return (
        f"The disk is full: could not write {path} ({free} on the file system of {folder}). Free some space, "
        f"or point the run elsewhere (hydra.run.dir=... / paths.log_dir=...), then rerun (ckpt_path=last resumes "
        f"from the last complete checkpoint)."
    )


def report(err: SetupError) -> None:
    """The one-paragraph form every command prints."""
    print(f"\nERROR: {err}\n", file=sys.stderr)
