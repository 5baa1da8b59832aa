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
from ovseg_lab.layers.steps import checkpoint_call, image_steps


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-6,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    length: int | None = None,
) -> torch.Tensor:
    """q (N, L, H, D), k (N, S, H, D), v (N, S, H, Dv) -> (N, L, H, Dv), kernel phi(x) = elu(x) + 1.

    out_l = phi(q_l) . sum_s phi(k_s) v_s^T / (phi(q_l) . sum_s phi(k_s) + eps). Values are divided by S
    before the sum and the result multiplied back, which keeps fp16/bf16 sums in range.

    ``extra`` = (kv (H, D, Dv), k_sum (H, D)): the terms of keys / values shared by every row (already divided by
    ``length``), added to the sums; ``length``: the S the values are divided by (default: v's length). CAT-Seg's
    padding tokens are the same for every pixel, so their share of the sums is computed once (see
    :class:`ClassAggregationLayer`).
    """
    q, k = F.elu(q).add_(1), F.elu(k).add_(1)
    length = length or v.shape[1]
    kv = torch.einsum("nshd,nshv->nhdv", k, v / length)
    k_sum = k.sum(dim=1)
    if extra is not None:
        kv = kv + extra[0]
        k_sum = k_sum + extra[1]
    normaliser = 1.0 / (torch.einsum("nlhd,nhd->nlh", q, k_sum) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, normaliser) * length


