"""ADE20K-150 (ADEChallengeData2016) and ADE20K-full 847 (ADE20K_2021_17_01).

ADE-150: ``annotations/<split>/*.png`` hold 0 = other (-> ignore 255) and 1..150 (-> train id 0..149).

ADE-847: ``images/ADE/<split>/<scene>/ADE_*_<n>_seg.png`` encode the object class of each pixel as
``R // 10 * 256 + G`` (the instance is in B); that index is the ``ade_id`` of
``assets/vocab/ade847_id_map.json``, mapped to train ids 0..846, every other index (0 = unlabelled) -> 65535.
Labels are 16-bit. As in the MaskFormer / CAT-Seg preparation, an image whose short side exceeds 512 is
resized to short side 512 (image: bilinear, label: nearest, OpenCV sampling conventions) and images are
re-encoded as JPEG at PIL's default quality. The image list comes from ``index_ade20k.pkl`` when present,
else from the folder tree.
"""

from __future__ import annotations

import json
import pickle
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np

from ovseg_lab.data.prepare.core import (
    UINT16_IGNORE,
    Converted,
    Preparer,
    Sample,
    Target,
    check_same_size,
    find_dir,
    read_id_map,
    read_rgb,
)
from ovseg_lab.errors import DataError
from ovseg_lab.vocab import load_vocabulary

ADE_SPLITS = {"train": "training", "val": "validation"}
ADE847_MAX_SHORT_SIDE = 512


class ADE150(Preparer):
    name = "ade150"
    raw_hint = "ADEChallengeData2016 folder (images/ and annotations/)"

    def __init__(self) -> None:
        super().__init__()
        self.targets = (Target("ade150", load_vocabulary("ade150").classes),)

    def samples(self, raw: Path, split: str) -> list[Sample]:
        ade_split = ADE_SPLITS[split]
        hint = "Unzip ADEChallengeData2016.zip and pass the ADEChallengeData2016 folder."
        labels = find_dir(raw, [f"annotations/{ade_split}", f"ADEChallengeData2016/annotations/{ade_split}"],
                          f"ADE20K-150 {split} annotations", "*.png", hint)
        images = labels.parent.parent / "images" / ade_split
        samples = []
        for label in sorted(labels.glob("*.png")):
            image = images / f"{label.stem}.jpg"
            if not image.is_file():
                raise DataError(f"The ADE20K annotation {label} has no image {image}.")
            samples.append(Sample(split, label.stem, image, label))
        self.source_note = str(labels.parent.parent)
        return samples

    def convert(self, sample: Sample) -> Converted:
        raw_ids = read_id_map(sample.source)
        if raw_ids.dtype != np.uint8:
            raise DataError(f"{sample.source} is {raw_ids.dtype}; ADEChallengeData2016 annotations are 8-bit.")
        check_same_size(sample.image, raw_ids, sample.source)
        return Converted({"ade150": raw_ids - np.uint8(1)})  # 0 (other) wraps to 255 = ignore


