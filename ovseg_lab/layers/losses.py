"""Per-pixel losses shared by the dense methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, T, h, w) -> (B, T, H, W), bilinear."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


IGNORE_PIXEL_MODES = ("negative", "exclude")


def per_pixel_bce(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, ignore_pixels: str = "exclude"
) -> torch.Tensor:
    """CAT-Seg's loss: sigmoid BCE of every class logit against the one-hot label.

    logits: (B, T, h, w), upsampled to the label size; labels: (B, H, W) with ids in [0, T) or ``ignore_index``.
    ``ignore_pixels``:
      - ``negative``: the official release (cat_seg_model.py, training branch of ``forward``): ignore pixels get an
        all-zero target and the mean runs over every (pixel, class) pair, so void regions push every class down.
      - ``exclude``: ignore pixels are left out; the mean runs over (valid pixel, class) pairs.
    """
    if ignore_pixels not in IGNORE_PIXEL_MODES:
        raise ValueError(f"ignore_pixels must be one of {IGNORE_PIXEL_MODES}, got {ignore_pixels!r}")
    logits = upsample_to(logits, labels.shape[-2:])
    num_classes = logits.shape[1]
    valid = labels != ignore_index
    if ignore_pixels == "negative":
        logits = logits.permute(0, 2, 3, 1)  # (B, H, W, T)
        target = torch.zeros_like(logits)
        target[valid] = F.one_hot(labels[valid].long(), num_classes).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target)
    if not valid.any():
        return logits.sum() * 0.0
    logits = logits.permute(0, 2, 3, 1)[valid]  # (N, T)
    target = F.one_hot(labels[valid].long(), num_classes).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target)


def per_pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Softmax cross-entropy over classes (LSeg), ignore pixels excluded; logits upsampled to the label size."""
    logits = upsample_to(logits, labels.shape[-2:])
    if not (labels != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)


def dice_loss(pred_logits: torch.Tensor, target: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
    """Dice loss of matched masks: pred_logits and target (N, P); summed over masks, divided by ``num_masks``
    (defaults to N). Zero for perfect, confident predictions."""
    return soft_dice_loss(pred_logits.sigmoid(), target, num_masks)


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
    """:func:`dice_loss` of masks that are already probabilities in [0, 1] (N, P) (OVSegmentor min-max
    normalises its predicted masks instead of a sigmoid)."""
    prob = prob.flatten(1)
    target = target.flatten(1).to(prob.dtype)
    numerator = 2 * (prob * target).sum(-1)
    denominator = prob.sum(-1) + target.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / (num_masks if num_masks is not None else max(1, prob.shape[0]))


def sigmoid_focal_loss(
    pred_logits: torch.Tensor,
    target: torch.Tensor,
    num_masks: float | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet) of matched masks (N, P): mean over pixels, summed over masks / num_masks."""
    target = target.to(pred_logits.dtype)
    prob = pred_logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(pred_logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(1).mean(1).sum() / (num_masks if num_masks is not None else max(1, pred_logits.shape[0]))
