"""The engine shared by every benchmark preparer: find samples, convert, write atomically, summarise.

A preparer (one per dataset family, see the sibling modules) knows the official raw layout and the id mapping;
this module does everything else the same way for all of them:

- output ``OUT/<target>/images/<split>/<stem>.jpg`` and ``OUT/<target>/labels/<split>/<stem>.png|.tif``, plus
  ``OUT/<target>/vocab.json`` and ``OUT/<target>/prepare_summary.json``;
- atomic writes (``ovseg_lab.utils.io.atomic_path``): a killed run never leaves a half-written file, so a sample
  whose label exists is finished and a rerun skips it (resumable);
- progress bars, optional worker processes, and a summary (images, classes seen, ignored-pixel fraction).

One preparer may write several targets from the same raw data (``voc20`` also writes ``voc20b``).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from ovseg_lab.errors import DataError
from ovseg_lab.utils.io import atomic_path, write_json

UINT8_IGNORE = 255
UINT16_IGNORE = 65535
IMAGE_MODES = ("auto", "hardlink", "symlink", "copy")


@dataclass(frozen=True)
class Target:
    """A prepared benchmark: its folder name, class names in train-id order and ignore id.

    More than 255 classes need 16-bit labels (stored as .tif, ignore 65535); the rest are 8-bit .png (ignore 255).
    """

    name: str
    classes: tuple[str, ...]
    ignore_index: int = UINT8_IGNORE

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        limit = self.ignore_index
        if self.ignore_index not in (UINT8_IGNORE, UINT16_IGNORE):
            raise ValueError(f"{self.name}: ignore_index must be 255 or 65535, got {self.ignore_index}")
        if len(self.classes) > limit:
            raise ValueError(f"{self.name}: {len(self.classes)} classes do not fit labels with ignore id {limit}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dtype(self) -> type:
        return np.uint16 if self.ignore_index == UINT16_IGNORE else np.uint8

    @property
    def label_suffix(self) -> str:
        return ".tif" if self.ignore_index == UINT16_IGNORE else ".png"

    def image_path(self, out: Path, split: str, stem: str, suffix: str) -> Path:
        return out / self.name / "images" / split / f"{stem}{suffix}"

    def label_path(self, out: Path, split: str, stem: str) -> Path:
        return out / self.name / "labels" / split / f"{stem}{self.label_suffix}"


@dataclass(frozen=True)
class Sample:
    """One raw image and whatever its preparer needs to build the label (a path, annotations, ...)."""

    split: str
    stem: str
    image: Path
    source: Any = None

    @property
    def image_suffix(self) -> str:
        suffix = self.image.suffix.lower()
        return ".jpg" if suffix == ".jpeg" else suffix


@dataclass
class Converted:
    """A converted sample. ``labels[target] = None`` leaves the sample out of that target (PAS-20 drops images
    without any labelled pixel, as the official preparation does). ``image`` is set when the image itself
    changes (ADE-847 is resized); otherwise the raw file is linked or copied unchanged."""

    labels: dict[str, np.ndarray | None]
    image: np.ndarray | None = None


class Preparer:
    """Base class of the per-family preparers.

    Subclasses set ``name``, ``targets``, ``splits`` (prepared by default), ``available_splits`` and ``raw_hint``
    (what ``--raw`` should point at), and implement ``samples`` and ``convert``. Instances are pickled into
    worker processes, so they hold only plain data.
    """

    name: str = ""
    targets: tuple[Target, ...] = ()
    splits: tuple[str, ...] = ("val",)
    available_splits: tuple[str, ...] = ("train", "val")
    raw_hint: str = ""

    def __init__(self) -> None:
        self.source_note = ""  # which raw source samples() used, for the summary

    def samples(self, raw: Path, split: str) -> list[Sample]:
        raise NotImplementedError

    def convert(self, sample: Sample) -> Converted:
        raise NotImplementedError

    def prepare_command(self) -> str:
        return f"python scripts/prepare_datasets.py {self.name} --raw <{self.raw_hint}> --out data"


# ---------------------------------------------------------------------------------------------------- helpers
def find_dir(raw: Path, candidates: Sequence[str], what: str, pattern: str = "*", hint: str = "") -> Path:
    """The first ``raw/<candidate>`` that is a folder holding a file matching ``pattern``."""
    tried = []
    for candidate in candidates:
        folder = raw / candidate if candidate else raw
        tried.append(str(folder))
        if folder.is_dir() and next(folder.glob(pattern), None) is not None:
            return folder
    listing = ", ".join(tried)
    raise DataError(f"Cannot find {what} under {raw}: looked for {pattern} in {listing}.{' ' + hint if hint else ''}")


def find_file(raw: Path, candidates: Sequence[str], what: str, hint: str = "") -> Path:
    tried = []
    for candidate in candidates:
        path = raw / candidate
        tried.append(str(path))
        if path.is_file():
            return path
    raise DataError(f"Cannot find {what} under {raw}: looked for {', '.join(tried)}.{' ' + hint if hint else ''}")


def read_id_map(path: Path) -> np.ndarray:
    """A single-channel label PNG as a 2-D array (palette PNGs give their indices, not colours)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(f"Label {path} has image mode {img.mode}; expected a single-channel id map.")
            return np.array(img)
    except (OSError, SyntaxError) as err:
        raise DataError(f"Cannot read label {path}: {err}") from None


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except (OSError, SyntaxError) as err:
        raise DataError(f"Cannot read image {path}: {err}") from None


