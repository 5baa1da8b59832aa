"""Building models outside the training entry point: from Hydra overrides or from a checkpoint.

Both paths construct pretrained-weight nodes with random initialisation (nothing is downloaded): counting
parameters needs no weights, and a checkpoint carries its own.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ovseg_lab.config_checks import CLIP_TARGET
from ovseg_lab.errors import SetupError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PRETRAINED_FLAGS = ("backbone_pretrained", "pretrained_backbone", "text_pretrained")
# nodes that read files from the hub even for random weights (a tokenizer)
NEEDS_HUB_FILES = ("ovseg_lab.models.text_encoders.BertTextEncoder",)
# files a model initialises from at construction (earlier stages' outputs); a checkpoint already carries them
INIT_FILE_KEYS = ("maskformer_weights", "clip_weights", "init_weights", "init_from", "pretrained_weights")


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The config ``train.py`` would run with these overrides (no Hydra run directory involved)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import ovseg_lab.resolvers  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


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


def match_optional_parameters(module, state: dict) -> None:
    """Drop optional parameters the checkpoint was trained without, so its keys match the rebuilt module.

    OVSeg: a CLIP adapted without mask prompt tuning has no ``mask_prompts``; the training run removed them when
    it loaded that CLIP from ``clip_weights``, which a rebuild from the checkpoint no longer does.
    """
    for name, sub in module.named_modules():
        if getattr(sub, "mask_prompts", None) is not None and f"{name}.mask_prompts" not in state:
            sub.mask_prompts = None


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


def build_net(overrides: list[str], init_files: bool = True):
    """The network (``model.net``) of a composed config, with random weights; ``init_files=False`` also skips the
    files it would initialise from (earlier stages' outputs, e.g. OVSeg's MaskFormer), for counting or building
    a paper model before those stages ran."""
    from hydra.utils import instantiate

    model_cfg = resolved_model_config(compose_config(overrides))
    if not init_files:
        without_init_files(model_cfg)
    return instantiate(model_cfg.net if "net" in model_cfg else model_cfg)


def model_from_checkpoint(path: str | Path):
    """(LightningModule with the checkpoint's weights, its stored config) for prediction and notebooks."""
    from hydra.utils import instantiate

    from ovseg_lab.runner import load_weights, read_checkpoint

    checkpoint = read_checkpoint(path)
    config_yaml = checkpoint.get("ovseg_config")
    if not config_yaml:
        raise SetupError(
            f"{path} carries no ovseg-lab config (ovseg_config): it was not written by train.py or "
            "scripts/convert_checkpoint.py. Convert official checkpoints first."
        )
    import ovseg_lab.resolvers  # noqa: F401

    cfg = OmegaConf.create(config_yaml)
    model_cfg = resolved_model_config(cfg)
    without_init_files(model_cfg)
    module = instantiate(model_cfg)
    match_optional_parameters(module, checkpoint.get("state_dict", {}))
    load_weights(module, checkpoint)
    module.eval()
    return module, cfg
