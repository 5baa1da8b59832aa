"""Grouping layers of GroupViT / OVSegmentor: learnable group tokens that absorb image tokens.

A :class:`GroupingBlock` turns ``S_in`` group tokens into ``S_out`` segment tokens: an MLP over the token
axis mixes the input group tokens into ``S_out`` queries, the queries cross-attend to the image tokens, and
every image token is then *assigned* to exactly one query (Gumbel-softmax over the queries, hard one-hot in
the forward pass with straight-through gradients). A segment token is the assignment-weighted mean of its
image tokens plus its query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import Mlp
from torch import nn

from ovseg_lab.layers.attention import attention


def hard_softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """One-hot argmax of ``softmax(logits)`` in the forward pass, the softmax's gradient in the backward pass."""
    soft = logits.softmax(dim)
    index = soft.argmax(dim, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return hard - soft.detach() + soft


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, hard: bool = True, dim: int = -1) -> torch.Tensor:
    """Gumbel-softmax sample along ``dim``; ``hard`` makes it one-hot with straight-through gradients.

    Gumbel noise is drawn as ``-log(Exponential(1))``, which never produces inf for float32 (the sampler
    GroupViT switched to for the same reason).
    """
    gumbels = -torch.empty_like(logits).exponential_().log()
    soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return soft
    index = soft.argmax(dim, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return one_hot - soft.detach() + soft


class CrossAttention(nn.Module):
    """Multi-head attention of ``query`` (B, N, C) over ``key`` (B, S, C); ``key_padding_mask`` (B, S) True = pad."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = True  # SDPA kernels; False = the reference computation (speed.attention=math)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(key))
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = attention(q, k, v, mask, fused=self.fused_attn)
        return self.proj(out.transpose(1, 2).flatten(2))


class CrossAttnBlock(nn.Module):
    """Transformer block whose attention reads another token set: x = q + attn(q, k); x = x + mlp(x).

    post_norm: normalise the output instead of the inputs (GroupViT's pre-assignment block).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, post_norm: bool = False) -> None:
        super().__init__()
        self.norm_q = nn.Identity() if post_norm else nn.LayerNorm(dim)
        self.norm_k = nn.Identity() if post_norm else nn.LayerNorm(dim)
        self.norm_post = nn.LayerNorm(dim) if post_norm else nn.Identity()
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = query + self.attn(self.norm_q(query), self.norm_k(key), key_padding_mask)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


@dataclass
class Assignment:
    """What a grouping block decided, for segmentation and the cross-image mask loss.

    soft: (B, S_out, L) softmax over the S_out groups for every image token (no noise): the map used at test time.
    hard: (B, S_out, L) the one-hot (Gumbel) assignment used in the forward pass (straight-through gradients).
    q: (B, S_out, C) projected group queries; k: (B, L, C) projected image-token keys (logits = q k^T / sqrt(C)).
    """

    soft: torch.Tensor
    hard: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor


class AssignAttention(nn.Module):
    """Single-head assignment of L image tokens to S groups (softmax over the *groups*, not the tokens).

    out = (A / (A.sum(tokens) + eps)) @ v with A the hard Gumbel assignment during training, the hard argmax
    of the softmax at evaluation.
    """

    def __init__(
        self, dim: int, hard: bool = True, gumbel: bool = True, gumbel_tau: float = 1.0, assign_eps: float = 1.0
    ) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.hard = hard
        self.gumbel = gumbel
        self.gumbel_tau = gumbel_tau
        self.assign_eps = assign_eps

    def forward(self, groups: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, Assignment]:
        """groups (B, S, C), tokens (B, L, C) -> new groups (B, S, C) and the :class:`Assignment`."""
        q, k, v = self.q_proj(groups), self.k_proj(tokens), self.v_proj(tokens)
        logits = (q @ k.transpose(1, 2)) * self.scale  # (B, S, L)
        if self.gumbel and self.training:
            assign = gumbel_softmax(logits, tau=self.gumbel_tau, hard=self.hard, dim=1)
        elif self.hard:
            assign = hard_softmax(logits, dim=1)
        else:
            assign = logits.softmax(dim=1)
        weights = assign / (assign.sum(dim=-1, keepdim=True) + self.assign_eps)
        out = self.proj(weights @ v)
        return out, Assignment(soft=logits.detach().softmax(dim=1), hard=assign, q=q, k=k)


class GroupingBlock(nn.Module):
    """S_in group tokens + L image tokens -> S_out segment tokens (B, S_out, out_dim) and their :class:`Assignment`.

    mlp_ratio: (token-mixing hidden factor, channel MLP hidden factor) of GroupViT, (0.5, 4.0).
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        num_heads: int,
        num_group_tokens: int,
        num_output_groups: int,
        mlp_ratio: tuple[float, float] = (0.5, 4.0),
        hard: bool = True,
        gumbel: bool = True,
        gumbel_tau: float = 1.0,
        assign_eps: float = 1.0,
    ) -> None:
        super().__init__()
        tokens_hidden, channels_hidden = int(mlp_ratio[0] * dim), int(mlp_ratio[1] * dim)
        self.num_output_groups = num_output_groups
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_inter = Mlp(num_group_tokens, tokens_hidden, num_output_groups)  # mixes along the token axis
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, num_heads, post_norm=True)
        self.assign = AssignAttention(dim, hard=hard, gumbel=gumbel, gumbel_tau=gumbel_tau, assign_eps=assign_eps)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, channels_hidden, out_dim)
        self.reduction = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out_dim, bias=False)) if out_dim != dim else nn.Identity()
        )

    def forward(self, tokens: torch.Tensor, group_tokens: torch.Tensor) -> tuple[torch.Tensor, Assignment]:
        """tokens (B, L, C), group_tokens (B, S_in, C) -> (B, S_out, out_dim), Assignment over L."""
        group_tokens = self.norm_tokens(group_tokens)
        tokens = self.norm_x(tokens)
        queries = self.norm_post_tokens(self.mlp_inter(group_tokens.transpose(1, 2)).transpose(1, 2))
        queries = self.pre_assign_attn(queries, tokens)
        new, assignment = self.assign(queries, tokens)
        new = new + queries
        return self.reduction(new) + self.mlp_channels(self.norm_new_x(new)), assignment


class TokenMixer(nn.Module):
    """LayerNorm then an MLP along the token axis: (B, S_in, C) -> (B, S_out, C) (GroupViT's group projector)."""

    def __init__(self, dim: int, num_in: int, num_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(num_in, dim // 2, num_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens).transpose(1, 2)).transpose(1, 2)
