"""OVSegmentor (CVPR 2023) and GroupViT (CVPR 2022): segmentation that emerges from image-caption pairs.

Image side: a ViT whose learnable group tokens absorb the patch tokens through Gumbel-softmax hard
assignment (:class:`GroupViTEncoder`; OVSegmentor ViT-B/16 [6, 6] with 64 -> 8 groups, GroupViT ViT-S [6, 3, 3]
with 64 then 8), the final segment tokens averaged and projected (Linear -> 4096 -> BN -> ReLU -> 256).
Text side: BERT (OVSegmentor) or GroupViT's transformer, projected the same way.

Training signals (:meth:`OVSegmentor.training_losses`): image-caption InfoNCE; one auxiliary objective chosen by
``objective`` (masked entity completion with all entities / a single entity / all nouns masked, GroupViT's
multi-label contrastive loss, or masked language modelling with or without the groups); and in stage 2 the
cross-image mask consistency against a momentum encoder (:mod:`ovseg_lab.models.ovsegmentor_losses`).

Zero-shot segmentation (:meth:`OVSegmentor.forward`): every pixel takes its group through the (upsampled)
soft assignment maps, every group its class distribution, restricted to the image-level top-k classes; a class
named "background" is scored by a per-benchmark threshold instead of text.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ovseg_lab.clip.prompts import resolve_templates
from ovseg_lab.data.captions import NOUN_PADDINGS, noun_prompts
from ovseg_lab.errors import SetupError
from ovseg_lab.layers.contrastive import info_nce, multi_label_info_nce, shared_prompt_masks
from ovseg_lab.layers.grouping import Assignment, CrossAttnBlock, GroupingBlock, TokenMixer
from ovseg_lab.layers.normalize import IMAGENET_MEAN, IMAGENET_STD
from ovseg_lab.models.ovsegmentor_losses import cross_image_mask_loss, select_related_groups
from ovseg_lab.vocab import Vocabulary

OBJECTIVES = ("none", "all_entities", "single_entity", "all_nouns", "multi_label", "mlm", "mlm_nogroups")
MASKING_OBJECTIVES = ("all_entities", "single_entity", "all_nouns")
BACKGROUND = "background"


# ============================================================================================ image encoder
@dataclass
class EncoderOutput:
    """tokens: (B, G, C) final segment tokens (after the last norm); assignments: one per grouping block;
    grid: (h, w) of the patch tokens."""

    tokens: torch.Tensor
    assignments: list[Assignment]
    grid: tuple[int, int]


class GroupViTStage(nn.Module):
    """Transformer blocks over [image tokens, group tokens], then (except in the last stage) a grouping block."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        num_group_tokens: int,
        num_prev_group_tokens: int,
        num_output_groups: int | None,
        mlp_ratio: float,
        drop_path: Sequence[float],
        hard: bool,
        gumbel_tau: float,
    ) -> None:
        super().__init__()
        self.num_group_tokens = num_group_tokens
        self.group_token = None
        self.group_projector = None
        if num_group_tokens:
            self.group_token = nn.Parameter(torch.zeros(1, num_group_tokens, dim))
            if num_prev_group_tokens:  # later stages start from a mix of the previous stage's group tokens
                self.group_projector = TokenMixer(dim, num_prev_group_tokens, num_group_tokens)
            else:
                trunc_normal_(self.group_token, std=0.02)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path[i], norm_layer=nn.LayerNorm)
            for i in range(depth)
        )
        self.grouping = (
            GroupingBlock(
                dim, dim, num_heads, num_group_tokens, num_output_groups, hard=hard, gumbel=hard, gumbel_tau=gumbel_tau
            )
            if num_output_groups
            else None
        )

    def forward(
        self, x: torch.Tensor, prev_groups: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, Assignment | None]:
        """x (B, L, C) -> (new tokens, this stage's group tokens before grouping, assignment)."""
        groups = None
        if self.group_token is not None:
            groups = self.group_token.expand(x.shape[0], -1, -1)
            if self.group_projector is not None and prev_groups is not None:
                groups = groups + self.group_projector(prev_groups)
            x = torch.cat([x, groups], dim=1)
        for block in self.blocks:
            x = block(x)
        if groups is not None:
            x, groups = x[:, : -self.num_group_tokens], x[:, -self.num_group_tokens :]
        if self.grouping is None:
            return x, groups, None
        x, assignment = self.grouping(x, groups)
        return x, groups, assignment


