"""Building models outside the training entry point: from Hydra overrides or from a checkpoint.

Both paths construct pretrained-weight nodes with random initialisation (nothing is downloaded): counting
parameters needs no weights, and a checkpoint carries its own. Composing and walking configs is
:mod:`ovseg_lab.config`; reading checkpoints is :mod:`ovseg_lab.checkpoints` (both re-exported here for callers
that import them from this module).
"""

from __future__ import annotations

import ovseg_lab.resolvers  # noqa: F401  (a composed config resolves ${stage:} etc.)
from ovseg_lab.checkpoints import match_optional_parameters, model_from_checkpoint
from ovseg_lab.config import (
    CONF_DIR,
    INIT_FILE_KEYS,
    NEEDS_HUB_FILES,
    PRETRAINED_FLAGS,
    compose_config,
    resolved_model_config,
    without_init_files,
    without_pretrained_weights,
)

__all__ = [
    "CONF_DIR",
    "INIT_FILE_KEYS",
    "NEEDS_HUB_FILES",
    "PRETRAINED_FLAGS",
    "build_net",
    "compose_config",
    "match_optional_parameters",
    "model_from_checkpoint",
    "resolved_model_config",
    "training_free_model",
    "without_init_files",
    "without_pretrained_weights",
]


def build_net(overrides: list[str], init_files: bool = True):
    """The network (``model.net``) of a composed config, with random weights; ``init_files=False`` also skips the
    files it would initialise from (earlier stages' outputs, e.g. OVSeg's MaskFormer), for counting or building
    a paper model before those stages ran."""
    from hydra.utils import instantiate

    model_cfg = resolved_model_config(compose_config(overrides))
    if not init_files:
        without_init_files(model_cfg)
    return instantiate(model_cfg.net if "net" in model_cfg else model_cfg)


def training_free_model(name: str, overrides: list[str] | tuple = ()):
    """(LightningModule, config) of ``model=<name>`` built from its CLIP weights alone, for a net that declares
    ``needs_checkpoint = False`` (the training-free methods); a pretrained tag that is not on this machine is one
    paragraph naming ``clip.pretrained=<file>`` before anything is downloaded."""
    from hydra.utils import get_class, instantiate

    from ovseg_lab.clip.loading import pretrained_cached
    from ovseg_lab.errors import SetupError

    cfg = compose_config(["task_name=predict", f"model={name}", *overrides], "eval")
    target = cfg.model.get("net", {}).get("_target_")
    if not target or getattr(get_class(target), "needs_checkpoint", True):
        raise SetupError(
            f"model={name} has weights of its own to train: give --checkpoint <last.ckpt> (a run of train.py, or an "
            "official checkpoint converted with scripts/convert_checkpoint.py). --model runs only the training-free "
            "models (maskclip, sclip, clearclip, naclip)."
        )
    clip = cfg.get("clip", {})
    if clip.get("model_cfg") is None and pretrained_cached(clip.get("model_name"), clip.get("pretrained")) is False:
        raise SetupError(
            f"model={name} is training-free: its only weights are CLIP's, {clip.get('model_name')} "
            f"'{clip.get('pretrained')}', which are not on this machine and cannot be downloaded here. Point "
            "clip.pretrained=<file> at a local copy (OpenAI's ViT-B-16.pt or an open_clip checkpoint of that "
            "architecture), e.g. `ovseg-predict --model clearclip clip.pretrained=~/ViT-B-16.pt --image photo.jpg "
            '--classes "cat,sofa"`, or run once with internet so open_clip caches them.'
        )
    from omegaconf import OmegaConf

    # resolved as it is, pretrained weights included: they are the whole model
    module = instantiate(OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True)))
    module.eval()
    return module, cfg
