"""Prepared benchmarks on disk and the dataset that reads them.

Layout written by ``scripts/prepare_datasets.py`` and ``scripts/make_toy.py``::

    ROOT/images/SPLIT/<stem>.(jpg|png)     RGB images
    ROOT/labels/SPLIT/<stem>.(png|tif)     train ids; uint8 with ignore 255, or uint16 with ignore 65535
    ROOT/vocab.json                        class names in train-id order (optional when packaged)

Other layouts (MESS's prepared folders, ``ovseg_lab.data.mess``) name their image and label folders and pair files
by their endings instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ovseg_lab.data.sampling import SampleKey
from ovseg_lab.errors import DataError
from ovseg_lab.vocab import Vocabulary, load_vocabulary, vocabulary_from_names

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff")


@dataclass
class BenchmarkSpec:
    """One benchmark split: where it lives, its vocabulary and how to score it.

    vocabulary: packaged vocabulary name ("ade150"), a file, or the class names themselves; None means
        ``ROOT/vocab.json``.
    background_from: PAS-20b style scoring: predicted ids >= this value count as the background class
        ``background_from`` (the metric then has ``background_from + 1`` classes).
    prepare: the command that creates this benchmark, quoted in missing-data messages.
    images / labels: image and label folders relative to ``root`` (default ``images/SPLIT``, ``labels/SPLIT``).
    image_suffix / label_suffix: pair files by their endings, as detectron2's ``load_sem_seg`` does (MESS
        registers its datasets with it): image ``<id><image_suffix>`` goes with label ``<id><label_suffix>``.
        None: images by extension, labels by stem.
    metric_convention: the benchmark's own mIoU convention (MESS: ``mmseg``); None = the model's.
    """

    name: str
    root: str
    split: str = "val"
    vocabulary: str | list[str] | None = None
    ignore_index: int = 255
    background_from: int | None = None
    max_images: int | None = None
    prepare: str = ""
    images: str | None = None
    labels: str | None = None
    image_suffix: str | None = None
    label_suffix: str | None = None
    metric_convention: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> "BenchmarkSpec":
        cfg = dict(cfg)
        known = {f for f in cls.__dataclass_fields__ if f not in ("name", "extra")}
        extra = {k: cfg.pop(k) for k in list(cfg) if k not in known}
        cfg.pop("name", None)
        return cls(name=name, extra=extra, **cfg)

    @property
    def image_dir(self) -> Path:
        return Path(self.root) / (self.images or f"images/{self.split}")

    @property
    def label_dir(self) -> Path:
        return Path(self.root) / (self.labels or f"labels/{self.split}")

    def missing(self) -> str | None:
        """A one-line description of what is missing, or None when the split is on disk."""
        hint = f" (prepare it with: {self.prepare})" if self.prepare else ""
        if not self.image_dir.is_dir() or not self.label_dir.is_dir():
            return f"{self.name} {self.split} split not found at {self.image_dir}{hint}"
        unfinished = self._unfinished_command()
        if unfinished is not None:
            return (f"{self.name} {self.split} split at {self.image_dir} is incomplete (its preparation was "
                    f"interrupted; scores on it would come from fewer images); finish it with: {unfinished or self.prepare}")
        if self.vocabulary is None and not (Path(self.root) / "vocab.json").is_file():
            return f"{self.name} has no vocabulary file {Path(self.root) / 'vocab.json'}{hint}"
        return None

    def _unfinished_command(self) -> str | None:
        """The command that started this split's preparation when prepare_summary.json marks it incomplete."""
        summary = Path(self.root) / "prepare_summary.json"
        if not summary.is_file():
            return None
        import json

        try:
            entry = (json.loads(summary.read_text()).get("splits") or {}).get(self.split) or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            return None
        if entry.get("complete", True):  # folders prepared before the flag existed count as complete
            return None
        return str(entry.get("command") or "")

    def load_vocabulary(self) -> Vocabulary:
        """The class names; their number must match ``num_classes`` of the config, or of the prepared folder's
        prepare_summary.json when the folder's own vocab.json is used."""
        if self.vocabulary is not None and not isinstance(self.vocabulary, str):
            return vocabulary_from_names(list(self.vocabulary), name=self.name)
        source = self.vocabulary or str(Path(self.root) / "vocab.json")
        return load_vocabulary(source, name=self.name, expected_size=self.expected_num_classes())

    def expected_num_classes(self) -> int | None:
        if self.extra.get("num_classes") is not None:
            return int(self.extra["num_classes"])
        summary = Path(self.root) / "prepare_summary.json"
        if self.vocabulary is None and summary.is_file():
            import json

            try:
                value = json.loads(summary.read_text()).get("num_classes")
            except (OSError, json.JSONDecodeError):
                return None
            return int(value) if isinstance(value, int) else None
        return None

    @property
    def num_eval_classes(self) -> int:
        """Classes the metric counts (PAS-20b: 20 objects + background)."""
        return self.background_from + 1 if self.background_from is not None else len(self.load_vocabulary())


