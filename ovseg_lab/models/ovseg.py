"""OVSeg: class-agnostic mask proposals, each classified by CLIP on its masked crop, ensembled with MaskFormer.

Stage 1 (:mod:`ovseg_lab.models.maskformer`) proposes Q masks with CLIP-space class scores p_MF.
Stage 2 binarises each mask (sigmoid > threshold), crops its tight box from the image, fills the background
with the CLIP mean (0 after normalisation), resizes the crop to the CLIP input size and classifies it with the
(mask-adapted) CLIP against the vocabulary's prompt-ensembled text embeddings: p_CLIP.
Ensemble: p = p_MF^(1-lambda) * p_CLIP^lambda; semantic map seg[c] = sum_q p[q, c] * sigmoid(mask_q).

Analysis modes (the paper's bottleneck figure): ``gt_masks`` classifies the ground-truth segments with CLIP,
``oracle_labels`` gives each proposal the ground-truth class it overlaps best. Segment Anything can replace
MaskFormer as the proposal source (:class:`SAMProposals`), as in the public demo.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_lab.checkpoints import load_into, load_state_from
from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.errors import SetupError
from ovseg_lab.layers.normalize import IMAGENET_MEAN, IMAGENET_STD
from ovseg_lab.vocab import Vocabulary

MASK_PROMPT_HINT = " Mask prompts need the same clip.mask_prompt_depth and image size."
CLASSIFY_MODES = ("ensemble", "maskformer", "clip")
ANALYSIS_MODES = (None, "gt_masks", "oracle_labels")


# ---------------------------------------------------------------------------------------------- region crops
def patch_keep_mask(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """OVSeg's m = ceil(avgpool_patch(mask)): (N, S, S) region masks -> (N, (S/p)^2), 1 where a patch holds any
    foreground, 0 where it is entirely background (those tokens get mask prompts)."""
    pooled = F.max_pool2d(masks[:, None].float(), patch_size)
    return (pooled > 0).flatten(1).float()


def masked_region_crops(
    image: torch.Tensor, masks: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked crops of one image.

    image: (3, H, W) normalised (0 = the CLIP mean); masks: (Q, H, W) bool. Each non-empty mask's tight box is
    cropped from the image with everything outside the mask set to 0, and resized to size x size (bicubic, no
    aspect keep). Returns crops (N, 3, size, size), crop masks (N, size, size) bool and valid (Q,) bool with
    N = valid.sum() (empty masks are invalid).
    """
    valid = masks.flatten(1).any(dim=1)
    crops, crop_masks = [], []
    for mask in masks[valid]:
        rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        region = (image * mask)[:, top:bottom, left:right]
        crops.append(F.interpolate(region[None], size=(size, size), mode="bicubic", align_corners=False)[0])
        box_mask = mask[top:bottom, left:right].float()[None, None]
        crop_masks.append(F.interpolate(box_mask, size=(size, size), mode="nearest")[0, 0] > 0.5)
    if not crops:
        return image.new_zeros(0, 3, size, size), masks.new_zeros(0, size, size), valid
    return torch.stack(crops), torch.stack(crop_masks), valid


def geometric_ensemble(p_maskformer: torch.Tensor, p_clip: torch.Tensor, weight: float) -> torch.Tensor:
    """OVSeg's ensemble p = p_MF^(1 - lambda) * p_CLIP^lambda (elementwise, any shape)."""
    return p_maskformer.pow(1 - weight) * p_clip.pow(weight)


def semantic_inference(class_probs: torch.Tensor, mask_probs: torch.Tensor) -> torch.Tensor:
    """seg[c, h, w] = sum_q p[q, c] * m[q, h, w]: (Q, K), (Q, H, W) -> (K, H, W)."""
    return torch.einsum("qk,qhw->khw", class_probs, mask_probs.to(class_probs.dtype))


