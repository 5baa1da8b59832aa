"""MaskFormer, the class-agnostic proposal generator of OVSeg (stage 1), in plain PyTorch on timm backbones.

backbone (timm, strides 4/8/16/32) -> FPN pixel decoder (mask features at stride 4)
                                    -> DETR transformer decoder on res5 (queries, deep supervision)
query embedding -> class embedding in CLIP space: logits = 100 * cos(embedding, [text features; no-object])
query embedding -> mask embedding; mask logits = <mask embedding, mask features>

The set criterion matches queries to ground-truth segments with the Hungarian matcher of
:mod:`ovseg_lab.layers.matcher` and trains with CE (no-object weight 0.1) + sigmoid focal (x20) + dice (x1),
on the last decoder layer and every earlier one (deep supervision).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_lab.errors import SetupError
from ovseg_lab.layers.losses import dice_loss, sigmoid_focal_loss
from ovseg_lab.layers.matcher import hungarian_match, pairwise_dice_cost, pairwise_sigmoid_focal_cost

FEATURE_NAMES = ("res2", "res3", "res4", "res5")


class TimmFeatureBackbone(nn.Module):
    """A timm model as a detectron2-style backbone: images -> {res2..res5} (NCHW, strides 4, 8, 16, 32).

    Args:
        name: timm architecture ("resnet101c", "swin_base_patch4_window12_384", or a tiny variant).
        pretrained: load timm's ImageNet weights (needs the hub or a local cache).
        multi_grid: dilation factors of the res5 blocks' 3x3 convolutions (R-101c: [1, 2, 4]).
        model_kwargs: passed to ``timm.create_model`` (img_size, embed_dim, depths, drop_path_rate, ...).
        frozen_bn: BatchNorm layers become detectron2's FrozenBatchNorm2d (fixed statistics and affine, the
            release's ``RESNETS.NORM: FrozenBN``); freeze_at: detectron2's ``FREEZE_AT`` (1 = the stem, 2 = the stem
            and res2 stop training; 0 = nothing).
    """

    is_backbone = True  # parameters get the backbone learning-rate multiplier

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        multi_grid: Sequence[int] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        frozen_bn: bool = False,
        freeze_at: int = 0,
    ) -> None:
        super().__init__()
        import timm
        from omegaconf import OmegaConf

        if OmegaConf.is_config(model_kwargs):  # timm wants plain tuples and lists
            model_kwargs = OmegaConf.to_container(model_kwargs, resolve=True)
        try:
            self.body = timm.create_model(name, pretrained=pretrained, features_only=True, **dict(model_kwargs or {}))
        except (RuntimeError, OSError) as err:
            if pretrained:
                raise SetupError(
                    f"Could not load timm ImageNet weights for backbone '{name}': {type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200] if str(err) else ''}. Run once with internet so timm caches them, "
                    "or set model.net.maskformer.backbone.pretrained=false (random init)."
                ) from None
            raise
        reductions = self.body.feature_info.reduction()
        channels = self.body.feature_info.channels()
        self._select = []
        for stride in (4, 8, 16, 32):
            if stride not in reductions:
                raise SetupError(f"Backbone '{name}' has no feature map at stride {stride} (has {reductions}).")
            self._select.append(len(reductions) - 1 - reductions[::-1].index(stride))
        self.channels = [channels[i] for i in self._select]
        if multi_grid:
            self._apply_multi_grid(list(multi_grid))
        if frozen_bn:
            from timm.layers import freeze_batch_norm_2d

            self.body = freeze_batch_norm_2d(self.body)
        self._freeze(freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        """detectron2's FREEZE_AT on a timm ResNet: 1 = stem (conv1, bn1), 2 = stem + layer1."""
        if freeze_at <= 0:
            return
        names = ("conv1", "bn1") + (("layer1",) if freeze_at >= 2 else ())
        for name, param in self.body.named_parameters():
            if name.split(".")[0] in names:
                param.requires_grad_(False)

    def _apply_multi_grid(self, grid: list[int]) -> None:
        """DeepLab multi-grid: the i-th res5 block's 3x3 conv gets dilation grid[i]."""
        stage = getattr(self.body, "layer4", None)
        if stage is None:
            raise SetupError("multi_grid applies to ResNet backbones (a 'layer4' stage) only.")
        for block, rate in zip(stage, grid):
            conv = block.conv2
            conv.dilation, conv.padding = (rate, rate), (rate * (conv.kernel_size[0] // 2),) * 2

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.body(images)
        features = {}
        for name, index, channels in zip(FEATURE_NAMES, self._select, self.channels):
            x = outputs[index]
            if x.shape[1] != channels and x.shape[-1] == channels:  # timm's Swin features are NHWC
                x = x.permute(0, 3, 1, 2)
            features[name] = x.contiguous()
        return features


def build_backbone(spec: Mapping[str, Any]) -> nn.Module:
    """``{type: swin, ...}`` -> :class:`~ovseg_lab.layers.swin.SwinBackbone` (the release's Swin layout);
    ``{type: timm, name: ...}`` or no type -> :class:`TimmFeatureBackbone` (R-101c and the toy backbones).
    The options may also sit under the type's name (``{type: swin, swin: {...}, timm: {...}}``), so a recipe can
    switch backbones with one key."""
    spec = dict(spec)
    kind = spec.pop("type", "timm")
    if isinstance(spec.get(kind), Mapping):  # {type: swin, swin: {...}, timm: {...}}: the chosen type's options
        spec = dict(spec[kind])
    if kind == "swin":
        from ovseg_lab.layers.swin import SwinBackbone

        return SwinBackbone(**spec)
    if kind != "timm":
        raise SetupError(f"model.net.maskformer.backbone.type must be 'swin' or 'timm', got '{kind}'.")
    return TimmFeatureBackbone(**spec)


def _group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, act: bool = True) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), _group_norm(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class FPNPixelDecoder(nn.Module):
    """MaskFormer's FPN pixel decoder: top-down from res5 with lateral 1x1 convs, GroupNorm everywhere.

    features {res2..res5} -> mask features (B, mask_dim, H/4, W/4).
    """

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256) -> None:
        super().__init__()
        self.top = ConvNormAct(in_channels[-1], conv_dim, 3)
        self.laterals = nn.ModuleList(ConvNormAct(c, conv_dim, 1, act=False) for c in in_channels[:-1])
        self.outputs = nn.ModuleList(ConvNormAct(conv_dim, conv_dim, 3) for _ in in_channels[:-1])
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        y = self.top(features["res5"])
        for name, lateral, output in zip(FEATURE_NAMES[:3][::-1], self.laterals[::-1], self.outputs[::-1]):
            x = lateral(features[name])
            y = output(x + F.interpolate(y, size=x.shape[-2:], mode="nearest"))
        return self.mask_features(y)


