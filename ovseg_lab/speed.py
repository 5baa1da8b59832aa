"""Speed options that change how a network computes, never what: applied to a built model, each tested for
equal outputs against the plain path (tests/test_speed.py).

Config node ``speed`` (conf/speed/default.yaml), applied by the runner after the model is built:

- ``attention``: ``sdpa`` (fused kernels, default) or ``math`` (the reference softmax(q k^T) v). Switches our
  attention layers and timm's (``fused_attn``) and Hugging Face models (``attn_implementation``). MaskFormer's
  ``nn.MultiheadAttention`` always goes through PyTorch's SDPA (called with ``need_weights=False``).
- ``channels_last``: NHWC memory layout for convolution weights and 4-D inputs of the net (faster convolutions
  on GPUs with tensor cores; pays where convolutions dominate: LSeg's DPT decoder, MaskFormer's backbone and
  pixel decoder, CAT-Seg's upsampling decoder).
- ``compile``: ``torch.compile`` the net in place (state-dict keys unchanged), with ``compile_mode`` and
  ``compile_backend``.

Other speed switches live with the model they belong to (listed in docs/performance.md): text-embedding cache
``clip.cache_text``, batched sliding windows ``model.inference.batch_windows``, CAT-Seg's ``model.net.class_chunk``,
OVSeg's ``model.net.region_batch``; bf16 autocast is the trainer's ``trainer.precision`` (bf16-mixed on GPUs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ovseg_lab.errors import SetupError

ATTENTION_IMPLS = ("sdpa", "math")


@dataclass(frozen=True)
class SpeedConfig:
    attention: str = "sdpa"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLS:
            raise SetupError(f"speed.attention must be one of {ATTENTION_IMPLS}, got '{self.attention}'.")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | SpeedConfig | None) -> SpeedConfig:
        if cfg is None:
            return cls()
        if isinstance(cfg, SpeedConfig):
            return cfg
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise SetupError(f"Unknown speed option(s) {unknown}; known: {sorted(known)}.")
        return cls(**dict(cfg))


def set_attention(module: nn.Module, impl: str) -> int:
    """Switch every attention layer under ``module`` to ``impl`` (sdpa | math); returns how many were switched."""
    if impl not in ATTENTION_IMPLS:
        raise SetupError(f"attention implementation must be one of {ATTENTION_IMPLS}, got '{impl}'.")
    fused = impl == "sdpa"
    switched = 0
    for sub in module.modules():
        if hasattr(sub, "fused_attn") and isinstance(sub.fused_attn, bool):  # ours and timm's
            sub.fused_attn = fused
            switched += 1
        elif hasattr(sub, "set_attn_implementation") and getattr(sub, "config", None) is not None:  # transformers
            sub.set_attn_implementation("sdpa" if fused else "eager")
            switched += 1
    return switched


def _channels_last_inputs(_module: nn.Module, args: tuple) -> tuple:
    return tuple(
        a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a
        for a in args
    )


def use_channels_last(net: nn.Module) -> nn.Module:
    """4-D weights and the net's 4-D tensor inputs in channels_last layout (values unchanged)."""
    net.to(memory_format=torch.channels_last)
    if not getattr(net, "_channels_last_hook", False):
        net.register_forward_pre_hook(_channels_last_inputs)
        net._channels_last_hook = True
    return net


def apply_speed(model: nn.Module, cfg: Mapping[str, Any] | SpeedConfig | None) -> nn.Module:
    """Apply the speed options to a LightningModule (its ``net``) or a bare net, in place; returns ``model``."""
    speed = SpeedConfig.from_config(cfg)
    net = getattr(model, "net", model)
    set_attention(net, speed.attention)
    if speed.channels_last:
        use_channels_last(net)
    if speed.compile:
        # in place: the module keeps its parameters and state-dict keys, so checkpoints stay interchangeable
        net.compile(mode=speed.compile_mode, backend=speed.compile_backend, dynamic=None)
    return model
