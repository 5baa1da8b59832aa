"""Lightning's CSV logger without its habit of deleting curves.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` whenever its folder is not empty ("Previous log files in this
directory will be deleted"): with the fixed ``csv/`` folder of our runs (``version: ""``) a resumed run lost the
curves of its steps before the kill, and a rerun in the same folder lost the earlier run's. Here:

- rows are written to disk at every checkpoint, before it (Lightning buffers 100 steps; ``ResumeState`` flushes
  the loggers while the checkpoint is assembled);
- a resumed run (``resume_step`` = the checkpoint's global step) keeps every row logged before that step and
  appends; rows logged after the checkpoint by the killed process are dropped, because the resumed run logs
  those steps again: every step appears exactly once;
- a fresh run in a folder holding another run's curves moves them aside to ``metrics.<n>.csv`` first.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info

from ovseg_lab.utils.io import atomic_path


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class RecordWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None = None) -> None:
        self._resume_step = resume_step  # read by _check_log_dir_exists, which the parent __init__ calls
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._resume_step is None:
            index = 1
            while path.with_name(f"metrics.{index}.csv").exists():
                index += 1
            aside = path.with_name(f"metrics.{index}.csv")
            os.replace(path, aside)
            rank_zero_info(f"CSV logger: the curves of an earlier run in {path.parent} were kept as {aside.name}.")
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            rows = [row for row in reader if (_step(row) is None or _step(row) < self._resume_step)]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = fields  # appended rows keep the existing header (a new key rewrites it, keeping rows)


class RecordCSVLogger(CSVLogger):
    """``CSVLogger`` that appends on resume and never deletes (see the module docstring)."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> RecordWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = RecordWriter(log_dir=self.log_dir, resume_step=self._resume_step)
        return self._experiment

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        # Lightning buffers rows for flush_logs_every_n_steps (100) steps: a run killed after a checkpoint lost the
        # curves up to it, which the resumed run does not log again. On disk at every checkpoint, they survive.
        self.save()
