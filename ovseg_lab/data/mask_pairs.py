"""Mask-category pairs for OVSeg's CLIP adaptation: caption readers, webdataset shards, datasets, DataModule.

Mining the pairs runs OVSeg's MaskFormer and CLIP and lives above ``data/``: :mod:`ovseg_lab.ovseg_chain`
(``scripts/mine_mask_pairs.py``); it writes its shards with :func:`pair_sample`.

Shard samples: ``__key__``, ``png`` (masked crop, background = CLIP mean colour), ``mask.npy`` (crop mask, bool),
``txt`` (the noun), ``json`` (image, mask index, score, ground-truth class when known).
"""

from __future__ import annotations

import io
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ovseg_lab.data.benchmark import IMAGE_EXTENSIONS, read_image
from ovseg_lab.data.datamodule import SegmentationDataModule
from ovseg_lab.data.shards import shard_urls as find_shards
from ovseg_lab.errors import DataError, SetupError
from ovseg_lab.layers.normalize import OPENAI_MEAN


# ---------------------------------------------------------------------------------------------- captions
def load_captions(path: str | Path) -> dict[str, list[str]]:
    """Image stem -> captions, from COCO Captions JSON ({"images": [{id, file_name}], "annotations": [{image_id,
    caption}]}) or JSON lines ({"stem", "caption"}, the toy benchmark's format)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Captions file not found: {path}.")
    captions: dict[str, list[str]] = defaultdict(list)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    row = json.loads(line)
                    captions[str(row["stem"])].append(str(row["caption"]))
        else:
            data = json.loads(text)
            stems = {img["id"]: Path(img["file_name"]).stem for img in data["images"]}
            for ann in data["annotations"]:
                captions[stems[ann["image_id"]]].append(str(ann["caption"]))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"Captions file {path} is neither COCO Captions JSON nor JSON lines with stem/caption: {err}") from None
    return dict(captions)


# ---------------------------------------------------------------------------------------------- shards
def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def pair_sample(key: str, crop: np.ndarray, mask: np.ndarray, noun: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """A shard sample: crop (S, S, 3) uint8, mask (S, S) bool."""
    return {"__key__": key, "png": _png_bytes(crop), "mask.npy": _npy_bytes(mask.astype(bool)), "txt": noun,
            "json": json.dumps(dict(meta)).encode()}


def shard_urls(shards: str | Path | Sequence[str]) -> list[str]:
    """A folder of .tar shards, a glob, or a list -> sorted shard paths; a clear error when there are none."""
    return find_shards(shards, "mask-pair shards (*.tar)", "Mine them with scripts/mine_mask_pairs.py.")


def decode_pair(sample: Mapping[str, Any]) -> dict[str, Any]:
    image = np.array(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    mask = np.load(io.BytesIO(sample["mask.npy"]))
    text = sample["txt"].decode() if isinstance(sample["txt"], bytes) else str(sample["txt"])
    return {"image": torch.from_numpy(image).permute(2, 0, 1).contiguous(), "mask": torch.from_numpy(mask.astype(bool)),
            "text": text}


# the colour the release's mask-prompt-tuning transform takes for background (open_clip_training/src/open_clip/
# transform.py:72-83, Maskget: a pixel is background when all three channels equal it)
RELEASE_MASK_COLOUR = (124, 116, 103)
AUGMENTS = ("flip", "random_resized_crop")
MASK_SOURCES = ("stored", "colour")


def release_crop_transform(image: torch.Tensor, mask: torch.Tensor, mask_from: str = "colour",
                           colour: Sequence[int] = RELEASE_MASK_COLOUR) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's training transform for masked crops (``image_transform(is_train=True, with_mask=True)``):
    torchvision's RandomResizedCrop to the crop's size, scale (0.9, 1), PIL bicubic, no flip; then the mask is
    "every pixel not exactly ``colour``" (``mask_from=colour``) or the stored mask cropped alike (nearest).

    image (3, S, S) uint8, mask (S, S) bool -> the same shapes.
    """
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from PIL import Image

    size = image.shape[-1]
    crop = T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    top, left, height, width = crop.get_params(pil, crop.scale, crop.ratio)
    array = np.asarray(TF.resized_crop(pil, top, left, height, width, [size, size], T.InterpolationMode.BICUBIC))
    if mask_from == "colour":
        new_mask = torch.from_numpy(~(array == np.asarray(colour, dtype=np.uint8)).all(axis=2))
    else:
        new_mask = TF.resized_crop(mask[None].float(), top, left, height, width, [size, size],
                                   T.InterpolationMode.NEAREST)[0] > 0.5
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), new_mask