def qkv_table(attn: nn.Module, dim: int, guidance: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The part of a guided q/k/v projection that does not depend on the tokens, for layers with ``q``, ``k``
    (on [x; guidance]) and ``v`` (on x) linears (:class:`GuidedLinearAttention`, Swin's window attention).

    (..., 3*dim) = [W_qg g + b_q, W_kg g + b_k, b_v] per guidance row (``guidance`` (..., G)), or (3*dim,) = the
    biases; q|k|v = x @ [W_qx; W_kx; W_v]^T + table. One fused matmul on the tokens, the guidance once per row.
    """
    biases = [layer.bias if layer.bias is not None else like.new_zeros(dim) for layer in (attn.q, attn.k, attn.v)]
    if guidance is None:
        return torch.cat(biases)
    qk = F.linear(guidance, torch.cat([attn.q.weight[:, dim:], attn.k.weight[:, dim:]]), torch.cat(biases[:2]))
    return torch.cat([qk, biases[2].expand(*qk.shape[:-1], dim)], dim=-1)


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
    pre-LN attention + MLP (ReLU, ratio 4), bilinearly upsampled and added back to the input (the official
    residual: x + up(pooled + attention + MLP)). ``pad_len`` > 0 appends learnable padding tokens (and padding
    guidance) until there are ``pad_len`` classes, as the official release does; with more classes nothing is
    padded. A padding token is the same at every pixel, so its key and value are too: their share of the linear
    attention's sums is computed once and added (no padding tokens are materialised, and the MLP, whose padding
    outputs the release discards, never runs on them).

    forward(x (B, C, T, H, W), guidance (B, T, G) or None, pool, chunk) -> (B, C, T, H, W).
    forward_state(state (B, H*W, T, C), ...) is the same on CATSegHead's pixel-major layout, pixels in groups of
    about ``tokens`` tokens (pixels are independent here), in place when ``inplace``.
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
        self.padding_guidance = (
            nn.Parameter(torch.zeros(1, 1, guidance_dim)) if pad_len > 0 and guidance_dim > 0 else None
        )

    def forward(
        self, x: torch.Tensor, guidance: torch.Tensor | None, pool: int = 1, chunk: int | None = None
    ) -> torch.Tensor:
        b, c, t, h, w = x.shape
        state = x.permute(0, 3, 4, 2, 1).reshape(b, h * w, t, c)
        tokens = chunk * h * w if chunk else None
        out = self.forward_state(state, guidance, h, w, pool, tokens, inplace=False)
        return out.view(b, h, w, t, c).permute(0, 4, 3, 1, 2)

    def _padding_terms(
        self, w_qkv: torch.Tensor, num_pad: int, length: int, guided: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv (H, D, D), k_sum (H, D)) of ``num_pad`` padding tokens, values divided by ``length``."""
        c = w_qkv.shape[1]
        heads = self.attention.num_heads
        pad = F.layer_norm(self.padding_tokens.reshape(1, c), (c,), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        pad_guidance = self.padding_guidance.reshape(1, -1) if guided and self.padding_guidance is not None else None
        kv = F.linear(pad, w_qkv) + qkv_table(self.attention, c, pad_guidance, pad)
        k = (F.elu(kv[0, c : 2 * c]) + 1).view(heads, -1)
        v = kv[0, 2 * c :].view(heads, -1)
        return num_pad * torch.einsum("hd,hv->hdv", k, v / length), num_pad * k

    def _mix(
        self,
        x: torch.Tensor,
        table: torch.Tensor,
        w_qkv: torch.Tensor,
        extra: tuple[torch.Tensor, torch.Tensor] | None,
        length: int,
        inplace: bool,
    ) -> torch.Tensor:
        """x (G, P, T, C) tokens of P pixels of G images; table (G, 1, T, 3C) or (3C,) -> x + attention + MLP
        (a new tensor)."""
        g, p, t, c = x.shape
        heads = self.attention.num_heads
        qkv = F.linear(F.layer_norm(x, (c,), self.norm1.weight, self.norm1.bias, self.norm1.eps), w_qkv)
        qkv = qkv.add_(table) if inplace else qkv + table
        q, k, v = (part.reshape(g * p, t, heads, -1) for part in qkv.split(c, dim=-1))
        y = x + linear_attention(q, k, v, extra=extra, length=length).reshape(g, p, t, c)
        del qkv, q, k, v
        hidden = F.linear(
            F.layer_norm(y, (c,), self.norm2.weight, self.norm2.bias, self.norm2.eps),
            self.mlp[0].weight,
            self.mlp[0].bias,
        )
        hidden = hidden.relu_() if inplace else F.relu(hidden)
        out = F.linear(hidden, self.mlp[2].weight, self.mlp[2].bias)
        return y.add_(out) if inplace else y + out

    def forward_state(
        self,
        state: torch.Tensor,
        guidance: torch.Tensor | None,
        height: int,
        width: int,
        pool: int = 1,
        tokens: int | None = None,
        inplace: bool = False,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """state (B, H*W, T, C) pixel-major -> the same after class aggregation; guidance (B, T, G) or None.

        ``tokens``: tokens per step (None: every pixel of every image in one step): whole images per step when
        they fit, else groups of pixels of one image. ``inplace`` (no autograd): the steps add into ``state``.
        ``checkpoint`` (autograd): each step's activations are recomputed in the backward pass instead of kept.
        """
        b, hw, t, c = state.shape
        if pool > 1:
            grid = state.reshape(b, height, width, t * c).permute(0, 3, 1, 2)  # channels-last (B, T*C, H, W)
            pooled = F.avg_pool2d(grid, pool)
            ph, pw = pooled.shape[-2:]
            pooled = pooled.permute(0, 2, 3, 1).reshape(b, ph * pw, t, c)
        else:
            pooled, ph, pw = state, height, width
        num_pad = self.pad_len - t if self.padding_tokens is not None and t < self.pad_len else 0
        length = t + num_pad
        guided = guidance is not None and self.guidance_dim > 0
        w_qkv = torch.cat([self.attention.q.weight[:, :c], self.attention.k.weight[:, :c], self.attention.v.weight])
        table = qkv_table(self.attention, c, guidance if guided else None, state)  # (B, T, 3C) or (3C,)
        table = table.unsqueeze(1) if table.dim() == 3 else table  # (B, 1, T, 3C): shared by an image's pixels
        extra = self._padding_terms(w_qkv, num_pad, length, guided) if num_pad else None
        pixels = ph * pw
        steps = image_steps(b, pixels * t, pixels, tokens)
        in_place = inplace and pool == 1
        outs = []
        for i0, i1, p0, p1 in steps:
            x = pooled[i0:i1, p0:p1]
            step_table = table[i0:i1] if table.dim() == 4 else table
            y = checkpoint_call(self._mix, checkpoint and not inplace, x, step_table, w_qkv, extra, length, inplace)
            if in_place:
                x.add_(y)  # the official residual: x + (x + attention + MLP)
            else:
                outs.append(y)
        if in_place:
            return state
        # steps are image-major: whole images stack along the image axis, pixel groups of one image along pixels
        mixed = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0 if steps[0][3] == pixels else 1)
        mixed = mixed.reshape(b, ph, pw, t * c)
        if pool > 1:
            mixed = F.interpolate(mixed.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=True)
            mixed = mixed.permute(0, 2, 3, 1)
        mixed = mixed.reshape(b, hw, t, c)
        return state.add_(mixed) if inplace else state + mixed
