"""Linear attention ("Transformers are RNNs", elu+1 kernel) and the class-aggregation layer of CAT-Seg.

Linear attention has no positional encoding and is permutation-equivariant along the token axis, which is
what lets CAT-Seg aggregate over an arbitrary, unordered set of classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ovseg_lab.layers.broadcast import split_linear


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """q (N, L, H, D), k (N, S, H, D), v (N, S, H, Dv) -> (N, L, H, Dv), kernel phi(x) = elu(x) + 1.

    out_l = phi(q_l) . sum_s phi(k_s) v_s^T / (phi(q_l) . sum_s phi(k_s) + eps). Values are divided by S
    before the sum and the result multiplied back, which keeps fp16/bf16 sums in range.
    """
    q, k = F.elu(q) + 1, F.elu(k) + 1
    length = v.shape[1]
    kv = torch.einsum("nshd,nshv->nhdv", k, v / length)
    normaliser = 1.0 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, normaliser) * length


class GuidedLinearAttention(nn.Module):
    """q, k = Linear([x; guidance]), v = Linear(x); multi-head linear attention over the token axis.

    forward(x (G*K, L, C), guidance (G, L, Cg) shared by K consecutive rows of x, or None) -> (G*K, L, C).
    """

    def __init__(self, dim: int, guidance_dim: int = 0, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        split = lambda t: rearrange(t, "n l (h d) -> n l h d", h=self.num_heads)  # noqa: E731
        q, k = split_linear(self.q, x, guidance), split_linear(self.k, x, guidance)
        out = linear_attention(split(q), split(k), split(self.v(x)))
        return rearrange(out, "n l h d -> n l (h d)")


class ClassAggregationLayer(nn.Module):
    """CAT-Seg class aggregation: per pixel, attention across the class axis of a cost embedding.

    Runs on an average-pooled map (``pool`` x ``pool``; 2 in training, 1 at evaluation in the paper),
    pre-LN attention + MLP (ReLU, ratio 4), bilinearly upsampled and added back to the input.
    ``pad_len`` > 0 appends learnable padding tokens (and padding guidance) until there are ``pad_len``
    classes, as the official release does; with more classes nothing is padded.

    forward(x (B, C, T, H, W), guidance (B, T, G) or None, pool, chunk) -> (B, C, T, H, W). Pixels are
    independent here (attention runs across classes only), so ``chunk`` (classes per chunk, as in spatial
    aggregation) runs the pixels in groups of about chunk * H * W tokens: same result, bounded memory.
    """

    def __init__(self, dim: int = 128, guidance_dim: int = 128, num_heads: int = 4, pad_len: int = 0) -> None:
        super().__init__()
        self.attention = GuidedLinearAttention(dim, guidance_dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.ReLU(), nn.Linear(dim * 4, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.guidance_dim = guidance_dim
        self.pad_len = pad_len
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim)) if pad_len > 0 else None
        self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim)) if pad_len > 0 and guidance_dim > 0 else None

    def _mix(self, tokens: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """tokens (N, T, C) of one or more pixels; guidance (G, T, Cg) shared by N/G consecutive pixels, or None."""
        tokens = tokens + self.attention(self.norm1(tokens), guidance)
        return tokens + self.mlp(self.norm2(tokens))

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None, pool: int = 1, chunk: int | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        pooled = rearrange(x, "b c t h w -> (b t) c h w")
        if pool > 1:
            pooled = F.avg_pool2d(pooled, pool)
        ph, pw = pooled.shape[-2:]
        tokens = rearrange(pooled, "(b t) c h w -> (b h w) t c", b=b)
        num_pad = self.pad_len - t if self.padding_tokens is not None and t < self.pad_len else 0
        if num_pad:
            tokens = torch.cat([tokens, self.padding_tokens.expand(tokens.shape[0], num_pad, -1)], dim=1)
        if guidance is not None and self.guidance_dim:
            if num_pad and self.padding_guidance is not None:
                guidance = torch.cat([guidance, self.padding_guidance.expand(b, num_pad, -1)], dim=1)
            # (B, T, G): shared by the h*w pixel rows of its image (tokens are image-major)
        else:
            guidance = None
        pixels = ph * pw
        rows = max(1, (chunk * pixels) // tokens.shape[1]) if chunk else pixels * b
        if rows >= pixels * b:
            tokens = self._mix(tokens, guidance)
        else:  # per image (its guidance), ``rows`` pixels at a time
            tokens = torch.cat([
                self._mix(tokens[i * pixels + start : i * pixels + min(start + rows, pixels)],
                          guidance[i : i + 1] if guidance is not None else None)
                for i in range(b) for start in range(0, pixels, rows)
            ])
        tokens = tokens[:, :t]
        out = rearrange(tokens, "(b h w) t c -> (b t) c h w", b=b, h=ph, w=pw)
        if pool > 1:
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return x + rearrange(out, "(b t) c h w -> b c t h w", b=b)
