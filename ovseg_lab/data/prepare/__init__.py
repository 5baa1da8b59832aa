"""Benchmark preparation: official raw archives -> the prepared layout read by ``ovseg_lab.data.benchmark``.

``scripts/prepare_datasets.py NAME --raw DIR --out DIR`` is the command-line front end; ``prepare_benchmark``
is the same thing from Python. One module per dataset family (coco, ade, pascal_context, voc, cityscapes); ``core``
holds
the writing, resuming and summarising they share. This package imports neither torch nor Lightning at load
time, so the script starts at once.
"""

from __future__ import annotations

import os
from typing import Sequence

from ovseg_lab.data.prepare.core import Preparer, SplitSummary, Target, prepare
from ovseg_lab.errors import DataError

# name -> (module, class, targets it writes)
PREPARERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "coco_stuff": ("coco", "CocoStuff", ("coco_stuff",)),
    "coco_object": ("coco", "CocoObject", ("coco_object",)),
    "ade150": ("ade", "ADE150", ("ade150",)),
    "ade847": ("ade", "ADE847", ("ade847",)),
    "pc59": ("pascal_context", "PC59", ("pc59", "pc59b")),
    "pc459": ("pascal_context", "PC459", ("pc459",)),
    "voc20": ("voc", "VOC20", ("voc20", "voc20b")),
    "cityscapes": ("cityscapes", "Cityscapes19", ("cityscapes19",)),
}
# benchmarks written as a by-product of another name
ALIASES = {"voc20b": "voc20", "pc59b": "pc59"}
# preparers that can read more than one raw source
SOURCES = {"coco_object": ("auto", "stuffthingmaps", "instances"), "pc59": ("auto", "json", "mat")}


def make_preparer(name: str, source: str = "auto") -> Preparer:
    """The preparer of benchmark ``name`` (``voc20b`` -> voc20, ``pc59b`` -> pc59)."""
    from importlib import import_module

    key = ALIASES.get(name, name)
    if key not in PREPARERS:
        raise DataError(f"Unknown benchmark {name!r}; choose one of {', '.join(sorted(PREPARERS) + sorted(ALIASES))}.")
    module, cls, _ = PREPARERS[key]
    preparer_cls = getattr(import_module(f"ovseg_lab.data.prepare.{module}"), cls)
    if key in SOURCES:
        return preparer_cls(source=source)
    if source != "auto":
        raise DataError(f"{name} reads one raw source; --source applies to {', '.join(SOURCES)} only.")
    return preparer_cls()


def prepare_benchmark(
    name: str,
    raw: str | os.PathLike,
    out: str | os.PathLike,
    splits: Sequence[str] | None = None,
    workers: int = 1,
    force: bool = False,
    image_mode: str = "auto",
    source: str = "auto",
    progress: bool = True,
    limit: int | None = None,
    command: str | None = None,
) -> list[SplitSummary]:
    """Prepare benchmark ``name`` from the official raw layout under ``raw`` into ``out/<benchmark>/``."""
    preparer = make_preparer(name, source)
    return prepare(preparer, raw, out, splits=splits, workers=workers, force=force, image_mode=image_mode,
                   progress=progress, limit=limit, command=command)


__all__ = ["ALIASES", "PREPARERS", "Preparer", "SplitSummary", "Target", "make_preparer", "prepare", "prepare_benchmark"]