def lookup_table(mapping: dict[int, int], size: int, default: int, dtype: type) -> np.ndarray:
    """A table ``lut`` with ``lut[raw_id] = train_id`` for the mapped ids and ``default`` elsewhere."""
    lut = np.full(size, default, dtype=dtype)
    for raw_id, train_id in mapping.items():
        lut[raw_id] = train_id
    return lut


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file without decoding it."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, SyntaxError) as err:
        raise DataError(f"Cannot read image {path}: {err}") from None


def check_same_size(image: Path, label: np.ndarray, source: Any) -> None:
    height, width = image_size(image)
    if label.shape != (height, width):
        raise DataError(
            f"Image {image} is {width}x{height} but its annotation {source} is {label.shape[1]}x{label.shape[0]}."
        )


# ---------------------------------------------------------------------------------------------------- writing
def _write_label(path: Path, label: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        if label.dtype == np.uint16:
            Image.fromarray(label).save(tmp, format="TIFF", compression="tiff_adobe_deflate")
        else:
            Image.fromarray(label).save(tmp, format="PNG")


def _place_image(src: Path, dst: Path, mode: str) -> None:
    """Link or copy ``src`` to ``dst`` atomically (``auto``: hard link when possible, else copy)."""
    with atomic_path(dst) as tmp:
        if mode in ("auto", "hardlink"):
            tmp.unlink()
            try:
                os.link(src, tmp)
                return
            except OSError:
                if mode == "hardlink":
                    raise
        if mode == "symlink":
            tmp.unlink(missing_ok=True)
            os.symlink(src.resolve(), tmp)
            return
        shutil.copyfile(src, tmp)


def _write_image(dst: Path, image: np.ndarray) -> None:
    # PIL's default JPEG quality (75), as the official ADE-847 preparation saved its resized images.
    with atomic_path(dst) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=75)


@dataclass
class TargetCounts:
    """Per-target statistics of one sample or a whole split."""

    images: int = 0
    written: int = 0
    kept: int = 0
    left_out: int = 0
    class_pixels: np.ndarray | None = None
    ignored_pixels: int = 0

    def add(self, other: "TargetCounts") -> None:
        self.images += other.images
        self.written += other.written
        self.kept += other.kept
        self.left_out += other.left_out
        self.ignored_pixels += other.ignored_pixels
        if other.class_pixels is not None:
            self.class_pixels = other.class_pixels.copy() if self.class_pixels is None else self.class_pixels + other.class_pixels


def label_counts(label: np.ndarray, target: Target, where: Any) -> tuple[np.ndarray, int]:
    """(pixels per class, ignored pixels); an id outside the vocabulary is an error naming ``where``."""
    flat = label.reshape(-1)
    valid = flat[flat != target.ignore_index]
    if valid.size and int(valid.max()) >= target.num_classes:
        raise DataError(
            f"{where} holds id {int(valid.max())} outside the {target.num_classes} classes of {target.name}; "
            "rerun the prepare command with --force to rebuild it."
        )
    counts = np.bincount(valid.astype(np.int64), minlength=target.num_classes)
    return counts, int(flat.size - valid.size)


