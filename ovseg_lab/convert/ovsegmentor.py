"""Official OVSegmentor checkpoints (Jazzcharles/OVSegmentor, ``MultiLabelContrastive``) -> our OVSegmentor names.

The release saves ``{"model": state_dict, ...}`` (utils/checkpoint.py) of models/multi_label_contrastive.py:266:

- ``img_encoder.*`` (models/group_vit.py ``GroupViT``): ``layers.{i}`` -> ``image_encoder.stages.{i}``
  (``downsample`` -> ``grouping``; ``group_projector.0/1`` -> ``group_projector.norm/mlp``), ``patch_embed.proj``
  -> ``patch_embed``, ``patch_embed.norm`` -> ``patch_norm``; ``pos_embed`` is (N, C) after the release's DINO
  initialisation (group_vit.py:797, the class token dropped) and (1, N, C) without it: ours is (1, N, C);
- ``img_encoder_momentum.*``: the stage-2 momentum copy, never read at evaluation: dropped (stage 2 restarts it
  from the online encoder);
- ``text_encoder.transformer.*`` (transformers ``BertModel`` with its pooler, models/transformer.py:124) ->
  ``text_encoder.bert.*``; the pooler is never used (the CLS hidden state is): dropped;
- ``img_projector`` / ``text_projector`` / ``bridge_projector`` (``ProjectMLP``: 1x1 ``Conv1d`` + BatchNorm +
  ReLU + 1x1 ``Conv1d``) -> ``image_head`` / ``text_head`` / ``answer_head`` (``Linear`` + BatchNorm + ReLU +
  ``Linear``: the kernel axis squeezed);
- ``align_proj_img`` / ``align_proj_text`` -> ``align_visual`` / ``align_text``;
- ``multimodal_groupingblock.blocks.0`` (``MultimodalGroupingBlock``) -> ``decoder``: ``norm_tokens`` ->
  ``norm_text``, ``norm_x`` -> ``norm_visual``, ``pre_assign_attn`` -> ``cross``, ``post_attn`` -> ``self_attn``,
  ``norm_new_x`` -> ``norm_out``; its ``assign`` attention is built but never called
  (multi_label_contrastive.py:137-147 vs 150-186): dropped;
- ``logit_scale`` kept; ``logit_scale_mask`` (built for stage 2, never read): dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from ovseg_lab.convert.common import strip_prefix
from ovseg_lab.errors import SetupError

# (official pattern, our name); applied in order, first match wins; "" = dropped on purpose
_ENCODER_RULES: list[tuple[str, str]] = [
    (r"patch_embed\.proj\.", "patch_embed."),
    (r"patch_embed\.norm\.", "patch_norm."),
    (r"layers\.(\d+)\.downsample\.", "stages.{0}.grouping."),
    (r"layers\.(\d+)\.group_projector\.0\.", "stages.{0}.group_projector.norm."),
    (r"layers\.(\d+)\.group_projector\.1\.", "stages.{0}.group_projector.mlp."),
    (r"layers\.(\d+)\.", "stages.{0}."),
    (r"(norm|pos_embed)", "{0}"),
]
_RULES: list[tuple[str, str]] = [
    (r"img_encoder_momentum\.", ""),
    (r"text_encoder\.transformer\.pooler\.", ""),
    (r"text_encoder\.transformer\.", "text_encoder.bert."),
    (r"img_projector\.", "image_head."),
    (r"text_projector\.", "text_head."),
    (r"bridge_projector\.", "answer_head."),
    (r"align_proj_img\.", "align_visual."),
    (r"align_proj_text\.", "align_text."),
    (r"multimodal_groupingblock\.blocks\.0\.assign\.", ""),
    (r"multimodal_groupingblock\.blocks\.0\.norm_tokens\.", "decoder.norm_text."),
    (r"multimodal_groupingblock\.blocks\.0\.norm_x\.", "decoder.norm_visual."),
    (r"multimodal_groupingblock\.blocks\.0\.pre_assign_attn\.", "decoder.cross."),
    (r"multimodal_groupingblock\.blocks\.0\.post_attn\.", "decoder.self_attn."),
    (r"multimodal_groupingblock\.blocks\.0\.norm_new_x\.", "decoder.norm_out."),
    (r"logit_scale_mask$", ""),
    (r"(logit_scale|multi_label_logit_scale)$", "{0}"),
]
_PROJECTOR = {"linear_hidden.0.": "fc1.", "linear_hidden.1.": "bn.", "linear_out.": "fc2."}


def _apply(rules: list[tuple[str, str]], key: str) -> str | None:
    for pattern, target in rules:
        match = re.match(pattern, key)
        if match:
            return target.format(*match.groups()) + key[match.end() :] if target else ""
    return None


def rename_group_vit_key(key: str) -> str | None:
    """Our ``GroupViTEncoder`` name of a key of the releases' ``GroupViT`` image encoder (relative to it)."""
    return _apply(_ENCODER_RULES, key)


