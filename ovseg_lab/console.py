"""What a person reads in the terminal: one line per log message, named evaluation bars, the run's step count.

- Lightning logs through its own handler *and* propagates to the root logger that Hydra configures, so every INFO
  line appeared twice ("INFO: GPU available ..." and "[date][lightning...][INFO] - GPU available ...").
  :func:`one_line_per_message` leaves the root's handlers (console and the run's .log file) as the only ones.
- Log lines and warnings written while a progress bar is drawn were glued onto the bar. :class:`TqdmHandler`
  (the console handler of ``conf/hydra/default.yaml``) writes through ``tqdm.write``, and warnings are routed
  into logging (``logging.captureWarnings``), so each message gets its own line above the bars.
- :class:`ProgressBar`: evaluation bars named after the benchmark ("Validation toy_unseen", not "DataLoader 1"),
  and the training bar shows the global step out of ``max_steps`` (epochs mean little in step-based recipes).
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class TqdmHandler(logging.StreamHandler):
    """A console handler that writes above running tqdm bars instead of into them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def one_line_per_message() -> None:
    """Drop Lightning's own console handlers when the root logger has handlers (Hydra's), and route warnings there."""
    root = logging.getLogger()
    if not root.handlers:  # no configured logging (a library use of runner.train): keep Lightning's own output
        return
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's; file handlers stay
                logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)


class ProgressBar(TQDMProgressBar):
    """TQDMProgressBar with benchmark names on evaluation bars and ``step`` = global step / max_steps."""

    @staticmethod
    def _benchmark_name(trainer: Any, dataloader_idx: int) -> str:
        benchmarks = getattr(trainer.datamodule, "eval_benchmarks", None) if trainer.datamodule is not None else None
        try:
            return str(benchmarks[dataloader_idx].name)
        except (TypeError, IndexError, AttributeError):
            return f"DataLoader {dataloader_idx}"

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        changed = self._current_eval_dataloader_idx != dataloader_idx  # what super() asks (and then updates)
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if changed:
            desc = self.sanity_check_description if trainer.sanity_checking else self.validation_description
            self.val_progress_bar.set_description(f"{desc} {self._benchmark_name(trainer, dataloader_idx)}")

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if trainer.max_steps and trainer.max_steps > 0:
            items["step"] = f"{trainer.global_step}/{trainer.max_steps}"
        return items