def sine_position_embedding(x: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine embedding for a feature map (B, C, h, w) -> (B, 2*num_feats, h, w)."""
    b, _, h, w = x.shape
    ones = torch.ones(b, h, w, device=x.device, dtype=torch.float32)
    y_embed, x_embed = ones.cumsum(1), ones.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, device=x.device, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


class DecoderLayer(nn.Module):
    """DETR decoder layer (post-norm): self-attention, cross-attention to the image, FFN.

    Query positions are added to queries and keys; image positions to the cross-attention keys.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        q = tgt + query_pos
        tgt = self.norms[0](tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norms[1](tgt + self.dropout(attended))
        return self.norms[2](tgt + self.dropout(self.ffn(tgt)))


class MLP(nn.Sequential):
    """Linear layers with ReLU between them: dims[0] -> ... -> dims[-1]."""

    def __init__(self, dims: Sequence[int]) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class MaskFormer(nn.Module):
    """Proposal generator with CLIP-space classification.

    Args:
        backbone: :class:`TimmFeatureBackbone` options (name, pretrained, multi_grid, model_kwargs).
        embed_dim: CLIP joint-space width E the class head maps to (512 ViT-B, 768 ViT-L).
        num_queries, hidden_dim, heads, ffn_dim, dec_layers, dropout: transformer decoder (paper: 100, 256, 8,
            2048, 6, 0.1).
        conv_dim, mask_dim: pixel decoder widths (paper: 256, 256).
        class_hidden: hidden width of the 2-layer class MLP (paper: 1024).
        temperature: logit scale of the cosine classifier (paper: 100).
        deep_supervision: return the earlier decoder layers' predictions for auxiliary losses.
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        embed_dim: int,
        num_queries: int = 100,
        hidden_dim: int = 256,
        heads: int = 8,
        ffn_dim: int = 2048,
        dec_layers: int = 6,
        dropout: float = 0.1,
        conv_dim: int = 256,
        mask_dim: int = 256,
        class_hidden: int = 1024,
        temperature: float = 100.0,
        deep_supervision: bool = True,
        size_divisibility: int = 32,
    ) -> None:
        super().__init__()
        from omegaconf import OmegaConf

        if OmegaConf.is_config(backbone):
            backbone = OmegaConf.to_container(backbone, resolve=True)
        self.backbone = build_backbone(backbone)
        self.pixel_decoder = FPNPixelDecoder(self.backbone.channels, conv_dim, mask_dim)
        res5 = self.backbone.channels[-1]
        self.input_proj = nn.Conv2d(res5, hidden_dim, 1) if res5 != hidden_dim else nn.Identity()
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, heads, ffn_dim, dropout) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = MLP([hidden_dim, class_hidden, embed_dim])
        self.mask_embed = MLP([hidden_dim, hidden_dim, hidden_dim, mask_dim])
        # "no object" lives in the text-embedding space beside the class names
        self.no_object_embedding = nn.Parameter(torch.randn(1, embed_dim) * embed_dim**-0.5)
        self.temperature = temperature
        self.deep_supervision = deep_supervision
        self.size_divisibility = size_divisibility
        self.hidden_dim = hidden_dim

    @property
    def num_queries(self) -> int:
        return self.query_embed.num_embeddings

    def class_logits(self, query_embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(..., Q, E) query class embeddings, text (K, E) -> (..., Q, K+1) logits, last = no object."""
        classifier = torch.cat([F.normalize(text, dim=-1), F.normalize(self.no_object_embedding, dim=-1)], dim=0)
        return self.temperature * F.normalize(query_embeddings, dim=-1) @ classifier.to(query_embeddings.dtype).t()

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict[str, Any]:
        """images (B, 3, H, W) normalised, H and W multiples of ``size_divisibility``; text (K, E) class features.

        Returns {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4), "aux_outputs": [same, per earlier
        layer]} (aux only with deep supervision).
        """
        features = self.backbone(images)
        mask_features = self.pixel_decoder(features)
        src = self.input_proj(features["res5"])
        pos = sine_position_embedding(src, self.hidden_dim // 2).flatten(2).transpose(1, 2)
        memory = src.flatten(2).transpose(1, 2)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(images.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        hidden = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, pos)
            hidden.append(self.decoder_norm(tgt))
        if not self.deep_supervision:
            hidden = hidden[-1:]
        predictions = [
            {
                "pred_logits": self.class_logits(self.class_embed(h), text),
                "pred_masks": torch.einsum("bqc,bchw->bqhw", self.mask_embed(h), mask_features),
            }
            for h in hidden
        ]
        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        return out


def semantic_targets(labels: torch.Tensor, ignore_index: int = 255) -> list[dict[str, torch.Tensor]]:
    """Per image, one binary mask per class present: labels (B, H, W) -> [{"labels": (M,), "masks": (M, H, W)}]."""
    targets = []
    for label in labels:
        classes = label.unique()
        classes = classes[classes != ignore_index]
        targets.append({"labels": classes.long(), "masks": (label[None] == classes[:, None, None]).float()})
    return targets


class SetCriterion(nn.Module):
    """Hungarian-matched losses of MaskFormer (OVSeg weights: CE 1 with no-object 0.1, focal 20, dice 1)."""

    def __init__(
        self,
        class_weight: float = 1.0,
        mask_weight: float = 20.0,
        dice_weight: float = 1.0,
        no_object_weight: float = 0.1,
        cost_class: float = 1.0,
        cost_mask: float = 20.0,
        cost_dice: float = 1.0,
    ) -> None:
        super().__init__()
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.no_object_weight = no_object_weight
        self.costs = (cost_class, cost_mask, cost_dice)

    @torch.no_grad()
    def match(
        self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, targets: list[dict]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (query index, target index); costs at the prediction resolution (targets resized nearest)."""
        cost_class, cost_mask, cost_dice = self.costs
        indices = []
        for logits, masks, target in zip(pred_logits, pred_masks, targets):
            if target["labels"].numel() == 0:
                empty = torch.empty(0, dtype=torch.long)
                indices.append((empty, empty))
                continue
            prob = logits.float().softmax(-1)[:, target["labels"]]
            tgt = F.interpolate(target["masks"][:, None], size=masks.shape[-2:], mode="nearest")[:, 0].flatten(1)
            out = masks.float().flatten(1)
            cost = (
                -cost_class * prob
                + cost_mask * pairwise_sigmoid_focal_cost(out, tgt)
                + cost_dice * pairwise_dice_cost(out, tgt)
            )
            indices.append(hungarian_match(cost))
        return indices

    def _losses(
        self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, targets: list[dict], num_masks: float
    ) -> dict[str, torch.Tensor]:
        indices = self.match(pred_logits, pred_masks, targets)
        num_classes = pred_logits.shape[-1] - 1
        target_classes = torch.full(pred_logits.shape[:2], num_classes, dtype=torch.long, device=pred_logits.device)
        for b, ((q, t), target) in enumerate(zip(indices, targets)):
            target_classes[b, q.to(pred_logits.device)] = target["labels"][t.to(target["labels"].device)]
        class_weight = pred_logits.new_ones(num_classes + 1)
        class_weight[-1] = self.no_object_weight
        loss_ce = F.cross_entropy(pred_logits.float().transpose(1, 2), target_classes, class_weight)

        matched_pred = [masks[q] for masks, (q, _) in zip(pred_masks, indices)]
        matched_tgt = [target["masks"][t] for target, (_, t) in zip(targets, indices)]
        if sum(m.shape[0] for m in matched_pred) == 0:
            zero = pred_masks.sum() * 0.0
            return {"loss_ce": loss_ce, "loss_mask": zero, "loss_dice": zero}
        pred = torch.cat(matched_pred)
        tgt = torch.cat(matched_tgt).to(pred.dtype)
        # loss at the target resolution, as MaskFormer does
        pred = F.interpolate(pred[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        pred, tgt = pred.flatten(1).float(), tgt.flatten(1).float()
        return {
            "loss_ce": loss_ce,
            "loss_mask": sigmoid_focal_loss(pred, tgt, num_masks),
            "loss_dice": dice_loss(pred, tgt, num_masks),
        }

    def forward(self, outputs: Mapping[str, Any], targets: list[dict]) -> dict[str, torch.Tensor]:
        """Weighted losses of the last layer and of every auxiliary layer; "loss" is their sum."""
        num_masks = float(sum(len(t["labels"]) for t in targets))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            count = torch.tensor([num_masks], device=outputs["pred_logits"].device)
            torch.distributed.all_reduce(count)
            num_masks = count.item() / torch.distributed.get_world_size()
        num_masks = max(num_masks, 1.0)
        losses: dict[str, torch.Tensor] = {}
        layers = [outputs] + list(outputs.get("aux_outputs", []))
        for i, layer in enumerate(layers):
            suffix = "" if i == 0 else f"_{i - 1}"
            for key, value in self._losses(layer["pred_logits"], layer["pred_masks"], targets, num_masks).items():
                losses[key + suffix] = value * self.weights[key]
        losses["loss"] = sum(losses.values())
        return losses
