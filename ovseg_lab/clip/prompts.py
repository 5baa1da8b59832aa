"""Prompt templates and class-name handling for the CLIP text tower.

Template sets (data from the public releases, packaged in ``assets/prompt_templates.json``):

- ``catseg``: the single template of the shipped CAT-Seg configs, "A photo of a {} in the scene" (P=1).
- ``imagenet80``: the 80 ImageNet templates of CLIP (the P=80 setting discussed in CAT-Seg).
- ``vild14``: the 14 ViLD templates of the OVSeg release.
- ``vild63``: the 63 ViLD templates of the CAT-Seg release.
- ``photo``: "a photo of a {}." (OVSegmentor / SAM demo).
- ``raw``: the class name alone (LSeg).

A config may also give an explicit list of templates, each containing ``{}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib import resources

from ovseg_lab.errors import SetupError

SYNONYM_MODES = ("first", "mean", "full")


@cache
def _packaged_templates() -> dict[str, list[str]]:
    path = resources.files("ovseg_lab") / "assets" / "prompt_templates.json"
    return json.loads(path.read_text())


def template_sets() -> dict[str, tuple[str, ...]]:
    packaged = _packaged_templates()
    return {
        "catseg": ("A photo of a {} in the scene",),
        "imagenet80": tuple(packaged["IMAGENET_TEMPLATES"]),
        "imagenet_select8": tuple(packaged["IMAGENET_TEMPLATES_SELECT"]),
        "vild14": tuple(packaged["ovseg_VILD_PROMPT"]),
        "vild63": tuple(packaged["ViLD_templates"]),
        "photo": ("a photo of a {}.",),
        "raw": ("{}",),
    }


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A template-set name or an explicit list -> a tuple of templates, each with one ``{}``."""
    if isinstance(templates, str):
        sets = template_sets()
        if templates not in sets:
            raise SetupError(f"Unknown prompt template set '{templates}'; choose one of {sorted(sets)} or give a list.")
        resolved = sets[templates]
    else:
        resolved = tuple(str(t) for t in templates)
    if not resolved:
        raise SetupError("The prompt template list is empty.")
    bad = [t for t in resolved if t.count("{}") != 1]
    if bad:
        raise SetupError(f"Prompt templates must contain exactly one '{{}}': {bad[:3]}")
    return resolved


def class_synonyms(name: str, mode: str) -> tuple[str, ...]:
    """Names to embed for one class.

    ADE-847 and PC-459 names are WordNet synonym strings ("building, edifice"). ``first`` keeps only the
    first synonym (CAT-Seg), ``mean`` embeds each synonym and averages, ``full`` uses the string as is.
    """
    if mode not in SYNONYM_MODES:
        raise SetupError(f"Unknown synonym mode '{mode}'; choose one of {SYNONYM_MODES}.")
    if mode == "full":
        return (name,)
    parts = tuple(p.strip() for p in name.split(",") if p.strip()) or (name,)
    return parts[:1] if mode == "first" else parts
