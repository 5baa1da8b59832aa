"""Shared helpers for checkpoint conversion: loading official files safely, checking the result."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ovseg_lab.checkpoints import describe_differences, differences, read_checkpoint, state_dict_of
from ovseg_lab.errors import SetupError


def load_official(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from an official checkpoint file (weights only; detectron2 {"model": ...} unwrapped)."""
    return state_dict_of(read_checkpoint(path, "official checkpoint", "--input"), str(path))


def check_against(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a conversion whose keys or shapes differ from the target model's state dict."""
    missing, unexpected, mismatched = differences(expected, converted)
    if missing or unexpected or mismatched:
        raise SetupError(
            f"{source} does not match the configured model: "
            f"{describe_differences(expected, converted, sorted(missing), sorted(unexpected), sorted(mismatched), 4)}. "
            "Check the clip/model overrides (e.g. clip=vitl14 for a ViT-L checkpoint)."
        )


def lightning_checkpoint(
    state_dict: Mapping[str, torch.Tensor], net_class: str, config_yaml: str | None = None
) -> dict[str, Any]:
    """Wrap a state dict the way our checkpoints look, so eval.py ckpt=... reads it."""
    ckpt: dict[str, Any] = {"state_dict": dict(state_dict), "ovseg_net_class": net_class, "converted": True}
    if config_yaml is not None:
        ckpt["ovseg_config"] = config_yaml
    return ckpt


def split_attention_projections(clip_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI / open_clip attention (``attn.in_proj_weight`` (3C, C)) -> our q/k/v split (``attn.q_proj_weight``, ...).

    The shared ``in_proj_bias`` keeps its name: :class:`~ovseg_lab.clip.CLIPBackbone` splits only the weights.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in clip_state.items():
        if key.endswith("attn.in_proj_weight"):
            stem = key[: -len("in_proj_weight")]
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[f"{stem}{name}_proj_weight"] = part.clone()
        else:
            out[key] = value
    return out


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from the keys that all start with it (DDP's ``module.``, Lightning's ``net.``)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)
