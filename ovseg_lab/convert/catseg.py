"""Official CAT-Seg checkpoints (detectron2 ``model_final.pth``) -> our CATSeg parameter names.

Official layout (cvlab-kaist/CAT-Seg): the CLIP model (OpenAI layout, attention split into
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` + shared ``in_proj_bias``, prompt tokens in
``visual.transformer.prompt_tokens``) under ``sem_seg_head.predictor.clip_model.``, the aggregator under
``sem_seg_head.predictor.transformer.``, and the two intermediate-layer upsamplers as top-level
``upsample1`` / ``upsample2``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ovseg_lab.errors import SetupError

CLIP_PREFIX = "sem_seg_head.predictor.clip_model."
AGG_PREFIX = "sem_seg_head.predictor.transformer."

# (official pattern relative to the aggregator, our name relative to net.head); applied in order
_AGGREGATOR_RULES: list[tuple[str, str]] = [
    (r"conv1\.", "cost_embedding."),
    (r"guidance_projection\.0\.", "appearance_guidance.0."),
    (r"text_guidance_projection\.0\.", "text_guidance.0."),
    (r"decoder_guidance_projection\.(\d)\.0\.", r"decoder_guidance.\1.0."),
    (r"decoder(\d)\.up\.", r"decoder\1.up."),
    (r"decoder(\d)\.conv\.double_conv\.", r"decoder\1.conv.block."),
    (r"head\.", "head."),
    (r"layers\.(\d+)\.swin_block\.block_(\d)\.", r"spatial_layers.\1.block\2."),
    (r"layers\.(\d+)\.swin_block\.guidance_norm\.", r"spatial_layers.\1.guidance_norm."),
    (r"layers\.(\d+)\.attention\.attention\.", r"class_layers.\1.attention."),
    (r"layers\.(\d+)\.attention\.MLP\.", r"class_layers.\1.mlp."),
    (r"layers\.(\d+)\.attention\.(norm\d|padding_tokens|padding_guidance)", r"class_layers.\1.\2"),
]
# buffers of the official code that are recomputed here
_DROPPED = re.compile(r"(attn_mask$|pixel_mean$|pixel_std$|clip_pixel_mean$|clip_pixel_std$)")


def _aggregator_key(rest: str) -> str | None:
    for pattern, replacement in _AGGREGATOR_RULES:
        if re.match(pattern, rest):
            return re.sub("^" + pattern, replacement, rest, count=1)
    return None


# the released models, told apart by the CLIP patch embedding (width, 3, patch, patch) -> the paper recipe they
# belong to (its clip group, and the official evaluation: top-256 truncation, protocol, six benchmarks)
_RELEASED = {(768, 16): "experiment=catseg_vitb16_coco", (1024, 14): "experiment=catseg_vitl14_coco"}


def catseg_overrides(official: Mapping[str, torch.Tensor]) -> list[str]:
    """The Hydra overrides of the model an official CAT-Seg checkpoint belongs to, read off its shapes.

    ViT-B/16 (patch embedding (768, 3, 16, 16)) -> ``experiment=catseg_vitb16_coco``, ViT-L/14@336 ->
    ``experiment=catseg_vitl14_coco``; visual prompt tokens (depth, length, width) -> ``finetune=prompt`` with that
    length and depth. Other CLIPs: nothing (the user names the clip group after ``--``).
    """
    overrides = []
    patch = official.get(CLIP_PREFIX + "visual.conv1.weight")
    if patch is not None and (int(patch.shape[0]), int(patch.shape[-1])) in _RELEASED:
        overrides.append(_RELEASED[(int(patch.shape[0]), int(patch.shape[-1]))])
    prompts = official.get(CLIP_PREFIX + "visual.transformer.prompt_tokens")
    if prompts is not None:
        depth, length = int(prompts.shape[0]), int(prompts.shape[1])
        overrides += ["finetune=prompt", f"finetune.prompt_length={length}", f"finetune.prompt_depth={depth}"]
    return overrides


def convert_catseg_state_dict(official: Mapping[str, torch.Tensor], prefix: str = "net.") -> dict[str, torch.Tensor]:
    """Rename an official CAT-Seg state dict into ours (keys of the LightningModule when ``prefix='net.'``).

    Raises SetupError naming the keys it does not understand.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in official.items():
        if _DROPPED.search(key):
            continue
        if key.startswith(CLIP_PREFIX):
            rest = key[len(CLIP_PREFIX) :]
            if rest == "visual.transformer.prompt_tokens":
                converted[prefix + "clip.visual_prompts"] = value
            else:
                converted[prefix + "clip.model." + rest] = value
        elif key.startswith(AGG_PREFIX):
            ours = _aggregator_key(key[len(AGG_PREFIX) :])
            if ours is None:
                unknown.append(key)
            else:
                converted[prefix + "head." + ours] = value
        elif key.startswith(("upsample1.", "upsample2.")):
            converted[prefix + "head." + key] = value
        else:
            unknown.append(key)
    if unknown:
        raise SetupError(f"Not a CAT-Seg checkpoint layout: {len(unknown)} unknown keys, e.g. {unknown[:5]}.")
    return converted
