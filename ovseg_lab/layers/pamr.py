"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), the post-processing SCLIP and NACLIP offer.

Score maps are propagated ``num_iter`` times between each pixel and its 8 neighbours at each dilation, weighted by
a softmax over the neighbours of -|I(p) - I(p')| / (0.1 * local std of I), averaged over image channels. Borders
replicate, as in the releases' ``pamr.py`` (SCLIP / NACLIP: ``PAMR(num_iter, dilations=(8, 16))``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

OFFSETS = tuple((a, b) for a in range(3) for b in range(3) if (a, b) != (1, 1))  # the 8 neighbours of a 3x3 cell


def _neighbours(x: torch.Tensor, dilations: Sequence[int], centre: bool = False) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, P, H, W): the value at each neighbour (replicate border), dilation by dilation."""
    height, width = x.shape[-2:]
    offsets = sorted(OFFSETS + ((1, 1),)) if centre else OFFSETS
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        out.extend(padded[..., a * d : a * d + height, b * d : b * d + width] for a, b in offsets)
    return torch.stack(out, dim=2)


def pamr(image: torch.Tensor, scores: torch.Tensor, num_iter: int, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """image (B, K, H, W) (the normalised picture), scores (B, C, h, w) -> refined scores (B, C, H, W); the
    scores are first resized to the image (bilinear, align_corners=True)."""
    scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=True)
    spread = _neighbours(image, dilations, centre=True).std(dim=2, keepdim=True)
    affinity = -(_neighbours(image, dilations) - image.unsqueeze(2)).abs() / (1e-8 + 0.1 * spread)
    affinity = affinity.mean(dim=1, keepdim=True).softmax(dim=2)
    for _ in range(num_iter):
        scores = (_neighbours(scores, dilations) * affinity).sum(dim=2)
    return scores
