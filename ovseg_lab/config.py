"""Composing and walking configs: the one home of the config folder, the compose helper and the node walkers.

``conf/`` is found through the package (``ovseg_lab/conf``, a link to the repository's ``conf/`` in a checkout,
the installed copy in a wheel), so editable and ordinary ``pip install .`` installs read the same configs.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parent / "conf"
CLIP_TARGET = "ovseg_lab.clip.CLIPBackbone"
PRETRAINED_FLAGS = ("backbone_pretrained", "pretrained_backbone", "text_pretrained")
# nodes that read files from the hub even for random weights (a tokenizer)
NEEDS_HUB_FILES = ("ovseg_lab.models.text_encoders.BertTextEncoder",)
# files a model initialises from at construction (earlier stages' outputs); a checkpoint already carries them
INIT_FILE_KEYS = ("maskformer_weights", "clip_weights", "init_weights", "init_from", "pretrained_weights")


def compose_config(
    overrides: list[str], config_name: str = "train", *, with_hydra: bool = False, reuse_hydra: bool = False
) -> DictConfig:
    """The config the entry point ``config_name`` would run with these overrides.

    ``with_hydra``: keep the ``hydra`` node (``${hydra:...}`` interpolations, run directories). ``reuse_hydra``:
    inside a running Hydra app (a pipeline stage), compose with that app's search path instead of a fresh one.
    Resolving the result needs our resolvers (``import ovseg_lab.resolvers``, done by every entry point and by
    :mod:`ovseg_lab.build`); importing them here would close a cycle (``${stage:}`` composes its stage)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if reuse_hydra and GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)


def nodes_with_target(node: Any, target: str) -> Iterator[DictConfig]:
    """Every config node (in dicts and lists, at any depth) whose ``_target_`` is ``target``; an outer match hides
    its children. Values that cannot be resolved here (e.g. ``${stage:...}``) are skipped."""
    if isinstance(node, DictConfig):
        if node.get("_target_") == target:
            yield node
            return
        for key in node:
            try:
                child = node[key]
            except Exception:
                continue
            yield from nodes_with_target(child, target)
    elif isinstance(node, ListConfig):
        for item in node:
            yield from nodes_with_target(item, target)


def clip_nodes(node: Any) -> Iterator[DictConfig]:
    """Every CLIP tower a (model) config builds."""
    return nodes_with_target(node, CLIP_TARGET)


def without_pretrained_weights(node: Any) -> None:
    """In place: pretrained=None (and no weights file) on every CLIP node, ``pretrained: true`` and ``*_pretrained``
    flags false elsewhere (timm backbones: LSeg's ViT, OVSeg's Swin / ResNet), timm names to initialise from None
    (OVSegmentor's DINO ViT). ``NEEDS_HUB_FILES`` nodes keep their hub name: BERT needs its tokenizer even with
    random weights."""
    if isinstance(node, DictConfig):
        with open_dict(node):
            if node.get("_target_") == CLIP_TARGET:
                node.pretrained = None
                node.weights = None
            elif node.get("pretrained") is True:
                node.pretrained = False
            elif isinstance(node.get("pretrained"), str) and node.get("_target_") not in NEEDS_HUB_FILES:
                node.pretrained = None  # a timm name to initialise from (OVSegmentor's DINO ViT)
            for key in PRETRAINED_FLAGS:
                if key in node:
                    node[key] = False
        for key in node:
            without_pretrained_weights(node._get_node(key))


def without_init_files(node: Any) -> None:
    """In place: every ``INIT_FILE_KEYS`` entry and every CLIP node's ``weights`` set to None (the checkpoint's
    own weights replace them)."""
    if isinstance(node, DictConfig):
        with open_dict(node):
            for key in INIT_FILE_KEYS:
                if key in node:
                    node[key] = None
            if node.get("_target_") == CLIP_TARGET and "weights" in node:
                node.weights = None
        for key in node:
            without_init_files(node._get_node(key))


def resolved_model_config(cfg: DictConfig) -> DictConfig:
    """The ``model`` node with interpolations resolved and pretrained downloads switched off."""
    clip = cfg.get("clip")
    if isinstance(clip, DictConfig) and "weights" in clip:
        # a stage's output (${stage:...}) needs the run's Hydra context to resolve and is not needed here
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.clip.weights = None
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    without_pretrained_weights(model_cfg)
    return model_cfg


def resolved_yaml(cfg: DictConfig) -> str:
    """The composed config with every interpolation resolved (``config_resolved.yaml``, checkpoints)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


# Groups composed into every run (conf/train.yaml, conf/eval.yaml) that only some models read: the CLIP tower, its
# finetune strategy, CAT-Seg's cost aggregation. A model reads a group when the config interpolates it (``${clip}``,
# ``${clip.image_size}``), directly or through another group it reads (``clip.finetune: ${finetune}``).
METHOD_GROUPS = ("clip", "finetune", "aggregation")
_REFERENCE = re.compile(r"\$\{(?:oc\.select:)?([A-Za-z_]\w*)")


def _references(node: Any) -> set[str]:
    """Top-level keys that the interpolations anywhere under ``node`` name."""
    found: set[str] = set()
    if isinstance(node, (DictConfig, ListConfig)):
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            child = node._get_node(key)
            raw = child._value() if child is not None else None
            if isinstance(raw, str):
                found |= set(_REFERENCE.findall(raw))
            else:
                found |= _references(child)
    return found


def unused_groups(cfg: DictConfig) -> list[str]:
    """The :data:`METHOD_GROUPS` in ``cfg`` that nothing outside them reads (e.g. ``clip`` for OVSegmentor)."""
    present = [g for g in METHOD_GROUPS if g in cfg]
    read: set[str] = set()
    for key in cfg:
        if key not in present and key != "hydra":
            read |= _references(cfg._get_node(key))
    inherited = OmegaConf.select(cfg, "pipeline.inherit", default=None) or []
    read |= {str(k).split(".", 1)[0] for k in inherited}  # values a pipeline hands its stages
    todo = [g for g in present if g in read]
    while todo:
        for ref in _references(cfg._get_node(todo.pop())):
            if ref in present and ref not in read:
                read.add(ref)
                todo.append(ref)
    return [g for g in present if g not in read]


def drop_unused_groups(cfg: DictConfig) -> list[str]:
    """In place: remove the groups nothing reads, so config_resolved.yaml, the loggers and the checkpoint record only
    what the run builds. Returns their names."""
    unused = unused_groups(cfg)
    if unused:
        with open_dict(cfg):
            for group in unused:
                cfg.pop(group)
    return unused
