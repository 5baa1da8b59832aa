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
