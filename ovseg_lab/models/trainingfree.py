"""Training-free open-vocabulary segmenters over a frozen CLIP: MaskCLIP, SCLIP, ClearCLIP, NACLIP.

Each patch embedding of the changed last block (:mod:`ovseg_lab.clip.dense_paths`) is compared (cosine) with the
text embedding of every *name* of every class: a class string of the releases' ``cls_*.txt`` files may hold
several names ("sky, wall, tree, ..." for VOC's background), each prompted with the 80 ImageNet templates, the
normalised template embeddings averaged and renormalised. :meth:`TrainingFreeSegmenter.forward` returns these
per-name cosines at the window's resolution; the sliding window averages them, and
:meth:`TrainingFreeSegmenter.class_probabilities` is the releases' ``postprocess_result``: scale, softmax over all
names, the best name per class, and background where no class is confident enough.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.clip.dense_paths import LastBlock, dense_embeddings
from ovseg_lab.clip.prompts import resolve_templates
from ovseg_lab.vocab import Vocabulary


def split_names(classes: Sequence[str], separator: str) -> tuple[list[str], list[int]]:
    """Class strings -> (names, owning class of each name), as the releases' ``get_cls_idx`` splits a line."""
    names, owners = [], []
    for index, string in enumerate(classes):
        parts = string.split(separator)
        names.extend(parts)
        owners.extend([index] * len(parts))
    return names, owners


def centred_padding(height: int, width: int, patch: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding up to multiples of ``patch``, split as ClearCLIP's
    ``compute_padsize`` (the smaller half left / top)."""
    pad_w, pad_h = -width % patch, -height % patch
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


class TrainingFreeSegmenter(nn.Module):
    """A frozen CLIP whose last block follows ``last_block``; no parameter of its own.

    Args:
        clip: the CLIP towers (their weights are the method's only weights).
        last_block: :class:`LastBlock` fields (attention, residual, ffn, gaussian_std).
        templates: prompt templates (the releases: the 80 ImageNet templates).
        name_separator: how a class string splits into names (SCLIP / NACLIP ", ", ClearCLIP ",").
        pad_to_patch: zero-pad each window (in normalised space: the CLIP mean) to patch multiples and cut the
            logits back, as ClearCLIP does; False: the patch conv drops the remainder (SCLIP / NACLIP).
    """

    needs_checkpoint = False  # every weight is CLIP's: eval / predict / demo run without a checkpoint

    def __init__(
        self,
        clip: CLIPBackbone,
        last_block: Mapping[str, Any] | LastBlock | None = None,
        templates: str | Sequence[str] = "imagenet80",
        name_separator: str = ", ",
        pad_to_patch: bool = False,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.clip.requires_grad_(False)
        self.last_block = last_block if isinstance(last_block, LastBlock) else LastBlock(**dict(last_block or {}))
        self.templates = resolve_templates(templates if isinstance(templates, str) else list(templates))
        self.name_separator = name_separator
        self.pad_to_patch = pad_to_patch

    @property
    def patch_size(self) -> int:
        return int(self.clip.model.visual.conv1.kernel_size[0])

    def name_embeddings(self, vocabulary: Vocabulary) -> tuple[torch.Tensor, list[int]]:
        """(Q, C) L2-normalised text embeddings of every name (template average), and each name's class."""
        names, owners = split_names(vocabulary.classes, self.name_separator)
        per_template = self.clip.encode_vocabulary(names, self.templates)  # (Q, P, C), normalised per template
        return F.normalize(per_template.mean(dim=1), dim=-1), owners

    def forward(self, images: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> per-name cosines (B, Q, H, W) (bilinear from the patch grid)."""
        x = self.clip.normalize(images)
        height, width = x.shape[-2:]
        pad = centred_padding(height, width, self.patch_size) if self.pad_to_patch else (0, 0, 0, 0)
        if any(pad):
            x = F.pad(x, pad)
        dense = F.normalize(dense_embeddings(self.clip, x, self.last_block), dim=1)
        text, _ = self.name_embeddings(vocabulary)
        logits = torch.einsum("bchw,qc->bqhw", dense, text.to(dense.dtype))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        left, _, top, _ = pad
        return logits[:, :, top : top + height, left : left + width]

    def class_probabilities(
        self,
        logits: torch.Tensor,
        vocabulary: Vocabulary,
        logit_scale: float,
        prob_thd: float = 0.0,
        area_thd: float | None = None,
        background: int | None = None,
    ) -> torch.Tensor:
        """Per-name cosines (B, Q, H, W) -> class scores (B, T, H, W) whose argmax is the releases' prediction.

        softmax(logit_scale * logits) over names, max over each class's names; with ``area_thd`` (SCLIP) classes
        other than ``background`` covering at most that fraction of the predicted foreground are zeroed; where
        the best class scores below ``prob_thd`` the ``background`` class gets the score 2 (above any
        probability), as the releases set those pixels to background.
        """
        _, owners = split_names(vocabulary.classes, self.name_separator)
        probs = (logits * logit_scale).softmax(dim=1)
        num_classes = len(vocabulary.classes)
        if len(owners) != num_classes:
            names_of = [[q for q, owner in enumerate(owners) if owner == c] for c in range(num_classes)]
            probs = torch.stack([probs[:, names].amax(dim=1) for names in names_of], dim=1)
        if area_thd is not None:
            others = [c for c in range(num_classes) if c != background]
            hits = F.one_hot(probs.argmax(dim=1), num_classes).sum(dim=(1, 2))[:, others].to(probs.dtype)  # (B, T-1)
            keep = (hits > area_thd * hits.sum(dim=1, keepdim=True)).to(probs.dtype)
            probs = probs.clone()
            probs[:, others] *= keep[:, :, None, None]
        if prob_thd > 0 and background is not None:
            unsure = probs.max(dim=1).values < prob_thd
            probs = probs.clone()
            probs[:, background] = torch.where(
                unsure, torch.full_like(unsure, 2.0, dtype=probs.dtype), probs[:, background]
            )
        return probs