def process_sample(preparer: Preparer, out: Path, force: bool, image_mode: str, sample: Sample) -> dict[str, TargetCounts]:
    """Convert and write one sample for every target of ``preparer`` (or count it when already written)."""
    results: dict[str, TargetCounts] = {}
    paths = {
        t.name: (t.image_path(out, sample.split, sample.stem, sample.image_suffix), t.label_path(out, sample.split, sample.stem))
        for t in preparer.targets
    }
    if not force and all(image.exists() and label.exists() for image, label in paths.values()):
        for target in preparer.targets:
            label_path = paths[target.name][1]
            counts, ignored = label_counts(read_id_map(label_path), target, f"Prepared label {label_path}")
            results[target.name] = TargetCounts(images=1, kept=1, class_pixels=counts, ignored_pixels=ignored)
        return results

    converted = preparer.convert(sample)
    first_image: Path | None = None
    for target in preparer.targets:
        label = converted.labels.get(target.name)
        image_path, label_path = paths[target.name]
        if label is None:
            results[target.name] = TargetCounts(left_out=1)
            continue
        if label.dtype != target.dtype:
            raise TypeError(f"{preparer.name} produced {label.dtype} labels for {target.name}, expected {np.dtype(target.dtype)}")
        counts, ignored = label_counts(label, target, f"The converted label of {sample.image}")
        # Image first, label last: an existing label means the sample is complete.
        if converted.image is not None and first_image is None:
            _write_image(image_path, converted.image)
        elif first_image is not None:
            _place_image(first_image, image_path, "auto" if image_mode != "symlink" else "symlink")
        else:
            _place_image(sample.image, image_path, image_mode)
        first_image = first_image or image_path
        _write_label(label_path, label)
        results[target.name] = TargetCounts(images=1, written=1, class_pixels=counts, ignored_pixels=ignored)
    return results


def _remove_stale_temporaries(out: Path, targets: Iterable[Target], split: str) -> None:
    """Temporary files of a run that was killed (atomic writes leave nothing else behind)."""
    for target in targets:
        for kind in ("images", "labels"):
            folder = out / target.name / kind / split
            if folder.is_dir():
                for stale in folder.glob(".*.tmp*"):
                    stale.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- driver
@dataclass
class SplitSummary:
    target: str
    split: str
    images: int
    written: int
    kept: int
    left_out: int
    classes_seen: int
    num_classes: int
    ignored_fraction: float
    unseen_classes: list[str] = field(default_factory=list)

    def line(self) -> str:
        detail = f"{self.written} written, {self.kept} kept from an earlier run"
        if self.left_out:
            detail += f", {self.left_out} left out (no labelled pixel)"
        return (
            f"{self.target:<12} {self.split:<6} {self.images:>7} images ({detail}); "
            f"{self.classes_seen}/{self.num_classes} classes seen; {100 * self.ignored_fraction:.1f}% pixels ignored"
        )


