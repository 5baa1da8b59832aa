"""End-of-epoch report of skipped unreadable samples (see :mod:`ovseg_lab.data.bad_samples`)."""

from __future__ import annotations

import lightning as L


class BadSampleReport(L.Callback):
    """After every training epoch and every evaluation: print which samples were skipped, log their count
    (``data/bad_samples``), and stop the run when too large a fraction of the epoch was unreadable."""

    def _close(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        log = getattr(trainer.datamodule, "bad_samples", None)
        if log is None:
            return
        report = log.end_period(what)  # raises DataError on a flood
        if report:
            pl_module.print(f"WARNING: {report}")
        if trainer.loggers:
            for logger in trainer.loggers:
                logger.log_metrics({"data/bad_samples": float(len(log.files))}, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close(trainer, pl_module, f"training epoch {trainer.current_epoch}")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._close(trainer, pl_module, f"evaluation at step {trainer.global_step}")
