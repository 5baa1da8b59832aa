"""The one place that reads checkpoints and weight files.

Every loading path goes through here: resuming (``ckpt_path``), evaluating (``ckpt=``), predicting, a stage's
output read by the next stage (``init_from``, ``clip_weights``, ``maskformer_weights``, ``clip.weights``),
OVSeg mining (``proposals_ckpt``), checkpoint conversion and local CLIP weight files (``clip.pretrained``).

- :func:`read_checkpoint`: ``torch.load(weights_only=True)``; a missing, empty, truncated (a run killed while
  saving, a full disk, an interrupted copy) or corrupt file, or one that pickles Python objects, becomes one
  :class:`SetupError` paragraph naming the file and the config key, never a ``PytorchStreamReader`` traceback.
- :func:`state_dict_of`, :func:`pick_prefix`, :func:`read_weights`: the tensors, keys picked by prefix.
- :func:`differences`, :func:`check_fits`, :func:`load_into`, :func:`load_weights`: missing / unexpected /
  other-shape keys named in one message instead of a ``load_state_dict`` dump.
- :func:`model_from_checkpoint`, :func:`net_from_checkpoint`: a model rebuilt from the config a checkpoint
  carries (``ovseg_config``) and loaded with its weights.

Writing checkpoints (atomically) is :mod:`ovseg_lab.lit.checkpoint_io`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ovseg_lab.errors import SetupError


def _expand(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(path)))


def _where(path: Path, key: str | None) -> str:
    return f"{path} ({key})" if key else str(path)


def unreadable_message(path: Path, err: BaseException, what: str = "checkpoint", key: str | None = None) -> str:
    """One paragraph: which file could not be read, the first line of torch's reason, and what to do."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    detail = f"{type(err).__name__}: {reason.rstrip('.')}" if reason else type(err).__name__
    if "weights only load failed" in str(err).lower() or "weights_only" in reason:
        cause = (
            "It holds Python objects other than tensors and plain containers, which ovseg-lab refuses to "
            "unpickle (checkpoints load with torch.load(weights_only=True)); re-save its state dict alone."
        )
    else:
        cause = (
            "The file is truncated or corrupt (a run killed while saving, a full disk, an interrupted copy or "
            "download): copy or convert it again, or point at another checkpoint (for a run, ckpt_path= one "
            "of its other checkpoints)."
        )
    return f"Cannot read the {what} {_where(path, key)}: {detail}. {cause}"


def read_checkpoint(
    path: str | os.PathLike,
    what: str = "checkpoint",
    key: str | None = None,
    map_location: Any = "cpu",
    torchscript_ok: bool = False,
) -> dict[str, Any]:
    """The dict a checkpoint file holds, read with ``weights_only=True``.

    ``what`` / ``key`` name the file in errors ("stage checkpoint", "model.init_from"). ``torchscript_ok``:
    OpenAI's original CLIP ``.pt`` files are TorchScript archives; open_clip reads those into a state dict."""
    path = _expand(path)
    if not path.is_file():
        raise SetupError(f"The {what} {_where(path, key)} was not found.")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        if torchscript_ok and "TorchScript" in str(err):
            obj = _read_torchscript(path, what, key)
        else:
            raise SetupError(unreadable_message(path, err, what, key)) from None
    if not isinstance(obj, dict):
        raise SetupError(f"The {what} {_where(path, key)} holds a {type(obj).__name__}, not a state dict.")
    return obj


def _read_torchscript(path: Path, what: str, key: str | None) -> dict[str, Any]:
    import open_clip

    try:
        return open_clip.load_state_dict(str(path))
    except Exception as err:
        raise SetupError(unreadable_message(path, err, what, key)) from None