def _rename(key: str) -> str | None:
    """Our name for an official key ("" = dropped on purpose, None = not understood)."""
    if key.startswith("img_encoder."):
        inner = rename_group_vit_key(key[len("img_encoder.") :])
        return None if inner is None else "image_encoder." + inner
    name = _apply(_RULES, key)
    if name and name.split(".", 1)[0] in ("image_head", "text_head", "answer_head"):
        head, rest = name.split(".", 1)
        for official, ours in _PROJECTOR.items():
            if rest.startswith(official):
                return f"{head}.{ours}{rest[len(official) :]}"
        return None
    return name


def convert_ovsegmentor_state_dict(official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official ``MultiLabelContrastive`` state dict (or its gradients) -> ``net.*`` keys of our module."""
    state = strip_prefix(official, "module.")
    converted, unknown = {}, []
    for key, value in state.items():
        name = _rename(key)
        if name is None:
            unknown.append(key)
            continue
        if not name:
            continue
        if name.endswith("pos_embed") and value.dim() == 2:
            value = value[None]  # the release's DINO-initialised (N, C) -> (1, N, C)
        if re.match(r"(image_head|text_head|answer_head)\.fc[12]\.weight$", name):
            value = value.squeeze(-1)  # 1x1 Conv1d (out, in, 1) -> Linear (out, in)
        converted[f"net.{name}"] = value
    if unknown:
        raise SetupError(
            f"Unrecognised OVSegmentor checkpoint keys ({len(unknown)}), e.g. {unknown[:4]}: is this a "
            "Jazzcharles/OVSegmentor MultiLabelContrastive checkpoint?"
        )
    return converted


def ovsegmentor_overrides(official: Mapping[str, torch.Tensor]) -> list[str]:
    """The model sizes read off an official checkpoint (group ViT widths, depths, groups; BERT size; projector),
    and BERT built from its config only (the checkpoint holds its weights)."""
    state = strip_prefix(official, "module.")
    enc = "img_encoder."
    if f"{enc}pos_embed" not in state:
        raise SetupError("Not an OVSegmentor checkpoint: img_encoder.pos_embed is missing.")
    pos = state[f"{enc}pos_embed"]
    tokens, width = pos.shape[-2], pos.shape[-1]
    patch = state[f"{enc}patch_embed.proj.weight"].shape[-1]
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{enc}layers\.(\d+)\.", k))})
    depths = [
        len({m.group(1) for k in state if (m := re.match(rf"{enc}layers\.{s}\.blocks\.(\d+)\.", k))}) for s in stages
    ]
    groups = [
        int(state[f"{enc}layers.{s}.group_token"].shape[1]) if f"{enc}layers.{s}.group_token" in state else 0
        for s in stages
    ]
    outputs = [int(state[f"{enc}layers.{s}.downsample.mlp_inter.fc2.weight"].shape[0]) for s in stages[:-1]]
    side = math.isqrt(tokens)
    net = "model.net"
    overrides = [
        f"{net}.image_encoder.embed_dim={width}",
        f"{net}.image_encoder.patch_size={patch}",
        f"{net}.image_encoder.image_size={side * patch}",
        f"{net}.image_encoder.depths=[{','.join(map(str, depths))}]",
        f"{net}.image_encoder.num_group_tokens=[{','.join(map(str, groups))}]",
        f"{net}.image_encoder.num_output_groups=[{','.join(map(str, outputs))}]",
        f"{net}.image_encoder.patch_norm={str(f'{enc}patch_embed.norm.weight' in state).lower()}",
        f"{net}.image_encoder.pretrained=null",
        f"{net}.embed_dim={state['text_projector.linear_out.weight'].shape[0]}",
        f"{net}.proj_hidden={state['text_projector.linear_hidden.0.weight'].shape[0]}",
        f"{net}.text_encoder.pretrained_weights=false",
    ]
    bert = "text_encoder.transformer."
    words = state[f"{bert}embeddings.word_embeddings.weight"]
    hidden = int(words.shape[1])
    layers = len({m.group(1) for k in state if (m := re.match(rf"{bert}encoder\.layer\.(\d+)\.", k))})
    sizes = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "intermediate_size": int(state[f"{bert}encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "vocab_size": int(words.shape[0]),
        "max_position_embeddings": int(state[f"{bert}embeddings.position_embeddings.weight"].shape[0]),
    }
    if sizes != {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
    }:  # not bert-base-uncased: say its size
        overrides.append(f"{net}.text_encoder.config={{{','.join(f'{k}:{v}' for k, v in sizes.items())}}}")
    return overrides
