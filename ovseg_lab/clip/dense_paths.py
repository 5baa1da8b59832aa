"""The frozen-CLIP dense path of the training-free methods: the last visual block, changed.

MaskCLIP, SCLIP, ClearCLIP and NACLIP keep every CLIP weight and change only how the last block of the image
tower mixes its tokens (and whether it keeps its residual and FFN), so that each patch token lands in the joint
image-text space as a local feature instead of a copy of the global one. :class:`LastBlock` names the switches;
:func:`dense_embeddings` runs the tower with them.

Attention variants (``LastBlock.attention``), per head with scale d^-1/2:

- ``qk``: CLIP's own softmax(q k^T) (the vanilla baseline).
- ``value``: no mixing, each token its own value (MaskCLIP, ``mmseg/models/backbones/vit.py:96-104``).
- ``qq+kk``: softmax(q q^T) + softmax(k k^T) (SCLIP's correlative attention, ``clip/model.py`` ``custom_attn``).
- ``qq``: softmax(q q^T) (ClearCLIP, ``open_clip/transformer.py:614``).
- ``kk+neighbourhood``: softmax(k k^T + Gaussian prior over patch distance) (NACLIP, ``clip/model.py``).

Position embeddings meet a grid other than the stored one the way these releases resample them (DINO's
``interpolate_pos_encoding``): bicubic with ``scale_factor = (side + 0.1) / sqrt(N)``, only when the number of
patches differs from the stored one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_lab.clip.attention import SplitQKVAttention
from ovseg_lab.errors import SetupError

ATTENTIONS = ("qk", "value", "qq+kk", "qq", "kk", "kk+neighbourhood")


@dataclass(frozen=True)
class LastBlock:
    """How the last visual block runs in the dense pass.

    attention: one of :data:`ATTENTIONS`.
    residual: add the block input back after attention (False: ClearCLIP, NACLIP's reduced architecture).
    ffn: run the block's MLP residual after attention.
    gaussian_std: NACLIP's neighbourhood prior width, in patches (``kk+neighbourhood`` only).
    """

    attention: str = "qk"
    residual: bool = True
    ffn: bool = True
    gaussian_std: float = 5.0

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise SetupError(f"last_block.attention must be one of {ATTENTIONS}, got '{self.attention}'.")
        if self.attention == "kk+neighbourhood" and not self.gaussian_std > 0:
            raise SetupError(f"last_block.gaussian_std must be positive, got {self.gaussian_std}.")


def neighbourhood_prior(grid: tuple[int, int], std: float, device=None) -> torch.Tensor:
    """NACLIP's additive attention prior (1 + h*w, 1 + h*w): exp(-|p - p'|^2 / (2 std^2)) between patches p, p' of
    the (h, w) grid, 0 in the CLS row and column (``get_attention_addition`` with its Gaussian window)."""
    h, w = grid
    rows = torch.arange(h, dtype=torch.float32, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float32, device=device).repeat(h)
    dist2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    prior = torch.exp(-dist2 / (2 * std**2))
    return F.pad(prior, (1, 0, 1, 0))


def last_block_attention(
    attn: SplitQKVAttention, x: torch.Tensor, kind: str, grid: tuple[int, int], gaussian_std: float = 5.0
) -> torch.Tensor:
    """The changed attention of the last block on its normalised input x (B, L, W) -> (B, L, W), out_proj included."""
    batch, length, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, heads, L, d)
        return t.reshape(batch, length, heads, head_dim).transpose(1, 2)

    q, k, v = (split(attn.project(x, which)) for which in "qkv")
    scale = head_dim**-0.5
    if kind == "value":
        out = v
    else:
        if kind == "qk":
            weights = (q @ k.transpose(-2, -1) * scale).softmax(-1)
        elif kind == "qq":
            weights = (q @ q.transpose(-2, -1) * scale).softmax(-1)
        elif kind == "kk":
            weights = (k @ k.transpose(-2, -1) * scale).softmax(-1)
        elif kind == "qq+kk":
            weights = (q @ q.transpose(-2, -1) * scale).softmax(-1) + (k @ k.transpose(-2, -1) * scale).softmax(-1)
        elif kind == "kk+neighbourhood":
            prior = neighbourhood_prior(grid, gaussian_std, x.device).to(x.dtype)
            weights = (k @ k.transpose(-2, -1) * scale + prior).softmax(-1)
        else:  # pragma: no cover - LastBlock validates
            raise SetupError(f"unknown attention '{kind}'")
        out = weights @ v
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))


def run_last_block(block: nn.Module, x: torch.Tensor, spec: LastBlock, grid: tuple[int, int]) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` under ``spec``: (B, L, W) -> (B, L, W)."""
    y = block.ls_1(last_block_attention(block.attn, block.ln_1(x), spec.attention, grid, spec.gaussian_std))
    if spec.residual:
        y = x + y
    if spec.ffn:
        y = y + block.ls_2(block.mlp(block.ln_2(y)))
    return y


def resampled_positions(positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1 + N, W) stored position embeddings -> (1 + h*w, W) for a (h, w) grid, as the releases'
    ``interpolate_pos_encoding`` does (kept as stored when h*w == N, whatever the aspect ratio)."""
    stored = positions.shape[0] - 1
    if grid[0] * grid[1] == stored:
        return positions
    side = int(math.sqrt(stored))
    patch = positions[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patch = F.interpolate(
        patch,
        scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side),
        mode="bicubic",
        align_corners=False,
        recompute_scale_factor=False,
    )
    patch = patch.permute(0, 2, 3, 1).reshape(-1, positions.shape[-1]).to(positions.dtype)
    return torch.cat([positions[:1], patch], dim=0)


def dense_embeddings(clip, images: torch.Tensor, spec: LastBlock) -> torch.Tensor:
    """Patch embeddings in the joint space through the changed last block.

    clip: a :class:`~ovseg_lab.clip.CLIPBackbone`; images: (B, 3, H, W) normalised (any H, W: the patch conv
    drops a remainder). Returns (B, C, H // p, W // p), not normalised.
    """
    visual = clip.model.visual
    x = visual.conv1(images)
    grid = (int(x.shape[-2]), int(x.shape[-1]))
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
    x = visual.ln_pre(x + resampled_positions(visual.positional_embedding, grid).to(x.dtype))
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    x = visual.ln_post(run_last_block(blocks[-1], x, spec, grid))
    if visual.proj is not None:
        x = x @ visual.proj
    return x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *grid)
