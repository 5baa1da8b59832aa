"""Scaled dot-product attention with a switch between PyTorch's fused kernels and the reference computation.

Every attention layer of ovseg-lab calls :func:`attention` with its own ``fused_attn`` flag (timm's
convention, so one walk over the modules switches ours and timm's alike, see :mod:`ovseg_lab.speed`).
Fused = ``F.scaled_dot_product_attention``: flash / memory-efficient / cuDNN kernels on GPU (chosen by
PyTorch from dtype, head size and mask), a fused CPU kernel otherwise; it never materialises the (L, S)
score matrix when a flash or memory-efficient kernel runs. Unfused = softmax(q k^T / sqrt(d) + mask) v
written out, the reference the fused path is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """q (..., L, D), k (..., S, D), v (..., S, Dv); attn_mask broadcastable to (..., L, S), bool (True = attend,
    SDPA's convention) or additive float -> (..., L, Dv)."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return scores.softmax(dim=-1) @ v


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, fused: bool = True
) -> torch.Tensor:
    """Multi-head attention core, shapes as :func:`reference_attention`; ``fused`` picks SDPA."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return reference_attention(q, k, v, attn_mask)
