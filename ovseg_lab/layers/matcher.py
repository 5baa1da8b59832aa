"""Hungarian matching (scipy) between predictions and targets, shared by MaskFormer (OVSeg) and the
cross-image mask consistency of OVSegmentor."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


@torch.no_grad()
def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment.

    cost: (N, M) with N predictions and M targets (any N, M). Returns (pred_index, target_index), each of
    length min(N, M), sorted by prediction index. Non-finite costs are replaced by a large finite value so
    scipy never fails on a NaN from an empty mask.
    """
    cost = cost.detach().float().cpu()
    cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
    rows, cols = linear_sum_assignment(cost.numpy())
    order = np.argsort(rows)
    return torch.as_tensor(rows[order], dtype=torch.long), torch.as_tensor(cols[order], dtype=torch.long)


def pairwise_dice_cost(pred_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Dice between every predicted mask (sigmoid of logits) and every target mask.

    pred_logits: (N, P) flattened mask logits; target: (M, P) in [0, 1]. Returns (N, M).
    """
    prob = pred_logits.sigmoid()
    numerator = 2 * prob @ target.t()
    denominator = prob.sum(-1)[:, None] + target.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def pairwise_sigmoid_focal_cost(
    pred_logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Mean per-pixel sigmoid focal loss of every prediction against every target: (N, P), (M, P) -> (N, M)."""
    prob = pred_logits.sigmoid()
    num_pixels = pred_logits.shape[1]
    focal_pos = ((1 - prob) ** gamma) * torch.nn.functional.binary_cross_entropy_with_logits(
        pred_logits, torch.ones_like(pred_logits), reduction="none"
    )
    focal_neg = (prob**gamma) * torch.nn.functional.binary_cross_entropy_with_logits(
        pred_logits, torch.zeros_like(pred_logits), reduction="none"
    )
    if alpha >= 0:
        focal_pos = focal_pos * alpha
        focal_neg = focal_neg * (1 - alpha)
    return (focal_pos @ target.t() + focal_neg @ (1 - target).t()) / num_pixels


def pairwise_l2_cost(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between every row of ``a`` (N, D) and of ``b`` (M, D): (N, M)."""
    return torch.cdist(a.float(), b.float())
