"""Mask-category pairs for OVSeg's CLIP adaptation: mining, webdataset shards, datasets, DataModule.

Mining (``scripts/mine_mask_pairs.py`` -> :func:`mine_pairs`): for every image, nouns from its captions
(:mod:`ovseg_lab.data.nouns`); masks from a trained MaskFormer (or the ground truth); each noun is given the one
mask that the pre-trained CLIP scores highest for it (softmax over the image's nouns); the masked crop and the
noun become a pair. Ground-truth alternatives of OVSeg Table 2: ``masks=gt`` (ground-truth segments) and
``nouns=gt`` (ground-truth class names instead of caption nouns).

Shard samples: ``__key__``, ``png`` (masked crop, background = CLIP mean colour), ``mask.npy`` (crop mask, bool),
``txt`` (the noun), ``json`` (image, mask index, score, ground-truth class when known).
"""

from __future__ import annotations

import io
import json
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ovseg_lab.data.benchmark import IMAGE_EXTENSIONS, LABEL_EXTENSIONS, read_image, read_label
from ovseg_lab.data.datamodule import SegmentationDataModule
from ovseg_lab.data.nouns import noun_phrases
from ovseg_lab.errors import DataError, SetupError
from ovseg_lab.utils.io import write_json


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
            for number, line in enumerate(text.splitlines(), 1):
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
    if isinstance(shards, (list, tuple)):
        urls = [str(s) for s in shards]
    else:
        path = Path(str(shards))
        urls = sorted(str(p) for p in (path.glob("*.tar") if path.is_dir() else path.parent.glob(path.name)))
    if not urls:
        raise DataError(f"No mask-pair shards (*.tar) at {shards}; mine them with scripts/mine_mask_pairs.py.")
    return urls


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
    from ovseg_lab.clip.backbone import OPENAI_MEAN

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


# ---------------------------------------------------------------------------------------------- mining
def _majority_class(mask: torch.Tensor, label: torch.Tensor, ignore_index: int) -> int | None:
    values = label[mask & (label != ignore_index)]
    return int(values.mode().values) if values.numel() else None


