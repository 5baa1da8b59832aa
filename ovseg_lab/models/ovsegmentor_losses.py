"""OVSegmentor's cross-image mask consistency (stage 2).

For two images that share an entity, image A's group queries are compared with the keys of image B from the
momentum encoder: that predicts where A's groups lie in B. The target is where B's own groups lie (momentum
encoder). Predicted and target masks are paired by Hungarian matching on the L2 distance of the L2-normalised
masks, targets are sigmoid maps binarised at ``threshold`` x their maximum, predictions are min-max normalised,
and the loss is the Dice loss. Only the groups most related to the shared entity receive gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ovseg_lab.layers.losses import soft_dice_loss
from ovseg_lab.layers.matcher import hungarian_match, pairwise_l2_cost


def select_related_groups(
    group_embeddings: torch.Tensor, entity_embedding: torch.Tensor, ratio: float, mode: str = "detach_least"
) -> torch.Tensor:
    """(B, G) bool: the groups whose mask predictions are trained, from how each group's projected embedding
    (B, G, D) scores against its image's shared-entity prompt embedding (B, D).

    ``detach_least`` (the release, models/multi_label_contrastive.py:675-679): the ``int(G * ratio)`` lowest
    scoring groups are detached (``topk(largest=False)``), every other group is trained (0.25: 6 of 8 trained).
    ``train_most`` (ours): the ``round(G * ratio)`` highest scoring groups are trained (0.25: 2 of 8).
    """
    logits = (group_embeddings.detach() @ entity_embedding.detach().unsqueeze(-1)).squeeze(-1)
    groups = logits.shape[1]
    if mode == "detach_least":
        detached = logits.topk(int(groups * ratio), dim=1, largest=False).indices
        return torch.ones_like(logits, dtype=torch.bool).scatter_(1, detached, False)
    if mode != "train_most":
        raise ValueError(f"group ratio mode must be 'detach_least' or 'train_most', got {mode!r}")
    keep = max(1, min(groups, int(round(groups * ratio))))
    top = logits.topk(keep, dim=1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)


def _min_max(x: torch.Tensor) -> torch.Tensor:
    low, high = x.min(dim=-1, keepdim=True).values, x.max(dim=-1, keepdim=True).values
    return (x - low) / (high - low).clamp_min(1e-6)


def match_masks(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For every image, the permutation of target masks matched to the predicted ones: (B, G) target indices.

    predicted, target: (B, G, P); cost = L2 distance between L2-normalised masks.
    """
    order = []
    for pred_b, target_b in zip(
        F.normalize(predicted.detach().float(), dim=-1), F.normalize(target.detach().float(), dim=-1)
    ):
        rows, cols = hungarian_match(pairwise_l2_cost(pred_b, target_b))
        perm = torch.empty(pred_b.shape[0], dtype=torch.long)
        perm[rows] = cols
        order.append(perm)
    return torch.stack(order).to(predicted.device)


def cross_image_mask_loss(
    predicted: torch.Tensor,
    target: torch.Tensor,
    grid: tuple[int, int],
    mask_size: int | None,
    threshold: float,
    selected: torch.Tensor | None = None,
    reduction: str = "official",
) -> torch.Tensor:
    """Dice loss between matched masks.

    predicted: (B, G, h*w) logits of image A's groups on image B's tokens (gradient to A's encoder);
    target: (B, G, h*w) logits of B's own groups (momentum encoder, no gradient); grid: (h, w);
    mask_size: resolution the masks are compared at (bilinear, OVSegmentor: 224); selected: (B, G) groups whose
    predictions receive gradients (the others are detached); reduction: ``official`` (models/losses.py:103-131:
    one Dice per image over the pixels of all its groups, summed over images and divided by the number of
    groups, so the loss grows with the per-GPU batch) or ``per_mask`` (ours: the mean Dice of single masks).
    """
    batch, groups = predicted.shape[:2]
    if selected is not None:
        predicted = torch.where(selected[..., None], predicted, predicted.detach())
    predicted = predicted.reshape(batch, groups, *grid)
    target = target.detach().reshape(batch, groups, *grid)
    if mask_size:
        predicted = F.interpolate(predicted, size=(mask_size, mask_size), mode="bilinear", align_corners=True)
        target = F.interpolate(target, size=(mask_size, mask_size), mode="bilinear", align_corners=True)
    predicted, target = predicted.flatten(2).float(), target.flatten(2).float()
    order = match_masks(predicted, target)
    target = torch.gather(target, 1, order[..., None].expand_as(target))
    target = target.sigmoid()
    binary = (target >= threshold * target.max(dim=-1, keepdim=True).values).to(predicted.dtype)
    predicted = _min_max(predicted)
    if reduction == "official":
        return soft_dice_loss(predicted.flatten(1), binary.flatten(1), num_masks=groups)
    if reduction != "per_mask":
        raise ValueError(f"Dice reduction must be 'official' or 'per_mask', got {reduction!r}")
    return soft_dice_loss(predicted.flatten(0, 1), binary.flatten(0, 1))
