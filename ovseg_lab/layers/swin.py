"""Swin Transformer blocks with an optional guidance input (CAT-Seg's spatial aggregation).

Guidance features are concatenated to the (normalised) tokens for the query and key projections only; values
come from the tokens alone. The blocks run on many slices that share one guidance map (CAT-Seg: the T class
slices of an image share its appearance guidance), so the guidance half of the q/k projections is computed
once per image and broadcast (:func:`split_linear`) instead of concatenating T copies. Window attention runs
through :func:`ovseg_lab.layers.attention.attention` (SDPA); the shifted-window mask uses -100 like the reference Swin
implementation. There is no relative position bias.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from timm.layers import Mlp
from torch import nn

from ovseg_lab.layers.attention import attention
from ovseg_lab.layers.broadcast import split_linear


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C), windows image-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """(B * H/w * W/w, w*w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


@lru_cache(maxsize=32)
def _shift_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(num_windows, w*w, w*w) additive mask: -100 between tokens from different regions of a shifted window."""
    region = torch.zeros(1, height, width, 1)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[:, hs, ws, :] = count
            count += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, w*w)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return diff.ne(0).float() * -100.0


class GuidedWindowAttention(nn.Module):
    """Multi-head window self-attention; q, k from [x; guidance], v from x.

    forward(x, guidance, mask): x (B*K*nW, N, dim) windows of B images with K slices each; guidance
    (B, nW, N, G) shared by the K slices of an image, or None; mask (nW, N, N) additive or None.
    Returns (B*K*nW, N, dim).
    """

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.q = nn.Linear(dim + guidance_dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim + guidance_dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = True  # SDPA kernels; False = the reference computation (speed.attention=math)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, _ = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(bw, n, heads, -1).transpose(1, 2)

        q = split(split_linear(self.q, x, guidance))
        k = split(split_linear(self.k, x, guidance))
        v = split(self.v(x))
        if mask is not None:
            num_windows = mask.shape[0]
            # (nW, N, N) -> one mask per window of every slice: (B*K*nW, 1, N, N) as a broadcast view
            mask = mask.to(q.dtype).unsqueeze(0).expand(bw // num_windows, -1, -1, -1).reshape(bw, 1, n, n)
        out = attention(q, k, v, mask, fused=self.fused_attn)
        return self.proj(out.transpose(1, 2).reshape(bw, n, self.dim))


class GuidedSwinBlock(nn.Module):
    """Pre-LN Swin block (W-MSA when shift=0, SW-MSA otherwise) with an optional guidance input.

    forward(x, guidance, height, width): x (B*K, H*W, dim) = K slices per image, image-major;
    guidance (B, H*W, guidance_dim) shared by the K slices of an image, or None.
    When the map is not larger than the window, the window covers it and the shift is dropped (as in Swin).
    """

    def __init__(self, dim: int, guidance_dim: int = 0, num_heads: int = 4, window_size: int = 12,
                 shift_size: int = 0, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.guidance_dim = guidance_dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GuidedWindowAttention(dim, guidance_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def _geometry(self, height: int, width: int) -> tuple[int, int]:
        window, shift = self.window_size, self.shift_size
        if min(height, width) <= window:
            window, shift = min(height, width), 0
        if height % window or width % window:
            raise ValueError(f"feature map {height}x{width} is not divisible by the Swin window {window}")
        return window, shift

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None, height: int, width: int) -> torch.Tensor:
        b, length, c = x.shape
        window, shift = self._geometry(height, width)
        h = self.norm1(x).view(b, height, width, c)
        g = guidance.view(guidance.shape[0], height, width, -1) if guidance is not None and self.guidance_dim else None
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
            g = torch.roll(g, shifts=(-shift, -shift), dims=(1, 2)) if g is not None else None
        g_windows = None
        if g is not None:
            g_windows = window_partition(g, window)
            g_windows = g_windows.view(g.shape[0], -1, *g_windows.shape[1:])  # (B, nW, N, G)
        mask = _shift_mask(height, width, window, shift).to(x.device) if shift else None
        attended = self.attn(window_partition(h, window), g_windows, mask)
        attended = window_reverse(attended, window, height, width)
        if shift:
            attended = torch.roll(attended, shifts=(shift, shift), dims=(1, 2))
        x = x + attended.reshape(b, length, c)
        return x + self.mlp(self.norm2(x))