class GroupViTEncoder(nn.Module):
    """Group ViT image encoder.

    Args:
        depths / num_group_tokens / num_output_groups: per stage; OVSegmentor [6, 6] / [64, 0] / [8],
            GroupViT [6, 3, 3] / [64, 8, 0] / [64, 8].
        hard_assignment: Gumbel-softmax hard assignment with straight-through gradients (else soft).
        pretrained: a timm model name whose blocks initialise ours in order ("vit_base_patch16_224.dino",
            OVSegmentor's DINO init), or None for random init.
    """

    is_backbone = False

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depths: Sequence[int] = (6, 3, 3),
        num_heads: int = 6,
        num_group_tokens: Sequence[int] = (64, 8, 0),
        num_output_groups: Sequence[int] = (64, 8),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        hard_assignment: bool = True,
        gumbel_tau: float = 1.0,
        patch_norm: bool = True,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        depths, num_group_tokens, num_output_groups = list(depths), list(num_group_tokens), list(num_output_groups)
        if len(num_group_tokens) != len(depths) or len(num_output_groups) != len(depths) - 1:
            raise SetupError(
                f"GroupViT stages disagree: depths {depths} need {len(depths)} num_group_tokens (got {num_group_tokens}) "
                f"and {len(depths) - 1} num_output_groups (got {num_output_groups})."
            )
        for i, groups in enumerate(num_output_groups):
            if not num_group_tokens[i]:
                raise SetupError(
                    f"Stage {i} groups into {groups} segments but has no group tokens (num_group_tokens[{i}] = 0)."
                )
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim) if patch_norm else nn.Identity()
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        total = sum(depths)
        rates = [drop_path_rate * i / max(1, total - 1) for i in range(total)]  # stochastic depth, linear in depth
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.stages.append(
                GroupViTStage(
                    embed_dim,
                    depth,
                    num_heads,
                    num_group_tokens[i],
                    num_group_tokens[i - 1] if i else 0,
                    num_output_groups[i] if i < len(num_output_groups) else None,
                    mlp_ratio,
                    rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    hard_assignment,
                    gumbel_tau,
                )
            )
        self.norm = nn.LayerNorm(embed_dim)
        self.num_groups = num_output_groups[-1]
        self.apply(self._init_weights)
        if pretrained:
            self.load_timm_vit(pretrained)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def width(self) -> int:
        return self.embed_dim

    def load_timm_vit(self, name: str) -> None:
        """Initialise patch embedding, position embedding, blocks (in order across stages) and the final norm
        from a pretrained timm ViT (OVSegmentor: DINO ViT-B/16)."""
        import timm

        try:
            source = timm.create_model(name, pretrained=True, num_classes=0).state_dict()
        except Exception as err:  # hub errors come in many types
            raise SetupError(
                f"Could not load the pretrained ViT '{name}' for the group ViT ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:160] if str(err) else ''}). Run once with internet so timm caches it, "
                "or set model.net.image_encoder.pretrained=null for random init."
            ) from None
        target: dict[str, torch.Tensor] = {}
        block_names = [
            f"stages.{s}.blocks.{b}" for s, stage in enumerate(self.stages) for b in range(len(stage.blocks))
        ]
        for key, value in source.items():
            if key.startswith("blocks."):
                index, rest = key.split(".", 2)[1:]
                if int(index) < len(block_names):
                    target[f"{block_names[int(index)]}.{rest}"] = value
            elif key.startswith("patch_embed.proj."):
                target[key.replace("patch_embed.proj.", "patch_embed.")] = value
            elif key.startswith("norm."):
                target[key] = value
            elif key == "pos_embed":
                has_cls = math.isqrt(value.shape[1] - 1) ** 2 == value.shape[1] - 1
                target["pos_embed"] = self._resize_pos(value[:, 1:] if has_cls else value)
        own = self.state_dict()
        bad = [k for k, v in target.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise SetupError(
                f"The pretrained ViT '{name}' does not fit this group ViT (e.g. {bad[:3]}): check embed_dim/num_heads/patch_size."
            )
        self.load_state_dict(target, strict=False)

    def _resize_pos(self, pos: torch.Tensor) -> torch.Tensor:
        """(1, n*n, C) position embeddings bicubically resized to this encoder's grid."""
        side = int(math.isqrt(pos.shape[1]))
        if (side, side) == self.grid:
            return pos
        grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=self.grid, mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == self.grid:
            return self.pos_embed
        pos = self.pos_embed.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos.float(), size=grid, mode="bicubic", align_corners=False).to(self.pos_embed.dtype)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """images (B, 3, H, W) normalised, H and W multiples of the patch size."""
        x = self.patch_embed(images)
        grid = (x.shape[-2], x.shape[-1])
        x = self.patch_norm(x.flatten(2).transpose(1, 2)) + self.position_embedding(grid)
        groups, assignments = None, []
        for stage in self.stages:
            x, groups, assignment = stage(x, groups)
            if assignment is not None:
                assignments.append(assignment)
        return EncoderOutput(self.norm(x), assignments, grid)

    @staticmethod
    def assignment_maps(assignments: Sequence[Assignment]) -> torch.Tensor:
        """Soft maps of the final groups over the patch tokens (B, G, h*w), chained through every stage."""
        maps = assignments[0].soft
        for assignment in assignments[1:]:
            maps = assignment.soft @ maps
        return maps