def _summarise(target: Target, split: str, counts: TargetCounts) -> SplitSummary:
    pixels = counts.class_pixels if counts.class_pixels is not None else np.zeros(target.num_classes, dtype=np.int64)
    total = int(pixels.sum()) + counts.ignored_pixels
    unseen = [target.classes[i] for i in np.flatnonzero(pixels == 0)]
    return SplitSummary(
        target=target.name,
        split=split,
        images=counts.images,
        written=counts.written,
        kept=counts.kept,
        left_out=counts.left_out,
        classes_seen=int((pixels > 0).sum()),
        num_classes=target.num_classes,
        ignored_fraction=counts.ignored_pixels / total if total else 0.0,
        unseen_classes=unseen[:20],
    )


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (it stops the pool and removes the temporaries); a
    worker interrupted mid-write would print its own traceback and could leave a half-written temporary."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_pool(context, workers: int):
    """A worker pool whose processes never see Ctrl-C. SIGINT is ignored in the parent while the workers are
    started: an ignored signal stays ignored across fork and exec, and Python keeps it so at start-up, so a Ctrl-C
    while a spawned worker still imports its modules (before its initializer runs) cannot interrupt it there. The
    parent's handler comes back right after (a Ctrl-C in that instant is lost, not mishandled)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return context.Pool(workers, initializer=_ignore_sigint)
    finally:
        signal.signal(signal.SIGINT, previous)


def _iterate(job, samples: list[Sample], workers: int, progress: bool, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1:
            for sample in samples:
                yield job(sample)
                bar.update()
        else:
            # spawn, not fork: a forked child of a process whose torch / OpenMP threads are running can hang
            context = multiprocessing.get_context("spawn")
            with _start_pool(context, workers) as pool:  # leaving it terminates and joins
                for result in pool.imap_unordered(job, samples, chunksize=max(1, min(32, len(samples) // (workers * 8)))):
                    yield result
                    bar.update()
    finally:
        bar.close()


def prepare(
    preparer: Preparer,
    raw: str | os.PathLike,
    out: str | os.PathLike,
    splits: Sequence[str] | None = None,
    workers: int = 1,
    force: bool = False,
    image_mode: str = "auto",
    progress: bool = True,
    limit: int | None = None,
    command: str | None = None,
) -> list[SplitSummary]:
    """Prepare ``splits`` (default: the preparer's) of one benchmark family from ``raw`` into ``out``.

    image_mode: how unchanged images reach the output (``auto`` = hard link, else copy; ``copy``; ``symlink``).
    limit: prepare only the first ``limit`` samples of each split (a quick look at a huge dataset).
    command: the command line that runs this, stored with a split while it is incomplete (evaluation names it).

    A split is marked ``"complete": false`` in prepare_summary.json when it starts and complete only at its end, so
    an interrupted preparation is never evaluated silently on fewer images. Interrupted (Ctrl-C), the workers are
    stopped and the temporaries removed before :class:`PrepareInterrupted` is raised.
    """
    raw, out = Path(raw).expanduser(), Path(out).expanduser()
    if not raw.is_dir():
        raise DataError(f"--raw {raw} is not a folder; for {preparer.name} it should be {preparer.raw_hint}.")
    if image_mode not in IMAGE_MODES:
        raise DataError(f"Unknown image mode {image_mode!r}; choose one of {', '.join(IMAGE_MODES)}.")
    splits = list(splits or preparer.splits)
    unknown = [s for s in splits if s not in preparer.available_splits]
    if unknown:
        raise DataError(f"{preparer.name} has no split {unknown[0]!r}; available: {', '.join(preparer.available_splits)}.")

    summaries: list[SplitSummary] = []
    for split in splits:
        start = time.time()
        samples = preparer.samples(raw, split)
        if not samples:
            raise DataError(f"No {split} samples of {preparer.name} found under {raw} ({preparer.raw_hint}).")
        stems = [s.stem for s in samples]
        if len(set(stems)) != len(stems):
            duplicate = next(s for s in stems if stems.count(s) > 1)
            raise DataError(f"Two {split} images of {preparer.name} share the name {duplicate}: outputs would collide.")
        if limit:
            samples = samples[:limit]
        _remove_stale_temporaries(out, preparer.targets, split)
        for target in preparer.targets:
            _mark_incomplete(target, out, split, command or preparer.prepare_command())
        job = functools.partial(process_sample, preparer, out, force, image_mode)
        totals = {t.name: TargetCounts() for t in preparer.targets}
        try:
            for result in _iterate(job, samples, workers, progress, f"{preparer.name} {split}"):
                for name, counts in result.items():
                    totals[name].add(counts)
        except KeyboardInterrupt:
            _remove_stale_temporaries(out, preparer.targets, split)  # the pool is gone: nothing writes any more
            raise PrepareInterrupted(preparer.name, split) from None
        for target in preparer.targets:
            summary = _summarise(target, split, totals[target.name])
            summaries.append(summary)
            _write_target_files(target, out, summary, raw, preparer.source_note, time.time() - start)
    return summaries


class PrepareInterrupted(KeyboardInterrupt):
    """Ctrl-C during a split: finished files are kept, the split stays marked incomplete."""

    def __init__(self, name: str, split: str) -> None:
        super().__init__(f"interrupted: {name} {split} is marked incomplete (evaluation refuses it); rerun the same "
                         "command to resume: finished files are kept and skipped.")


def _read_info(root: Path) -> dict[str, Any]:
    import json

    info_path = root / "prepare_summary.json"
    if info_path.is_file():  # keep the entries of splits prepared by earlier runs
        try:
            return json.loads(info_path.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def _mark_incomplete(target: Target, out: Path, split: str, command: str) -> None:
    root = out / target.name
    info = _read_info(root)
    info.setdefault("splits", {})[split] = {"complete": False, "command": command}
    info.update({"benchmark": target.name, "num_classes": target.num_classes})
    write_json(root / "prepare_summary.json", info)


def _write_target_files(target: Target, out: Path, summary: SplitSummary, raw: Path, source: str, seconds: float) -> None:
    root = out / target.name
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "vocab.json", list(target.classes))
    info_path = root / "prepare_summary.json"
    info = _read_info(root)
    info.setdefault("splits", {})[summary.split] = {
        "complete": True,
        "images": summary.images,
        "classes_seen": summary.classes_seen,
        "num_classes": summary.num_classes,
        "ignored_pixel_fraction": summary.ignored_fraction,
        "unseen_classes_first_20": summary.unseen_classes,
        "left_out_without_labels": summary.left_out,
        "raw": str(raw),
        "source": source,
        "seconds": round(seconds, 1),
    }
    info.update({"benchmark": target.name, "num_classes": target.num_classes, "ignore_index": target.ignore_index,
                 "label_format": target.label_suffix.lstrip(".")})
    write_json(info_path, info)
