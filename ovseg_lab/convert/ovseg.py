"""OVSeg's mask-adapted CLIP (facebookresearch/ov-seg) -> the CLIP weights our OVSeg loads (``model.net.clip_weights``).

Official layouts accepted:

- the released adapted CLIP (``ovseg_clip_l_9a1909.pth``): an open_clip state dict (optionally under
  ``state_dict`` with DDP's ``module.`` prefix, as open_clip's trainer saves it), attention as
  ``attn.in_proj_weight``, mask prompts as ``visual.mask_embedding`` (depth, grid*grid, width);
- the full OVSeg detectron2 checkpoint (``ovseg_swinbase_vitL14_ft_mpt.pth``): its CLIP under
  ``clip_adapter.clip_model.``; the rest (Swin-B MaskFormer, ``clip_adapter.non_object_embedding``, pixel
  statistics) is not part of the CLIP and is left out here.

Result keys: ``net.clip.model.*`` (q/k/v split like :class:`~ovseg_lab.clip.CLIPBackbone`) and
``net.clip.mask_prompts`` -- the layout of ``clip_adapted.pt`` that ``model=ovseg_clip_adapt`` exports.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ovseg_lab.convert.common import split_attention_projections, strip_prefix
from ovseg_lab.errors import SetupError

ADAPTER_PREFIX = "clip_adapter.clip_model."
# parts of the full OVSeg checkpoint that are not the CLIP
_NOT_CLIP = ("backbone.", "sem_seg_head.", "clip_adapter.non_object_embedding", "clip_adapter.pixel_", "criterion.",
             "pixel_mean", "pixel_std", "clip_adapter.text_templates.")
_CLIP_ROOTS = ("visual.", "transformer.", "token_embedding.", "positional_embedding", "text_projection", "ln_final.",
               "logit_scale")


def convert_ovseg_clip_state_dict(official: Mapping[str, torch.Tensor], prefix: str = "net.") -> dict[str, torch.Tensor]:
    """Rename an official OVSeg CLIP (open_clip file or full OVSeg checkpoint) into ``net.clip.*`` keys.

    Raises SetupError naming the keys it does not understand.
    """
    state = strip_prefix(official, "module.")
    if any(k.startswith(ADAPTER_PREFIX) for k in state):
        state = {k[len(ADAPTER_PREFIX):]: v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
        unknown = [k for k in official if not k.startswith(ADAPTER_PREFIX) and not k.startswith(_NOT_CLIP)]
        if unknown:
            raise SetupError(f"Not an OVSeg checkpoint layout: {len(unknown)} unknown keys, e.g. {unknown[:5]}.")
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
