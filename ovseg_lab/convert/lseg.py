"""Official LSeg checkpoints (isl-org/lang-seg, e.g. ``demo_e200.ckpt``) -> our LSegNet parameter names.

Official layout: a PyTorch Lightning checkpoint of ``LSegModule`` whose ``state_dict`` holds ``net.`` (LSegNet):

- ``clip_pretrained.*``: the OpenAI CLIP (``clip.load``; ViT-B/32 for ``clip_vitl16_384``), attention as
  ``attn.in_proj_weight`` -> our ``clip.model.*`` with the q/k/v split;
- ``pretrained.model.*``: the timm ViT (``vit_large_patch16_384``) -> ``encoder.vit.*`` (its final ``norm`` and
  classifier ``head`` are never used by LSeg and are dropped; we prune them too);
- ``pretrained.act_postprocess{1..4}``: ``nn.Sequential(readout, Transpose, Unflatten, Conv1x1, resample)`` ->
  ``encoder.reassemble.{0..3}`` (``.0.project`` = readout projection, ``.3`` = 1x1 conv, ``.4`` = resample);
- ``scratch.layer{1..4}_rn`` -> ``decoder.fusion.project.{0..3}``; ``scratch.refinenet{1..4}`` ->
  ``decoder.fusion.fuse.{0..3}`` (``resConfUnit1`` = skip unit, ``resConfUnit2`` = unit; refinenet4's
  ``resConfUnit1`` is built but never called by the official forward: dropped);
- ``scratch.head1`` -> ``decoder.head``; ``scratch.head_block.depthwise.depthwise`` (arch_option 1/2) ->
  ``decoder.regularization.blocks.0.label_conv.conv``.

The official logit scale is a plain tensor (``nn.Parameter(...).exp()``), not in the state dict: ours is the
release's fixed 1/0.07.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from ovseg_lab.convert.common import split_attention_projections, strip_prefix
from ovseg_lab.errors import SetupError

# (official pattern relative to LSegNet, our name relative to the net); applied in order, first match wins
_RULES: list[tuple[str, str]] = [
    (r"pretrained\.model\.(norm|head|fc_norm|pre_logits)\.", ""),  # unused by LSeg: dropped
    (r"pretrained\.model\.", "encoder.vit."),
    (r"pretrained\.act_postprocess(\d)\.0\.project\.", "encoder.reassemble.{0}.readout.project."),
    (r"pretrained\.act_postprocess(\d)\.3\.", "encoder.reassemble.{0}.project."),
    (r"pretrained\.act_postprocess(\d)\.4\.", "encoder.reassemble.{0}.resample."),
    # the zero-shot ResNet-101 (LSegRNNetZS, modules/models/lseg_blocks_zs.py:109-119): torchvision's resnet101
    # regrouped as layer1 = Sequential(conv1, bn1, relu, maxpool, layer1), layer2..4 -> timm's features_only names
    (r"pretrained\.layer1\.0\.", "encoder.resnet.conv1."),
    (r"pretrained\.layer1\.1\.", "encoder.resnet.bn1."),
    (r"pretrained\.layer1\.4\.", "encoder.resnet.layer1."),
    (r"pretrained\.layer2\.", "encoder.resnet.layer2."),
    (r"pretrained\.layer3\.", "encoder.resnet.layer3."),
    (r"pretrained\.layer4\.", "encoder.resnet.layer4."),
    (r"scratch\.layer(\d)_rn\.", "decoder.fusion.project.{0}."),
    (r"scratch\.refinenet4\.resConfUnit1\.", ""),  # never called by the official forward: dropped
    (r"scratch\.refinenet(\d)\.resConfUnit1\.", "decoder.fusion.fuse.{0}.skip_unit."),
    (r"scratch\.refinenet(\d)\.resConfUnit2\.", "decoder.fusion.fuse.{0}.unit."),
    (r"scratch\.refinenet(\d)\.out_conv\.", "decoder.fusion.fuse.{0}.out_conv."),
    (r"scratch\.head1\.", "decoder.head."),
    (r"scratch\.head_block\.depthwise\.depthwise\.", "decoder.regularization.blocks.0.label_conv.conv."),
]


def _rename(key: str) -> str | None:
    """Our name for an official LSegNet key ("" = dropped on purpose, None = not understood)."""
    for pattern, target in _RULES:
        match = re.match(pattern, key)
        if match:
            if not target:
                return ""
            index = [str(int(g) - 1) for g in match.groups()]  # official levels count from 1
            return target.format(*index) + key[match.end() :]
    return None


# (ViT width, patch size) of the released image encoders -> our encoder name
_ENCODERS = {(1024, 16): "vit_large_16_384", (768, 32): "vit_base_32_384"}


def lseg_overrides(official: Mapping[str, torch.Tensor]) -> list[str]:
    """The image encoder read off an official LSeg checkpoint (ViT-L/16 or ViT-B/32 at 384, or the zero-shot
    ResNet-101); the paper recipe
    (experiment=lseg_ade20k) supplies the rest."""
    state = strip_prefix(official, "net.")
    if "pretrained.layer1.0.weight" in state:  # LSegRNNetZS (the ResNet rows of the zero-shot tables)
        return ["model.net.encoder.name=resnet101"]
    proj = state.get("pretrained.model.patch_embed.proj.weight")
    if proj is None:
        return []  # not a known layout: the converter names the keys it does not understand
    key = (int(proj.shape[0]), int(proj.shape[-1]))
    if key not in _ENCODERS:  # not a released encoder (e.g. a toy model): the user's overrides describe it
        return []
    return [f"model.net.encoder.name={_ENCODERS[key]}"]


def convert_lseg_state_dict(official: Mapping[str, torch.Tensor], prefix: str = "net.") -> dict[str, torch.Tensor]:
    """Rename an official LSeg state dict (with or without its ``net.`` prefix) into our LightningModule's keys.

    Raises SetupError naming the keys it does not understand.
    """
    state = strip_prefix(official, "net.")
    clip = split_attention_projections(
        {k[len("clip_pretrained.") :]: v for k, v in state.items() if k.startswith("clip_pretrained.")}
    )
    converted = {f"{prefix}clip.model.{k}": v for k, v in clip.items()}
    unknown = []
    for key, value in state.items():
        if key.startswith("clip_pretrained."):
            continue
        ours = _rename(key)
        if ours is None:
            unknown.append(key)
        elif ours:
            converted[prefix + ours] = value
    if unknown:
        raise SetupError(f"Not an LSeg checkpoint layout: {len(unknown)} unknown keys, e.g. {unknown[:5]}.")
    converted[prefix + "log_scale"] = torch.tensor(math.log(1 / 0.07))
    return converted
