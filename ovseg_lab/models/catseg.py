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
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.errors import SetupError
from ovseg_lab.layers.linear_attention import ClassAggregationLayer
from ovseg_lab.layers.losses import IGNORE_PIXEL_MODES, per_pixel_bce
from ovseg_lab.layers.swin import GuidedSwinBlock, _window_masks, qkv_table, swin_block_windows, window_index
from ovseg_lab.models.costvolume import cosine_cost_volume
from ovseg_lab.vocab import Vocabulary

WORKING_TOKENS = 4096  # tokens per step of the head's stages without autograd (a few MiB: stays in cache)
DECODER_CLASSES = 8  # classes per decoder step without autograd


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
    def from_config(cls, cfg: Mapping[str, Any] | "AggregationSpec" | None) -> "AggregationSpec":
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
        return F.conv2d(guidance, self.conv.block[0].weight[:, self.up.out_channels:], padding=1)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None, guided: torch.Tensor | None = None) -> torch.Tensor:
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

    def forward_state(self, state: torch.Tensor, guidance: torch.Tensor | None, height: int, width: int,
                      chunk: int | None = None, inplace: bool = False) -> torch.Tensor:
        """state (B, H*W, T, C) pixel-major (CATSegHead's layout), ``chunk`` slices at a time, in place when
        ``inplace``: gather into block 1's windows, block 1, gather into block 2's shifted windows, block 2,
        scatter back (see :func:`~ovseg_lab.layers.swin.swin_block_windows`)."""
        b, hw, t, c = state.shape
        g = None
        if guidance is not None and self.guidance_norm is not None:
            g = self.guidance_norm(guidance.flatten(2).transpose(1, 2))  # (B, H*W, G)
        geometry = [blk._geometry(height, width) for blk in (self.block1, self.block2)]
        idx1, idx2 = (window_index(height, width, *geo).to(state.device) for geo in geometry)
        inverse1 = torch.empty_like(idx1)
        inverse1[idx1] = torch.arange(len(idx1), device=idx1.device)
        perm = inverse1[idx2]  # block 1's windowed position of every block 2 windowed position
        masks1, masks2 = (_window_masks(height, width, *geo) for geo in geometry)
        chunk = max(1, min(chunk or t, t))
        images = []
        for i in range(b):
            tables = [qkv_table(blk.attn, c, g[i][idx] if g is not None and blk.guidance_dim else None, state).unsqueeze(-2)
                      for blk, idx in ((self.block1, idx1), (self.block2, idx2))]
            parts = []
            for start in range(0, t, chunk):
                part = state[i, :, start : start + chunk]  # (H*W, K, C)
                xw = swin_block_windows(self.block1, part[idx1], tables[0], masks1, inplace)
                xw = swin_block_windows(self.block2, xw[perm], tables[1], masks2, inplace)
                if inplace:
                    part[idx2] = xw
                else:
                    parts.append(torch.empty_like(xw).index_copy(0, idx2, xw))
            if not inplace:
                images.append(torch.cat(parts, dim=1))
        return state if inplace else torch.stack(images)


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
            if agg.spatial_aggregation else []
        )
        self.class_layers = nn.ModuleList(
            [ClassAggregationLayer(hidden_dim, text_dim, num_heads, pad_len) for _ in range(num_layers)]
            if agg.class_aggregation else []
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
        return torch.cat([
            image.unsqueeze(2).expand(-1, -1, t, -1, -1),
            words.permute(0, 2, 1)[..., None, None].expand(-1, -1, -1, h, w),
        ], dim=1)  # (B, 2C, T, h, w)

    def embed_input(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cost volume or feature volume -> (B, hidden, T, h, w). dense (B, C, h, w), text (B, T, P, C)."""
        state = self.embed_state(self.cost_volume(dense, text), inplace=False)
        b, (h, w), t, c = state.shape[0], dense.shape[-2:], state.shape[2], state.shape[3]
        return state.view(b, h, w, t, c).permute(0, 4, 3, 1, 2)

    def embed_state(self, volume: torch.Tensor, chunk: int | None = None, inplace: bool = False) -> torch.Tensor:
        """(B, P, T, h, w) volume -> the pixel-major cost embedding (B, h*w, T, hidden); ``chunk`` classes at a time
        into one preallocated tensor when ``inplace`` (no autograd)."""
        b, p, t, h, w = volume.shape
        c = self.cost_embedding.out_channels
        if not inplace:
            embedded = self.cost_embedding(volume.transpose(1, 2).reshape(b * t, p, h, w))
            return embedded.view(b, t, c, h * w).permute(0, 3, 1, 2).contiguous()
        state = volume.new_empty(b, h * w, t, c)
        chunk = chunk or t
        for i in range(b):
            for start in range(0, t, chunk):
                part = self.cost_embedding(volume[i, :, start : start + chunk].transpose(0, 1))  # (K, C, h, w)
                state[i, :, start : start + chunk] = part.flatten(2).permute(2, 0, 1)
        return state

    def forward(
        self,
        dense: torch.Tensor,
        intermediates: Sequence[torch.Tensor],
        text: torch.Tensor,
        class_pool: int = 1,
        class_chunk: int | None = None,
        truncate: int | None = None,
    ) -> torch.Tensor:
        """dense (B, C, h, w), intermediates 2 x (B, W, h, w), text (B, T, P, C) -> logits (B, T, 4h, 4w).

        ``truncate``: the official ``pad_len`` behaviour (Aggregator.forward): with more than ``truncate`` classes,
        only each image's top-``truncate`` classes by maximum cost are aggregated and the others score -100.

        The cost embedding lives in one pixel-major tensor (B, h*w, T, hidden) from the cost embedding to the
        decoder: Swin blocks gather a few class slices at a time into their windows and scatter them back, class
        aggregation reads each pixel's (T, hidden) block where it lies, the decoder reads a few classes at a time.
        Without autograd every stage works in place on that tensor and on working sets of about
        ``WORKING_TOKENS`` tokens (fast in cache, bounded memory); ``class_chunk`` caps the classes per step further.
        With autograd the same computation runs out of place.
        """
        if truncate and text.shape[1] > truncate:
            cost = cosine_cost_volume(dense, text)  # (B, P, T, h, w)
            score = cost.permute(0, 2, 1, 3, 4).flatten(2).amax(dim=-1)  # (B, T)
            del cost
            keep = score.topk(truncate, dim=-1).indices  # (B, K)
            kept_text = torch.gather(text, 1, keep[..., None, None].expand(-1, -1, *text.shape[2:]))
            logits = self.forward(dense, intermediates, kept_text, class_pool, class_chunk)
            out = logits.new_full((logits.shape[0], text.shape[1], *logits.shape[2:]), -100.0)
            return out.scatter_(1, keep[..., None, None].expand(-1, -1, *logits.shape[2:]), logits)
        inplace = not torch.is_grad_enabled()
        b, t = text.shape[:2]
        h, w = dense.shape[-2:]
        slices = max(1, WORKING_TOKENS // (h * w))
        slices = min(slices, class_chunk) if class_chunk else slices
        tokens = min(WORKING_TOKENS, class_chunk * h * w) if class_chunk else WORKING_TOKENS
        x = self.embed_state(self.cost_volume(dense, text), slices, inplace)  # (B, h*w, T, C)
        appearance = self.appearance_guidance(dense) if self.appearance_guidance is not None else None
        text_guidance = None
        if self.text_guidance is not None:
            text_guidance = self.text_guidance(F.normalize(F.normalize(text, dim=-1).mean(dim=2), dim=-1))
        for index in range(self.num_layers):
            if self.spatial_layers:
                x = self.spatial_layers[index].forward_state(x, appearance, h, w, slices, inplace)
            if self.class_layers:
                x = self.class_layers[index].forward_state(x, text_guidance, h, w, class_pool, tokens, inplace)
        guidance = [proj(up(feat)) for proj, up, feat in zip(
            self.decoder_guidance, (self.upsample1, self.upsample2), intermediates)]
        decoder_classes = min(DECODER_CLASSES, class_chunk) if class_chunk else DECODER_CLASSES
        return self.decode_state(x, guidance, h, w, decoder_classes, inplace)

    def decode(self, x: torch.Tensor, guidance: list[torch.Tensor], chunk: int | None = None) -> torch.Tensor:
        """(B, C, T, h, w) -> (B, T, 4h, 4w), optionally ``chunk`` classes at a time."""
        b, c, t, h, w = x.shape
        state = x.permute(0, 3, 4, 2, 1).reshape(b, h * w, t, c)
        return self.decode_state(state, guidance, h, w, chunk, inplace=not torch.is_grad_enabled())

    def decode_state(self, x: torch.Tensor, guidance: list[torch.Tensor], height: int, width: int,
                     chunk: int | None = None, inplace: bool = False) -> torch.Tensor:
        """Pixel-major (B, h*w, T, C) -> logits (B, T, 4h, 4w), ``chunk`` classes at a time."""
        b, _, t, c = x.shape
        chunk = chunk or t
        guided = [block.guidance_term(g) for block, g in zip((self.decoder1, self.decoder2), guidance)]
        out = None
        outputs = []
        for i in range(b):
            for start in range(0, t, chunk):
                part = x[i, :, start : start + chunk].permute(1, 2, 0).reshape(-1, c, height, width)  # (K, C, h, w)
                part = self.decoder1(part, None, guided[0][i : i + 1])
                part = self.head(self.decoder2(part, None, guided[1][i : i + 1]))[:, 0]  # (K, 4h, 4w)
                if inplace:
                    if out is None:
                        out = part.new_empty(b, t, *part.shape[-2:])
                    out[i, start : start + chunk] = part
                else:
                    outputs.append(part)
        if inplace:
            return out
        return torch.cat(outputs).view(b, t, *outputs[0].shape[-2:])


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
        ignore_index: int = 255,
        ignore_pixels: str = "negative",
    ) -> None:
        super().__init__()
        if ignore_pixels not in IGNORE_PIXEL_MODES:
            raise SetupError(f"model.net.ignore_pixels must be one of {IGNORE_PIXEL_MODES}, got '{ignore_pixels}'.")
        if len(clip.feature_layers) != 2:
            raise SetupError(f"CAT-Seg's decoder needs exactly two CLIP feature layers, got clip.feature_layers={list(clip.feature_layers)}.")
        self.clip = clip
        head_kwargs = dict(head or {})
        head_kwargs.setdefault("num_templates", len(clip.templates))
        self.head = CATSegHead(clip.embed_dim, clip.width, aggregation=aggregation, **head_kwargs)
        self.class_pool_train = class_pool_train
        self.class_pool_eval = class_pool_eval
        self.truncate_classes = truncate_classes
        self.pad_len = head_kwargs.get("pad_len", 256)
        self.class_chunk = class_chunk
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
        chunk = None if self.training else self.class_chunk
        truncate = self.pad_len if self.truncate_classes else None
        return self.head(feats.dense, feats.intermediates, text, pool, chunk, truncate)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_pixel_bce(logits, labels, self.ignore_index, self.ignore_pixels)
