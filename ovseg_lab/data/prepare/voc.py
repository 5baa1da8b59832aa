"""PASCAL VOC 2012: PAS-20 (background ignored) and PAS-20b (background scored) from one pass.

Labels come from ``SegmentationClassAug`` (the SBD-augmented set the CAT-Seg preparation reads) or else the
original ``SegmentationClass``: 0 = background, 1..20 = the VOC classes, 255 = void boundary. Palette PNGs
are read as indices; RGB-encoded copies are decoded with the VOC colour map.

- voc20: k -> k - 1, background and void -> 255. An image left without any labelled pixel is not written
  (as in the official preparation; it would add nothing to the confusion matrix).
- voc20b: k -> k - 1, background -> 20, void -> 255. Its vocabulary (``assets/vocab/voc20b.json``) is the
  20 VOC names + 39 PC-59 names that stand for background: predictions >= 20 count as background.

val = ``ImageSets/Segmentation/val.txt`` (1,449 images); train = the other SegmentationClassAug images
(train_aug, 10,582) or ``ImageSets/Segmentation/train.txt`` without the augmented set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ovseg_lab.data.prepare.core import Converted, Preparer, Sample, Target, check_same_size, find_dir, find_file
from ovseg_lab.errors import DataError
from ovseg_lab.vocab import load_vocabulary

VOID = 255
NUM_VOC_CLASSES = 20


def voc_colormap(size: int = 256) -> np.ndarray:
    """The PASCAL VOC palette: colour of index i from the bits of i spread over R, G, B (size x 3 uint8)."""
    colours = np.zeros((size, 3), dtype=np.uint8)
    for index in range(size):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = (r, g, b)
    return colours


def read_voc_label(path: Path) -> np.ndarray:
    """VOC class indices (0..20, 255) of a SegmentationClass(Aug) PNG: palette, grey or RGB-encoded."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            array = np.array(img.convert("RGB") if mode not in ("P", "L", "RGB") else img)
    except (OSError, SyntaxError) as err:
        raise DataError(f"Cannot read label {path}: {err}") from None
    if array.ndim == 2:
        return array
    codes = (array[..., 0].astype(np.int64) << 16) | (array[..., 1].astype(np.int64) << 8) | array[..., 2]
    palette = voc_colormap()
    known = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(palette[: NUM_VOC_CLASSES + 1])}
    r, g, b = (int(c) for c in palette[VOID])  # (224, 224, 192): the void boundary
    known[(r << 16) | (g << 8) | b] = VOID
    values, inverse = np.unique(codes, return_inverse=True)
    unknown = [hex(int(v)) for v in values if int(v) not in known]
    if unknown:
        raise DataError(f"{path} holds colours {unknown[:3]} that are not VOC classes (RGB-encoded label?).")
    return np.array([known[int(v)] for v in values], dtype=np.uint8)[inverse.reshape(codes.shape)]


class VOC20(Preparer):
    """Writes voc20 (PAS-20) and voc20b (PAS-20b) from the same VOC2012 labels."""

    name = "voc20"
    raw_hint = "VOC2012 folder (JPEGImages/, ImageSets/, SegmentationClass/ or SegmentationClassAug/)"

    def __init__(self) -> None:
        super().__init__()
        self.targets = (Target("voc20", load_vocabulary("voc20").classes), Target("voc20b", load_vocabulary("voc20b").classes))
        shift = np.full(256, VOID, dtype=np.uint8)
        shift[1 : NUM_VOC_CLASSES + 1] = np.arange(NUM_VOC_CLASSES)
        self.lut = shift
        self.lut_bg = shift.copy()
        self.lut_bg[0] = NUM_VOC_CLASSES

    def samples(self, raw: Path, split: str) -> list[Sample]:
        hint = "Untar VOCtrainval_11-May-2012.tar and pass VOCdevkit/VOC2012."
        voc = find_dir(raw, ["", "VOC2012", "VOCdevkit/VOC2012"], "VOC2012 JPEGImages", "JPEGImages", hint)
        labels = None
        for candidate in (voc / "SegmentationClassAug", raw / "SegmentationClassAug", voc / "SegmentationClass"):
            if candidate.is_dir() and next(candidate.glob("*.png"), None) is not None:
                labels = candidate
                break
        if labels is None:
            raise DataError(f"Neither {voc / 'SegmentationClassAug'} nor {voc / 'SegmentationClass'} holds label PNGs. {hint}")
        val_list = find_file(voc, ["ImageSets/Segmentation/val.txt"], "the VOC2012 segmentation val list", hint)
        val_ids = [line.strip() for line in val_list.read_text().splitlines() if line.strip()]
        if split == "val":
            ids = val_ids
        elif labels.name == "SegmentationClassAug":
            val_set = set(val_ids)
            ids = sorted(p.stem for p in labels.glob("*.png") if p.stem not in val_set)
        else:
            train_list = find_file(voc, ["ImageSets/Segmentation/train.txt"], "the VOC2012 segmentation train list", hint)
            ids = [line.strip() for line in train_list.read_text().splitlines() if line.strip()]
        self.source_note = labels.name
        samples = []
        for image_id in ids:
            image, label = voc / "JPEGImages" / f"{image_id}.jpg", labels / f"{image_id}.png"
            if not image.is_file() or not label.is_file():
                raise DataError(f"VOC2012 {split} lists {image_id}, but {image if not image.is_file() else label} is missing.")
            samples.append(Sample(split, image_id, image, label))
        return samples

    def convert(self, sample: Sample) -> Converted:
        raw_ids = read_voc_label(sample.source)
        check_same_size(sample.image, raw_ids, sample.source)
        voc20 = self.lut[raw_ids]
        return Converted({"voc20": voc20 if (voc20 != VOID).any() else None, "voc20b": self.lut_bg[raw_ids]})
