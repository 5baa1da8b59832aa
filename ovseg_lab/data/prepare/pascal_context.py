"""Pascal-Context 459 / 59 (and 59 + background) from VOC2010 and the Pascal-Context annotations.

Raw ids are the full Pascal-Context label ids: 0 = unlabelled, 1..459 = the classes of ``labels.txt``
(``assets/vocab/pc459.json`` in that order). Sources: ``trainval/<id>.mat`` (``LabelMap``, from
trainval.tar.gz) and, for PC-59, ``trainval_merged.json`` (the Detail API file, RLE per category), which
the official CAT-Seg / mmseg preparations read; PC-59 uses the json when present, else the .mat files.

- pc459: raw v -> train id v - 1, 0 -> ignore 65535 (16-bit labels).
- pc59: the sorted raw ids of ``assets/vocab/pc59_raw_ids.json`` (index 0 = unlabelled): raw_ids[i] -> i - 1;
  unlabelled and the other 400 classes -> ignore 255.
- pc59b (OVSegmentor / GroupViT's 60-class "Context"): the 59 classes as in pc59 and background = 59 for
  every other pixel; vocabulary = the 59 names + "background".

Only the 5,104 ids of ``assets/vocab/pascalcontext_val.txt`` are val; train is the rest of trainval.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ovseg_lab.data.prepare.core import (
    UINT16_IGNORE,
    Converted,
    Preparer,
    Sample,
    Target,
    check_same_size,
    find_dir,
    lookup_table,
)
from ovseg_lab.errors import DataError
from ovseg_lab.vocab import load_vocabulary

NUM_RAW_CLASSES = 459


def pascal_context_val_ids() -> list[str]:
    path = resources.files("ovseg_lab") / "assets" / "vocab" / "pascalcontext_val.txt"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pc59_raw_ids() -> list[int]:
    path = resources.files("ovseg_lab") / "assets" / "vocab" / "pc59_raw_ids.json"
    return list(json.loads(path.read_text(encoding="utf-8"))["raw_ids"])


def read_label_map(path: Path) -> np.ndarray:
    """The ``LabelMap`` of a Pascal-Context trainval .mat file as (H, W) int64 raw ids."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as err:  # scipy raises several types for truncated / foreign files
        raise DataError(f"Cannot read {path} ({type(err).__name__}: {err}).") from None
    if "LabelMap" not in mat:
        raise DataError(f"{path} has no LabelMap (keys: {sorted(k for k in mat if not k.startswith('__'))}).")
    label = np.asarray(mat["LabelMap"]).astype(np.int64)
    if label.ndim != 2 or label.min() < 0 or label.max() > NUM_RAW_CLASSES:
        raise DataError(f"{path}: LabelMap must be a 2-D map of ids 0..{NUM_RAW_CLASSES} (got shape {label.shape}, "
                        f"range {label.min()}..{label.max()}).")
    return label


