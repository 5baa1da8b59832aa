"""OVSeg (facebookresearch/ov-seg) checkpoints -> our OVSeg.

Two official layouts:

- the whole detectron2 checkpoint (``ovseg_swinbase_vitL14_ft_mpt.pth``, and the R-101c + ViT-B/16 model):
  ``backbone.*`` (D2SwinTransformer with output norms norm0..norm3, or detectron2's deeplab ResNet-101c with
  FrozenBN), ``sem_seg_head.pixel_decoder.*`` (BasePixelDecoder), ``sem_seg_head.predictor.*`` (DETR decoder,
  query embedding, CLIP-space class MLP, mask MLP), ``clip_adapter.clip_model.*`` (OpenAI CLIP with
  ``visual.mask_embedding``) and ``clip_adapter.non_object_embedding`` -> ``net.maskformer.*`` and ``net.clip.*``
  (:func:`convert_ovseg_state_dict`, ``--format ovseg``);
- the released adapted CLIP alone (``ovseg_clip_l_9a1909.pth``, an open_clip state dict, optionally under
  ``state_dict`` with DDP's ``module.`` prefix) -> ``net.clip.*`` only (:func:`convert_ovseg_clip_state_dict`,
  ``--format ovseg_clip``; used as ``model.net.clip_weights``).

Derived buffers the official modules recompute (Swin's ``relative_position_index``, pixel statistics, the
criterion's ``empty_weight``, the adapter's cached text features) are dropped; any other unknown key is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ovseg_lab.convert.common import split_attention_projections, strip_prefix
from ovseg_lab.errors import SetupError

ADAPTER_PREFIX = "clip_adapter.clip_model."
# buffers of the official model that are not weights (recomputed by the modules that own them)
_DERIVED = ("pixel_mean", "pixel_std", "clip_adapter.pixel_mean", "clip_adapter.pixel_std", "criterion.empty_weight")
_DERIVED_SUFFIX = ("relative_position_index",)
_CLIP_ROOTS = (
    "visual.",
    "transformer.",
    "token_embedding.",
    "positional_embedding",
    "text_projection",
    "ln_final.",
    "logit_scale",
)

# sem_seg_head.* -> maskformer.* (BasePixelDecoder's adapter_i / layer_i; the DETR decoder; the MLP heads)
_HEAD_RULES = [
    (r"pixel_decoder\.layer_4\.weight$", "pixel_decoder.top.0.weight"),
    (r"pixel_decoder\.layer_4\.norm\.", "pixel_decoder.top.1."),
    (r"pixel_decoder\.adapter_(\d)\.weight$", lambda m: f"pixel_decoder.laterals.{int(m[1]) - 1}.0.weight"),
    (r"pixel_decoder\.adapter_(\d)\.norm\.", lambda m: f"pixel_decoder.laterals.{int(m[1]) - 1}.1."),
    (r"pixel_decoder\.layer_(\d)\.weight$", lambda m: f"pixel_decoder.outputs.{int(m[1]) - 1}.0.weight"),
    (r"pixel_decoder\.layer_(\d)\.norm\.", lambda m: f"pixel_decoder.outputs.{int(m[1]) - 1}.1."),
    (r"pixel_decoder\.mask_features\.", "pixel_decoder.mask_features."),
    (r"predictor\.transformer\.decoder\.layers\.(\d+)\.self_attn\.", lambda m: f"layers.{m[1]}.self_attn."),
    (r"predictor\.transformer\.decoder\.layers\.(\d+)\.multihead_attn\.", lambda m: f"layers.{m[1]}.cross_attn."),
    (r"predictor\.transformer\.decoder\.layers\.(\d+)\.linear1\.", lambda m: f"layers.{m[1]}.ffn.0."),
    (r"predictor\.transformer\.decoder\.layers\.(\d+)\.linear2\.", lambda m: f"layers.{m[1]}.ffn.3."),
    (r"predictor\.transformer\.decoder\.layers\.(\d+)\.norm(\d)\.", lambda m: f"layers.{m[1]}.norms.{int(m[2]) - 1}."),
    (r"predictor\.transformer\.decoder\.norm\.", "decoder_norm."),
    (r"predictor\.query_embed\.", "query_embed."),
    (r"predictor\.input_proj\.", "input_proj."),
    (r"predictor\.class_embed\.layers\.(\d)\.", lambda m: f"class_embed.{2 * int(m[1])}."),
    (r"predictor\.mask_embed\.layers\.(\d)\.", lambda m: f"mask_embed.{2 * int(m[1])}."),
]
# detectron2 ResNet (deeplab stem, FrozenBN) -> timm ResNet with a deep stem (TimmFeatureBackbone's body)
_RESNET_RULES = [
    (r"stem\.conv(\d)\.weight$", lambda m: f"conv1.{3 * (int(m[1]) - 1)}.weight"),
    (r"stem\.conv([12])\.norm\.", lambda m: f"conv1.{3 * (int(m[1]) - 1) + 1}."),
    (r"stem\.conv3\.norm\.", "bn1."),
    (r"res(\d)\.(\d+)\.conv(\d)\.weight$", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
    (r"res(\d)\.(\d+)\.conv(\d)\.norm\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}."),
    (r"res(\d)\.(\d+)\.shortcut\.weight$", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
    (r"res(\d)\.(\d+)\.shortcut\.norm\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.1."),
]


def _rename(key: str, rules) -> str | None:
    for pattern, target in rules:
        match = re.match(pattern, key)
        if match:
            new = target(match) if callable(target) else target
            return new + key[match.end() :]
    return None


def is_swin(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("backbone.patch_embed.") for k in state)


def convert_ovseg_clip_state_dict(
    official: Mapping[str, torch.Tensor], prefix: str = "net."
) -> dict[str, torch.Tensor]:
    """Rename an official OVSeg CLIP (open_clip file, or the CLIP part of a full OVSeg checkpoint) into
    ``<prefix>clip.*`` keys (q/k/v split like :class:`~ovseg_lab.clip.CLIPBackbone`; mask prompts as
    ``clip.mask_prompts``). Raises SetupError naming the keys it does not understand."""
    state = strip_prefix(official, "module.")
    if any(k.startswith(ADAPTER_PREFIX) for k in state):
        state = {k[len(ADAPTER_PREFIX) :]: v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
    unknown = [k for k in state if not k.startswith(_CLIP_ROOTS)]
    if unknown:
        raise SetupError(f"Not an open_clip / OVSeg CLIP layout: {len(unknown)} unknown keys, e.g. {unknown[:5]}.")
    converted: dict[str, torch.Tensor] = {}
    for key, value in split_attention_projections(state).items():
        if key == "visual.mask_embedding":
            converted[prefix + "clip.mask_prompts"] = value
        else:
            converted[prefix + "clip.model." + key] = value
    return converted


def convert_maskformer_state_dict(
    official: Mapping[str, torch.Tensor], prefix: str = "maskformer."
) -> dict[str, torch.Tensor]:
    """The MaskFormer part of a full OVSeg checkpoint (backbone, sem_seg_head, the no-object embedding) ->
    ``<prefix>*`` keys of :class:`~ovseg_lab.models.maskformer.MaskFormer`."""
    swin = is_swin(official)
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in official.items():
        if key.startswith(ADAPTER_PREFIX) or key in _DERIVED or key.endswith(_DERIVED_SUFFIX):
            continue
        if key == "clip_adapter.non_object_embedding":
            converted[prefix + "no_object_embedding"] = value
        elif key.startswith("backbone."):
            rest = key[len("backbone.") :]
            new = rest if swin else _rename(rest, _RESNET_RULES)
            if new is None:
                unknown.append(key)
            else:
                converted[prefix + "backbone." + ("" if swin else "body.") + new] = value
        elif key.startswith("sem_seg_head."):
            new = _rename(key[len("sem_seg_head.") :], _HEAD_RULES)
            if new is None:
                unknown.append(key)
            else:
                converted[prefix + new] = value
        else:
            unknown.append(key)
    if unknown:
        raise SetupError(f"Not an OVSeg detectron2 checkpoint layout: {len(unknown)} unknown keys, e.g. {unknown[:5]}.")
    return converted


def convert_ovseg_state_dict(official: Mapping[str, torch.Tensor], prefix: str = "net.") -> dict[str, torch.Tensor]:
    """A whole official OVSeg checkpoint -> ``<prefix>maskformer.*`` + ``<prefix>clip.*``."""
    if not any(k.startswith(("backbone.", "sem_seg_head.")) for k in official):
        raise SetupError(
            "Not a whole OVSeg checkpoint (no backbone./sem_seg_head. keys). For the released adapted "
            "CLIP alone (ovseg_clip_l_*.pth) use --format ovseg_clip."
        )
    clip = {k: v for k, v in official.items() if k.startswith(ADAPTER_PREFIX)}
    rest = {k: v for k, v in official.items() if not k.startswith(ADAPTER_PREFIX)}
    return convert_maskformer_state_dict(rest, prefix + "maskformer.") | convert_ovseg_clip_state_dict(clip, prefix)


def ovseg_overrides(official: Mapping[str, torch.Tensor]) -> list[str]:
    """The paper setting a whole checkpoint belongs to (Swin-B + ViT-L/14 or R-101c + ViT-B/16) and its mask
    prompt depth, read off its keys and shapes."""
    out = [] if is_swin(official) else ["ovseg.setting=r101c_vitb16"]
    prompts = official.get(ADAPTER_PREFIX + "visual.mask_embedding")
    out.append(f"clip.mask_prompt_depth={0 if prompts is None else prompts.shape[0]}")
    return out


def ovseg_clip_overrides(official: Mapping[str, torch.Tensor]) -> list[str]:
    state = strip_prefix(official, "module.")
    prompts = state.get("visual.mask_embedding", state.get(ADAPTER_PREFIX + "visual.mask_embedding"))
    return [f"clip.mask_prompt_depth={0 if prompts is None else prompts.shape[0]}"]
