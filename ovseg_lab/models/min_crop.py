"""The smallest training crop each model family can segment, read from its (composed, unbuilt) config.

``data.transform.crop_size`` is checked against it before anything runs (:func:`crop_problems`, called by
``config_checks``). The minimum is the side of one cell of the coarsest feature map the family's image path builds
from the crop; below it the whole crop is less than one token (or, for strict backbones, the forward fails):

- CAT-Seg, the cost-volume baseline, OVSeg's CLIP adaptation and OVSeg + SAM: one patch of the CLIP image tower
  (the crop is resized to the tower's input; a crop below one patch has less content than one token).
- LSeg: 32 px, the 1/32 level of its DPT pyramid (``LSegNet`` rounds sides to multiples of 32, at least 32; the
  ResNet encoder and ViT-B/32 end at stride 32), or the ViT's patch if larger.
- OVSeg (MaskFormer proposals): ``size_divisibility`` (MaskFormer pads the crop to multiples of it; the backbone's
  stride-32 map needs one cell). A Swin backbone built with timm's strict image size (its default) accepts only
  its ``img_size``: the padded crop must equal it, or ``model_kwargs.strict_img_size: false`` (as the paper
  recipe sets).
- OVSegmentor / GroupViT: one patch of the group ViT (``image_encoder.patch_size``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

LSEG_PYRAMID_STRIDE = 32  # LSegNet's coarsest level (ovseg_lab.models.lseg.LSegNet.forward rounds to it)


def _get(node: Any, key: str, default: Any = None) -> Any:
    try:
        return OmegaConf.select(node, key, default=default, throw_on_resolution_failure=False)
    except Exception:  # an interpolation that only resolves inside a Hydra run
        return default


def _patch_size(clip: DictConfig) -> int | None:
    """Patch of a CLIP node's image tower, from its custom model_cfg or open_clip's named config (no weights)."""
    patch = _get(clip, "model_cfg.vision_cfg.patch_size")
    if patch is not None:
        return int(patch)
    try:
        import open_clip

        named = open_clip.get_model_config(str(clip.get("model_name")))
    except Exception:
        return None
    return (named or {}).get("vision_cfg", {}).get("patch_size")


def _clip_patch(model: DictConfig) -> tuple[int, str] | None:
    from ovseg_lab.config import CLIP_TARGET, nodes_with_target

    patches = [p for p in (_patch_size(c) for c in nodes_with_target(model, CLIP_TARGET)) if p]
    return (max(patches), "patch of the model's CLIP image tower") if patches else None


def _lseg(model: DictConfig) -> tuple[int, str] | None:
    name = _get(model, "net.encoder.name")
    patch = None
    try:
        from ovseg_lab.models.lseg import ENCODERS

        spec = ENCODERS.get(str(name))
        if spec is not None and _get(model, "net.encoder.tiny") and spec.tiny:
            spec = ENCODERS[spec.tiny]
        if spec is not None and spec.kind == "vit":
            patch = spec.timm_kwargs.get("patch_size") or int(spec.timm_name.split("patch")[1].split("_")[0])
    except Exception:  # an unknown encoder name is refused when the net is built, with its own message
        pass
    if patch and patch > LSEG_PYRAMID_STRIDE:
        return int(patch), f"patch of LSeg's ViT encoder ({name})"
    return LSEG_PYRAMID_STRIDE, "cell of the 1/32 level of LSeg's DPT pyramid"


def _ovseg(model: DictConfig) -> tuple[int, str] | None:
    if _get(model, "net.maskformer") is None:  # CLIP adaptation, SAM proposals: the CLIP tower sees the crop
        return _clip_patch(model)
    divisibility = int(_get(model, "net.maskformer.size_divisibility") or 32)
    return max(divisibility, 32), "MaskFormer's size divisibility (its backbone's stride-32 map)"


def _group_vit(model: DictConfig) -> tuple[int, str] | None:
    patch = _get(model, "net.image_encoder.patch_size")
    return (int(patch), "patch of the group ViT image encoder") if patch else None


MINIMUM_CROP: dict[str, Callable[[DictConfig], tuple[int, str] | None]] = {
    "ovseg_lab.models.catseg.CATSeg": _clip_patch,
    "ovseg_lab.models.costvolume.CostVolumeBaseline": _clip_patch,
    "ovseg_lab.models.lseg.LSegNet": _lseg,
    "ovseg_lab.models.ovseg.OVSeg": _ovseg,
    "ovseg_lab.models.ovsegmentor.OVSegmentor": _group_vit,
}


def minimum_crop(model: DictConfig | None) -> tuple[int, str] | None:
    """(pixels, what they are) for the ``model`` config node, or None for a family without a rule."""
    if model is None:
        return None
    rule = MINIMUM_CROP.get(str(_get(model, "net._target_")))
    return rule(model) if rule is not None else _clip_patch(model)


def _strict_swin_problem(model: DictConfig, sizes: list[int]) -> str | None:
    backbone = _get(model, "net.maskformer.backbone")
    if backbone is None or "swin" not in str(_get(backbone, "name", "")).lower():
        return None
    kwargs = _get(backbone, "model_kwargs") or {}
    if kwargs.get("strict_img_size", True) is False:
        return None
    built = kwargs.get("img_size")
    divisibility = int(_get(model, "net.maskformer.size_divisibility") or 32)
    padded = [math.ceil(s / divisibility) * divisibility for s in sizes]
    if built is None or all(p == built for p in padded):
        return None
    return (
        f"data.transform.crop_size={sizes if len(sizes) > 1 else sizes[0]} pads to {padded[0]} px, but the Swin "
        f"backbone ({backbone.get('name')}) is built for {built} px with timm's strict image size; use a crop "
        f"that pads to {built} or set model.net.maskformer.backbone.model_kwargs.strict_img_size=false"
    )


def crop_problems(model: DictConfig | None, sizes: list[int], crop: Any) -> list[str]:
    """User-facing lines for a training crop (``sizes``: its sides) the chosen model cannot segment."""
    need = minimum_crop(model)
    if need is not None and min(sizes) < need[0]:
        return [
            f"data.transform.crop_size={crop} is below the {need[0]} px {need[1]} (the smallest crop it can segment)"
        ]
    strict = _strict_swin_problem(model, sizes) if model is not None else None
    return [strict] if strict else []
