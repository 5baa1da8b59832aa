"""Linear layers on [x; guidance] where one guidance entry is shared by many rows of x."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_linear(layer: nn.Linear, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
    """``layer(cat([x, g], -1))`` where each guidance entry is shared by a group of x rows.

    The layer's input is [x; g], so its output is W_x x + W_g g + b: the guidance term is computed once per
    group and broadcast. x: (G * K, *S, C) ordered group-major; guidance: (G, *S, Cg) (K = 1 when the sizes
    match). Returns x's shape with the layer's output size.
    """
    dim = x.shape[-1]
    out = F.linear(x, layer.weight[:, :dim], layer.bias)
    if guidance is None:
        return out
    guided = F.linear(guidance, layer.weight[:, dim:])
    return (out.view(guided.shape[0], -1, *guided.shape[1:]) + guided.unsqueeze(1)).view(out.shape)