# ---------------------------------------------------------------------------------------------------- ADE-847
def decode_ade_classes(seg_rgb: np.ndarray) -> np.ndarray:
    """Object class index of every pixel of an ADE20K ``_seg.png``: R // 10 * 256 + G, (H, W) int32."""
    return (seg_rgb[..., 0].astype(np.int32) // 10) * 256 + seg_rgb[..., 1].astype(np.int32)


def short_side_resize_shape(height: int, width: int, max_short: int = ADE847_MAX_SHORT_SIDE) -> tuple[int, int] | None:
    """(H, W) after shrinking the short side to ``max_short`` (aspect kept, rounded), or None to keep the size."""
    if width >= height > max_short:
        return max_short, round(width / height * max_short)
    if height >= width > max_short:
        return round(height / width * max_short), max_short
    return None


def resize_nearest(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """OpenCV INTER_NEAREST: output pixel i samples input pixel floor(i / (out / in)) (OpenCV's own arithmetic)."""

    def source_index(size_in: int, size_out: int) -> np.ndarray:
        step = 1.0 / (size_out / size_in)
        return np.minimum(np.floor(np.arange(size_out) * step).astype(np.int64), size_in - 1)

    rows, cols = source_index(label.shape[0], shape[0]), source_index(label.shape[1], shape[1])
    return label[rows[:, None], cols[None, :]]


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source pixels and weight of the second one for each output pixel, as OpenCV's INTER_LINEAR picks them:
    half-pixel centres, clamped at the borders."""
    position = (np.arange(size_out) + 0.5) * (1.0 / (size_out / size_in)) - 0.5
    first = np.floor(position).astype(np.int64)
    weight = position - first
    before = first < 0
    first[before], weight[before] = 0, 0.0
    after = first >= size_in - 1
    first[after], weight[after] = size_in - 1, 0.0
    return first, np.minimum(first + 1, size_in - 1), weight.astype(np.float32)


def resize_bilinear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """OpenCV INTER_LINEAR (no antialiasing) on a (H, W, 3) uint8 image, in float: within one grey level of
    OpenCV's fixed-point result."""
    r0, r1, wr = _linear_taps(image.shape[0], shape[0])
    c0, c1, wc = _linear_taps(image.shape[1], shape[1])
    pixels = image.astype(np.float32)
    rows = pixels[r0] * (1 - wr)[:, None, None] + pixels[r1] * wr[:, None, None]
    out = rows[:, c0] * (1 - wc)[None, :, None] + rows[:, c1] * wc[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def ade847_id_map() -> dict[int, int]:
    path = resources.files("ovseg_lab") / "assets" / "vocab" / "ade847_id_map.json"
    return {e["ade_id"]: e["train_id"] for e in json.loads(path.read_text(encoding="utf-8"))}


class ADE847(Preparer):
    name = "ade847"
    raw_hint = "ADE20K_2021_17_01 folder (index_ade20k.pkl and images/ADE/)"

    def __init__(self) -> None:
        super().__init__()
        self.targets = (Target("ade847", load_vocabulary("ade847").classes, UINT16_IGNORE),)
        mapping = ade847_id_map()
        self.lut = np.full(max(mapping) + 1, UINT16_IGNORE, dtype=np.uint16)
        for ade_id, train_id in mapping.items():
            self.lut[ade_id] = train_id

    def _root(self, raw: Path) -> Path:
        for root in (raw, raw / "ADE20K_2021_17_01"):
            if (root / "images" / "ADE").is_dir():
                return root
        raise DataError(
            f"Cannot find images/ADE under {raw} or {raw / 'ADE20K_2021_17_01'}: pass the unpacked ADE20K_2021_17_01 folder."
        )

    def _indexed_images(self, root: Path) -> list[Path] | None:
        index = root / "index_ade20k.pkl"
        if not index.is_file():
            return None
        try:
            with index.open("rb") as f:
                data = pickle.load(f)  # the dataset's own index file (a dict of lists / arrays)
            folders, filenames = list(data["folder"]), list(data["filename"])
        except Exception as err:  # unreadable pickle or another layout
            raise DataError(f"Cannot read {index} ({type(err).__name__}: {err}); delete it to list images from the folders.") from None
        images = []
        for folder, filename in zip(folders, filenames):
            parts = PurePosixPath(str(folder).replace("\\", "/")).parts
            # index folders read "ADE20K_2021_17_01/images/ADE/<split>/..." (relative to the dataset's parent)
            relative = parts[parts.index("images"):] if "images" in parts else parts
            images.append(root.joinpath(*relative, str(filename)))
        return images

    def samples(self, raw: Path, split: str) -> list[Sample]:
        root = self._root(raw)
        prefix = "ADE_val_" if split == "val" else "ADE_train_"
        images = self._indexed_images(root)
        if images is None:
            images = sorted((root / "images" / "ADE" / ADE_SPLITS[split]).rglob(f"{prefix}*.jpg"))
            self.source_note = "folder tree (no index_ade20k.pkl)"
        else:
            self.source_note = "index_ade20k.pkl"
        samples = []
        for image in images:
            if not image.name.startswith(prefix):
                continue
            seg = image.with_name(f"{image.stem}_seg.png")
            if not image.is_file() or not seg.is_file():
                raise DataError(f"ADE20K image {image} or its mask {seg.name} is missing (index lists it).")
            samples.append(Sample(split, image.stem, image, seg))
        return sorted(samples, key=lambda s: s.stem)

    def convert(self, sample: Sample) -> Converted:
        seg = read_rgb(sample.source)
        classes = decode_ade_classes(seg)
        check_same_size(sample.image, classes, sample.source)
        image = read_rgb(sample.image)
        shape = short_side_resize_shape(*classes.shape)
        if shape is not None:
            image = resize_bilinear(image, shape)
            classes = resize_nearest(classes, shape)
        label = np.full(classes.shape, UINT16_IGNORE, dtype=np.uint16)
        known = classes < len(self.lut)
        label[known] = self.lut[classes[known]]
        return Converted({"ade847": label}, image=image)