def _to_uint8_crop(crop: torch.Tensor, mask: torch.Tensor, clip) -> np.ndarray:
    """A normalised crop back to uint8 RGB, background at the CLIP mean colour."""
    rgb = (crop * clip.std[0] + clip.mean[0]) * mask[None] + clip.mean[0] * (~mask[None])
    return (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def mine_pairs(
    net,
    images: str | Path,
    out: str | Path,
    captions: str | Path | None = None,
    labels: str | Path | None = None,
    vocabulary: Sequence[str] | None = None,
    masks: str = "proposals",
    nouns: str = "captions",
    captions_per_image: int = 1,
    noun_mode: str = "head",
    min_objectness: float = 0.0,
    max_images: int | None = None,
    shard_size: int = 5000,
    ignore_index: int = 255,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Mine (masked crop, noun) pairs into webdataset shards under ``out``; returns (and writes) a report.

    net: an :class:`~ovseg_lab.models.ovseg.OVSeg` whose CLIP is the *pre-trained* one (it scores masks) and,
    for ``masks=proposals``, whose MaskFormer proposes them. ``labels`` + ``vocabulary`` enable ground-truth
    masks / names and the match rate: how often the mined noun equals the ground-truth class of the chosen mask
    (the class covering most of it).
    """
    import webdataset as wds
    from tqdm import tqdm

    from ovseg_lab.models.ovseg import masked_region_crops

    if masks not in ("proposals", "gt") or nouns not in ("captions", "gt"):
        raise SetupError(f"masks must be proposals|gt and nouns captions|gt (got masks={masks}, nouns={nouns}).")
    needs_labels = masks == "gt" or nouns == "gt"
    if needs_labels and (labels is None or vocabulary is None):
        raise SetupError("Ground-truth masks or names need labels= (a label folder) and vocabulary=.")
    if nouns == "captions" and captions is None:
        raise SetupError("nouns=captions needs captions= (COCO Captions JSON or JSON lines).")
    if masks == "proposals" and net.maskformer is None:
        raise SetupError("masks=proposals needs a MaskFormer (proposals.ckpt=...).")
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise DataError(f"Image folder not found: {image_dir}.")
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    by_stem = load_captions(captions) if captions is not None else {}
    if nouns == "captions":
        files = [f for f in files if f.stem in by_stem]
    if max_images:
        files = files[:max_images]
    if not files:
        raise DataError(f"No image in {image_dir} to mine (with captions in {captions}).")

    net = net.to(device).eval()
    clip = net.clip
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = wds.ShardWriter(str(tmp / "pairs-%06d.tar"), maxcount=shard_size, verbose=0)
    stats = {"images": 0, "pairs": 0, "nouns": 0, "checked": 0, "matched": 0, "no_mask": 0}
    text_cache: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(files), desc="mining mask-category pairs", unit="img", disable=not progress)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        pictures = [torch.from_numpy(read_image(f)).permute(2, 0, 1) for f in chunk]
        label_maps = []
        for f in chunk:
            if labels is None:
                label_maps.append(None)
                continue
            path = next((Path(labels) / f"{f.stem}{ext}" for ext in LABEL_EXTENSIONS if (Path(labels) / f"{f.stem}{ext}").exists()), None)
            if path is None:
                raise DataError(f"No label for {f} in {labels}.")
            label_maps.append(torch.from_numpy(read_label(path).astype(np.int64)))
        proposal_sets = _proposals(net, pictures, label_maps, masks, min_objectness, ignore_index, device,
                                   vocabulary or ["object"])
        # nouns of every image, then all crops of the chunk through CLIP in one batch
        per_image = []
        for f, label in zip(chunk, label_maps):
            if nouns == "gt":
                names = [vocabulary[c] for c in label.unique().tolist() if c != ignore_index]
            else:
                names = []
                for caption in by_stem[f.stem][:captions_per_image]:
                    names += [n for n in noun_phrases(caption, noun_mode) if n not in names]
            per_image.append(names)
        pieces = [masked_region_crops(clip.normalize(p.to(device).float()[None] / 255)[0], b.to(device), clip.image_size)
                  for p, b in zip(pictures, proposal_sets)]
        all_crops = torch.cat([p[0] for p in pieces])
        features = net.region.region_features(all_crops, torch.cat([p[1] for p in pieces])) if all_crops.shape[0] else None
        missing = sorted({n for names in per_image for n in names} - set(text_cache))
        if missing:
            for name, feature in zip(missing, net.region.text_features(missing)):
                text_cache[name] = feature
        offset = 0
        for f, label, binary, names, (crops, crop_masks, valid) in zip(chunk, label_maps, proposal_sets, per_image, pieces):
            stats["images"] += 1
            stats["nouns"] += len(names)
            count = crops.shape[0]
            image_features = features[offset : offset + count] if count else None
            offset += count
            if not names:
                continue
            if count == 0:
                stats["no_mask"] += len(names)
                continue
            text = torch.stack([text_cache[n] for n in names])
            if masks == "gt" and nouns == "gt":
                choice = torch.arange(len(names), device=crops.device)  # each segment with its own name
                scores = torch.ones(len(names))
            else:
                probs = (net.region.temperature * image_features @ text.t().float()).softmax(dim=1)  # (masks, nouns)
                scores, choice = probs.max(dim=0)
            valid_index = valid.nonzero()[:, 0]
            for n, (name, q, score) in enumerate(zip(names, choice.tolist(), scores.tolist())):
                meta = {"image": f.stem, "mask": int(valid_index[q]), "score": round(float(score), 4)}
                if label is not None:
                    cls = _majority_class(binary[valid_index[q]].cpu(), label, ignore_index)
                    meta["gt_class"] = vocabulary[cls] if (cls is not None and vocabulary is not None) else cls
                    if vocabulary is not None and cls is not None:
                        stats["checked"] += 1
                        stats["matched"] += int(vocabulary[cls] == name)
                crop = _to_uint8_crop(crops[q], crop_masks[q], clip)
                writer.write(pair_sample(f"{f.stem}_{n:03d}", crop, crop_masks[q].cpu().numpy(), name, meta))
                stats["pairs"] += 1
        bar.update(len(chunk))
    bar.close()
    writer.close()
    if stats["pairs"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"Mining produced no pair from {len(files)} images (no nouns or no valid masks).")
    report = {**stats, "match_rate": round(stats["matched"] / stats["checked"], 4) if stats["checked"] else None,
              "masks": masks, "nouns_from": nouns, "captions_per_image": captions_per_image, "noun_mode": noun_mode}
    write_json(tmp / "report.json", report)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the shard folder appears complete or not at all
    return report


def _proposals(net, pictures, label_maps, masks: str, min_objectness: float, ignore_index: int, device: str,
               class_names: Sequence[str]) -> list[torch.Tensor]:
    """Binary masks (Q, H, W) per image: ground-truth segments or MaskFormer proposals (sigmoid > threshold).

    ``min_objectness`` drops proposals whose no-object probability (against ``class_names``) exceeds 1 - it."""
    if masks == "gt":
        result = []
        for label in label_maps:
            classes = [c for c in label.unique().tolist() if c != ignore_index]
            result.append(label[None] == torch.tensor(classes, dtype=label.dtype)[:, None, None])
        return result
    import torch.nn.functional as F

    text = net.region.text_features(list(class_names))
    sizes = {tuple(p.shape[-2:]) for p in pictures}
    groups = [torch.stack(pictures)] if len(sizes) == 1 else [p[None] for p in pictures]  # one batch when sizes agree
    result = []
    for group in groups:
        image = group.to(device).float() / 255
        padded = net._pad(image)
        outputs = net.maskformer(net.normalize_for_maskformer(padded), text)
        logits = F.interpolate(outputs["pred_masks"], size=padded.shape[-2:], mode="bilinear", align_corners=False)
        binary = logits[..., : image.shape[-2], : image.shape[-1]].sigmoid() > net.mask_threshold
        objectness = 1 - outputs["pred_logits"].float().softmax(-1)[..., -1]
        for b in range(binary.shape[0]):
            keep = objectness[b] >= min_objectness
            result.append(binary[b][keep].cpu())
    return result


def build_mining_net(cfg) -> Any:
    """The OVSeg net mining uses: from a MaskFormer checkpoint's stored config and weights (its frozen CLIP is the
    pre-trained one), or a CLIP-only net (ground-truth masks)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    from ovseg_lab.models.ovseg import MASK_PROMPT_HINT, OVSeg
    from ovseg_lab.utils.weights import load_into, load_state_from

    ckpt = cfg.get("proposals_ckpt")
    if ckpt:
        path = Path(str(ckpt)).expanduser()
        if not path.is_file():
            raise SetupError(f"MaskFormer checkpoint not found: {path} (proposals_ckpt=...).")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        stored = checkpoint.get("ovseg_config")
        if not stored:
            raise SetupError(f"{path} has no stored config (ovseg_config); was it written by train.py model=ovseg?")
        net_cfg = OmegaConf.create(stored).model.net
        with open_dict(net_cfg):
            net_cfg.maskformer_weights = None
            net_cfg.clip_weights = None
            net_cfg.clip.pretrained = None  # the checkpoint holds the CLIP weights
            net_cfg.analysis = None
            if cfg.get("mask_threshold") is not None:
                net_cfg.mask_threshold = cfg.mask_threshold
        net = instantiate(net_cfg)
        load_into(net, load_state_from(path, ("net.",)), str(path), "OVSeg")
        return net
    clip = instantiate(cfg.clip)
    net = OVSeg(clip, maskformer=None, analysis="gt_masks", templates=cfg.get("templates", "vild14"))
    if cfg.get("clip_weights"):
        load_into(net.clip, load_state_from(cfg.clip_weights, ("net.clip.", "clip.", "")), cfg.clip_weights, "CLIP", MASK_PROMPT_HINT)
    return net


def mine_from_config(cfg) -> dict[str, Any]:
    """Entry point of ``scripts/mine_mask_pairs.py`` and of pipeline stages (config ``conf/mine.yaml``)."""
    from ovseg_lab.runner import run_dir_of
    from ovseg_lab.utils.io import write_text
    from ovseg_lab.preflight import resolved_yaml
    from ovseg_lab.vocab import load_vocabulary

    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config_resolved.yaml", resolved_yaml(cfg))
    from omegaconf import OmegaConf

    toy = OmegaConf.select(cfg, "data.generate_toy", default=None)
    if toy:  # a pipeline stage on the toy benchmark: make sure it exists
        from ovseg_lab.data.toy import ToyConfig, generate_toy

        options = OmegaConf.to_container(toy, resolve=True)
        generate_toy(options.pop("out"), ToyConfig(**options))
    torch.manual_seed(int(cfg.get("seed", 0)))
    net = build_mining_net(cfg)
    vocabulary = list(load_vocabulary(cfg.vocabulary).classes) if cfg.get("vocabulary") else None
    report = mine_pairs(
        net, images=cfg.images, out=cfg.out, captions=cfg.get("captions"), labels=cfg.get("labels"),
        vocabulary=vocabulary, masks=cfg.masks, nouns=cfg.nouns, captions_per_image=cfg.captions_per_image,
        noun_mode=cfg.noun_mode, min_objectness=cfg.min_objectness, max_images=cfg.get("max_images"),
        shard_size=cfg.shard_size, device=cfg.device,
    )
    write_json(run_dir / "mining_report.json", report)
    rate = report["match_rate"]
    print(f"mined {report['pairs']} pairs from {report['images']} images"
          + (f"; noun = ground-truth class of the chosen mask in {100 * rate:.1f}% of {report['checked']}" if rate is not None else ""))
    return report
