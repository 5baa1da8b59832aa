"""End-of-epoch report of skipped unreadable samples (see :mod:`ovseg_lab.data.bad_samples`)."""

from __future__ import annotations

import lightning as L


class BadSampleReport(L.Callback):
    """After every training epoch and every evaluation: print which samples were skipped, log their count
    (``data/bad_samples``), and stop the run when too large a fraction of the epoch was unreadable.

    A training epoch is closed at its last batch (``on_train_batch_end``, which Lightning runs before the
    ModelCheckpoint callbacks) and logged at that batch's step, like the batch's own curves: a run resumed from the
    checkpoint saved there does not run that epoch's end again, so a row written after the checkpoint (at the
    checkpoint's step, which the resumed CSV drops) was lost after a kill and the resumed CSV was not the
    uninterrupted run's."""

    def __init__(self) -> None:
        self._closed_epoch: int | None = None

    def _close(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str, step: int) -> None:
        log = getattr(trainer.datamodule, "bad_samples", None)
        if log is None:
            return
        report = log.end_period(what)  # raises DataError on a flood
        if report:
            pl_module.print(f"WARNING: {report}")
        if trainer.loggers:
            for logger in trainer.loggers:
                logger.log_metrics({"data/bad_samples": float(len(log.files))}, step=step)

    def _close_training_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._closed_epoch != trainer.current_epoch:
            self._closed_epoch = trainer.current_epoch
            self._close(trainer, pl_module, f"training epoch {trainer.current_epoch}", max(trainer.global_step - 1, 0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        last_of_run = 0 < trainer.max_steps <= trainer.global_step
        if last_of_epoch or last_of_run:
            self._close_training_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_training_epoch(trainer, pl_module)  # an epoch cut short otherwise (closed once either way)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._close(trainer, pl_module, f"evaluation at step {trainer.global_step}", trainer.global_step)