def _find_with_extension(folder: Path, stem: str, extensions: tuple[str, ...]) -> Path | None:
    for ext in extensions:
        candidate = folder / f"{stem}{ext}"
        if candidate.exists():
            return candidate
    return None


class CorruptFileError(DataError):
    """An image or label file that does not decode (truncated, overwritten, not an image at all).

    Datasets skip such samples and count them (see :class:`BadSampleLog`); anything that decodes but is wrong
    (label ids outside the vocabulary, a size mismatch, a wrong label mode) stays a :class:`DataError`.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"Cannot read {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def read_label(path: Path) -> np.ndarray:
    """A label map as a 2-D integer array (uint8 or uint16 as stored)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(f"Label {path} has image mode {img.mode}; expected a single-channel id map.")
            array = np.array(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptFileError(path, f"{type(err).__name__}: {err}") from None
    if array.ndim != 2:
        raise DataError(f"Label {path} is not a 2-D id map (shape {array.shape}).")
    return array


def read_image(path: Path) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.array(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptFileError(path, f"{type(err).__name__}: {err}") from None


class SegmentationFolder(Dataset):
    """Images and label maps of one prepared benchmark split.

    Items: ``{"image": uint8 (3, H, W), "label": int64 (H, W), "stem": str}``; a sample whose image or label
    does not decode becomes ``{"bad": path, "reason": str}`` (``collate`` drops it and reports it).
    Label ids must lie in [0, num_classes) or equal ``ignore_index``; anything else is an error naming the file.
    Indices may be :class:`SampleKey` (index, seed): the transform then draws from that seed only.
    """

    def __init__(self, spec: BenchmarkSpec, num_classes: int | None = None, transform=None) -> None:
        missing = spec.missing()
        if missing:
            raise DataError(missing)
        self.spec = spec
        self.transform = transform
        self.num_classes = num_classes if num_classes is not None else len(spec.load_vocabulary())
        def is_image(p: Path) -> bool:
            return p.name.endswith(spec.image_suffix) if spec.image_suffix else p.suffix.lower() in IMAGE_EXTENSIONS

        # hidden files: temporaries of an interrupted atomic write, editor or OS litter
        images = sorted(p for p in spec.image_dir.iterdir() if is_image(p) and not p.name.startswith("."))
        if not images:
            raise DataError(f"No images (*{spec.image_suffix or '.jpg / *.png'}) in {spec.image_dir}.")
        if spec.max_images:
            images = images[: spec.max_images]
        self.samples: list[tuple[Path, Path]] = []
        for image in images:
            if spec.label_suffix:
                expected = f"{image.name[: len(image.name) - len(spec.image_suffix or image.suffix)]}{spec.label_suffix}"
                label = spec.label_dir / expected if (spec.label_dir / expected).exists() else None
            else:
                expected = f"{image.stem}.png or .tif"
                label = _find_with_extension(spec.label_dir, image.stem, LABEL_EXTENSIONS)
            if label is None:
                raise DataError(f"No label for image {image} in {spec.label_dir} (expected {expected}).")
            self.samples.append((image, label))

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        label = read_label(label_path)
        if image.shape[:2] != label.shape:
            raise DataError(f"Image {image_path} is {image.shape[1]}x{image.shape[0]} but its label {label_path} is {label.shape[1]}x{label.shape[0]}.")
        valid = label != self.spec.ignore_index
        if valid.any() and label[valid].max() >= self.num_classes:
            bad = np.unique(label[valid & (label >= self.num_classes)])[:5].tolist()
            vocabulary = self.spec.vocabulary or Path(self.spec.root) / "vocab.json"
            if not isinstance(vocabulary, (str, Path)):  # the names themselves: say where they came from
                vocabulary = f"{len(vocabulary)} class names given with the benchmark"
            raise DataError(
                f"Label {label_path} holds ids {bad} outside the {self.num_classes}-class vocabulary of "
                f"{self.spec.name} ({vocabulary}; ignore id {self.spec.ignore_index}): the vocabulary is too "
                "short for these labels, or the labels were not converted to train ids."
            )
        return image, label

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, seed = (key.index, key.seed) if isinstance(key, SampleKey) else (int(key), None)
        try:
            image, label = self.load(index)
        except CorruptFileError as err:
            return {"bad": str(err.path), "reason": err.reason}
        image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        label_t = torch.from_numpy(label.astype(np.int64))
        if self.transform is not None:
            if seed is None:
                image_t, label_t = self.transform(image_t, label_t)
            else:  # the sample's own generator: the same crop/flip whichever worker or run loads it
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image_t, label_t = self.transform(image_t, label_t)
        return {"image": image_t, "label": label_t, "stem": self.samples[index][0].stem}
