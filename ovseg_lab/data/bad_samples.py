"""Bookkeeping of samples skipped because their files do not decode.

One corrupt JPEG must not stop a week-long run, but a folder of them means the data is broken: samples are
skipped and counted, every epoch ends with a report naming them, and a flood of them (more than
``max_bad_samples`` distinct files, or more than ``max_bad_fraction`` of the samples read in an epoch) stops
the run with a :class:`DataError`. Loader workers are separate processes, so a skipped sample travels to the
main process inside its batch (``batch["bad"]``: file or shard-member names) and is recorded here.
"""

from __future__ import annotations

from typing import Any, Iterable

from ovseg_lab.errors import DataError


class BadSampleLog:
    """Distinct bad files over the run, and occurrences / samples read per reporting period (epoch)."""

    def __init__(self, max_bad_samples: int | None = 100, max_bad_fraction: float | None = 0.01) -> None:
        if max_bad_fraction is not None and not 0.0 <= float(max_bad_fraction) <= 1.0:
            raise DataError(f"data.max_bad_fraction must lie in [0, 1], got {max_bad_fraction}.")
        if max_bad_samples is not None and int(max_bad_samples) < 0:
            raise DataError(f"data.max_bad_samples must be >= 0, got {max_bad_samples}.")
        self.max_bad_samples = None if max_bad_samples is None else int(max_bad_samples)
        self.max_bad_fraction = None if max_bad_fraction is None else float(max_bad_fraction)
        self.files: dict[str, str] = {}  # name -> reason, insertion-ordered, over the whole run
        self.period_bad = 0
        self.period_seen = 0
        self.period_new: list[str] = []

    def record(self, bad: Iterable[Any], good: int) -> None:
        """One batch: ``bad`` names (or {"bad": name, "reason": ...} dicts) and the number of good samples."""
        bad = list(bad)
        for entry in bad:
            name, reason = (entry.get("bad"), entry.get("reason", "")) if isinstance(entry, dict) else (str(entry), "")
            if name not in self.files:
                self.files[name] = reason
                self.period_new.append(name)
        self.period_bad += len(bad)
        self.period_seen += len(bad) + int(good)
        if self.max_bad_samples is not None and len(self.files) > self.max_bad_samples:
            raise DataError(self._flood(f"{len(self.files)} distinct unreadable files (data.max_bad_samples="
                                        f"{self.max_bad_samples})"))

    def end_period(self, what: str) -> str | None:
        """Close an epoch: a one-paragraph report (None if nothing was skipped); raise on too high a fraction."""
        bad, seen, new = self.period_bad, self.period_seen, self.period_new
        self.period_bad, self.period_seen, self.period_new = 0, 0, []
        if not bad:
            return None
        if self.max_bad_fraction is not None and seen and bad / seen > self.max_bad_fraction:
            raise DataError(self._flood(f"{bad} of {seen} samples of the {what} ({100 * bad / seen:.1f}%) did not "
                                        f"decode (data.max_bad_fraction={self.max_bad_fraction})"))
        listing = ", ".join(new[:5]) + (" ..." if len(new) > 5 else "")
        return (f"{what}: skipped {bad} unreadable sample(s) of {seen} read; {len(new)} new file(s): {listing} "
                f"({len(self.files)} distinct over the run)")

    def _flood(self, what: str) -> str:
        examples = "; ".join(f"{name} ({reason})" if reason else name for name, reason in list(self.files.items())[:5])
        return (f"Too many corrupt samples: {what}. First ones: {examples}. Check the dataset (re-download or "
                "re-prepare it) or raise the threshold.")

    def summary(self) -> dict[str, Any]:
        """The metrics.json entry: distinct unreadable files and why."""
        return {"count": len(self.files), "files": dict(self.files)}


def split_bad(batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(good samples, bad markers) of a list of dataset items."""
    good = [b for b in batch if "bad" not in b]
    return good, [b for b in batch if "bad" in b]
