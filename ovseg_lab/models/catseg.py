"""CAT-Seg: cost aggregation over CLIP image-text cost volumes (Cho et al., CVPR 2024).

cost volume (B, P, T, h, w) = cos(dense CLIP embedding, text embedding of class t and template p)
  -> cost embedding: Conv 7x7 P -> hidden, per class
  -> L x [ spatial aggregation (two Swin blocks per class slice, appearance guidance for q/k)
           class aggregation  (linear attention across classes per pixel, text guidance for q/k) ]
  -> upsampling decoder with CLIP intermediate features -> logits (B, T, 4h, 4w)

The ``aggregation`` options reproduce Table 4: ``input`` cost | feature (feature volume = image and text
embeddings concatenated), ``spatial_aggregation``, ``class_aggregation``, ``embedding_guidance``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.errors import SetupError
from ovseg_lab.layers.attention import attention
from ovseg_lab.layers.linear_attention import ClassAggregationLayer, qkv_table
from ovseg_lab.layers.losses import IGNORE_PIXEL_MODES, per_pixel_bce
from ovseg_lab.layers.steps import checkpoint_call, image_steps
from ovseg_lab.layers.swin import GuidedSwinBlock, _shift_mask, window_partition
from ovseg_lab.models.costvolume import cosine_cost_volume
from ovseg_lab.vocab import Vocabulary

# Without autograd the head's stages work in steps of about this many elements (tokens x channels: 4096 tokens of
# the released hidden size 128, 2 MiB in fp32), so that a step's tensors stay in cache; small maps (the toy) take
# several images per step, so that a step is never much smaller than this either.
WORKING_ELEMENTS = 4096 * 128
DECODER_PIXELS = 8 * 24 * 24  # decoder input pixels per step without autograd (8 classes of the released 24x24 map)


@dataclass(frozen=True)
class AggregationSpec:
    """Which parts of the aggregator run (CAT-Seg Table 4 rows)."""

    name: str = "full"
    input: str = "cost"
    spatial_aggregation: bool = True
    class_aggregation: bool = True
    embedding_guidance: bool = True

    def __post_init__(self) -> None:
        if self.input not in ("cost", "feature"):
            raise SetupError(f"aggregation.input must be 'cost' or 'feature', got '{self.input}'.")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | AggregationSpec | None) -> AggregationSpec:
        if cfg is None:
            return cls()
        if isinstance(cfg, AggregationSpec):
            return cfg
        return cls(**{k: v for k, v in dict(cfg).items() if not k.startswith("_")})


class DoubleConv(nn.Module):
    """(3x3 conv without bias -> GroupNorm(C/16) -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        groups = max(1, out_channels // 16)
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UpBlock(nn.Module):
    """x2 transposed conv to (in - guidance) channels, concat the projected guidance, DoubleConv -> out."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def guidance_term(self, guidance: torch.Tensor) -> torch.Tensor:
        """The guidance half of the first convolution, once per image: (B, G, 2h, 2w) -> (B, out, 2h, 2w)."""
        return F.conv2d(guidance, self.conv.block[0].weight[:, self.up.out_channels :], padding=1)

    def forward(
        self, x: torch.Tensor, guidance: torch.Tensor | None, guided: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B*T, C, h, w), image-major; guidance (B, G, 2h, 2w) shared by the T classes of an image (or its
        :meth:`guidance_term` as ``guided``)."""
        x = self.up(x)
        if guidance is None and guided is None:
            return self.conv(x)
        # conv([x; g]) = conv_x(x) + conv_g(g): the guidance half runs once per image, not once per class
        if guided is None:
            guided = self.guidance_term(guidance)
        y = F.conv2d(x, self.conv.block[0].weight[:, : x.shape[1]], padding=1)
        y.view(guided.shape[0], -1, *y.shape[1:]).add_(guided.unsqueeze(1))
        return self.conv.block[1:](y)


# ---------------------------------------------------------------------------------------------- windowed Swin pair
# CAT-Seg runs the same pair of Swin blocks on every class slice of the cost embedding. The head keeps the cost
# embedding in one pixel-major tensor (B, H*W, T, C); the pair runs on a few slices at a time in windowed token order
# (window-major, then position in the window, then slice): one gather into block 1's windows, one gather from block
# 1's windows into block 2's shifted windows (the cyclic shift is part of the index), one gather back. q, k, v come
# from one fused matmul on the tokens; the guidance halves of q and k and the biases are a per-window-position table
# computed once per image and broadcast over the slices. The same computation as GuidedSwinBlock (tested against
# it), without its (B*T)-sized layout copies.
@lru_cache(maxsize=32)
def window_index(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(nW * w*w,) raster index of the token at every windowed position (windows of the map rolled by -shift)."""
    idx = torch.arange(height * width).view(1, height, width, 1)
    if shift:
        idx = torch.roll(idx, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(idx, window).reshape(-1)


@lru_cache(maxsize=32)
def window_masks(height: int, width: int, window: int, shift: int) -> tuple[torch.Tensor | None, ...]:
    """One (w*w, w*w) additive mask per window; None where the window holds one region (the mask is all zeros)."""
    if not shift:
        return (None,) * ((height // window) * (width // window))
    return tuple(m if bool(m.ne(0).any()) else None for m in _shift_mask(height, width, window, shift))


class _PermuteRows(torch.autograd.Function):
    """x.index_select(1, index) for a permutation ``index``; its gradient is the gather by the inverse permutation
    (advanced indexing's backward would scatter-add into a zero-filled tensor)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x (G, M, ...) -> x[:, index], ``inverse`` the inverse permutation of ``index``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _PermuteRows.apply(x, index, inverse)
    return x.index_select(1, index)


def swin_block_windows(
    block: GuidedSwinBlock, xw: torch.Tensor, table: torch.Tensor, masks: tuple[torch.Tensor | None, ...], inplace: bool
) -> torch.Tensor:
    """One Swin block on windowed tokens xw (G, nW*N, K, C): K slices of G images; ``table`` (G, nW*N, 1, 3C) from
    :func:`qkv_table` on the windowed guidance, or (3C,); ``masks`` one per window. In place when ``inplace``."""
    g, m, k, c = xw.shape
    attn = block.attn
    heads = attn.num_heads
    num_windows = len(masks)
    n = m // num_windows
    h = F.layer_norm(xw, (c,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    w_qkv = torch.cat([attn.q.weight[:, :c], attn.k.weight[:, :c], attn.v.weight], dim=0)
    qkv = F.linear(h, w_qkv)
    qkv = qkv.add_(table) if inplace else qkv + table
    qkv = qkv.view(g, num_windows, n, k, 3, heads, c // heads)
    d = c // heads
    # SDPA's fused CPU kernels take 4-D (batch, heads, N, d) inputs (more dimensions fall back to the math path)
    if all(mask is None for mask in masks):  # every window in one call: batch (G, nW, K)
        q, key, v = (t.permute(0, 1, 3, 4, 2, 5).reshape(-1, heads, n, d) for t in qkv.unbind(4))
        out = attention(q, key, v, None, fused=attn.fused_attn).view(g, num_windows, k, heads, n, d)
        out = out.permute(0, 1, 4, 2, 3, 5)  # (G, nW, N, K, heads, d)
    else:  # window by window: a mask only where the shifted window mixes regions
        outs = []
        for (w_q, w_k, w_v), mask in zip((window.unbind(3) for window in qkv.unbind(1)), masks):
            q, key, v = (t.permute(0, 2, 3, 1, 4).reshape(-1, heads, n, d) for t in (w_q, w_k, w_v))
            mask = mask.to(device=q.device, dtype=q.dtype) if mask is not None else None
            out = attention(q, key, v, mask, fused=attn.fused_attn).view(g, k, heads, n, d)
            outs.append(out.permute(0, 3, 1, 2, 4))  # (G, N, K, heads, d)
        out = torch.stack(outs, dim=1)
    out = F.linear(out.reshape(g, m, k, c), attn.proj.weight, attn.proj.bias)
    xw = xw.add_(out) if inplace else xw + out
    del out, qkv, h
    mlp = block.mlp
    hidden = F.linear(
        F.layer_norm(xw, (c,), block.norm2.weight, block.norm2.bias, block.norm2.eps), mlp.fc1.weight, mlp.fc1.bias
    )
    hidden = torch._C._nn.gelu_(hidden) if inplace else F.gelu(hidden)
    out = F.linear(hidden, mlp.fc2.weight, mlp.fc2.bias)
    return xw.add_(out) if inplace else xw + out


class SpatialAggregation(nn.Module):
    """Two Swin blocks (W-MSA then SW-MSA) applied to every class slice of the cost embedding.

    forward(x (B, C, T, H, W), guidance (B, G, H, W) or None, chunk) -> (B, C, T, H, W); ``chunk`` bounds the
    number of class slices processed at once (same result, less memory).
    """

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.block1 = GuidedSwinBlock(dim, guidance_dim, num_heads, window_size, shift_size=0)
        self.block2 = GuidedSwinBlock(dim, guidance_dim, num_heads, window_size, shift_size=window_size // 2)
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim else None

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None, chunk: int | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        state = x.permute(0, 3, 4, 2, 1).reshape(b, h * w, t, c)
        out = self.forward_state(state, guidance, h, w, chunk, inplace=False)
        return out.view(b, h, w, t, c).permute(0, 4, 3, 1, 2)

    def forward_state(
        self,
        state: torch.Tensor,
        guidance: torch.Tensor | None,
        height: int,
        width: int,
        slices: int | None = None,
        inplace: bool = False,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """state (B, H*W, T, C) pixel-major (CATSegHead's layout) -> the same after the Swin pair: gather into block
        1's windows, block 1, gather into block 2's shifted windows, block 2, gather back. ``slices``: class slices
        per step (None: all slices of all images in one step); whole images per step when they fit. In place
        (``inplace``, no autograd): each step writes its slices back into ``state``. ``checkpoint`` (autograd):
        each step's activations are recomputed in the backward pass instead of kept."""
        b, hw, t, c = state.shape
        g = None
        if guidance is not None and self.guidance_norm is not None:
            g = self.guidance_norm(guidance.flatten(2).transpose(1, 2))  # (B, H*W, G)
        geometry = [blk._geometry(height, width) for blk in (self.block1, self.block2)]
        idx1, idx2 = (window_index(height, width, *geo).to(state.device) for geo in geometry)
        inverse1, inverse2 = torch.empty_like(idx1), torch.empty_like(idx2)
        inverse1[idx1] = torch.arange(len(idx1), device=idx1.device)
        inverse2[idx2] = torch.arange(len(idx2), device=idx2.device)
        perm = inverse1[idx2]  # block 1's windowed position of every block 2 windowed position
        inverse_perm = idx1.new_empty(len(perm))
        inverse_perm[perm] = torch.arange(len(perm), device=perm.device)
        masks1, masks2 = (window_masks(height, width, *geo) for geo in geometry)
        tables = [
            qkv_table(blk.attn, c, g[:, idx] if g is not None and blk.guidance_dim else None, state)
            for blk, idx in ((self.block1, idx1), (self.block2, idx2))
        ]
        tables = [table.unsqueeze(-2) if table.dim() == 3 else table for table in tables]  # (B, nW*N, 1, 3C)
        parts = []
        steps = image_steps(b, hw * t, t, None if slices is None else slices * hw)
        for i0, i1, s0, s1 in steps:
            part = state[i0:i1, :, s0:s1]  # (G, H*W, K, C)
            step_tables = [table[i0:i1] if table.dim() == 4 else table for table in tables]
            if inplace:
                xw = swin_block_windows(self.block1, permute_rows(part, idx1, inverse1), step_tables[0], masks1, True)
                part[:, idx2] = swin_block_windows(
                    self.block2, permute_rows(xw, perm, inverse_perm), step_tables[1], masks2, True
                )
                continue

            def pair(part: torch.Tensor, table1: torch.Tensor, table2: torch.Tensor) -> torch.Tensor:
                xw = swin_block_windows(self.block1, permute_rows(part, idx1, inverse1), table1, masks1, False)
                xw = swin_block_windows(self.block2, permute_rows(xw, perm, inverse_perm), table2, masks2, False)
                return permute_rows(xw, inverse2, idx2)

            parts.append(checkpoint_call(pair, checkpoint, part, *step_tables))
        if inplace:
            return state
        if len(parts) == 1:
            return parts[0]
        if steps[0][3] == t:  # whole images per step
            return torch.cat(parts)
        per_image = len(parts) // b
        return torch.cat([torch.cat(parts[k : k + per_image], dim=2) for k in range(0, len(parts), per_image)])


class CATSegHead(nn.Module):
    """Everything of CAT-Seg that is not CLIP: the 4.67M (ViT-B) / 5.78M (ViT-L) learnable parameters.

    Args:
        embed_dim: CLIP joint embedding size (512 ViT-B/16, 768 ViT-L/14).
        clip_width: CLIP visual width of the hooked intermediate layers (768 / 1024).
        num_templates: P, the prompt templates of the cost volume.
        prior_probability: if set, the output bias starts at logit(p) so that every class starts "absent with
            probability 1 - p" (Lin et al., RetinaNet). None = PyTorch's default init, as the official code.
            From a zero-centred bias, the per-class BCE first spends its gradient learning the class prior and
            then sits on it (loss ~0.128 for 36 classes) for 100-300 steps depending on the random init; a
            prior-initialised head learns from the first steps when the cost volume carries signal (three of
            three seeds on the toy). It matters when steps are few (the CPU toy), not over the paper's 80k.
    """

    def __init__(
        self,
        embed_dim: int,
        clip_width: int,
        num_templates: int = 1,
        aggregation: AggregationSpec | Mapping[str, Any] | None = None,
        hidden_dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        window_size: int = 12,
        appearance_guidance_proj_dim: int = 128,
        text_guidance_proj_dim: int = 128,
        decoder_dims: Sequence[int] = (64, 32),
        decoder_guidance_dims: Sequence[int] = (256, 128),
        decoder_guidance_proj_dims: Sequence[int] = (32, 16),
        pad_len: int = 256,
        prior_probability: float | None = None,
    ) -> None:
        super().__init__()
        if prior_probability is not None and not 0.0 < prior_probability < 1.0:
            raise SetupError(f"head.prior_probability must lie in (0, 1) or be null, got {prior_probability}.")
        self.aggregation = AggregationSpec.from_config(aggregation)
        agg = self.aggregation
        guided = agg.embedding_guidance
        appearance_dim = appearance_guidance_proj_dim if guided and agg.spatial_aggregation else 0
        text_dim = text_guidance_proj_dim if guided and agg.class_aggregation else 0
        input_channels = num_templates if agg.input == "cost" else 2 * embed_dim
        self.cost_embedding = nn.Conv2d(input_channels, hidden_dim, kernel_size=7, padding=3)
        self.appearance_guidance = (
            nn.Sequential(nn.Conv2d(embed_dim, appearance_dim, 3, padding=1), nn.ReLU()) if appearance_dim else None
        )
        self.text_guidance = nn.Sequential(nn.Linear(embed_dim, text_dim), nn.ReLU()) if text_dim else None
        self.spatial_layers = nn.ModuleList(
            [SpatialAggregation(hidden_dim, appearance_dim, num_heads, window_size) for _ in range(num_layers)]
            if agg.spatial_aggregation
            else []
        )
        self.class_layers = nn.ModuleList(
            [ClassAggregationLayer(hidden_dim, text_dim, num_heads, pad_len) for _ in range(num_layers)]
            if agg.class_aggregation
            else []
        )
        self.num_layers = num_layers if (agg.spatial_aggregation or agg.class_aggregation) else 0
        # CLIP intermediate layers -> decoder guidance at 2x and 4x the feature resolution
        self.upsample1 = nn.ConvTranspose2d(clip_width, decoder_guidance_dims[0], kernel_size=2, stride=2)
        self.upsample2 = nn.ConvTranspose2d(clip_width, decoder_guidance_dims[1], kernel_size=4, stride=4)
        self.decoder_guidance = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, p, 3, padding=1), nn.ReLU())
            for d, p in zip(decoder_guidance_dims, decoder_guidance_proj_dims)
        )
        self.decoder1 = UpBlock(hidden_dim, decoder_dims[0], decoder_guidance_proj_dims[0])
        self.decoder2 = UpBlock(decoder_dims[0], decoder_dims[1], decoder_guidance_proj_dims[1])
        self.head = nn.Conv2d(decoder_dims[1], 1, kernel_size=3, padding=1)
        if prior_probability is not None:
            nn.init.constant_(self.head.bias, math.log(prior_probability / (1.0 - prior_probability)))

    def cost_volume(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cost volume or feature volume (B, P, T, h, w). dense (B, C, h, w), text (B, T, P, C)."""
        if self.aggregation.input == "cost":
            return cosine_cost_volume(dense, text)  # (B, P, T, h, w)
        image = F.normalize(dense, dim=1)
        words = F.normalize(F.normalize(text, dim=-1).mean(dim=2), dim=-1)  # (B, T, C)
        t, (h, w) = words.shape[1], image.shape[-2:]
        return torch.cat(
            [
                image.unsqueeze(2).expand(-1, -1, t, -1, -1),
                words.permute(0, 2, 1)[..., None, None].expand(-1, -1, -1, h, w),
            ],
            dim=1,
        )  # (B, 2C, T, h, w)

    def embed_input(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cost volume or feature volume -> (B, hidden, T, h, w). dense (B, C, h, w), text (B, T, P, C)."""
        state = self.embed_state(self.cost_volume(dense, text), inplace=False)
        b, (h, w), t, c = state.shape[0], dense.shape[-2:], state.shape[2], state.shape[3]
        return state.view(b, h, w, t, c).permute(0, 4, 3, 1, 2)

    def embed_state(self, volume: torch.Tensor, slices: int | None = None, inplace: bool = False) -> torch.Tensor:
        """(B, P, T, h, w) volume -> the pixel-major cost embedding (B, h*w, T, hidden). ``inplace`` (no autograd):
        ``slices`` classes (or whole images) per step into one preallocated tensor."""
        b, p, t, h, w = volume.shape
        c = self.cost_embedding.out_channels
        if not inplace:
            embedded = self.cost_embedding(volume.transpose(1, 2).reshape(b * t, p, h, w))
            return embedded.view(b, t, c, h * w).permute(0, 3, 1, 2).contiguous()
        state = volume.new_empty(b, h * w, t, c)
        for i0, i1, s0, s1 in image_steps(b, t * h * w, t, None if slices is None else slices * h * w):
            part = volume[i0:i1, :, s0:s1].transpose(1, 2).reshape(-1, p, h, w)  # (G*K, P, h, w)
            part = self.cost_embedding(part).view(i1 - i0, s1 - s0, c, h * w)
            state[i0:i1, :, s0:s1] = part.permute(0, 3, 1, 2)
        return state

    def forward(
        self,
        dense: torch.Tensor,
        intermediates: Sequence[torch.Tensor],
        text: torch.Tensor,
        class_pool: int = 1,
        class_chunk: int | None = None,
        truncate: int | None = None,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """dense (B, C, h, w), intermediates 2 x (B, W, h, w), text (B, T, P, C) -> logits (B, T, 4h, 4w).

        ``truncate``: the official ``pad_len`` behaviour (Aggregator.forward): with more than ``truncate`` classes,
        only each image's top-``truncate`` classes by maximum cost are aggregated and the others score -100.

        The cost embedding lives in one pixel-major tensor (B, h*w, T, hidden) from the cost embedding to the
        decoder: Swin blocks gather class slices into their windows and back, class aggregation reads each pixel's
        (T, hidden) block where it lies, the decoder reads classes where they lie. Without autograd every stage works
        in place on that tensor, in steps of about ``WORKING_ELEMENTS`` elements (several whole images when they fit:
        fast in cache, bounded memory); ``class_chunk`` caps the classes per step further. With autograd every stage
        runs in one step, out of place (the same computation; steps would only add work, since autograd keeps every
        step's tensors anyway), unless ``checkpoint``: then ``class_chunk`` classes (pixels in class aggregation) per
        step, each step's activations recomputed in the backward pass (training memory bounded by one step's
        activations plus a few copies of the cost embedding, for about one more forward pass of the head).
        """
        if truncate and text.shape[1] > truncate:
            cost = cosine_cost_volume(dense, text)  # (B, P, T, h, w)
            score = cost.permute(0, 2, 1, 3, 4).flatten(2).amax(dim=-1)  # (B, T)
            del cost
            keep = score.topk(truncate, dim=-1).indices  # (B, K)
            kept_text = torch.gather(text, 1, keep[..., None, None].expand(-1, -1, *text.shape[2:]))
            logits = self.forward(dense, intermediates, kept_text, class_pool, class_chunk, checkpoint=checkpoint)
            out = logits.new_full((logits.shape[0], text.shape[1], *logits.shape[2:]), -100.0)
            return out.scatter_(1, keep[..., None, None].expand(-1, -1, *logits.shape[2:]), logits)
        inplace = not torch.is_grad_enabled()
        h, w = dense.shape[-2:]
        tokens = decoder_pixels = slices = None
        if inplace:
            tokens = WORKING_ELEMENTS // self.cost_embedding.out_channels
            slices, decoder_pixels = max(1, tokens // (h * w)), DECODER_PIXELS
        checkpoint = checkpoint and not inplace and bool(class_chunk)
        if class_chunk and (inplace or checkpoint):
            tokens = min(tokens or class_chunk * h * w, class_chunk * h * w)
            slices = min(slices or class_chunk, class_chunk)
            decoder_pixels = min(decoder_pixels or class_chunk * h * w, class_chunk * h * w)
        x = self.embed_state(self.cost_volume(dense, text), slices, inplace)  # (B, h*w, T, C)
        appearance = self.appearance_guidance(dense) if self.appearance_guidance is not None else None
        text_guidance = None
        if self.text_guidance is not None:
            text_guidance = self.text_guidance(F.normalize(F.normalize(text, dim=-1).mean(dim=2), dim=-1))
        for index in range(self.num_layers):
            if self.spatial_layers:
                x = self.spatial_layers[index].forward_state(x, appearance, h, w, slices, inplace, checkpoint)
            if self.class_layers:
                x = self.class_layers[index].forward_state(
                    x, text_guidance, h, w, class_pool, tokens, inplace, checkpoint
                )
        guidance = [
            proj(up(feat))
            for proj, up, feat in zip(self.decoder_guidance, (self.upsample1, self.upsample2), intermediates)
        ]
        return self.decode_state(x, guidance, h, w, decoder_pixels, inplace, checkpoint)

    def decode(self, x: torch.Tensor, guidance: list[torch.Tensor], chunk: int | None = None) -> torch.Tensor:
        """(B, C, T, h, w) -> (B, T, 4h, 4w), optionally ``chunk`` classes at a time."""
        b, c, t, h, w = x.shape
        state = x.permute(0, 3, 4, 2, 1).reshape(b, h * w, t, c)
        return self.decode_state(state, guidance, h, w, chunk * h * w if chunk else None, not torch.is_grad_enabled())

    def decode_state(
        self,
        x: torch.Tensor,
        guidance: list[torch.Tensor],
        height: int,
        width: int,
        pixels: int | None = None,
        inplace: bool = False,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """Pixel-major (B, h*w, T, C) -> logits (B, T, 4h, 4w), about ``pixels`` input pixels (classes x h x w) per
        step (whole images when they fit; None: one step); ``inplace``: the steps write into one output tensor."""
        b, hw, t, c = x.shape
        guided = [block.guidance_term(g) for block, g in zip((self.decoder1, self.decoder2), guidance)]
        out = None
        outputs = []
        steps = image_steps(b, t * hw, t, pixels)

        def decode_step(part: torch.Tensor, guided1: torch.Tensor, guided2: torch.Tensor) -> torch.Tensor:
            """(G, h*w, K, C) -> (G, K, 4h, 4w). The decoder gets (G*K, C, h, w) in channels-last memory: its
            few-channel convolutions run about twice as fast on it as on NCHW on the CPU (mkldnn keeps the format)."""
            part = part.transpose(1, 2).reshape(-1, height, width, c).permute(0, 3, 1, 2)
            part = self.head(self.decoder2(self.decoder1(part, None, guided1), None, guided2))
            return part.view(guided1.shape[0], -1, *part.shape[-2:])

        for i0, i1, s0, s1 in steps:
            part = checkpoint_call(decode_step, checkpoint, x[i0:i1, :, s0:s1], guided[0][i0:i1], guided[1][i0:i1])
            if inplace:
                if out is None:
                    out = part.new_empty(b, t, *part.shape[-2:])
                out[i0:i1, s0:s1] = part
            else:
                outputs.append(part)
        if inplace:
            return out
        if len(outputs) == 1:
            return outputs[0]
        if steps[0][3] == t:  # whole images per step
            return torch.cat(outputs)
        per_image = len(outputs) // b
        return torch.cat([torch.cat(outputs[k : k + per_image], dim=1) for k in range(0, len(outputs), per_image)])


class CATSeg(nn.Module):
    """CAT-Seg on a CLIP backbone.

    forward(images (B, 3, H, W) in [0, 1], vocabulary) -> logits (B, T, S/4, S/4), S = CLIP input size.

    Args:
        clip: the CLIP towers (``clip.feature_layers`` must name two blocks for the decoder).
        head: keyword arguments of :class:`CATSegHead` (hidden sizes, depths, window...).
        aggregation: Table 4 row (see :class:`AggregationSpec`).
        class_pool_train / class_pool_eval: pooling of the class-aggregation map (2 / 1 in the paper).
        truncate_classes: the official pad_len behaviour above ``pad_len`` classes: keep each image's
            top-``pad_len`` classes by maximum cost and give the others -100. Off by default: every class
            is scored, nothing is silently cut.
        class_chunk: classes per chunk in spatial aggregation and the decoder at evaluation, and the same number
            of tokens per chunk in class aggregation (memory bound for large vocabularies; identical results).
        train_class_chunk: the same in training, each chunk checkpointed (its activations recomputed in the
            backward pass): bounds the head's training memory for large vocabularies at the cost of about one more
            forward pass of the head; identical gradients. null = every class in one step (the official behaviour).
        ignore_pixels: how the BCE treats ignore pixels: ``negative`` (official: all-zero targets, counted in the
            mean) or ``exclude`` (left out); see :func:`~ovseg_lab.layers.losses.per_pixel_bce`.
    """

    def __init__(
        self,
        clip: CLIPBackbone,
        head: Mapping[str, Any] | None = None,
        aggregation: AggregationSpec | Mapping[str, Any] | None = None,
        class_pool_train: int = 2,
        class_pool_eval: int = 1,
        truncate_classes: bool = False,
        class_chunk: int | None = None,
        train_class_chunk: int | None = None,
        ignore_index: int = 255,
        ignore_pixels: str = "negative",
    ) -> None:
        super().__init__()
        if ignore_pixels not in IGNORE_PIXEL_MODES:
            raise SetupError(f"model.net.ignore_pixels must be one of {IGNORE_PIXEL_MODES}, got '{ignore_pixels}'.")
        if len(clip.feature_layers) != 2:
            raise SetupError(
                f"CAT-Seg's decoder needs exactly two CLIP feature layers, got clip.feature_layers={list(clip.feature_layers)}."
            )
        self.clip = clip
        head_kwargs = dict(head or {})
        head_kwargs.setdefault("num_templates", len(clip.templates))
        self.head = CATSegHead(clip.embed_dim, clip.width, aggregation=aggregation, **head_kwargs)
        self.class_pool_train = class_pool_train
        self.class_pool_eval = class_pool_eval
        self.truncate_classes = truncate_classes
        self.pad_len = head_kwargs.get("pad_len", 256)
        self.class_chunk = class_chunk
        self.train_class_chunk = train_class_chunk
        self.ignore_index = ignore_index
        self.ignore_pixels = ignore_pixels

    def features(self, images: torch.Tensor):
        size = self.clip.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return self.clip.encode_dense(self.clip.normalize(images))

    def forward(self, images: torch.Tensor, vocabulary: Vocabulary | Sequence[str]) -> torch.Tensor:
        names = vocabulary.classes if isinstance(vocabulary, Vocabulary) else tuple(vocabulary)
        feats = self.features(images)
        text = self.clip.encode_vocabulary(names).to(feats.dense.dtype)  # (T, P, C)
        text = text.unsqueeze(0).expand(images.shape[0], -1, -1, -1)
        pool = self.class_pool_train if self.training else self.class_pool_eval
        chunk = self.train_class_chunk if self.training else self.class_chunk
        truncate = self.pad_len if self.truncate_classes else None
        return self.head(
            feats.dense,
            feats.intermediates,
            text,
            pool,
            chunk,
            truncate,
            checkpoint=self.training and self.train_class_chunk is not None,
        )

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_pixel_bce(logits, labels, self.ignore_index, self.ignore_pixels)
