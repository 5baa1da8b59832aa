"""OVSeg's mask-category pair mining: the step of the OVSeg chain between training MaskFormer and adapting CLIP.

For every image: nouns from its captions (:mod:`ovseg_lab.data.nouns`); masks from a trained MaskFormer (or the
ground truth); each noun is given the one mask that the pre-trained CLIP scores highest for it (softmax over the
image's masks); the masked crop and the noun become a pair, written into webdataset shards
(:func:`ovseg_lab.data.mask_pairs.pair_sample`). Ground-truth alternatives of OVSeg Table 2: ``masks=gt``
(ground-truth segments) and ``nouns=gt`` (ground-truth class names instead of caption nouns).

Entry points: ``scripts/mine_mask_pairs.py`` / ``ovseg-mine`` and pipeline stages (``run:
ovseg_lab.ovseg_chain.mine_from_config``, config ``conf/mine.yaml``). This lives above ``ovseg_lab/data``: it runs
a model and writes run folders; the pair shards' reading side (datasets, DataModule) stays in
:mod:`ovseg_lab.data.mask_pairs`.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovseg_lab.data.benchmark import IMAGE_EXTENSIONS, LABEL_EXTENSIONS, read_image, read_label
from ovseg_lab.data.mask_pairs import load_captions, pair_sample
from ovseg_lab.data.nouns import noun_phrases
from ovseg_lab.errors import DataError, SetupError
from ovseg_lab.utils.io import write_json


@dataclass
class MiningOptions:
    """What :func:`mine_pairs` mines (see its docstring)."""

    masks: str = "proposals"
    nouns: str = "captions"
    captions_per_image: int = 1
    noun_mode: str = "head"
    min_objectness: float = 0.0
    ignore_index: int = 255
    vocabulary: Sequence[str] | None = None

    def check(self, has_maskformer: bool, captions: Any, labels: Any) -> None:
        if self.masks not in ("proposals", "gt") or self.nouns not in ("captions", "gt"):
            raise SetupError(
                f"masks must be proposals|gt and nouns captions|gt (got masks={self.masks}, nouns={self.nouns})."
            )
        if (self.masks == "gt" or self.nouns == "gt") and (labels is None or self.vocabulary is None):
            raise SetupError("Ground-truth masks or names need labels= (a label folder) and vocabulary=.")
        if self.nouns == "captions" and captions is None:
            raise SetupError("nouns=captions needs captions= (COCO Captions JSON or JSON lines).")
        if self.masks == "proposals" and not has_maskformer:
            raise SetupError("masks=proposals needs a MaskFormer (proposals_ckpt=...).")


@dataclass
class MiningStats:
    images: int = 0
    pairs: int = 0
    nouns: int = 0
    checked: int = 0  # pairs whose mask has a ground-truth class (labels + vocabulary given)
    matched: int = 0  # ... and whose noun is that class
    no_mask: int = 0  # nouns of images without any valid mask
    text_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def report(self, options: MiningOptions) -> dict[str, Any]:
        counts = {k: getattr(self, k) for k in ("images", "pairs", "nouns", "checked", "matched", "no_mask")}
        return {
            **counts,
            "match_rate": round(self.matched / self.checked, 4) if self.checked else None,
            "masks": options.masks,
            "nouns_from": options.nouns,
            "captions_per_image": options.captions_per_image,
            "noun_mode": options.noun_mode,
        }


def _images_to_mine(
    images: str | Path, by_stem: dict[str, list[str]], nouns: str, max_images: int | None, captions: Any
) -> list[Path]:
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise DataError(f"Image folder not found: {image_dir}.")
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if nouns == "captions":
        files = [f for f in files if f.stem in by_stem]
    if max_images:
        files = files[:max_images]
    if not files:
        raise DataError(f"No image in {image_dir} to mine (with captions in {captions}).")
    return files


def _read_chunk(
    chunk: Sequence[Path], labels: str | Path | None
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """uint8 pictures (3, H, W) and int64 label maps (H, W) (None without ``labels``)."""
    pictures = [torch.from_numpy(read_image(f)).permute(2, 0, 1) for f in chunk]
    label_maps: list[torch.Tensor | None] = []
    for f in chunk:
        if labels is None:
            label_maps.append(None)
            continue
        path = next(
            (Path(labels) / f"{f.stem}{ext}" for ext in LABEL_EXTENSIONS if (Path(labels) / f"{f.stem}{ext}").exists()),
            None,
        )
        if path is None:
            raise DataError(f"No label for {f} in {labels}.")
        label_maps.append(torch.from_numpy(read_label(path).astype(np.int64)))
    return pictures, label_maps


def _nouns_of(
    stem: str, label: torch.Tensor | None, by_stem: dict[str, list[str]], options: MiningOptions
) -> list[str]:
    """The names an image is mined for: ground-truth classes present, or its captions' nouns (deduplicated)."""
    if options.nouns == "gt":
        return [options.vocabulary[c] for c in label.unique().tolist() if c != options.ignore_index]
    names: list[str] = []
    for caption in by_stem[stem][: options.captions_per_image]:
        names += [n for n in noun_phrases(caption, options.noun_mode) if n not in names]
    return names