# ============================================================================================ heads
class ProjectionHead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear (GroupViT's 2-layer projector); accepts (B, C) or (B, L, C)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        x = self.fc2(F.relu(self.bn(self.fc1(x))))
        return x.reshape(*shape[:-1], -1)


class MultimodalDecoder(nn.Module):
    """Caption tokens read the segment tokens (cross-attention), then attend to each other (one block).

    OVSegmentor's masked-entity decoder (``MultimodalGroupingBlock``, models/multi_label_contrastive.py:150-186):
    token 0 of the output summarises the masked caption completed by the image. ``use_groups=False`` skips the
    cross-attention (the "MLM without groups" ablation). The self-attention block is timm's ``Block`` (the
    release's ``AttnBlock``: norm1, fused qkv, norm2, mlp, same parameter names).

    padding_mask: mask padding tokens out of the self-attention (ours). The release passes its mask to an
    attention that ignores it (models/group_vit.py:337-374), so padding tokens are attended to (paper recipes:
    False).
    """

    def __init__(self, dim: int, num_heads: int = 8, padding_mask: bool = False) -> None:
        super().__init__()
        self.padding_mask = padding_mask
        self.norm_text = nn.LayerNorm(dim)
        self.norm_visual = nn.LayerNorm(dim)
        self.cross = CrossAttnBlock(dim, num_heads, post_norm=True)
        self.self_attn = Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """text (B, L, C), text_mask (B, L) 1 = real token, visual (B, G, C) or None -> (B, L, C)."""
        text = self.norm_text(text)
        if visual is not None:
            text = self.cross(text, self.norm_visual(visual))
        attend = (text_mask != 0)[:, None, None, :] if self.padding_mask else None
        out = self.self_attn(text, attn_mask=attend) + text
        return self.norm_out(out)


def mask_token_ids(
    input_ids: torch.Tensor, offsets: torch.Tensor, spans: Sequence[Sequence[Sequence[int]]], mask_id: int
) -> torch.Tensor:
    """Replace every token that overlaps a character span of its caption by ``mask_id``.

    input_ids (B, L); offsets (B, L, 2) character offsets of each token ((0, 0) for special tokens);
    spans[b] = [(start, end), ...]. Sub-word pieces of a masked word are all masked.
    """
    masked = input_ids.clone()
    starts, ends = offsets[..., 0], offsets[..., 1]
    real = ends > starts
    for b, sample_spans in enumerate(spans):
        for start, end, *_ in sample_spans:
            hit = real[b] & (starts[b] < end) & (ends[b] > start)
            masked[b, hit.to(masked.device)] = mask_id
    return masked


# ============================================================================================ the method
class OVSegmentor(nn.Module):
    """OVSegmentor / GroupViT: group ViT + text tower + projection heads, caption losses, zero-shot segmentation.

    Args:
        image_encoder: :class:`GroupViTEncoder`.
        text_encoder: :class:`BertTextEncoder` or :class:`GroupViTTextEncoder`.
        objective: the auxiliary objective, one of ``OBJECTIVES`` (OVSegmentor: all_entities; GroupViT: multi_label).
        entity_weight / multi_label_weight / mlm_weight: weights of the auxiliary losses (1.0 in the papers).
        num_prompts: prompts per image for multi_label (GroupViT: 3).
        multi_label_templates: the template drawn for each prompt noun (GroupViT: one of the 80 ImageNet ones).
        multi_label_padding: a caption with fewer than ``num_prompts`` nouns is padded with the caption itself as
            extra positives (``caption``, the release) or its missing prompts are left out of the loss (``mask``).
        prompt_seed: seed of the numpy generator drawing prompt nouns and templates (the release: numpy's global one).
        patch_remainder: an image side that is not a multiple of the patch size: ``crop`` drops the remainder as
            the release's strided patch convolution does; ``resize`` resizes the image to the nearest multiple.
        add_multi_label: add the multi-label loss to any other objective (the release's ``multi_label > 0``;
            off in the paper's OVSegmentor configs, on for the toy, whose captions never name a single entity).
        shared_prompts_not_negative: in the multi-label loss, a prompt of another image naming an entity this
            image also holds is not a negative (False: official, every other prompt is one; True in the toy
            configs, where 92% of the prompts of a 32-image batch have an identical copy; docs/toy.md).
        cross_image_weight: weight of the cross-image mask consistency (stage 2: 0.1; 0 = off, no momentum encoder).
        cross_threshold / group_ratio / momentum / mask_size: its binarisation factor (0.6), share of groups (0.5),
            EMA (0.99), mask resolution (224).
        group_ratio_mode: ``detach_least`` (the release, models/multi_label_contrastive.py:675-679: the
            int(G * ratio) groups LEAST related to the shared entity are detached, the rest trained) or
            ``train_most`` (ours: the round(G * ratio) MOST related groups are trained). Equal at 0.5.
        dice_reduction: ``official`` (models/losses.py:103-131: one Dice per image over all its groups' pixels,
            summed over images, divided by the number of groups, so it grows with the per-GPU batch) or
            ``per_mask`` (ours: the mean Dice of the matched masks).
        decoder_padding_mask: mask caption padding in the entity decoder's self-attention (ours); the release's
            attention ignores the mask it is given (False in paper recipes).
        projector_statistics: ``official`` projects, as the release does, the momentum branch and every token of
            every text too (their outputs unused) so the projectors' BatchNorm running statistics see what the
            release's see (image projector 2 / 4 updates per step in stage 1 / 2, text projector 6 / 8); ``ours``
            projects only what a loss reads (2 and 2 / 3; the default); ``groupvit`` projects as GroupViT's release
            (models/multi_label_contrastive.py:209-237): the image projector sees the pooled image only (one
            update), the text projector each caption together with its multi-label prompts in ONE BatchNorm batch
            of B x (1 + K) rows (one update), so in training the prompts are normalised with the captions.
        momentum_mode: ``train`` (the release: the momentum encoder is a submodule of the model in train mode, so
            stochastic depth and Gumbel noise act on it) or ``eval`` (ours: fixed targets).
        entity_prompts: ``official``: answers are the template's prefix + the entities joined by " and " ("a photo
            of a cat and dog", datasets/clip_dataset.py:268) and the shared entity's prompt is "A photo of " +
            entity (clip_dataset.py:184); ``ours``: the whole template filled with "cat and a dog" and
            ``prompt_template`` for the shared entity.
        answer_templates: templates of the entity prompts ("a photo of a {}.").
        prompt_template: zero-shot class prompt.
        background_thresholds: vocabulary (benchmark) name -> threshold for its class named "background".
        topk_classes: restrict every image to its top-k classes by image-level similarity (None: off).
        freeze_text: stage 2 keeps the text tower fixed.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int = 256,
        proj_hidden: int = 4096,
        objective: str = "all_entities",
        entity_weight: float = 1.0,
        multi_label_weight: float = 1.0,
        mlm_weight: float = 1.0,
        num_prompts: int = 3,
        multi_label_templates: str | Sequence[str] = "imagenet80",
        multi_label_padding: str = "caption",
        prompt_seed: int = 0,
        patch_remainder: str = "crop",
        add_multi_label: bool = False,
        shared_prompts_not_negative: bool = False,
        mlm_probability: float = 0.15,
        decoder_heads: int = 8,
        cross_image_weight: float = 0.0,
        cross_threshold: float = 0.6,
        group_ratio: float = 0.5,
        momentum: float = 0.99,
        mask_size: int | None = 224,
        group_ratio_mode: str = "detach_least",
        dice_reduction: str = "official",
        decoder_padding_mask: bool = False,
        projector_statistics: str = "ours",
        momentum_mode: str = "train",
        entity_prompts: str = "official",
        answer_templates: str | Sequence[str] = "imagenet80",
        prompt_template: str = "a photo of a {}.",
        logit_scale_init: float = 1 / 0.07,
        logit_scale_max: float = 100.0,
        background_thresholds: Mapping[str, float] | None = None,
        topk_classes: int | None = 5,
        freeze_text: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise SetupError(f"model.net.objective must be one of {OBJECTIVES}, got '{objective}'.")
        if objective in MASKING_OBJECTIVES + ("mlm", "mlm_nogroups") and not getattr(
            text_encoder, "supports_masking", False
        ):
            raise SetupError(
                f"The '{objective}' objective masks caption tokens and needs the BERT text encoder "
                f"(model.net.text_encoder), not {type(text_encoder).__name__}."
            )
        for name, value, allowed in (
            ("group_ratio_mode", group_ratio_mode, ("detach_least", "train_most")),
            ("dice_reduction", dice_reduction, ("official", "per_mask")),
            ("projector_statistics", projector_statistics, ("official", "ours", "groupvit")),
            ("momentum_mode", momentum_mode, ("train", "eval")),
            ("entity_prompts", entity_prompts, ("official", "ours")),
        ):
            if value not in allowed:
                raise SetupError(f"model.net.{name} must be one of {allowed}, got '{value}'.")
        self.group_ratio_mode, self.dice_reduction = group_ratio_mode, dice_reduction
        self.projector_statistics, self.momentum_mode, self.entity_prompts = (
            projector_statistics,
            momentum_mode,
            entity_prompts,
        )
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_head = ProjectionHead(image_encoder.width, proj_hidden, embed_dim)
        self.text_head = ProjectionHead(text_encoder.width, proj_hidden, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        self.logit_scale_max = logit_scale_max
        self.objective = objective
        self.entity_weight, self.multi_label_weight, self.mlm_weight = entity_weight, multi_label_weight, mlm_weight
        self.num_prompts = num_prompts
        if multi_label_padding not in NOUN_PADDINGS:
            raise SetupError(
                f"model.net.multi_label_padding must be one of {NOUN_PADDINGS}, got '{multi_label_padding}'."
            )
        if patch_remainder not in ("crop", "resize"):
            raise SetupError(f"model.net.patch_remainder must be 'crop' or 'resize', got '{patch_remainder}'.")
        self.multi_label_templates = resolve_templates(multi_label_templates)
        self.multi_label_padding = multi_label_padding
        self.prompt_rng = np.random.RandomState(prompt_seed)
        self.patch_remainder = patch_remainder
        self.mlm_probability = mlm_probability
        self.add_multi_label = add_multi_label and objective != "multi_label"
        self.shared_prompts_not_negative = shared_prompts_not_negative
        if objective == "multi_label" or self.add_multi_label:
            self.multi_label_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        if objective in MASKING_OBJECTIVES + ("mlm", "mlm_nogroups"):
            width = min(image_encoder.width, text_encoder.width)
            self.align_visual = nn.Linear(image_encoder.width, width) if image_encoder.width != width else nn.Identity()
            self.align_text = nn.Linear(text_encoder.width, width) if text_encoder.width != width else nn.Identity()
            self.decoder = MultimodalDecoder(
                width, decoder_heads if width % decoder_heads == 0 else 1, decoder_padding_mask
            )
            if objective in MASKING_OBJECTIVES:
                self.answer_head = ProjectionHead(width, proj_hidden, embed_dim)
            else:
                self.mlm_head = nn.Sequential(
                    nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, text_encoder.vocab_size)
                )
        self.cross_image_weight = cross_image_weight
        self.cross_threshold, self.group_ratio, self.momentum, self.mask_size = (
            cross_threshold,
            group_ratio,
            momentum,
            mask_size,
        )
        self.momentum_encoder: nn.Module | None = None
        if cross_image_weight > 0:
            self.momentum_encoder = copy.deepcopy(image_encoder).requires_grad_(False)
        self.answer_templates = resolve_templates(answer_templates)
        self.prompt_template = resolve_templates([prompt_template])[0]
        self.background_thresholds = dict(background_thresholds or {})
        self.topk_classes = topk_classes
        if freeze_text:
            self.text_encoder.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------------ shared pieces
    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.logit_scale_max)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised, cropped (``patch_remainder: crop``) or resized to a multiple of
        the patch size."""
        patch = self.image_encoder.patch_size
        height, width = images.shape[-2:]
        if self.patch_remainder == "crop" and height >= patch and width >= patch:
            images = images[..., : height // patch * patch, : width // patch * patch]
        else:
            size = (max(patch, round(height / patch) * patch), max(patch, round(width / patch) * patch))
            if size != (height, width):
                images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> projected text embeddings (N, D), not normalised."""
        pooled, _, _ = self.text_encoder.encode(texts)
        return self.text_head(pooled)

    def _text_version(self) -> int:
        tensors = (
            list(self.text_encoder.parameters()) + list(self.text_head.parameters()) + list(self.text_head.buffers())
        )
        return sum(t._version for t in tensors)

    def class_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """(T, D) L2-normalised prompt embeddings of class names; cached per vocabulary at evaluation."""
        key = (tuple(names), self.prompt_template, self._text_version(), str(self.logit_scale.device))
        if not self.training and key in self._text_cache:
            return self._text_cache[key]
        prompts = [self.prompt_template.format(n.split(",")[0].strip()) for n in names]
        embeddings = F.normalize(self.encode_text(prompts).float(), dim=-1)
        if not self.training:
            self._text_cache[key] = embeddings.detach()
            while len(self._text_cache) > 16:
                self._text_cache.popitem(last=False)
        return embeddings

    # ------------------------------------------------------------------ zero-shot segmentation
    def forward(self, images: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> per-class scores (B, T, H, W) in [0, 1] (use ``inference.score: identity``).

        A pixel's score for class t is the score of its group: softmax over the image's top-k classes times the
        unrestricted softmax (GroupViT's inference). The class "background", when the vocabulary's name has a
        threshold, scores 1 where no other class reaches min(threshold, best group score) and 0 elsewhere.
        """
        height, width = images.shape[-2:]
        out = self.image_encoder(self.normalize(images))
        classes = list(vocabulary.classes)
        threshold = self.background_thresholds.get(vocabulary.name)
        background = classes.index(BACKGROUND) if threshold is not None and BACKGROUND in classes else None
        names = [c for i, c in enumerate(classes) if i != background]
        text = self.class_embeddings(names).to(out.tokens.dtype)  # (T, D)
        groups = F.normalize(self.image_head(out.tokens), dim=-1)  # (B, G, D)
        pooled = F.normalize(self.image_head(out.tokens.mean(dim=1)), dim=-1)  # (B, D)
        group_logits = self.scale * groups @ text.t()  # (B, G, T)
        affinity = group_logits.softmax(dim=-1)
        restricted = group_logits
        if self.topk_classes and self.topk_classes < len(names):
            top = (pooled @ text.t()).topk(self.topk_classes, dim=-1).indices  # (B, k)
            keep = torch.zeros_like(pooled @ text.t(), dtype=torch.bool).scatter_(1, top, True)
            restricted = group_logits.masked_fill(~keep[:, None, :], float("-inf"))
        affinity = restricted.softmax(dim=-1) * affinity

        maps = GroupViTEncoder.assignment_maps(out.assignments).reshape(images.shape[0], -1, *out.grid)
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
        onehot = F.one_hot(maps.argmax(dim=1), maps.shape[1]).permute(0, 3, 1, 2).to(affinity.dtype)  # (B, G, H, W)
        scores = torch.einsum("bghw,bgt->bthw", onehot, affinity)
        if background is not None:
            limit = torch.clamp(affinity.flatten(1).max(dim=1).values, max=threshold)  # (B,)
            bg = (scores.max(dim=1).values < limit[:, None, None]).to(scores.dtype)
            scores = torch.cat([scores[:, :background], bg[:, None], scores[:, background:]], dim=1)
        return scores

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of one batch; ``loss`` is their weighted sum.

        batch: image (B, 3, S, S) in [0, 1]; caption [str]; mentions [[[start, end, entity]]]; entities [[str]];
        optional question [str] (the official parser's masked captions), noun_mentions (all_nouns),
        pair_image (B, 3, S, S) in [0, 1] / pair_entity [str] / has_pair (B,) (cross-image consistency).

        The projectors run in the release's order (models/multi_label_contrastive.py:613-683: caption, image,
        question, answer, momentum image, shared entity), which fixes the sequence of BatchNorm updates.
        """
        captions = list(batch["caption"])
        joint = self.projector_statistics == "groupvit" and self.objective == "multi_label"
        if joint:  # GroupViT: captions and prompts through the text projector in one batch
            prompts, valid = self.multi_label_prompts(batch["entities"], captions)
            text_x, prompt_x = self._caption_and_prompts(captions, prompts)
        else:
            pooled, tokens, _ = self.text_encoder.encode(captions)
            text_x = self.text_head(pooled)
            self._statistics_only(self.text_head, tokens)
        out = self.image_encoder(self.normalize(batch["image"]))
        image_x = self.image_head(out.tokens.mean(dim=1))
        # as in OVSegmentor's release, the segment tokens pass the projector too, so that its BatchNorm statistics
        # (used at test time on single segments) cover segments and not only their mean (not GroupViT's release)
        group_x = None if self.projector_statistics == "groupvit" else self.image_head(out.tokens)
        losses = {"contrastive": info_nce(image_x, text_x, self.scale)}
        total = losses["contrastive"]
        if self.objective in MASKING_OBJECTIVES:
            losses["entity"] = self._entity_completion(out.tokens, batch)
            total = total + self.entity_weight * losses["entity"]
        elif joint:
            losses["multi_label"] = self._multi_label_loss(image_x, prompt_x, prompts, valid, batch["entities"])
            total = total + self.multi_label_weight * losses["multi_label"]
        elif self.objective == "multi_label":
            losses["multi_label"] = self._multi_label(image_x, batch["entities"], captions)
            total = total + self.multi_label_weight * losses["multi_label"]
        elif self.objective in ("mlm", "mlm_nogroups"):
            losses["mlm"] = self._masked_language_modelling(out.tokens, captions)
            total = total + self.mlm_weight * losses["mlm"]
        if self.cross_image_weight > 0:
            losses["cross_image"] = self._cross_image(out, group_x, batch)
            total = total + self.cross_image_weight * losses["cross_image"]
        if self.add_multi_label:
            losses["multi_label"] = self._multi_label(image_x, batch["entities"], captions)
            total = total + self.multi_label_weight * losses["multi_label"]
        losses["loss"] = total
        return losses

    def _statistics_only(self, head: nn.Module, features: torch.Tensor) -> None:
        """Run a projector on features whose projection no loss reads, for its BatchNorm running statistics
        alone, as the release does (``projector_statistics: official``)."""
        if self.projector_statistics == "official" and self.training:
            with torch.no_grad():
                head(features.detach())

    def _answer(self, entities: Sequence[str]) -> str:
        template = random.choice(self.answer_templates)
        if self.entity_prompts == "official":  # datasets/clip_dataset.py:268
            return template.split("{}")[0] + " and ".join(entities)
        return template.format(" and a ".join(entities))

    def entity_prompt(self, entity: str) -> str:
        """The prompt of the entity two paired images share (cross-image consistency)."""
        if self.entity_prompts == "official":  # datasets/clip_dataset.py:184
            return "A photo of " + entity
        return self.prompt_template.format(entity)

    def masked_questions(self, batch: Mapping[str, Any]) -> tuple[list[list[tuple[int, int]]], list[str]]:
        """Character spans to mask and the answer prompt of every caption, for the masking objective.

        all_entities: every entity mention; single_entity: the mentions of one random entity; all_nouns: every
        noun. A caption with nothing to mask keeps all its words; its answer is the caption itself (ours) or the
        bare template prefix (``entity_prompts: official``, what the release builds from an empty entity list).
        """
        spans, answers = [], []
        for index, caption in enumerate(batch["caption"]):
            mentions = batch["noun_mentions"][index] if self.objective == "all_nouns" else batch["mentions"][index]
            if self.objective == "single_entity" and mentions:
                chosen = random.choice(sorted({m[2] for m in mentions}))
                mentions = [m for m in mentions if m[2] == chosen]
            names = list(dict.fromkeys(m[2] for m in mentions))
            spans.append([(int(m[0]), int(m[1])) for m in mentions])
            answers.append(self._answer(names) if names or self.entity_prompts == "official" else caption)
        return spans, answers

    def _entity_completion(self, visual: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.objective == "all_nouns" and "noun_mentions" not in batch:
            raise SetupError("The 'all_nouns' objective needs a noun lexicon in the data config (data.nouns).")
        spans, answers = self.masked_questions(batch)
        if self.objective == "all_entities" and batch.get("question") is not None:
            # the official parser's questions: every entity word replaced by one "[MASK]" (clip_dataset.py:255-264)
            encoded = self.text_encoder.tokenize(list(batch["question"]))
            ids = encoded["input_ids"]
        else:
            encoded = self.text_encoder.tokenize(batch["caption"], offsets=True)
            ids = mask_token_ids(
                encoded["input_ids"], encoded["offset_mapping"], spans, self.text_encoder.mask_token_id
            )
        question_cls, question = self.text_encoder(ids, encoded["attention_mask"])
        self._statistics_only(self.text_head, question_cls)
        self._statistics_only(self.text_head, question)
        answer_cls, answer_tokens, _ = self.text_encoder.encode(answers)
        answer_x = self.text_head(answer_cls)
        self._statistics_only(self.text_head, answer_tokens)
        decoded = self.decoder(self.align_text(question), encoded["attention_mask"], self.align_visual(visual))
        return info_nce(self.answer_head(decoded[:, 0]), answer_x, self.scale)

    def multi_label_prompts(
        self, entities: Sequence[Sequence[str]], captions: Sequence[str]
    ) -> tuple[list[str], torch.Tensor]:
        """``num_prompts`` prompt strings per caption (flat, caption-major) and their validity (B, K) (see
        :func:`~ovseg_lab.data.captions.noun_prompts`)."""
        prompts, valid = [], []
        for names, caption in zip(entities, captions):
            texts, ok = noun_prompts(
                caption,
                list(names),
                self.num_prompts,
                self.multi_label_templates,
                self.prompt_rng,
                self.multi_label_padding,
            )
            prompts += texts
            valid.append(ok)
        return prompts, torch.tensor(valid, dtype=torch.bool).reshape(len(captions), self.num_prompts)

    def _multi_label(
        self, image_x: torch.Tensor, entities: Sequence[Sequence[str]], captions: Sequence[str]
    ) -> torch.Tensor:
        prompts, valid = self.multi_label_prompts(entities, captions)
        texts = self.encode_text(prompts).reshape(len(entities), self.num_prompts, -1)
        return self._multi_label_loss(image_x, texts, prompts, valid, entities)

    def _multi_label_loss(
        self,
        image_x: torch.Tensor,
        texts: torch.Tensor,
        prompts: Sequence[str],
        valid: torch.Tensor,
        entities: Sequence[Sequence[str]],
    ) -> torch.Tensor:
        """The multi-label loss of images (B, D) against their prompts' embeddings (B, K, D)."""
        valid = valid.to(image_x.device)
        scale = self.multi_label_logit_scale.exp().clamp(max=self.logit_scale_max)
        not_negative = (
            self._shared_prompts(prompts, entities, image_x.device) if self.shared_prompts_not_negative else None
        )
        return multi_label_info_nce(image_x, texts, valid, scale, not_negative)

    def _caption_and_prompts(
        self, captions: Sequence[str], prompts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GroupViT's text batch (models/multi_label_contrastive.py:217-237): every caption followed by its K
        prompts, B x (1 + K) texts through the tower and the projector at once. Returns the captions' (B, D) and
        the prompts' (B, K, D) embeddings."""
        k = self.num_prompts
        texts = [text for b, caption in enumerate(captions) for text in (caption, *prompts[b * k : (b + 1) * k])]
        projected = self.encode_text(texts).reshape(len(captions), 1 + k, -1)
        return projected[:, 0], projected[:, 1:]

    def _shared_prompts(
        self, prompts: Sequence[str], entities: Sequence[Sequence[str]], device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``shared_prompts_not_negative``: the masks of :func:`shared_prompt_masks` from the prompt texts (ids are
        stable hashes, the same on every rank)."""

        def text_id(text: str) -> int:
            return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little") if text else -1

        prompt_ids = torch.tensor([text_id(t) for t in prompts], device=device).reshape(len(entities), -1)
        width = max(1, max(len(names) for names in entities))
        image_ids = torch.full((len(entities), width), -1, dtype=torch.long, device=device)
        for b, names in enumerate(entities):
            for m, name in enumerate(names):
                image_ids[b, m] = text_id(self.prompt_template.format(name))
        return shared_prompt_masks(prompt_ids, image_ids)

    def _masked_language_modelling(self, visual: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """BERT masking (15 %: 80 % [MASK], 10 % random, 10 % kept) predicted from the decoder output."""
        encoded = self.text_encoder.tokenize(captions)
        ids, attention = encoded["input_ids"], encoded["attention_mask"]
        special = (ids == self.text_encoder.pad_token_id) | (attention == 0)
        special[:, 0] = True
        special |= ids == self.text_encoder.tokenizer.sep_token_id
        chosen = (torch.rand(ids.shape, device=ids.device) < self.mlm_probability) & ~special
        labels = ids.masked_fill(~chosen, -100)
        draw = torch.rand(ids.shape, device=ids.device)
        masked = ids.masked_fill(chosen & (draw < 0.8), self.text_encoder.mask_token_id)
        random_ids = torch.randint_like(ids, self.text_encoder.vocab_size)
        masked = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, masked)
        _, hidden = self.text_encoder(masked, attention)
        use_groups = self.objective == "mlm"
        decoded = self.decoder(self.align_text(hidden), attention, self.align_visual(visual) if use_groups else None)
        logits = self.mlm_head(decoded)
        if not chosen.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits[chosen], labels[chosen])

    @torch.no_grad()
    def update_momentum(self) -> None:
        """EMA of the online image encoder into the momentum encoder (after every optimizer step)."""
        if self.momentum_encoder is None:
            return
        for online, ema in zip(self.image_encoder.parameters(), self.momentum_encoder.parameters()):
            ema.mul_(self.momentum).add_(online.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Copy the online encoder into the momentum encoder (start of stage 2)."""
        if self.momentum_encoder is not None:
            self.momentum_encoder.load_state_dict(self.image_encoder.state_dict())

    def _cross_image(self, out: EncoderOutput, group_x: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Predict the partner image's momentum masks from this image's group queries (see ovsegmentor_losses)."""
        if "pair_image" not in batch:
            raise SetupError("Cross-image mask consistency needs paired images: set data.pair_images=true.")
        has_pair = batch["has_pair"].to(out.tokens.device)
        if not has_pair.any():
            return out.tokens.sum() * 0.0
        # the release's momentum encoder follows the model's mode (train: drop path, Gumbel noise); ours is fixed
        self.momentum_encoder.train(self.training and self.momentum_mode == "train")
        with torch.no_grad():
            partner = self.momentum_encoder(self.normalize(batch["pair_image"][has_pair]))
            self._statistics_only(self.image_head, partner.tokens.mean(dim=1))
            self._statistics_only(self.image_head, partner.tokens)
        online, target = out.assignments[-1], partner.assignments[-1]
        keys = target.k
        scale = keys.shape[-1] ** -0.5
        predicted = online.q[has_pair] @ keys.transpose(1, 2) * scale  # A's groups on B's tokens (B', G, L)
        target_logits = target.q @ keys.transpose(1, 2) * scale  # B's own groups (B', G, L)
        with torch.no_grad():
            entities = [e for e, p in zip(batch["pair_entity"], has_pair.tolist()) if p]
            entity_cls, entity_tokens, _ = self.text_encoder.encode([self.entity_prompt(e) for e in entities])
            entity_text = self.text_head(entity_cls)
            self._statistics_only(self.text_head, entity_tokens)
        selected = select_related_groups(group_x[has_pair], entity_text, self.group_ratio, self.group_ratio_mode)
        return cross_image_mask_loss(
            predicted,
            target_logits,
            partner.grid,
            self.mask_size,
            self.cross_threshold,
            selected,
            reduction=self.dice_reduction,
        )
