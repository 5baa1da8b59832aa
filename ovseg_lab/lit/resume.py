"""What a checkpoint needs beyond Lightning's own state for a resumed run to continue bit for bit.

Lightning restores weights, optimizer, LR schedule, step counters and callbacks. It does not restore the
random generators, and it restarts a non-stateful training loader from the first batch of the epoch. The
:class:`ResumeState` callback stores both in every checkpoint (``checkpoint["ovseg_resume"]``, plain tensors
and ints, so it loads with ``weights_only=True``):

- the torch (CPU and CUDA), numpy and Python RNG states, restored when training restarts;
- the data position (epoch, batches already trained in it), handed to the DataModule's ``resume_at`` so its
  sampler skips exactly those batches (see :class:`ovseg_lab.data.sampling.ResumableSampler`).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning

from ovseg_lab.errors import SetupError

STATE_KEY = "ovseg_resume"


def rng_state() -> dict[str, Any]:
    """Every global generator's state, as tensors / ints / tuples (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def count_the_epoch_in_progress(checkpoint: dict[str, Any], epoch: int) -> None:
    """Repair Lightning's epoch counter in a checkpoint saved mid-epoch (in ``on_train_batch_end``).

    A run Lightning 2.x resumes from a checkpoint saved at an epoch's last batch finishes that epoch but never counts
    the next one as started (``epoch_progress`` ready / started stay at the finished count): that next epoch's
    checkpoints then read as "epoch finished", and a run resumed from one of them trains on with the epoch number
    one short (the CSV's ``epoch`` column after kills at two epoch boundaries, with weights still exact). Saved
    mid-epoch, ``epoch`` (ours, ``trainer.current_epoch`` at the save) is in progress: counted as started."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = fit_loop.get("epoch_progress"), fit_loop.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return
    total = batches["total"]
    if total["completed"] != total["processed"] - 1:  # not saved inside a training batch's end
        return
    for part in ("total", "current"):
        progress = epochs[part]
        if progress["ready"] == progress["started"] == progress["processed"] == progress["completed"] == epoch:
            progress["ready"] = progress["started"] = epoch + 1


class ResumeState(L.Callback):
    """Save RNG states and the data position in checkpoints; restore them when ``trainer.fit(ckpt_path=...)``."""

    def __init__(self) -> None:
        self._pending_rng: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # the curves up to this checkpoint reach the disk before it does: flushed only after the save (the logger's
        # after_save_checkpoint), a kill between the two lost the rows a resumed run does not log again
        for logger in trainer.loggers:
            logger.save()
        # ModelCheckpoint saves in on_train_batch_end, after the batch was processed: `processed` counts it
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        checkpoint[STATE_KEY] = {
            "epoch": int(trainer.current_epoch),
            "batches_in_epoch": int(batches),
            "global_step": int(trainer.global_step),
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(STATE_KEY)
        if state is None or trainer.state.fn != "fit":
            return
        count_the_epoch_in_progress(checkpoint, int(state["epoch"]))  # before Lightning restores its loops
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "resume_at"):
            datamodule.resume_at(state["epoch"], state["batches_in_epoch"])
            # Lightning warns that a mid-epoch resume with a loader that is not a `_Stateful` "can cause unreliable
            # results": ours continues at the stored position (the sampler skips the batches already trained, the
            # RNGs are restored), which the resume test checks bit for bit. The warning is false here only.
            warnings.filterwarnings(
                "ignore",
                message="You're resuming from a checkpoint that ended before the epoch",
                category=PossibleUserWarning,
            )
        # applied at on_train_start: building the resumed loaders must not shift the restored generators
        self._pending_rng = state["rng"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``ckpt_path=last`` -> ``<run_dir>/checkpoints/last.ckpt``; any other value must be an existing file."""
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise SetupError(
                f"ckpt_path=last: no checkpoint at {last}. Resume in the run directory of the interrupted run "
                f"(hydra.run.dir=<that run's folder>), or pass ckpt_path=/path/to/file.ckpt."
            )
        return str(last)
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise SetupError(f"ckpt_path={ckpt_path}: no such checkpoint file.")
    return str(path)


# Keys a resume may change: how long to train, how it is logged, where folders live (a run folder copied to another
# disk, data moved to local scratch), and what leaves the batches alone (loader processes: every sample draws from
# its own seed; how often checkpoints are written). Anything else (lr, seed, data, model) would make the resumed
# half a different experiment than the one recorded in the folder.
RESUME_MAY_CHANGE = (
    "ckpt_path",
    "resume_force",
    "paths",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.log_every_n_steps",
    "logger",
    "callbacks.progress_bar",
    "callbacks.lr_monitor",
    "callbacks.bad_sample_report",  # in the callbacks group before it became part of every run
    "data.num_workers",
    "data.pin_memory",
    "callbacks.model_checkpoint.every_n_train_steps",
    "callbacks.model_checkpoint.train_time_interval",
)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _allowed(key: str) -> bool:
    return any(key == a or key.startswith(a + ".") for a in RESUME_MAY_CHANGE)


def config_differences(stored_yaml: str, cfg: Any) -> list[str]:
    """``key: stored -> current`` for every leaf that differs outside :data:`RESUME_MAY_CHANGE`.

    The allowed keys are first set to their stored values in a copy of ``cfg``, so values derived from them (a
    schedule's ``total_steps: ${trainer.max_steps}``) do not count as differences either.
    """
    import copy

    import yaml
    from omegaconf import OmegaConf, open_dict

    from ovseg_lab.config import METHOD_GROUPS

    stored = _flatten(yaml.safe_load(stored_yaml) or {})
    probe = copy.deepcopy(cfg)
    with open_dict(probe):
        for key, value in stored.items():
            if _allowed(key) and not key.startswith(("logger", "callbacks")):
                OmegaConf.update(probe, key, value, merge=False, force_add=True)
    current = _flatten(yaml.safe_load(OmegaConf.to_yaml(probe, resolve=True)) or {})
    missing = object()
    # groups this model does not read are no longer recorded (config.drop_unused_groups); older checkpoints have them
    unread = tuple(f"{group}." for group in METHOD_GROUPS if group not in cfg)
    return [
        f"{key}: {stored.get(key, '(absent)')!r} -> {current.get(key, '(absent)')!r}"
        for key in sorted(set(stored) | set(current))
        if not _allowed(key) and not key.startswith(unread) and stored.get(key, missing) != current.get(key, missing)
    ]


def check_resume_config(checkpoint: dict[str, Any], cfg: Any, ckpt_path: str, force: bool) -> None:
    """Refuse a resume whose config differs from the one stored in the checkpoint (unless ``resume_force=true``)."""
    stored = checkpoint.get("ovseg_config")
    if not stored:
        return
    diff = config_differences(stored, cfg)
    if not diff:
        return
    listing = "\n".join(f"  - {line}" for line in diff[:20]) + (
        f"\n  ... and {len(diff) - 20} more" if len(diff) > 20 else ""
    )
    if force:
        print(
            f"WARNING: resuming {ckpt_path} with a config that differs from the stored one (resume_force=true):\n{listing}"
        )
        return
    raise SetupError(
        f"Resume refused: the config differs from the one stored in {ckpt_path} in {len(diff)} key(s) other than "
        f"{', '.join(RESUME_MAY_CHANGE[3:])} and paths:\n{listing}\nResume with the overrides of the original run (its "
        f"config_resolved.yaml / .hydra/overrides.yaml), or pass resume_force=true to continue anyway."
    )
