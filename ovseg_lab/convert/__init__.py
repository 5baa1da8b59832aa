"""Import official checkpoints into ovseg-lab's parameter layout (``scripts/convert_checkpoint.py``).

Each format maps an official state dict to the keys of our LightningModule and names the Hydra overrides of
the model it fits; the result is checked key by key and shape by shape against a model built from config.
A format with a ``part`` converts one sub-module only (e.g. OVSeg's CLIP, loaded by ``model.net.clip_weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from ovseg_lab.convert.catseg import catseg_overrides, convert_catseg_state_dict
from ovseg_lab.convert.groupvit import (
    convert_groupvit_hf_state_dict,
    convert_groupvit_state_dict,
    groupvit_hf_overrides,
    groupvit_overrides,
)
from ovseg_lab.convert.lseg import convert_lseg_state_dict, lseg_overrides
from ovseg_lab.convert.ovseg import (
    convert_ovseg_clip_state_dict,
    convert_ovseg_state_dict,
    ovseg_clip_overrides,
    ovseg_overrides,
)
from ovseg_lab.convert.ovsegmentor import convert_ovsegmentor_state_dict, ovsegmentor_overrides

Converter = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


class Format(NamedTuple):
    converter: Converter
    overrides: list[str]  # the model the official weights belong to
    part: str | None = None  # key prefix of the converted sub-module; None = the whole model
    usage: str = ""  # how to use the written file; {overrides}: the overrides the model was built with
    # overrides read off the official state dict (e.g. which CLIP), placed after ``overrides``
    detect: Callable[[Mapping[str, torch.Tensor]], list[str]] | None = None


FORMATS: dict[str, Format] = {
    # the paper recipe (ViT-B/16 at 384 or ViT-L/14 at 336) and prompt tokens are read off the checkpoint's shapes
    "catseg": Format(
        convert_catseg_state_dict,
        ["model=catseg"],
        usage="python eval.py ckpt={out} {overrides}",
        detect=catseg_overrides,
    ),
    # LSeg's release: ViT-L/16 or ViT-B/32 image encoder (read off the checkpoint), CLIP ViT-B/32 text tower
    "lseg": Format(
        convert_lseg_state_dict,
        ["experiment=lseg_ade20k"],
        usage="python eval.py ckpt={out} {overrides}",
        detect=lseg_overrides,
    ),
    # GroupViT's release (NVlabs .pth, {"model": ...}) and transformers' GroupViTModel layout; sizes read off the file
    "groupvit": Format(
        convert_groupvit_state_dict,
        ["model=groupvit"],
        usage="python eval.py ckpt={out} {overrides}",
        detect=groupvit_overrides,
    ),
    "groupvit_hf": Format(
        convert_groupvit_hf_state_dict,
        ["model=groupvit"],
        usage="python eval.py ckpt={out} {overrides}",
        detect=groupvit_hf_overrides,
    ),
    # OVSegmentor's MultiLabelContrastive (stage 1 or 2): group ViT sizes and BERT size read off the checkpoint,
    # BERT's tokenizer from model.net.text_encoder.pretrained (bert-base-uncased)
    "ovsegmentor": Format(
        convert_ovsegmentor_state_dict,
        ["model=ovsegmentor"],
        usage="python eval.py ckpt={out} {overrides}",
        detect=ovsegmentor_overrides,
    ),
    # the whole OVSeg detectron2 checkpoint (MaskFormer + adapted CLIP): Swin-B + ViT-L/14 or R-101c + ViT-B/16 and
    # the mask prompt depth are read off the checkpoint
    "ovseg": Format(
        convert_ovseg_state_dict,
        ["experiment=ovseg"],
        usage="python eval.py ckpt={out} {overrides}",
        detect=ovseg_overrides,
    ),
    # the released adapted CLIP alone (ViT-L/14 at 224 with mask prompts): model.net.clip_weights of model=ovseg
    "ovseg_clip": Format(
        convert_ovseg_clip_state_dict,
        ["experiment=ovseg"],
        part="net.clip.",
        usage="python eval.py ckpt=<MaskFormer last.ckpt> {overrides} model.net.clip_weights={out}",
        detect=ovseg_clip_overrides,
    ),
}
