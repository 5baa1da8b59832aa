"""Steps over a batch of images: how the CAT-Seg head splits its work (cache-sized steps without autograd,
checkpointed steps in training with ``train_class_chunk``)."""

from __future__ import annotations

import torch
import torch.utils.checkpoint


def image_steps(batch: int, per_image: int, items: int, budget: int | None) -> list[tuple[int, int, int, int]]:
    """Steps (image start, image end, item start, item end) of about ``budget`` units over ``batch`` images of
    ``items`` items costing ``per_image`` units in all: several whole images per step when they fit, else
    groups of items of one image; one step when ``budget`` is None."""
    if budget is None or budget >= batch * per_image:
        return [(0, batch, 0, items)]
    if budget >= per_image:
        group = budget // per_image
        return [(i, min(i + group, batch), 0, items) for i in range(0, batch, group)]
    size = max(1, budget * items // per_image)
    return [(i, i + 1, s, min(s + size, items)) for i in range(batch) for s in range(0, items, size)]


def checkpoint_call(fn, checkpoint: bool, *args):
    """fn(*args), with its activations recomputed in the backward pass instead of kept when ``checkpoint``."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
