"""The CLIP cost-volume baseline: the simplest open-vocabulary segmenter that trains end to end.

Dense CLIP image embeddings are compared with the text embedding of every class (cosine, averaged over
prompt templates), scaled and shifted into logits, upsampled, and trained with CAT-Seg's per-pixel BCE.
It is the "cost volume without aggregation" reference point for CAT-Seg.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.layers.losses import per_pixel_bce
from ovseg_lab.vocab import Vocabulary


def cosine_cost_volume(dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pixel embedding with every (class, template) text embedding.

    dense: (B, C, h, w); text: (T, P, C) or (B, T, P, C). Returns (B, P, T, h, w).
    """
    dense = F.normalize(dense, dim=1)
    text = F.normalize(text, dim=-1)
    if text.dim() == 3:
        return torch.einsum("bchw,tpc->bpthw", dense, text)
    return torch.einsum("bchw,btpc->bpthw", dense, text)


class CostVolumeBaseline(nn.Module):
    """logits (B, T, h, w) = scale * mean_P cos(dense CLIP, text) + bias, at the CLIP feature resolution."""

    def __init__(
        self, clip: CLIPBackbone, init_scale: float = 10.0, init_bias: float = -2.0, ignore_index: int = 255
    ) -> None:
        super().__init__()
        self.clip = clip
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.ignore_index = ignore_index

    def forward(self, images: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> logits (B, T, H/p, W/p) at the CLIP input size."""
        size = self.clip.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        dense = self.clip.encode_dense(self.clip.normalize(images)).dense
        text = self.clip.encode_vocabulary(vocabulary.classes)
        cost = cosine_cost_volume(dense, text.to(dense.dtype)).mean(dim=1)
        return self.log_scale.exp() * cost + self.bias

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_pixel_bce(logits, labels, self.ignore_index)