def decode_detail_annotations(annotations: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Raw-id map from the Detail API's per-category RLE masks, painted in file order (0 where none)."""
    from ovseg_lab.data.prepare.coco import annotation_mask

    label = np.zeros((height, width), dtype=np.int64)
    for ann in annotations:
        label[annotation_mask(ann["segmentation"], height, width).astype(bool)] = int(ann["category_id"])
    return label


class _PascalContext(Preparer):
    available_splits = ("train", "val")
    raw_hint = "VOC2010 folder with JPEGImages/ and trainval/*.mat (and trainval_merged.json for PC-59)"

    def _voc_root(self, raw: Path) -> Path:
        return find_dir(raw, ["", "VOC2010", "VOCdevkit/VOC2010"], "VOC2010 JPEGImages", "JPEGImages",
                        "Untar VOCtrainval_03-May-2010.tar and pass VOCdevkit/VOC2010.")

    def _split_ids(self, candidates: list[str], split: str) -> list[str]:
        val = pascal_context_val_ids()
        if split == "val":
            present = set(candidates)
            return [i for i in val if i in present]
        val_set = set(val)
        return sorted(i for i in candidates if i not in val_set)

    def _mat_samples(self, raw: Path, split: str) -> list[Sample]:
        voc = self._voc_root(raw)
        mats = find_dir(raw, ["trainval", "VOC2010/trainval", "VOCdevkit/VOC2010/trainval"], "Pascal-Context trainval/*.mat",
                        "*.mat", "Untar trainval.tar.gz (Pascal-Context 459-class annotations) next to JPEGImages.")
        ids = self._split_ids(sorted(p.stem for p in mats.glob("*.mat")), split)
        self.source_note = "trainval/*.mat"
        return [Sample(split, i, self._image(voc, i), mats / f"{i}.mat") for i in ids]

    @staticmethod
    def _image(voc: Path, image_id: str) -> Path:
        image = voc / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            raise DataError(f"Pascal-Context annotates {image_id}, but {image} is missing.")
        return image

    def _raw_ids(self, sample: Sample) -> np.ndarray:
        if isinstance(sample.source, Path):
            raw_ids = read_label_map(sample.source)
        else:
            raw_ids = decode_detail_annotations(sample.source["annotations"], sample.source["height"], sample.source["width"])
        check_same_size(sample.image, raw_ids, sample.source if isinstance(sample.source, Path) else "trainval_merged.json")
        return raw_ids


class PC459(_PascalContext):
    name = "pc459"

    def __init__(self) -> None:
        super().__init__()
        self.targets = (Target("pc459", load_vocabulary("pc459").classes, UINT16_IGNORE),)
        # v -> v - 1, 0 -> 65535: the uint16 wrap-around of the official "LabelMap - 1"
        self.lut = ((np.arange(NUM_RAW_CLASSES + 1) - 1) % 65536).astype(np.uint16)

    def samples(self, raw: Path, split: str) -> list[Sample]:
        return self._mat_samples(raw, split)

    def convert(self, sample: Sample) -> Converted:
        return Converted({"pc459": self.lut[self._raw_ids(sample)]})


class PC59(_PascalContext):
    """Writes pc59 (background ignored) and pc59b (background = class 59). ``source``: auto | json | mat."""

    name = "pc59"
    SOURCES = ("auto", "json", "mat")

    def __init__(self, source: str = "auto") -> None:
        super().__init__()
        if source not in self.SOURCES:
            raise DataError(f"pc59 --source must be one of {', '.join(self.SOURCES)}, got {source!r}.")
        self.source = source
        names = load_vocabulary("pc59").classes
        self.targets = (Target("pc59", names), Target("pc59b", (*names, "background")))
        kept = {raw_id: i - 1 for i, raw_id in enumerate(pc59_raw_ids()) if i > 0}
        self.lut = lookup_table(kept, NUM_RAW_CLASSES + 1, 255, np.uint8)
        self.lut_bg = lookup_table(kept, NUM_RAW_CLASSES + 1, len(names), np.uint8)

    def _json_path(self, raw: Path) -> Path | None:
        for candidate in ("trainval_merged.json", "VOC2010/trainval_merged.json", "VOCdevkit/VOC2010/trainval_merged.json"):
            if (raw / candidate).is_file():
                return raw / candidate
        return None

    def samples(self, raw: Path, split: str) -> list[Sample]:
        json_path = self._json_path(raw) if self.source in ("auto", "json") else None
        if json_path is None:
            if self.source == "json":
                raise DataError(f"--source json: no trainval_merged.json under {raw} (or VOC2010/ below it).")
            return self._mat_samples(raw, split)
        voc = self._voc_root(raw)
        try:
            data = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{json_path} is not valid JSON ({err}); download it again.") from None
        images = {img["image_id"]: img for img in data.get("images", [])}
        per_image: dict[Any, list[dict]] = {}
        for ann in data.get("annos_segmentation", []):
            per_image.setdefault(ann["image_id"], []).append(
                {"category_id": ann["category_id"], "segmentation": ann["segmentation"]}
            )
        by_name = {Path(img["file_name"]).stem: img for img in images.values()}
        if split == "val":
            ids = self._split_ids(sorted(by_name), "val")
        else:
            ids = sorted(name for name, img in by_name.items() if img.get("phase") == "train")
            ids = self._split_ids(ids, "train")
        self.source_note = "trainval_merged.json"
        samples = []
        for image_id in ids:
            img = by_name[image_id]
            source = {"height": img["height"], "width": img["width"], "annotations": per_image.get(img["image_id"], [])}
            samples.append(Sample(split, image_id, self._image(voc, image_id), source))
        return samples

    def convert(self, sample: Sample) -> Converted:
        raw_ids = self._raw_ids(sample)
        return Converted({"pc59": self.lut[raw_ids], "pc59b": self.lut_bg[raw_ids]})
