"""COCO-Stuff-171 and COCO-Object from the official COCO / COCO-Stuff downloads.

COCO-Stuff (``stuffthingmaps_trainval2017.zip`` + ``train2017.zip`` / ``val2017.zip``): the stuff-thing maps
are 8-bit PNGs of raw ids 0..181 (COCO category id - 1, with gaps) and 255 = unlabelled. Raw id -> train id
0..170 by ``assets/vocab/coco_stuff171_id_map.json``; unlabelled and unused ids -> 255.

COCO-Object (GroupViT / OVSegmentor's benchmark): the 80 thing classes (train ids 0..79, the first 80
COCO-Stuff-171 names) and background = 80 for every other pixel (stuff and unlabelled). It is built from
the stuff-thing maps when present (what GroupViT's converter reads, so the published numbers) or else by
rasterising ``annotations/instances_<split>2017.json`` (polygons and RLE, drawn in annotation order, crowd
regions included).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ovseg_lab.data.prepare.core import (
    Converted,
    Preparer,
    Sample,
    Target,
    check_same_size,
    find_dir,
    find_file,
    lookup_table,
    read_id_map,
)
from ovseg_lab.errors import DataError, SetupError
from ovseg_lab.vocab import load_vocabulary

COCO_SPLITS = {"train": "train2017", "val": "val2017"}
NUM_THINGS = 80


def coco_stuff_id_map() -> list[dict[str, Any]]:
    path = resources.files("ovseg_lab") / "assets" / "vocab" / "coco_stuff171_id_map.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _image_dirs(coco_split: str) -> list[str]:
    return [f"images/{coco_split}", coco_split, f"coco/{coco_split}", f"coco/images/{coco_split}"]


def _map_dirs(coco_split: str) -> list[str]:
    return [
        f"annotations/{coco_split}",
        f"stuffthingmaps_trainval2017/{coco_split}",
        f"stuffthingmaps/{coco_split}",
        coco_split,
        f"coco/stuffthingmaps_trainval2017/{coco_split}",
    ]


def _paired_samples(image_dir: Path, map_dir: Path, split: str) -> list[Sample]:
    samples = []
    for label in sorted(map_dir.glob("*.png")):
        image = image_dir / f"{label.stem}.jpg"
        if not image.is_file():
            raise DataError(f"The stuff-thing map {label} has no image {image} (incomplete {image_dir.name}.zip?).")
        samples.append(Sample(split, label.stem, image, label))
    return samples


def _stuffthing_samples(raw: Path, split: str) -> list[Sample]:
    coco_split = COCO_SPLITS[split]
    hint = (
        f"Unzip stuffthingmaps_trainval2017.zip and {coco_split}.zip so that {coco_split}/*.png (maps) and "
        f"{coco_split}/*.jpg (images) exist, or use the images/{coco_split} + annotations/{coco_split} layout."
    )
    map_dir = find_dir(raw, _map_dirs(coco_split), f"COCO-Stuff {split} stuff-thing maps", "*.png", hint)
    image_dir = find_dir(raw, _image_dirs(coco_split), f"COCO {split} images", "*.jpg", hint)
    return _paired_samples(image_dir, map_dir, split)


class CocoStuff(Preparer):
    name = "coco_stuff"
    splits = ("train", "val")
    raw_hint = "folder with images/{train2017,val2017} and annotations/{train2017,val2017} (stuffthingmaps)"

    def __init__(self) -> None:
        super().__init__()
        names = load_vocabulary("coco_stuff171").classes
        self.targets = (Target("coco_stuff", names),)
        self.lut = lookup_table({e["raw_id"]: e["train_id"] for e in coco_stuff_id_map()}, 256, 255, np.uint8)

    def samples(self, raw: Path, split: str) -> list[Sample]:
        self.source_note = "stuffthingmaps"
        return _stuffthing_samples(raw, split)

    def convert(self, sample: Sample) -> Converted:
        raw_ids = read_id_map(sample.source)
        check_same_size(sample.image, raw_ids, sample.source)
        return Converted({"coco_stuff": self.lut[raw_ids]})


# ---------------------------------------------------------------------------------------------------- COCO-Object
def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Binary (H, W) uint8 mask of one COCO ``segmentation``: polygons, uncompressed or compressed RLE."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:  # a declared dependency; only a broken install gets here
        raise SetupError("COCO annotations need pycocotools: pip install pycocotools") from None
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):  # compressed RLE
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise DataError(f"Unknown COCO segmentation format: {type(segmentation).__name__}")
    mask = mask_utils.decode(rle)
    if mask.shape != (height, width):
        raise DataError(f"A COCO mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}.")
    return mask


class CocoObject(Preparer):
    """COCO-Object: 80 things + background (id 80). ``source``: auto | stuffthingmaps | instances."""

    name = "coco_object"
    splits = ("val",)
    raw_hint = "COCO folder with val2017/ images and annotations/instances_val2017.json (or the COCO-Stuff maps)"
    SOURCES = ("auto", "stuffthingmaps", "instances")

    def __init__(self, source: str = "auto") -> None:
        super().__init__()
        if source not in self.SOURCES:
            raise DataError(f"coco_object --source must be one of {', '.join(self.SOURCES)}, got {source!r}.")
        self.source = source
        things = load_vocabulary("coco_stuff171").classes[:NUM_THINGS]
        self.targets = (Target("coco_object", (*things, "background")),)
        id_map = coco_stuff_id_map()
        self.map_lut = lookup_table({e["raw_id"]: e["train_id"] for e in id_map if e["isthing"]}, 256, NUM_THINGS, np.uint8)
        # instances json: COCO category id = stuff-thing raw id + 1
        self.category_to_train = {e["raw_id"] + 1: e["train_id"] for e in id_map if e["isthing"]}

    def samples(self, raw: Path, split: str) -> list[Sample]:
        if self.source in ("auto", "stuffthingmaps"):
            try:
                samples = _stuffthing_samples(raw, split)
                self.source_note = "stuffthingmaps"
                return samples
            except DataError:
                if self.source == "stuffthingmaps":
                    raise
        self.source_note = "instances"
        return self._instance_samples(raw, split)

    def _instance_samples(self, raw: Path, split: str) -> list[Sample]:
        coco_split = COCO_SPLITS[split]
        annotations = find_file(
            raw, [f"annotations/instances_{coco_split}.json", f"instances_{coco_split}.json"],
            f"COCO {split} instance annotations", f"Unzip annotations_trainval2017.zip into {raw}.",
        )
        image_dir = find_dir(raw, _image_dirs(coco_split), f"COCO {split} images", "*.jpg", f"Unzip {coco_split}.zip into {raw}.")
        try:
            data = json.loads(annotations.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{annotations} is not valid JSON ({err}); download it again.") from None
        unknown = {c["id"] for c in data.get("categories", [])} - set(self.category_to_train)
        if unknown:
            raise DataError(f"{annotations} has category ids {sorted(unknown)[:5]} that are not COCO's 80 thing classes.")
        per_image: dict[int, list[dict]] = {}
        for ann in data.get("annotations", []):
            per_image.setdefault(ann["image_id"], []).append(
                {"segmentation": ann["segmentation"], "category_id": ann["category_id"]}
            )
        samples = []
        for info in sorted(data.get("images", []), key=lambda i: i["file_name"]):
            image = image_dir / info["file_name"]
            if not image.is_file():
                raise DataError(f"{annotations} lists {info['file_name']}, which is not in {image_dir}.")
            source = {"height": info["height"], "width": info["width"], "annotations": per_image.get(info["id"], [])}
            samples.append(Sample(split, image.stem, image, source))
        return samples

    def convert(self, sample: Sample) -> Converted:
        if isinstance(sample.source, Path):
            raw_ids = read_id_map(sample.source)
            check_same_size(sample.image, raw_ids, sample.source)
            return Converted({"coco_object": self.map_lut[raw_ids]})
        height, width = sample.source["height"], sample.source["width"]
        label = np.full((height, width), NUM_THINGS, dtype=np.uint8)
        for ann in sample.source["annotations"]:
            mask = annotation_mask(ann["segmentation"], height, width)
            label[mask.astype(bool)] = self.category_to_train[ann["category_id"]]
        check_same_size(sample.image, label, f"the annotations of {sample.image.name}")
        return Converted({"coco_object": label})
