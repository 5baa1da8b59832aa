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


def _shifted(x: torch.Tensor, dilations: Sequence[int], centre: bool = False):
    """The (B, K, H, W) maps read at each neighbour (replicate border), dilation by dilation, one at a time."""
    height, width = x.shape[-2:]
    offsets = sorted(OFFSETS + ((1, 1),)) if centre else OFFSETS
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        for a, b in offsets:
            yield padded[..., a * d : a * d + height, b * d : b * d + width]


def pamr(image: torch.Tensor, scores: torch.Tensor, num_iter: int, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """image (B, K, H, W) (the normalised picture), scores (B, C, h, w) -> refined scores (B, C, H, W); the
    scores are first resized to the image (bilinear, align_corners=True)."""
    scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=True)
    spread = torch.stack(list(_shifted(image, dilations, centre=True)), dim=2).std(dim=2)  # (B, K, H, W)
    affinity = torch.stack(
        [(-(n - image).abs() / (1e-8 + 0.1 * spread)).mean(dim=1) for n in _shifted(image, dilations)], dim=1
    ).softmax(dim=1)  # (B, P, H, W): the weight of each neighbour
    for _ in range(num_iter):
        # one neighbour at a time: (B, C, H, W) in memory instead of (B, C, P, H, W)
        refined = torch.zeros_like(scores)
        for p, neighbour in enumerate(_shifted(scores, dilations)):
            refined += neighbour * affinity[:, p : p + 1]
        scores = refined
    return scores
