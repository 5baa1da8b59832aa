"""Initialising a module from a weights file: a Lightning checkpoint or a plain state dict, keys picked by prefix,
every mismatch named in one message instead of a load_state_dict dump."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ovseg_lab.errors import SetupError


def load_state_from(path: str | os.PathLike, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """A state dict from a file (plain or Lightning checkpoint), keeping the keys under the first matching prefix
    (stripped). An empty prefix keeps everything."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise SetupError(f"Weights file not found: {path}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or pickled objects
        raise SetupError(f"Cannot read weights {path}: {type(err).__name__}: {err}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise SetupError(f"{path} holds no state dict.")
    for prefix in prefixes:
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            return picked
    raise SetupError(f"{path} has no weights under {list(prefixes)} (keys look like {list(state)[:3]}).")


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str, hint: str = "") -> None:
    """``module.load_state_dict(state)`` when every key and shape fits; otherwise one message naming the file
    (``source``), what it was for (``what``) and a few keys of each kind of mismatch, then ``hint``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise SetupError(
            f"{what} weights {source} do not fit the configured model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(mismatched)} with other shapes "
            f"(e.g. {mismatched[:3]}).{hint}"
        )
    module.load_state_dict(state)
