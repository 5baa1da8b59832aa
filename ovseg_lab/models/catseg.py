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
from einops import rearrange
from torch import nn

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.errors import SetupError
from ovseg_lab.layers.linear_attention import ClassAggregationLayer
from ovseg_lab.layers.losses import IGNORE_PIXEL_MODES, per_pixel_bce
from ovseg_lab.layers.swin import GuidedSwinBlock
from ovseg_lab.models.costvolume import cosine_cost_volume
from ovseg_lab.vocab import Vocabulary


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

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x (B*T, C, h, w), image-major; guidance (B, G, 2h, 2w) shared by the T classes of an image."""
        x = self.up(x)
        if guidance is None:
            return self.conv(x)
        # conv([x; g]) = conv_x(x) + conv_g(g): the guidance half runs once per image, not once per class
        first = self.conv.block[0]
        channels = x.shape[1]
        y = F.conv2d(x, first.weight[:, :channels], padding=1)
        guided = F.conv2d(guidance, first.weight[:, channels:], padding=1)
        y = (y.view(guided.shape[0], -1, *y.shape[1:]) + guided.unsqueeze(1)).view(y.shape)
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
        if guidance is not None and self.guidance_norm is not None:
            guidance = self.guidance_norm(rearrange(guidance, "b g h w -> b (h w) g"))
        else:
            guidance = None
        outputs = []
        chunk = chunk or t
        for start in range(0, t, chunk):
            part = x[:, :, start : start + chunk]
            tokens = rearrange(part, "b c t h w -> (b t) (h w) c")
            tokens = self.block1(tokens, guidance, h, w)  # guidance (B, h*w, G) shared by the n slices
            tokens = self.block2(tokens, guidance, h, w)
            outputs.append(rearrange(tokens, "(b t) (h w) c -> b c t h w", b=b, h=h, w=w))
        return torch.cat(outputs, dim=2)


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

    def embed_input(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cost volume or feature volume -> (B, hidden, T, h, w). dense (B, C, h, w), text (B, T, P, C)."""
        if self.aggregation.input == "cost":
            volume = cosine_cost_volume(dense, text)  # (B, P, T, h, w)
        else:
            image = F.normalize(dense, dim=1)
            words = F.normalize(F.normalize(text, dim=-1).mean(dim=2), dim=-1)  # (B, T, C)
            t, (h, w) = words.shape[1], image.shape[-2:]
            volume = torch.cat([
                image.unsqueeze(2).expand(-1, -1, t, -1, -1),
                words.permute(0, 2, 1)[..., None, None].expand(-1, -1, -1, h, w),
            ], dim=1)  # (B, 2C, T, h, w)
        b = volume.shape[0]
        embedded = self.cost_embedding(rearrange(volume, "b p t h w -> (b t) p h w"))
        return rearrange(embedded, "(b t) c h w -> b c t h w", b=b)

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
        """
        if truncate and text.shape[1] > truncate:
            cost = cosine_cost_volume(dense, text)  # (B, P, T, h, w)
            score = cost.permute(0, 2, 1, 3, 4).flatten(2).amax(dim=-1)  # (B, T)
            keep = score.topk(truncate, dim=-1).indices  # (B, K)
            kept_text = torch.gather(text, 1, keep[..., None, None].expand(-1, -1, *text.shape[2:]))
            logits = self.forward(dense, intermediates, kept_text, class_pool, class_chunk)
            out = logits.new_full((logits.shape[0], text.shape[1], *logits.shape[2:]), -100.0)
            return out.scatter(1, keep[..., None, None].expand(-1, -1, *logits.shape[2:]), logits)
        x = self.embed_input(dense, text)
        appearance = self.appearance_guidance(dense) if self.appearance_guidance is not None else None
        text_guidance = None
        if self.text_guidance is not None:
            text_guidance = self.text_guidance(F.normalize(F.normalize(text, dim=-1).mean(dim=2), dim=-1))
        for index in range(self.num_layers):
            if self.spatial_layers:
                x = self.spatial_layers[index](x, appearance, class_chunk)
            if self.class_layers:
                x = self.class_layers[index](x, text_guidance, class_pool, class_chunk)
        guidance = [proj(up(feat)) for proj, up, feat in zip(
            self.decoder_guidance, (self.upsample1, self.upsample2), intermediates)]
        return self.decode(x, guidance, class_chunk)

    def decode(self, x: torch.Tensor, guidance: list[torch.Tensor], chunk: int | None = None) -> torch.Tensor:
        """(B, C, T, h, w) -> (B, T, 4h, 4w), optionally ``chunk`` classes at a time."""
        b, _, t = x.shape[:3]
        chunk = chunk or t
        outputs = []
        for start in range(0, t, chunk):
            part = rearrange(x[:, :, start : start + chunk], "b c t h w -> (b t) c h w")
            part = self.decoder2(self.decoder1(part, guidance[0]), guidance[1])
            outputs.append(rearrange(self.head(part), "(b t) 1 h w -> b t h w", b=b))
        return torch.cat(outputs, dim=1)


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