def state_dict_of(checkpoint: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a Lightning ``state_dict``, detectron2's ``model`` or a plain state dict."""
    state: Any = checkpoint
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SetupError(f"{source} does not hold a state dict of tensors.")
    return dict(state)


def pick_prefix(state: Mapping[str, torch.Tensor], prefixes: Sequence[str], source: str) -> dict[str, torch.Tensor]:
    """The keys under the first prefix that has any, with the prefix stripped (``""`` keeps everything)."""
    for prefix in prefixes:
        picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            return picked
    raise SetupError(f"{source} has no weights under {list(prefixes)} (keys look like {list(state)[:3]}).")


def read_weights(
    path: str | os.PathLike,
    prefixes: Sequence[str] = ("",),
    what: str = "weights file",
    key: str | None = None,
    torchscript_ok: bool = False,
) -> dict[str, torch.Tensor]:
    """The state dict of a file (plain, Lightning or detectron2 checkpoint), keys picked by ``prefixes``."""
    source = _where(_expand(path), key)
    checkpoint = read_checkpoint(path, what, key, torchscript_ok=torchscript_ok)
    return pick_prefix(state_dict_of(checkpoint, source), prefixes, source)


def load_state_from(path: str | os.PathLike, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """:func:`read_weights` under the name the model files use."""
    return read_weights(path, prefixes)


def differences(own: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, other-shape) keys of ``state`` against a module's ``own`` state dict."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        k for k in own if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, mismatched


def describe_differences(
    own: Mapping[str, Any],
    state: Mapping[str, Any],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
    examples: int = 3,
) -> str:
    """ "N missing keys (e.g. ...), N unexpected (e.g. ...), N with other shapes (e.g. key: (a) here vs (b))"."""
    shapes = [f"{k}: {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} here" for k in mismatched[:examples]]
    return (
        f"{len(missing)} missing keys (e.g. {missing[:examples]}), {len(unexpected)} unexpected "
        f"(e.g. {unexpected[:examples]}), {len(mismatched)} with other shapes (e.g. {shapes})"
    )


def load_into(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    what: str,
    hint: str = "",
    ignore_missing: Callable[[str], bool] | None = None,
) -> None:
    """``module.load_state_dict(state)`` when every key and shape fits; otherwise one message naming the file
    (``source``), what it was for (``what``) and a few keys of each kind of mismatch, then ``hint``.
    ``ignore_missing(key)``: keys the module may keep as initialised (e.g. a momentum encoder)."""
    own = module.state_dict()
    missing, unexpected, mismatched = differences(own, state)
    if ignore_missing is not None:
        missing = [k for k in missing if not ignore_missing(k)]
    if missing or unexpected or mismatched:
        raise SetupError(
            f"{what} weights {source} do not fit the configured model: "
            f"{describe_differences(own, state, missing, unexpected, mismatched)}.{hint}"
        )
    module.load_state_dict(state, strict=ignore_missing is None)


def check_fits(model: nn.Module, checkpoint: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The checkpoint's state_dict, after checking it has exactly the model's keys and shapes (SetupError)."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise SetupError(f"{where} holds no state_dict.")
    own = model.state_dict()
    missing, unexpected, mismatched = differences(own, state)
    if missing or unexpected or mismatched:
        trained_with = checkpoint.get("ovseg_net_class", "an unknown model")
        net = getattr(model, "net", model)
        raise SetupError(
            f"{where} does not fit the configured model {type(net).__module__}.{type(net).__qualname__} "
            f"(it was trained with {trained_with}): {describe_differences(own, state, missing, unexpected, mismatched)}. "
            "Pass the same model/clip/experiment overrides used for training "
            "(a different shape often means another vocabulary size or CLIP variant)."
        )
    return state


def load_weights(model: nn.Module, source: str | Path | dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """Load a checkpoint's weights (path or already-read dict) into ``model``, with a clear message on mismatch;
    ``where`` names it in that message."""
    checkpoint = source if isinstance(source, dict) else read_checkpoint(source, key="ckpt")
    if where is None:
        where = "the checkpoint" if isinstance(source, dict) else f"Checkpoint {source} (ckpt)"
    model.load_state_dict(check_fits(model, checkpoint, where))
    return checkpoint


def stored_config(checkpoint: Mapping[str, Any], path: str | os.PathLike):
    """The run config a checkpoint carries (``ovseg_config``, written by train.py and convert_checkpoint.py)."""
    from omegaconf import OmegaConf

    config_yaml = checkpoint.get("ovseg_config")
    if not config_yaml:
        raise SetupError(
            f"{path} carries no ovseg-lab config (ovseg_config): it was not written by train.py or "
            "scripts/convert_checkpoint.py. Convert official checkpoints first."
        )
    import ovseg_lab.resolvers  # noqa: F401  (a stored config may use ${auto_precision:} etc.)

    return OmegaConf.create(config_yaml)


def match_optional_parameters(module: nn.Module, state: Mapping[str, Any]) -> None:
    """Drop optional parameters the checkpoint was trained without, so its keys match the rebuilt module.

    OVSeg: a CLIP adapted without mask prompt tuning has no ``mask_prompts``; the training run removed them when
    it loaded that CLIP from ``clip_weights``, which a rebuild from the checkpoint no longer does.
    """
    for name, sub in module.named_modules():
        if getattr(sub, "mask_prompts", None) is not None and f"{name}.mask_prompts" not in state:
            sub.mask_prompts = None


def model_from_checkpoint(path: str | os.PathLike, key: str = "--checkpoint"):
    """(LightningModule with the checkpoint's weights, its stored config) for prediction and notebooks."""
    from hydra.utils import instantiate

    from ovseg_lab.config import resolved_model_config, without_init_files

    checkpoint = read_checkpoint(path, key=key)
    cfg = stored_config(checkpoint, path)
    model_cfg = resolved_model_config(cfg)
    without_init_files(model_cfg)
    module = instantiate(model_cfg)
    match_optional_parameters(module, checkpoint.get("state_dict", {}))
    load_weights(module, checkpoint)
    module.eval()
    return module, cfg


def net_from_checkpoint(
    path: str | os.PathLike, what: str, key: str, edit: Callable[[Any], None] | None = None
) -> nn.Module:
    """The network (``model.net``) of a training checkpoint, rebuilt from its stored config with the files it
    initialised from switched off (the checkpoint holds those weights), then loaded with its ``net.`` weights.
    ``edit(net_cfg)`` may change inference-only values before the build (e.g. a mask threshold)."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from ovseg_lab.config import without_init_files, without_pretrained_weights

    checkpoint = read_checkpoint(path, what, key)
    cfg = stored_config(checkpoint, path)
    if "net" not in cfg.get("model", {}):
        raise SetupError(f"The {what} {_where(_expand(path), key)} stores no model.net config.")
    net_cfg = cfg.model.net
    without_init_files(net_cfg)
    without_pretrained_weights(net_cfg)  # the checkpoint holds the CLIP weights
    if edit is not None:
        with open_dict(net_cfg):
            edit(net_cfg)
    net = instantiate(net_cfg)
    source = _where(_expand(path), key)
    load_into(net, pick_prefix(state_dict_of(checkpoint, source), ("net.",), source), source, what)
    return net