def oracle_class_probs(
    masks: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """One-hot class of the ground-truth segment each binary mask (Q, H, W) overlaps with the highest IoU -> (Q, K).

    Masks that overlap no labelled pixel get all-zero rows."""
    probs = masks.new_zeros(masks.shape[0], num_classes, dtype=torch.float32)
    classes = label.unique()
    classes = classes[classes != ignore_index]
    if classes.numel() == 0 or masks.shape[0] == 0:
        return probs
    gt = (label[None] == classes[:, None, None]).flatten(1).float()  # (M, P)
    pred = masks.flatten(1).float()
    inter = pred @ gt.t()
    union = pred.sum(1, keepdim=True) + gt.sum(1)[None] - inter
    iou = inter / union.clamp(min=1)
    best = iou.argmax(dim=1)
    hit = iou.max(dim=1).values > 0
    probs[hit, classes[best[hit]].long()] = 1.0
    return probs


def granularity_select(class_probs: torch.Tensor, granularity: float) -> torch.Tensor:
    """The SAM demo's granularity: each mask votes for its best class; a class keeps the masks scoring at least
    ``granularity`` x its best mask's score (g >= 1: only the best mask). (Q, K) -> (Q, K) with dropped entries 0."""
    if class_probs.shape[0] == 0:
        return class_probs
    own = F.one_hot(class_probs.argmax(dim=1), class_probs.shape[1]).bool()
    scores = class_probs.masked_fill(~own, 0.0)
    best = scores.max(dim=0, keepdim=True).values
    if granularity >= 1:
        keep = own & (scores >= best) & (best > 0)
        # one mask per class even on ties
        first = torch.zeros_like(keep)
        winners = scores.argmax(dim=0)
        first[winners, torch.arange(scores.shape[1])] = True
        keep = keep & first
    else:
        keep = own & (scores >= granularity * best) & (best > 0)
    return class_probs * keep


# ---------------------------------------------------------------------------------------------- CLIP on regions
class RegionClassifier(nn.Module):
    """CLIP classification of masked region crops with a prompt ensemble.

    Text: every template's embedding is L2-normalised, averaged and renormalised; logits = temperature * cos.
    With mask prompts (``clip.mask_prompt_depth > 0``) fully-background patches are replaced by the prompts.
    """

    def __init__(
        self,
        clip: CLIPBackbone,
        templates: str | Sequence[str] = "vild14",
        temperature: float = 100.0,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        # a reference, not a submodule: the owner registers the tower once (as ``clip``), so the weights are saved
        # and converted under one name
        object.__setattr__(self, "clip", clip)
        self.templates = templates
        self.temperature = temperature
        self.batch_size = batch_size

    @property
    def crop_size(self) -> int:
        return self.clip.image_size

    def text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """(K,) names -> (K, C) prompt-ensembled, L2-normalised text embeddings."""
        return F.normalize(self.clip.encode_vocabulary(list(class_names), self.templates).mean(dim=1), dim=-1)

    def region_features(self, crops: torch.Tensor, crop_masks: torch.Tensor | None = None) -> torch.Tensor:
        """crops (N, 3, S, S) CLIP-normalised, crop_masks (N, S, S) -> (N, C) L2-normalised image embeddings."""
        out = []
        for start in range(0, crops.shape[0], self.batch_size):
            chunk = crops[start : start + self.batch_size]
            keep = None
            if self.clip.mask_prompts is not None and crop_masks is not None:
                keep = patch_keep_mask(crop_masks[start : start + self.batch_size], self.clip.patch_size)
            out.append(self.clip.encode_image(chunk, keep))
        if not out:
            return crops.new_zeros(0, self.clip.embed_dim)
        return F.normalize(torch.cat(out).float(), dim=-1)

    def logits(self, crops: torch.Tensor, crop_masks: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(N, K) logits of the crops against text features (K, C)."""
        return self.temperature * self.region_features(crops, crop_masks) @ text.t().float()


# ---------------------------------------------------------------------------------------------- SAM proposals
class SAMProposals(nn.Module):
    """Segment Anything's automatic mask generation (grid of point prompts) with transformers' ``SamModel``.

    Args:
        model_name: a Hugging Face id or local folder ("facebook/sam-vit-huge"), or None with ``config``.
        config: ``transformers.SamConfig`` keyword arguments for a (tiny, random-init) model built from config.
        points_per_side: grid points per side (32 in SAM's generator); points_per_batch prompts per decoder call.
        pred_iou_thresh, stability_score_thresh, stability_offset, box_nms_thresh: SAM's filters.
        max_masks: keep at most this many masks (highest predicted IoU first).
    """

    def __init__(
        self,
        model_name: str | None = "facebook/sam-vit-huge",
        config: Mapping[str, Any] | None = None,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        max_masks: int = 100,
    ) -> None:
        super().__init__()
        from transformers import SamConfig, SamImageProcessor, SamModel

        if config is not None:
            from omegaconf import OmegaConf

            # from a Hydra config (model.net.sam.config) the nested sub-configs arrive as DictConfig: SamConfig wants dicts
            config = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
            self.model = SamModel(SamConfig(**config))
            size = int(config.get("vision_config", {}).get("image_size", 1024))
            self.processor = SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
        elif model_name:
            try:
                self.model = SamModel.from_pretrained(model_name)
                self.processor = SamImageProcessor.from_pretrained(model_name)
            except OSError as err:
                raise SetupError(
                    f"Could not load Segment Anything '{model_name}' ({str(err).splitlines()[0][:160]}). Run once with "
                    "internet so transformers caches it, or point model.net.sam.model_name at a local folder "
                    "saved with save_pretrained."
                ) from None
        else:
            raise SetupError("SAMProposals needs model_name or config.")
        self.model.requires_grad_(False).eval()
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_offset = stability_offset
        self.box_nms_thresh = box_nms_thresh
        self.max_masks = max_masks

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (3, H, W) in [0, 1] -> masks (N, H, W) bool, predicted IoU scores (N,)."""
        from torchvision.ops import batched_nms, masks_to_boxes

        height, width = image.shape[-2:]
        inputs = self.processor(images=image.permute(1, 2, 0).cpu().numpy(), do_rescale=False, return_tensors="pt")
        device = next(self.model.parameters()).device
        pixel_values = inputs["pixel_values"].to(device)
        embeddings = self.model.get_image_embeddings(pixel_values)
        reshaped = inputs["reshaped_input_sizes"][0].tolist()
        n = self.points_per_side
        offsets = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
        grid = torch.stack(torch.meshgrid(offsets * reshaped[1], offsets * reshaped[0], indexing="xy"), dim=-1).reshape(
            -1, 2
        )
        all_masks, all_scores = [], []
        for start in range(0, grid.shape[0], self.points_per_batch):
            points = grid[start : start + self.points_per_batch][None, :, None, :]  # (1, P, 1, 2)
            out = self.model(image_embeddings=embeddings, input_points=points, multimask_output=True)
            logits = self.processor.post_process_masks(
                out.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
            )[0]
            logits = logits.flatten(0, 1)  # (P*3, H, W)
            scores = out.iou_scores.cpu().flatten()
            stability = (logits > self.stability_offset).flatten(1).sum(1) / (logits > -self.stability_offset).flatten(
                1
            ).sum(1).clamp(min=1)
            keep = (scores >= self.pred_iou_thresh) & (stability >= self.stability_score_thresh)
            masks = logits[keep] > 0
            nonempty = masks.flatten(1).any(1)
            all_masks.append(masks[nonempty])
            all_scores.append(scores[keep][nonempty])
        masks = torch.cat(all_masks) if all_masks else torch.zeros(0, height, width, dtype=torch.bool)
        scores = torch.cat(all_scores) if all_scores else torch.zeros(0)
        if masks.shape[0]:
            boxes = masks_to_boxes(masks).float()
            order = batched_nms(boxes, scores.float(), torch.zeros_like(scores, dtype=torch.long), self.box_nms_thresh)
            order = order[: self.max_masks]
            masks, scores = masks[order], scores[order]
        return masks.to(image.device), scores.to(image.device)


# ---------------------------------------------------------------------------------------------- the method
def _drop_region_clip_keys(state_dict, prefix, *args) -> None:
    """Checkpoints written before the region classifier held its CLIP by reference list the tower twice
    (``clip.*`` and ``region.clip.*``); the second copy is the same tensors."""
    for key in [k for k in state_dict if k.startswith(prefix + "region.clip.")]:
        del state_dict[key]


class OVSeg(nn.Module):
    """Proposals + masked-region CLIP classification.

    Args:
        clip: the CLIP towers (text features for MaskFormer's classifier and for regions; image tower for regions).
        maskformer: partial :class:`~ovseg_lab.models.maskformer.MaskFormer` (``embed_dim`` filled from CLIP), or
            None (only ``gt_masks`` analysis / SAM proposals then).
        criterion: MaskFormer's :class:`~ovseg_lab.models.maskformer.SetCriterion` (training).
        proposals: ``maskformer`` or ``sam``; sam: :class:`SAMProposals` for the latter.
        classify: ``ensemble`` (p_MF^(1-l) p_CLIP^l), ``maskformer`` (p_MF) or ``clip`` (p_CLIP).
        ensemble_weight: lambda. As in the release (ovseg_model.py:239-250), lambda = 0 means CLIP only (the
            CLIP classes of the valid masks, empty masks dropped), not MaskFormer only (that is ``classify=maskformer``).
        ensemble_weights: lambda per benchmark (the vocabulary's name, e.g. ``{ade150: 0.7, pc59: 0.6, voc20: 0.45}``,
            the release's evaluation commands in GETTING_STARTED.md); benchmarks not listed use ``ensemble_weight``.
        mask_threshold: binarisation of sigmoid(mask) for crops (0.4 Swin-B, 0.5 R-101c).
        templates, temperature: region / class text prompts (ViLD 14) and CLIP logit scale (100).
        analysis: None, ``gt_masks`` or ``oracle_labels`` (need labels in :meth:`forward`).
        granularity: SAM demo's per-class mask selection (see :func:`granularity_select`).
        short_side: resize so the short side has this length before inference, torch bilinear without a cap
            (None: keep the size). The paper recipes resize in the inference protocol instead
            (``model.inference.resize_short/resize_max``: PIL bilinear on uint8 with a long-side cap, detectron2's
            ResizeShortestEdge as the release evaluates).
        maskformer_weights / clip_weights: files to initialise from (Lightning checkpoints or plain state dicts).
    """

    def __init__(
        self,
        clip: CLIPBackbone,
        maskformer: Callable[..., nn.Module] | None = None,
        criterion: nn.Module | None = None,
        proposals: str = "maskformer",
        sam: nn.Module | None = None,
        classify: str = "ensemble",
        ensemble_weight: float = 0.7,
        ensemble_weights: Mapping[str, float] | None = None,
        mask_threshold: float = 0.4,
        templates: str | Sequence[str] = "vild14",
        temperature: float = 100.0,
        analysis: str | None = None,
        granularity: float = 1.0,
        short_side: int | None = None,
        region_batch: int = 256,
        ignore_index: int = 255,
        maskformer_weights: str | None = None,
        clip_weights: str | None = None,
    ) -> None:
        super().__init__()
        if classify not in CLASSIFY_MODES:
            raise SetupError(f"model.net.classify must be one of {CLASSIFY_MODES}, got '{classify}'.")
        if analysis not in ANALYSIS_MODES:
            raise SetupError(f"model.net.analysis must be one of {ANALYSIS_MODES}, got '{analysis}'.")
        if proposals not in ("maskformer", "sam"):
            raise SetupError(f"model.net.proposals must be 'maskformer' or 'sam', got '{proposals}'.")
        ensemble_weights = dict(ensemble_weights or {})
        for name, weight in [("ensemble_weight", ensemble_weight)] + [
            (f"ensemble_weights.{k}", v) for k, v in ensemble_weights.items()
        ]:
            if not 0.0 <= float(weight) <= 1.0:
                raise SetupError(f"model.net.{name} (lambda) must lie in [0, 1], got {weight}.")
        self.clip = clip
        self.region = RegionClassifier(clip, templates, temperature, region_batch)
        self.maskformer = maskformer(embed_dim=clip.embed_dim) if maskformer is not None else None
        self.criterion = criterion
        self.proposals = proposals
        self.sam = sam
        if proposals == "sam" and sam is None:
            raise SetupError("model.net.proposals=sam needs model.net.sam (SAMProposals options).")
        if proposals == "maskformer" and self.maskformer is None and analysis != "gt_masks":
            raise SetupError("model.net.maskformer is required unless proposals=sam or analysis=gt_masks.")
        self.classify = classify
        self.ensemble_weight = ensemble_weight
        self.ensemble_weights = {str(k): float(v) for k, v in ensemble_weights.items()}
        self.mask_threshold = mask_threshold
        self.analysis = analysis
        self.granularity = granularity
        self.short_side = short_side
        self.ignore_index = ignore_index
        self._register_load_state_dict_pre_hook(_drop_region_clip_keys)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if maskformer_weights:
            if self.maskformer is None:
                raise SetupError("model.net.maskformer_weights given but the model has no MaskFormer.")
            load_into(
                self.maskformer,
                load_state_from(maskformer_weights, ("net.maskformer.", "maskformer.", "")),
                maskformer_weights,
                "MaskFormer",
            )
        if clip_weights:
            state = load_state_from(clip_weights, ("net.clip.", "clip.", ""))
            if "mask_prompts" not in state and self.clip.mask_prompts is not None:
                self.clip.mask_prompts = None  # weights adapted without MPT: classify regions without prompts
            load_into(self.clip, state, clip_weights, "CLIP", MASK_PROMPT_HINT)

    @property
    def needs_labels(self) -> bool:
        return self.analysis is not None

    # ------------------------------------------------------------------ stage 1
    def normalize_for_maskformer(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def weight_for(self, vocabulary: Vocabulary | Sequence[str]) -> float:
        """lambda for a benchmark: ``ensemble_weights[vocabulary.name]`` when listed, else ``ensemble_weight``."""
        name = vocabulary.name if isinstance(vocabulary, Vocabulary) else None
        return self.ensemble_weights.get(name, self.ensemble_weight) if name is not None else self.ensemble_weight

    def maskformer_outputs(self, images: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
        """images (B, 3, H, W) in [0, 1], H and W multiples of 32 -> MaskFormer outputs (logits over K+1)."""
        text = self.region.text_features(class_names)
        return self.maskformer(self.normalize_for_maskformer(images), text)

    def loss(self, outputs: Mapping[str, Any], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        from ovseg_lab.models.maskformer import semantic_targets

        if self.criterion is None:
            raise SetupError("model.net.criterion is not configured; MaskFormer cannot train.")
        return self.criterion(outputs, semantic_targets(labels, self.ignore_index))

    # ------------------------------------------------------------------ stage 2
    def region_probs(
        self, images: torch.Tensor, masks: Sequence[torch.Tensor], text: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """CLIP softmax over the K classes for each binary mask of each image, all crops in one CLIP batch.

        images (B, 3, H, W) in [0, 1]; masks: B tensors (Q_b, H, W) bool. Returns per image (probs (Q_b, K),
        valid (Q_b,)); invalid (empty) masks get rows of ones (neutral in the ensemble).
        """
        normalized = self.clip.normalize(images)
        pieces = [masked_region_crops(img, m, self.region.crop_size) for img, m in zip(normalized, masks)]
        crops = torch.cat([p[0] for p in pieces])
        logits = self.region.logits(crops, torch.cat([p[1] for p in pieces]), text) if crops.shape[0] else None
        results, start = [], 0
        for (piece_crops, _, valid), m in zip(pieces, masks):
            probs = images.new_ones(m.shape[0], text.shape[0], dtype=torch.float32)
            count = piece_crops.shape[0]
            if count:
                probs[valid] = logits[start : start + count].float().softmax(dim=-1)  # bf16 under autocast
            start += count
            results.append((probs, valid))
        return results

    def _resize(self, images: torch.Tensor, labels: torch.Tensor | None):
        if self.short_side is None:
            return images, labels
        h, w = images.shape[-2:]
        scale = self.short_side / min(h, w)
        size = (round(h * scale), round(w * scale))
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if labels is not None:
            labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        return images, labels

    def _pad(self, normalized: torch.Tensor) -> torch.Tensor:
        """Zero padding of NORMALISED images to the MaskFormer's size divisibility: 0 is the mean colour, as
        detectron2's ImageList.from_tensors pads after the release normalises (ovseg_model.py:153-155)."""
        div = self.maskformer.size_divisibility if self.maskformer is not None else 1
        h, w = normalized.shape[-2:]
        ph, pw = (-h) % div, (-w) % div
        return F.pad(normalized, (0, pw, 0, ph)) if ph or pw else normalized

    def forward(
        self, images: torch.Tensor, vocabulary: Vocabulary | Sequence[str], labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> semantic scores (B, K, H', W') (H', W' = H, W unless ``short_side``).

        labels (B, H, W) are needed by the analysis modes only.
        """
        names = list(vocabulary.classes if isinstance(vocabulary, Vocabulary) else vocabulary)
        if self.needs_labels and labels is None:
            raise SetupError(f"model.net.analysis={self.analysis} needs ground-truth labels at evaluation.")
        images, labels = self._resize(images, labels)
        height, width = images.shape[-2:]
        text = self.region.text_features(names)
        if self.analysis == "gt_masks":
            return self._classify_gt_segments(images, labels, text)
        if self.proposals == "sam":
            return torch.stack([self._sam_inference(img, text) for img in images])

        padded = self._pad(self.normalize_for_maskformer(images))
        outputs = self.maskformer(padded, text)
        mask_logits = F.interpolate(outputs["pred_masks"], size=padded.shape[-2:], mode="bilinear", align_corners=False)
        mask_probs = mask_logits[..., :height, :width].float().sigmoid()
        binary = mask_probs > self.mask_threshold
        p_maskformer = outputs["pred_logits"].float().softmax(dim=-1)[..., :-1]
        if self.analysis == "oracle_labels":
            probs = [
                oracle_class_probs(binary[b], labels[b], len(names), self.ignore_index) for b in range(len(images))
            ]
        elif self.classify == "maskformer":
            probs = list(p_maskformer)
        else:
            weight = self.weight_for(vocabulary)
            probs = []
            for p_mf, (p_clip, valid) in zip(p_maskformer, self.region_probs(images, list(binary), text)):
                if self.classify == "clip" or weight == 0:  # the release: lambda 0 = CLIP only
                    probs.append(p_clip * valid[:, None])  # empty masks contribute nothing (the release drops them)
                else:
                    probs.append(geometric_ensemble(p_mf, p_clip, weight))
        return torch.stack([semantic_inference(p, m) for p, m in zip(probs, mask_probs)])

    def _classify_gt_segments(self, images: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        segments = []
        for label in labels:
            classes = label.unique()
            classes = classes[classes != self.ignore_index]
            segments.append(label[None] == classes[:, None, None])
        return torch.stack(
            [
                semantic_inference(probs, m.float())
                for (probs, _), m in zip(self.region_probs(images, segments, text), segments)
            ]
        )

    def _sam_inference(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        masks, _ = self.sam(image)
        ((probs, valid),) = self.region_probs(image[None], [masks], text)
        probs = granularity_select(probs * valid[:, None], self.granularity)
        if masks.shape[0] == 0:
            return image.new_zeros(text.shape[0], *image.shape[-2:])
        # overlapping SAM masks: each pixel takes its strongest selected mask per class
        return torch.einsum("qk,qhw->qkhw", probs, masks.float()).amax(dim=0)
