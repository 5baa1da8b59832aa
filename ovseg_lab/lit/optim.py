"""Optimizer parameter groups and learning-rate schedules shared by every recipe."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _backbone_modules(module: nn.Module) -> list[nn.Module]:
    """Submodules trained with the backbone learning-rate multiplier (the CLIP towers)."""
    from ovseg_lab.clip import CLIPBackbone

    return [m for m in module.modules() if isinstance(m, CLIPBackbone) or getattr(m, "is_backbone", False)]


WEIGHT_DECAY_RULES = ("types", "one_dim")


def one_dim_no_decay(name: str, param: torch.Tensor) -> bool:
    """GroupViT's / OVSegmentor's exemption from weight decay (utils/optimizer.py ``set_weight_decay``): every
    parameter of exactly one dimension and every ``.bias``; everything else decays, embedding tables, position
    embeddings, group tokens and the 0-dimensional logit scales included."""
    return param.ndim == 1 or name.endswith(".bias")


def build_param_groups(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_multiplier: float = 1.0,
    weight_decay_norm: float | None = 0.0,
    weight_decay_embed: float | None = 0.0,
    weight_decay_rule: str = "types",
    no_decay_names: Iterable[str] = (),
) -> list[dict]:
    """Trainable parameters grouped by (lr, weight decay), detectron2-style.

    Parameters inside CLIP towers (or modules flagged ``is_backbone``) get ``lr * backbone_lr_multiplier``;
    parameters inside a module with a float attribute ``lr_multiplier`` (e.g. LSeg's decoder, 10x) have their
    lr multiplied by it (the innermost such module wins). Weight decay by ``weight_decay_rule``: ``types``
    (ours) gives parameters of normalisation layers ``weight_decay_norm`` and of ``nn.Embedding``
    ``weight_decay_embed`` (None: the general weight decay); ``one_dim`` is the GroupViT / OVSegmentor
    releases' rule (:func:`one_dim_no_decay`: no decay for 1-D parameters and biases, the general one otherwise).
    Under ``types``, parameters whose own name (inside their module) contains one of ``no_decay_names`` get none
    (OVSeg's ``build_optimizer``: Swin's ``relative_position_bias_table``).
    """
    if weight_decay_rule not in WEIGHT_DECAY_RULES:
        raise ValueError(f"unknown weight_decay_rule {weight_decay_rule!r} (one of {WEIGHT_DECAY_RULES})")
    no_decay_names = tuple(no_decay_names)
    names = {id(p): n for n, p in module.named_parameters()}
    backbone_ids = {id(p) for m in _backbone_modules(module) for p in m.parameters()}
    module_multiplier: dict[int, float] = {}
    for submodule in module.modules():  # parents come before children, so inner flags overwrite outer ones
        factor = getattr(submodule, "lr_multiplier", None)
        if isinstance(factor, (int, float)) and not isinstance(factor, bool):
            module_multiplier.update({id(p): float(factor) for p in submodule.parameters()})
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for submodule in module.modules():
        for name, param in submodule.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            decay = 0.0 if any(n in name for n in no_decay_names) else weight_decay
            if weight_decay_rule == "one_dim":
                decay = 0.0 if one_dim_no_decay(names[id(param)], param) else weight_decay
            elif isinstance(submodule, NORM_TYPES) and weight_decay_norm is not None:
                decay = weight_decay_norm
            elif isinstance(submodule, nn.Embedding) and weight_decay_embed is not None:
                decay = weight_decay_embed
            group_lr = lr * backbone_lr_multiplier if id(param) in backbone_ids else lr
            group_lr *= module_multiplier.get(id(param), 1.0)
            groups.setdefault((group_lr, decay), []).append(param)
    return [{"params": params, "lr": group_lr, "weight_decay": decay} for (group_lr, decay), params in groups.items()]


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    kind: str = "cosine",
    warmup_steps: int = 0,
    warmup_factor: float = 0.001,
    power: float = 0.9,
    min_factor: float = 0.0,
    style: str = "scaled",
    steps_per_epoch: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up from ``warmup_factor``, then cosine / poly decay (to ``min_factor``) or
    constant; factors are of each parameter group's base lr.

    style ``scaled`` (ours): the warm-up factor multiplies the decay curve. ``timm``: timm's
    ``CosineLRScheduler(t_in_epochs=False)`` driven as GroupViT / OVSegmentor drive it (utils/lr_scheduler.py,
    main_pretrain.py:351-356): a plain linear warm-up from ``warmup_factor`` to 1 over ``warmup_steps``, the cosine
    counted from step 0 (so it starts below its top), ``min_factor`` from ``total_steps`` on, and ``step_update``
    called after each optimizer step, so step s uses the value of step max(s - 1, 0).

    steps_per_epoch: the schedule moves once per epoch of this many optimizer steps, as a ``LambdaLR`` stepped
    per epoch (Lightning's ``interval: epoch``, lang-seg's poly): every step of epoch e uses the factor of step
    e * steps_per_epoch. None: every step (ours).
    """
    if kind not in ("cosine", "poly", "constant"):
        raise ValueError(f"unknown schedule kind {kind!r}")
    if style not in ("scaled", "timm"):
        raise ValueError(f"unknown schedule style {style!r} (scaled or timm)")
    total_steps = max(1, int(total_steps))

    def decay(step: int) -> float:
        progress = min(1.0, step / total_steps)
        if kind == "cosine":
            value = 0.5 * (1 + math.cos(math.pi * progress))
        elif kind == "poly":
            value = (1 - progress) ** power
        else:
            value = 1.0
        return min_factor + (1 - min_factor) * value

    def factor(step: int) -> float:
        if steps_per_epoch:
            step = step // steps_per_epoch * steps_per_epoch
        if style == "timm":
            t = max(step - 1, 0)
            if t < warmup_steps:
                return warmup_factor + t * (1 - warmup_factor) / warmup_steps
            return decay(t) if t < total_steps else min_factor
        if step < warmup_steps:
            alpha = step / max(1, warmup_steps)
            warm = warmup_factor * (1 - alpha) + alpha
        else:
            warm = 1.0
        return warm * decay(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def count_trainable(parameters: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters if p.requires_grad)
