"""CLIP towers over open_clip: dense features, fine-tuning strategies, prompts and the text cache."""

from ovseg_lab.clip.attention import SplitQKVAttention
from ovseg_lab.clip.backbone import CLIPBackbone, DenseFeatures
from ovseg_lab.clip.finetune import STRATEGIES, FinetuneSpec
from ovseg_lab.clip.prompts import resolve_templates, template_sets

__all__ = [
    "CLIPBackbone",
    "DenseFeatures",
    "FinetuneSpec",
    "STRATEGIES",
    "SplitQKVAttention",
    "resolve_templates",
    "template_sets",
]