def _proposals(net, pictures, label_maps, options: MiningOptions, device: str) -> list[torch.Tensor]:
    """Binary masks (Q, H, W) per image: ground-truth segments or MaskFormer proposals (sigmoid > threshold).

    ``min_objectness`` drops proposals whose no-object probability (against the vocabulary) exceeds 1 - it."""
    if options.masks == "gt":
        result = []
        for label in label_maps:
            classes = [c for c in label.unique().tolist() if c != options.ignore_index]
            result.append(label[None] == torch.tensor(classes, dtype=label.dtype)[:, None, None])
        return result
    import torch.nn.functional as F

    text = net.region.text_features(list(options.vocabulary or ["object"]))
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
            keep = objectness[b] >= options.min_objectness
            result.append(binary[b][keep].cpu())
    return result


def _majority_class(mask: torch.Tensor, label: torch.Tensor, ignore_index: int) -> int | None:
    values = label[mask & (label != ignore_index)]
    return int(values.mode().values) if values.numel() else None


def _to_uint8_crop(crop: torch.Tensor, mask: torch.Tensor, clip) -> np.ndarray:
    """A normalised crop back to uint8 RGB, background at the CLIP mean colour."""
    rgb = (crop * clip.std[0] + clip.mean[0]) * mask[None] + clip.mean[0] * (~mask[None])
    return (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _text_features(net, names: list[list[str]], cache: dict[str, torch.Tensor]) -> None:
    """CLIP text features of every noun not yet in ``cache`` (one batch for the chunk)."""
    missing = sorted({n for per_image in names for n in per_image} - set(cache))
    if missing:
        for name, feature in zip(missing, net.region.text_features(missing)):
            cache[name] = feature


def _choose_masks(
    net, image_features: torch.Tensor, text: torch.Tensor, options: MiningOptions, count: int
) -> tuple[list[int], list[float]]:
    """For each noun, the mask CLIP scores highest for it (softmax over the masks) and that score."""
    if options.masks == "gt" and options.nouns == "gt":  # each segment with its own name
        return list(range(count)), [1.0] * count
    probs = (net.region.temperature * image_features @ text.t().float()).softmax(dim=1)  # (masks, nouns)
    scores, choice = probs.max(dim=0)
    return choice.tolist(), scores.tolist()


def _write_image_pairs(
    writer,
    net,
    stem: str,
    label,
    binary,
    names: list[str],
    crops,
    crop_masks,
    valid,
    image_features,
    options: MiningOptions,
    stats: MiningStats,
) -> None:
    """One image's pairs into the shard writer; the match statistics when its labels are known."""
    stats.images += 1
    stats.nouns += len(names)
    if not names:
        return
    if crops.shape[0] == 0:
        stats.no_mask += len(names)
        return
    text = torch.stack([stats.text_cache[n] for n in names])
    choice, scores = _choose_masks(net, image_features, text, options, len(names))
    valid_index = valid.nonzero()[:, 0]
    vocabulary = options.vocabulary
    for n, (name, q, score) in enumerate(zip(names, choice, scores)):
        meta = {"image": stem, "mask": int(valid_index[q]), "score": round(float(score), 4)}
        if label is not None:
            cls = _majority_class(binary[valid_index[q]].cpu(), label, options.ignore_index)
            meta["gt_class"] = vocabulary[cls] if (cls is not None and vocabulary is not None) else cls
            if vocabulary is not None and cls is not None:
                stats.checked += 1
                stats.matched += int(vocabulary[cls] == name)
        crop = _to_uint8_crop(crops[q], crop_masks[q], net.clip)
        writer.write(pair_sample(f"{stem}_{n:03d}", crop, crop_masks[q].cpu().numpy(), name, meta))
        stats.pairs += 1


def _mine_chunk(
    net, writer, chunk: Sequence[Path], by_stem, labels, options: MiningOptions, stats: MiningStats, device: str
) -> None:
    """Masks, nouns, CLIP features of every crop (one batch) and the chosen pairs of a chunk of images."""
    from ovseg_lab.models.ovseg import masked_region_crops

    pictures, label_maps = _read_chunk(chunk, labels)
    proposal_sets = _proposals(net, pictures, label_maps, options, device)
    names = [_nouns_of(f.stem, label, by_stem, options) for f, label in zip(chunk, label_maps)]
    clip = net.clip
    pieces = [
        masked_region_crops(clip.normalize(p.to(device).float()[None] / 255)[0], b.to(device), clip.image_size)
        for p, b in zip(pictures, proposal_sets)
    ]
    all_crops = torch.cat([p[0] for p in pieces])
    features = net.region.region_features(all_crops, torch.cat([p[1] for p in pieces])) if all_crops.shape[0] else None
    _text_features(net, names, stats.text_cache)
    offset = 0
    for f, label, binary, image_names, (crops, crop_masks, valid) in zip(
        chunk, label_maps, proposal_sets, names, pieces
    ):
        count = crops.shape[0]
        image_features = features[offset : offset + count] if count else None
        offset += count
        _write_image_pairs(
            writer, net, f.stem, label, binary, image_names, crops, crop_masks, valid, image_features, options, stats
        )


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
    (the class covering most of it). The shard folder appears complete or not at all (written as
    ``<out>.partial``, renamed at the end).
    """
    import webdataset as wds
    from tqdm import tqdm

    options = MiningOptions(masks, nouns, captions_per_image, noun_mode, min_objectness, ignore_index, vocabulary)
    options.check(net.maskformer is not None, captions, labels)
    by_stem = load_captions(captions) if captions is not None else {}
    files = _images_to_mine(images, by_stem, nouns, max_images, captions)

    net = net.to(device).eval()
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = wds.ShardWriter(str(tmp / "pairs-%06d.tar"), maxcount=shard_size, verbose=0)
    stats = MiningStats()
    with tqdm(total=len(files), desc="mining mask-category pairs", unit="img", disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            _mine_chunk(net, writer, chunk, by_stem, labels, options, stats, device)
            bar.update(len(chunk))
    writer.close()
    if stats.pairs == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"Mining produced no pair from {len(files)} images (no nouns or no valid masks).")
    report = stats.report(options)
    write_json(tmp / "report.json", report)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report


def build_mining_net(cfg) -> Any:
    """The OVSeg net mining uses: from a MaskFormer checkpoint's stored config and weights (its frozen CLIP is the
    pre-trained one), or a CLIP-only net (ground-truth masks) with optional ``clip_weights``."""
    from hydra.utils import instantiate

    from ovseg_lab.checkpoints import load_into, net_from_checkpoint, read_weights
    from ovseg_lab.models.ovseg import MASK_PROMPT_HINT, OVSeg

    if cfg.get("proposals_ckpt"):

        def inference_only(net_cfg) -> None:
            net_cfg.analysis = None
            if cfg.get("mask_threshold") is not None:
                net_cfg.mask_threshold = cfg.mask_threshold

        return net_from_checkpoint(cfg.proposals_ckpt, "MaskFormer checkpoint", "proposals_ckpt", inference_only)
    net = OVSeg(instantiate(cfg.clip), maskformer=None, analysis="gt_masks", templates=cfg.get("templates", "vild14"))
    if cfg.get("clip_weights"):
        state = read_weights(cfg.clip_weights, ("net.clip.", "clip.", ""), "CLIP weights", "clip_weights")
        load_into(net.clip, state, f"{cfg.clip_weights} (clip_weights)", "CLIP", MASK_PROMPT_HINT)
    return net


def mine_from_config(cfg) -> dict[str, Any]:
    """Entry point of ``scripts/mine_mask_pairs.py`` / ``ovseg-mine`` and of pipeline stages (``conf/mine.yaml``)."""
    from omegaconf import OmegaConf

    from ovseg_lab.config import resolved_yaml
    from ovseg_lab.runner import run_dir_of
    from ovseg_lab.utils.io import write_text
    from ovseg_lab.vocab import load_vocabulary

    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config_resolved.yaml", resolved_yaml(cfg))
    toy = OmegaConf.select(cfg, "data.generate_toy", default=None)
    if toy:  # a pipeline stage on the toy benchmark: make sure it exists
        from ovseg_lab.data.toy import ToyConfig, generate_toy

        options = OmegaConf.to_container(toy, resolve=True)
        generate_toy(options.pop("out"), ToyConfig(**options))
    torch.manual_seed(int(cfg.get("seed", 0)))
    net = build_mining_net(cfg)
    vocabulary = list(load_vocabulary(cfg.vocabulary).classes) if cfg.get("vocabulary") else None
    report = mine_pairs(
        net,
        images=cfg.images,
        out=cfg.out,
        captions=cfg.get("captions"),
        labels=cfg.get("labels"),
        vocabulary=vocabulary,
        masks=cfg.masks,
        nouns=cfg.nouns,
        captions_per_image=cfg.captions_per_image,
        noun_mode=cfg.noun_mode,
        min_objectness=cfg.min_objectness,
        max_images=cfg.get("max_images"),
        shard_size=cfg.shard_size,
        device=cfg.device,
    )
    write_json(run_dir / "mining_report.json", report)
    rate = report["match_rate"]
    print(
        f"mined {report['pairs']} pairs from {report['images']} images"
        + (
            f"; noun = ground-truth class of the chosen mask in {100 * rate:.1f}% of {report['checked']}"
            if rate is not None
            else ""
        )
    )
    return report
