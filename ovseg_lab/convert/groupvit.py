"""Official GroupViT checkpoints -> our OVSegmentor (``model=groupvit``) parameter names, in two layouts.

``groupvit``: the release's ``.pth`` (NVlabs/GroupViT, ``utils/checkpoint.py:71-93``: ``{"model": state_dict, ...}``)
of ``MultiLabelContrastive`` (``models/multi_label_contrastive.py``):

- ``img_encoder.*`` (``models/group_vit.py`` ``GroupViT``): ``patch_embed.proj`` / ``patch_embed.norm`` ->
  ``image_encoder.patch_embed`` / ``patch_norm``; ``layers.{i}`` -> ``stages.{i}`` with ``downsample`` ->
  ``grouping`` and ``group_projector.0`` / ``.1`` (LayerNorm, token MLP) -> ``group_projector.norm`` / ``.mlp``;
  the blocks (``norm1``, fused ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp``) are timm's names already;
- ``text_encoder.*`` (``models/transformer.py`` ``TextTransformer``, OpenAI's CLIP text layout) ->
  ``text_encoder.transformer.*`` (open_clip's ``TextTransformer``: the same names);
- ``img_projector`` / ``text_projector`` (``ProjectMLP``: 1x1 ``Conv1d`` -> SyncBatchNorm -> ReLU -> 1x1 ``Conv1d``)
  -> ``image_head`` / ``text_head`` (``fc1`` / ``bn`` / ``fc2``; the conv kernels lose their length-1 axis);
- ``logit_scale`` and ``multi_label_logit_scale`` keep their names.

The released files also pickle the training config (an OmegaConf object): ``load_official`` reads weights only and
refuses them; re-save the ``"model"`` entry of a file you trust (see docs/ovsegmentor.md).

``groupvit_hf``: transformers' ``GroupViTModel`` state dict (``nvidia/groupvit-gcc-yfcc``): the same modules under
other names, with the attention projections split into q/k/v (fused back into timm's ``qkv`` and the
``in_proj_weight`` of the text tower) and no multi-label logit scale (transformers does not keep it: ours gets the
release's initial value, 1/0.07, which only the multi-label training loss reads).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from ovseg_lab.convert.common import strip_prefix
from ovseg_lab.errors import SetupError

# (official pattern, our name), first match wins; keys relative to MultiLabelContrastive / our OVSegmentor
_OFFICIAL_RULES: list[tuple[str, str]] = [
    (r"img_encoder\.patch_embed\.proj\.", "image_encoder.patch_embed."),
    (r"img_encoder\.patch_embed\.norm\.", "image_encoder.patch_norm."),
    (r"img_encoder\.pos_embed$", "image_encoder.pos_embed"),
    (r"img_encoder\.layers\.(\d+)\.downsample\.", "image_encoder.stages.{0}.grouping."),
    (r"img_encoder\.layers\.(\d+)\.group_projector\.0\.", "image_encoder.stages.{0}.group_projector.norm."),
    (r"img_encoder\.layers\.(\d+)\.group_projector\.1\.", "image_encoder.stages.{0}.group_projector.mlp."),
    (r"img_encoder\.layers\.(\d+)\.", "image_encoder.stages.{0}."),
    (r"img_encoder\.norm\.", "image_encoder.norm."),
    (r"text_encoder\.", "text_encoder.transformer."),
    (r"img_projector\.linear_hidden\.0\.", "image_head.fc1."),
    (r"img_projector\.linear_hidden\.1\.", "image_head.bn."),
    (r"img_projector\.linear_out\.", "image_head.fc2."),
    (r"text_projector\.linear_hidden\.0\.", "text_head.fc1."),
    (r"text_projector\.linear_hidden\.1\.", "text_head.bn."),
    (r"text_projector\.linear_out\.", "text_head.fc2."),
    (r"(multi_label_logit_scale|logit_scale)$", "{0}"),
]

_HF_RULES: list[tuple[str, str]] = [
    (r"vision_model\.embeddings\.patch_embeddings\.projection\.", "image_encoder.patch_embed."),
    (r"vision_model\.embeddings\.layernorm\.", "image_encoder.patch_norm."),
    (r"vision_model\.embeddings\.position_embeddings$", "image_encoder.pos_embed"),
    (r"vision_model\.encoder\.stages\.(\d+)\.group_token$", "image_encoder.stages.{0}.group_token"),
    (
        r"vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_norm1\.",
        "image_encoder.stages.{0}.blocks.{1}.norm1.",
    ),
    (
        r"vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_norm2\.",
        "image_encoder.stages.{0}.blocks.{1}.norm2.",
    ),
    (
        r"vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.self_attn\.out_proj\.",
        "image_encoder.stages.{0}.blocks.{1}.attn.proj.",
    ),
    (r"vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.mlp\.", "image_encoder.stages.{0}.blocks.{1}.mlp."),
    (
        r"vision_model\.encoder\.stages\.(\d+)\.downsample\.pre_assign_attn\.attn\.out_proj\.",
        "image_encoder.stages.{0}.grouping.pre_assign_attn.attn.proj.",
    ),
    (r"vision_model\.encoder\.stages\.(\d+)\.downsample\.", "image_encoder.stages.{0}.grouping."),
    (r"vision_model\.encoder\.stages\.(\d+)\.group_projector\.0\.", "image_encoder.stages.{0}.group_projector.norm."),
    (r"vision_model\.encoder\.stages\.(\d+)\.group_projector\.1\.", "image_encoder.stages.{0}.group_projector.mlp."),
    (r"vision_model\.layernorm\.", "image_encoder.norm."),
    (r"text_model\.embeddings\.token_embedding\.", "text_encoder.transformer.token_embedding."),
    (r"text_model\.embeddings\.position_embedding\.weight$", "text_encoder.transformer.positional_embedding"),
    (r"text_model\.embeddings\.position_ids$", ""),  # a derived buffer (older transformers save it)
    (r"text_model\.encoder\.layers\.(\d+)\.layer_norm1\.", "text_encoder.transformer.transformer.resblocks.{0}.ln_1."),
    (r"text_model\.encoder\.layers\.(\d+)\.layer_norm2\.", "text_encoder.transformer.transformer.resblocks.{0}.ln_2."),
    (
        r"text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.",
        "text_encoder.transformer.transformer.resblocks.{0}.attn.out_proj.",
    ),
    (r"text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", "text_encoder.transformer.transformer.resblocks.{0}.mlp.c_fc."),
    (
        r"text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.",
        "text_encoder.transformer.transformer.resblocks.{0}.mlp.c_proj.",
    ),
    (r"text_model\.final_layer_norm\.", "text_encoder.transformer.ln_final."),
    (r"visual_projection\.0\.", "image_head.fc1."),
    (r"visual_projection\.1\.", "image_head.bn."),
    (r"visual_projection\.3\.", "image_head.fc2."),
    (r"text_projection\.0\.", "text_head.fc1."),
    (r"text_projection\.1\.", "text_head.bn."),
    (r"text_projection\.3\.", "text_head.fc2."),
    (r"logit_scale$", "logit_scale"),
]
# q/k/v projections fused into one tensor (ours: timm's qkv, open_clip's in_proj)
_HF_FUSED = [
    (
        r"vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$",
        "image_encoder.stages.{0}.blocks.{1}.attn.qkv.{3}",
    ),
    (
        r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$",
        "text_encoder.transformer.transformer.resblocks.{0}.attn.in_proj_{2}",
    ),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, target in rules:
        match = re.match(pattern, key)
        if match:
            return target.format(*match.groups()) + key[match.end() :] if target else ""
    return None


def _model_state(official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return strip_prefix(strip_prefix(official, "module."), "net.")


def convert_groupvit_state_dict(official: Mapping[str, torch.Tensor], prefix: str = "net.") -> dict[str, torch.Tensor]:
    """The release's ``MultiLabelContrastive`` state dict (DDP's ``module.`` prefix allowed) -> our keys.

    Raises SetupError naming the keys it does not understand."""
    converted, unknown = {}, []
    for key, value in _model_state(official).items():
        ours = _rename(key, _OFFICIAL_RULES)
        if ours is None:
            unknown.append(key)
            continue
        if re.search(r"_(head)\.fc[12]\.weight$", ours) and value.dim() == 3:  # Conv1d(kernel 1) -> Linear
            value = value[..., 0]
        converted[prefix + ours] = value
    if unknown:
        raise SetupError(f"Not a GroupViT (NVlabs) checkpoint layout: {len(unknown)} unknown keys, e.g. {unknown[:5]}.")
    return converted


def convert_groupvit_hf_state_dict(
    official: Mapping[str, torch.Tensor], prefix: str = "net."
) -> dict[str, torch.Tensor]:
    """transformers' ``GroupViTModel`` state dict -> our keys (q/k/v fused, multi-label scale at its initial value)."""
    converted, unknown = {}, []
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _model_state(official).items():
        for pattern, target in _HF_FUSED:
            match = re.match(pattern, key)
            if match:
                *index, part, kind = match.groups()
                fused.setdefault(target.format(*index, part, kind), {})[part] = value
                break
        else:
            ours = _rename(key, _HF_RULES)
            if ours is None:
                unknown.append(key)
            elif ours:
                converted[prefix + ours] = value
    if unknown:
        raise SetupError(
            f"Not a transformers GroupViTModel state dict: {len(unknown)} unknown keys, e.g. {unknown[:5]}."
        )
    for target, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise SetupError(f"{target}: the checkpoint has only the {sorted(parts)} projections of q/k/v.")
        converted[prefix + target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    converted.setdefault(prefix + "multi_label_logit_scale", torch.tensor(math.log(1 / 0.07)))
    return converted


# where each size sits in a layout: stage blocks, group tokens, grouping output, patch conv, position grid, text
# blocks, text positions, image projector output
_LAYOUT_KEYS = {
    "groupvit": (
        "img_encoder.layers.{}.blocks.",
        "img_encoder.layers.{}.group_token",
        "img_encoder.layers.{}.downsample.mlp_inter.fc2.weight",
        "img_encoder.patch_embed.proj.weight",
        "img_encoder.pos_embed",
        "text_encoder.transformer.resblocks.",
        "text_encoder.positional_embedding",
        "img_projector.linear_out.weight",
    ),
    "groupvit_hf": (
        "vision_model.encoder.stages.{}.layers.",
        "vision_model.encoder.stages.{}.group_token",
        "vision_model.encoder.stages.{}.downsample.mlp_inter.fc2.weight",
        "vision_model.embeddings.patch_embeddings.projection.weight",
        "vision_model.embeddings.position_embeddings",
        "text_model.encoder.layers.",
        "text_model.embeddings.position_embedding.weight",
        "visual_projection.3.weight",
    ),
}


def groupvit_overrides(official: Mapping[str, torch.Tensor]) -> list[str]:
    """The model sizes read off a release checkpoint (the paper's ViT-S gives the recipe's own values)."""
    return _sizes(_model_state(official), *_LAYOUT_KEYS["groupvit"])


def groupvit_hf_overrides(official: Mapping[str, torch.Tensor]) -> list[str]:
    return _sizes(_model_state(official), *_LAYOUT_KEYS["groupvit_hf"])


def _sizes(
    state: Mapping[str, torch.Tensor],
    block: str,
    group_token: str,
    grouping_out: str,
    patch: str,
    position: str,
    text_block: str,
    text_position: str,
    projector_out: str,
) -> list[str]:
    """Hydra overrides for the sizes of a checkpoint: stages, group tokens, widths, grid, projection.

    Attention heads cannot be read off the weights: the recipe's (6 for the image, width / 64 for the text) stay
    unless given after ``--``."""
    if patch not in state or position not in state:
        return []  # not a known layout: the converter names the keys it does not understand
    depths, tokens, outputs = [], [], []
    stage = 0
    while any(k.startswith(block.format(stage)) for k in state):
        prefix = block.format(stage)
        depths.append(1 + max(int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)))
        token = state.get(group_token.format(stage))
        tokens.append(int(token.shape[1]) if token is not None else 0)
        if grouping_out.format(stage) in state:
            outputs.append(int(state[grouping_out.format(stage)].shape[0]))
        stage += 1
    width, _, patch_size, _ = state[patch].shape
    grid = math.isqrt(int(state[position].shape[-2]))
    text_layers = 1 + max(int(k[len(text_block) :].split(".")[0]) for k in state if k.startswith(text_block))
    context, text_width = state[text_position].shape
    embed_dim, proj_hidden = state[projector_out].shape[:2]

    def listed(values: list[int]) -> str:
        return "[" + ",".join(map(str, values)) + "]"

    image = "model.net.image_encoder"
    return [
        f"{image}.embed_dim={width}",
        f"{image}.patch_size={patch_size}",
        f"{image}.image_size={grid * patch_size}",
        f"{image}.depths={listed(depths)}",
        f"{image}.num_group_tokens={listed(tokens)}",
        f"{image}.num_output_groups={listed(outputs)}",
        f"model.net.text_encoder.width={text_width}",
        f"model.net.text_encoder.layers={text_layers}",
        f"model.net.text_encoder.context_length={context}",
        f"model.net.embed_dim={embed_dim}",
        f"model.net.proj_hidden={proj_hidden}",
    ]
