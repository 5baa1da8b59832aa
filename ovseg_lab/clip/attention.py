"""Multi-head attention with separate q/k/v projection weights, computed with SDPA.

CLIP towers fuse q, k and v into one ``in_proj_weight`` (3W, W); fine-tuning strategies such as QV or KV
(CAT-Seg Table 6) must train single projections, so the fused weight is split into three parameters.
The in-projection bias stays one (3W,) vector, as in the official CAT-Seg release. Parameter names follow
``nn.MultiheadAttention``'s separate-weight layout (``q_proj_weight``...), which is also the official
CAT-Seg checkpoint layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_lab.layers.attention import attention


class SplitQKVAttention(nn.Module):
    """Drop-in replacement for ``nn.MultiheadAttention`` (self-attention use) inside open_clip blocks.

    Call signature matches what open_clip's ``ResidualAttentionBlock`` uses:
    ``attn(q_x, k_x, v_x, need_weights=False, attn_mask=mask) -> (out, None)``,
    with tensors (B, L, W) when ``batch_first`` else (L, B, W).
    """

    def __init__(self, width: int, num_heads: int, batch_first: bool = True) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.width = width
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.fused_attn = True  # SDPA kernels; False = the reference computation (speed.attention=math)
        self.q_proj_weight = nn.Parameter(torch.empty(width, width))
        self.k_proj_weight = nn.Parameter(torch.empty(width, width))
        self.v_proj_weight = nn.Parameter(torch.empty(width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(weight)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> SplitQKVAttention:
        """Copy the weights of a fused ``nn.MultiheadAttention`` into a split module."""
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("expected a self-attention nn.MultiheadAttention with a fused in_proj_weight")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("bias_k/bias_v/add_zero_attn are not used by CLIP and are not supported")
        module = cls(mha.embed_dim, mha.num_heads, batch_first=mha.batch_first)
        module = module.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            q, k, v = mha.in_proj_weight.chunk(3, dim=0)
            module.q_proj_weight.copy_(q)
            module.k_proj_weight.copy_(k)
            module.v_proj_weight.copy_(v)
            if mha.in_proj_bias is not None:
                module.in_proj_bias.copy_(mha.in_proj_bias)
            module.out_proj.load_state_dict(mha.out_proj.state_dict())
        return module

    def project(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """One input projection ('q', 'k' or 'v') with its slice of the shared bias: (..., W) -> (..., W)."""
        index = "qkv".index(which)
        weight = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)[index]
        bias = self.in_proj_bias[index * self.width : (index + 1) * self.width]
        return F.linear(x, weight, bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise NotImplementedError("SplitQKVAttention computes attention with SDPA and returns no weights")
        key = query if key is None else key
        value = query if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, _ = query.shape
        heads, head_dim = self.num_heads, self.width // self.num_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, -1, heads, head_dim).transpose(1, 2)

        q = split_heads(self.project(query, "q"))
        k = split_heads(self.project(key, "k"))
        v = split_heads(self.project(value, "v"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                # nn.MultiheadAttention's bool masks mark positions to *exclude*; SDPA's mark positions to keep.
                attn_mask = ~attn_mask
            else:
                attn_mask = attn_mask.to(q.dtype)
        out = attention(q, k, v, attn_mask, fused=self.fused_attn)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.width))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None