class PairShards(IterableDataset):
    """An endless, shuffled stream of decoded pairs from webdataset shards (resampled, split by node/worker).

    augment: ``flip`` (ours: random horizontal flips of crop and mask) or ``random_resized_crop`` (the release:
        :func:`release_crop_transform`). mask_from: ``stored`` (the mined mask) or ``colour`` (the release: pixels
        that differ from ``mask_colour``; None = the colour our miner fills the background with, round(255 * CLIP
        mean); the release's constant is :data:`RELEASE_MASK_COLOUR`). ``colour`` needs ``random_resized_crop``.
    """

    def __init__(self, shards, shuffle_buffer: int = 2000, flip: bool = True, seed: int = 0, augment: str = "flip",
                 mask_from: str = "stored", mask_colour: Sequence[int] | None = None) -> None:
        super().__init__()
        if augment not in AUGMENTS or mask_from not in MASK_SOURCES:
            raise SetupError(f"data.pairs.augment must be one of {AUGMENTS} and data.pairs.mask_from one of "
                             f"{MASK_SOURCES}, got '{augment}' / '{mask_from}'.")
        if mask_from == "colour" and augment != "random_resized_crop":
            raise SetupError("data.pairs.mask_from=colour is the release's transform: set data.pairs.augment=random_resized_crop.")
        self.urls = shard_urls(shards)
        self.shuffle_buffer = shuffle_buffer
        self.flip = flip
        self.seed = seed
        self.augment = augment
        self.mask_from = mask_from
        self.mask_colour = tuple(int(c) for c in mask_colour) if mask_colour is not None else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        # resampled shards never run dry, so every rank sees the same number of batches (no DDP hang)
        dataset = wds.WebDataset(self.urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node,
                                 handler=wds.reraise_exception).shuffle(self.shuffle_buffer)
        worker = (torch.utils.data.get_worker_info() or type("w", (), {"id": 0})).id
        rng = random.Random(self.seed + worker)
        if self.augment == "random_resized_crop":
            torch.manual_seed(self.seed + worker)  # RandomResizedCrop draws from torch's generator
        colour = self.mask_colour or fill_colour()
        for sample in dataset:
            item = decode_pair(sample)
            if self.augment == "random_resized_crop":
                item["image"], item["mask"] = release_crop_transform(item["image"], item["mask"], self.mask_from, colour)
            elif self.flip and rng.random() < 0.5:
                item["image"], item["mask"] = item["image"].flip(-1), item["mask"].flip(-1)
            yield item


def fill_colour() -> tuple[int, int, int]:
    """The uint8 colour our miner fills the background of a masked crop with: round(255 * CLIP mean)."""
    return tuple(int(round(255 * c)) for c in OPENAI_MEAN)


class CaptionImages(Dataset):
    """Whole images with one of their captions (image-caption pairs; mask = the whole image).

    The toy pipeline's stand-in for CLIP's web pre-training data.
    """

    def __init__(self, images: str | Path, captions: str | Path, size: int, flip: bool = True) -> None:
        self.image_dir = Path(images)
        if not self.image_dir.is_dir():
            raise DataError(f"Caption image folder not found: {self.image_dir}.")
        by_stem = load_captions(captions)
        files = {p.stem: p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        self.items = [(files[s], c) for s, caps in sorted(by_stem.items()) if s in files for c in caps]
        if not self.items:
            raise DataError(f"No image of {self.image_dir} has a caption in {captions}.")
        self.size = size
        self.flip = flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, caption = self.items[index]
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1)
        image = torch.nn.functional.interpolate(image[None].float(), size=(self.size, self.size), mode="bilinear",
                                                align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        if self.flip and random.random() < 0.5:
            image = image.flip(-1)
        return {"image": image, "mask": torch.ones(self.size, self.size, dtype=torch.bool), "text": caption}


def collate_pairs(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"image": torch.stack([b["image"] for b in batch]), "mask": torch.stack([b["mask"] for b in batch]),
            "text": [b["text"] for b in batch]}


class MaskPairDataModule(SegmentationDataModule):
    """Training on (image, text) pairs, evaluation on the segmentation benchmarks of :class:`SegmentationDataModule`.

    pairs: ``{shards: folder | glob}`` (mined mask-category pairs) or ``{captions: file, images: folder}``
    (image-caption pairs); ``crop_size`` for caption images (the CLIP input size); ``shuffle_buffer``.
    """

    def __init__(self, *args, pairs: Mapping[str, Any] | None = None, pair_batch_size: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pairs = dict(pairs or {})
        if not (self.pairs.get("shards") or self.pairs.get("captions")):
            raise SetupError("data.pairs needs 'shards' (mined mask-category pairs) or 'captions' + 'images'.")
        self.pair_batch_size = pair_batch_size or self.batch_size

    def missing(self, stage: str = "fit") -> list[str]:
        problems = [m for m in (s.missing() for s in self.eval_specs) if m] if not self.generate_toy else []
        if stage == "fit":
            if self.pairs.get("shards"):
                try:
                    shard_urls(self.pairs["shards"])
                except DataError as err:
                    problems.append(str(err))
            elif not self.generate_toy and not Path(str(self.pairs["captions"])).is_file():
                problems.append(f"captions file {self.pairs['captions']} not found")
        return problems

    def train_dataloader(self) -> DataLoader:
        if self.pairs.get("shards"):
            dataset: Dataset | IterableDataset = PairShards(
                self.pairs["shards"], self.pairs.get("shuffle_buffer", 2000), augment=self.pairs.get("augment", "flip"),
                mask_from=self.pairs.get("mask_from", "stored"), mask_colour=self.pairs.get("mask_colour"))
            return DataLoader(dataset, batch_size=self.pair_batch_size, num_workers=self.num_workers,
                              collate_fn=collate_pairs, persistent_workers=self.num_workers > 0)
        dataset = CaptionImages(self.pairs["images"], self.pairs["captions"], int(self.pairs.get("crop_size", 224)))
        return DataLoader(dataset, batch_size=self.pair_batch_size, shuffle=True, drop_last=len(dataset) >= self.pair_batch_size,
                          num_workers=self.num_workers, collate_fn=collate_pairs, persistent_workers=self.num_workers > 0)
