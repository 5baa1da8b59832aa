"""Cityscapes-19 (val: 500 images of 3 cities), the street-scene benchmark of the training-free protocol.

Images ``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png``, labels ``gtFine/<split>/<city>/<id>_gtFine_labelIds.png``
(the 34 Cityscapes ids). The 19 evaluated classes get the official train ids (cityscapesscripts ``labels.py``:
``trainId``, what mmseg's ``CityscapesDataset`` reads from ``*_labelTrainIds.png``); every other id -> 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ovseg_lab.data.prepare.core import Converted, Preparer, Sample, Target, check_same_size, find_dir, read_id_map
from ovseg_lab.errors import DataError
from ovseg_lab.vocab import load_vocabulary

VOID = 255
# Cityscapes label id -> train id of the 19 evaluated classes (road ... bicycle)
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13}
TRAIN_IDS |= {27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


class Cityscapes19(Preparer):
    name = "cityscapes"
    raw_hint = "folder holding leftImg8bit/ and gtFine/ (leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip)"

    def __init__(self) -> None:
        super().__init__()
        self.targets = (Target("cityscapes19", load_vocabulary("cityscapes19").classes),)
        self.lut = np.full(256, VOID, dtype=np.uint8)
        for label_id, train_id in TRAIN_IDS.items():
            self.lut[label_id] = train_id

    def samples(self, raw: Path, split: str) -> list[Sample]:
        hint = "Unzip leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into one folder and pass it."
        images = find_dir(
            raw,
            [f"leftImg8bit/{split}", f"cityscapes/leftImg8bit/{split}"],
            f"Cityscapes {split} images",
            f"*/*{IMAGE_SUFFIX}",
            hint,
        )
        labels = images.parent.parent / "gtFine" / split
        samples = []
        for image in sorted(images.glob(f"*/*{IMAGE_SUFFIX}")):
            stem = image.name[: -len(IMAGE_SUFFIX)]
            label = labels / image.parent.name / f"{stem}{LABEL_SUFFIX}"
            if not label.is_file():
                raise DataError(f"The Cityscapes image {image} has no label {label}. {hint}")
            samples.append(Sample(split, stem, image, label))
        self.source_note = str(images.parent.parent)
        return samples

    def convert(self, sample: Sample) -> Converted:
        raw_ids = read_id_map(sample.source)
        if raw_ids.dtype != np.uint8:
            raise DataError(f"{sample.source} is {raw_ids.dtype}; Cityscapes labelIds PNGs are 8-bit.")
        check_same_size(sample.image, raw_ids, sample.source)
        return Converted({"cityscapes19": self.lut[raw_ids]})
