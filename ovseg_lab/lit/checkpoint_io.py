"""Checkpoints that are either complete or absent, and that load without unpickling code.

Lightning's own writer streams into the final path: a run killed during a save (SIGKILL, a pre-empted node,
a full disk) leaves a truncated ``last.ckpt`` and nothing to resume from. Here a checkpoint is written to a
hidden temporary file in the same folder, flushed to disk (fsync), then renamed over the target, which POSIX
makes atomic; the folder is fsynced so the rename itself survives a power loss. ``FinalStepCheckpoint`` makes
``last.ckpt`` hold the final weights whatever the save schedule.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from ovseg_lab.errors import SetupError, disk_full_message, is_disk_full
from ovseg_lab.utils.io import mkstemp_beside


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) onto ``path`` atomically (tmp in the same folder + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:  # a full disk reads "inline_container.cc:672 unexpected pos" from torch's writer
        if is_disk_full(err, path.parent):
            raise SetupError(disk_full_message(path)) from err
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` plugin: atomic local saves, ``weights_only=True`` loads (trainer.plugins)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}.")
        if "://" in str(path):  # remote storage: fsspec's transactional write is the atomic primitive there
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path, map_location: Callable | Any = lambda storage, loc: storage, weights_only: bool | None = True
    ) -> dict[str, Any]:
        from ovseg_lab.checkpoints import read_checkpoint

        return read_checkpoint(path, key="ckpt_path", map_location=map_location)


class FinalStepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, plus: ``last.ckpt`` always holds the weights training ended with.

    Lightning saves on its schedule (``every_n_train_steps``) and, at the end, only if nothing was saved at all:
    a 600-step run saving every 250 steps ended with the step-500 weights in ``last.ckpt`` while its
    ``metrics.json`` scored step 600, so ``eval.py ckpt=last.ckpt`` did not reproduce the run (GroupViT's toy run:
    3.37 against 3.63 mIoU). Here the final step is saved when the schedule missed it; an interrupted run keeps
    its last scheduled save (what ``ckpt_path=last`` resumes from).
    """

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("save_last") == "link":  # Lightning would link last.ckpt to the last *scheduled* file
            raise SetupError(
                "callbacks.model_checkpoint.save_last=link is not supported: last.ckpt must hold the final weights "
                "(set save_last: true)."
            )
        super().__init__(*args, **kwargs)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not trainer.interrupted and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
