"""The metric of the few-shot-split zero-shot protocol (LSeg's PASCAL-5i / COCO-20i / FSS-1000 tables).

Every episode is a 2-way problem on one image: label 0 = "others", 1 = the episode's class. As in HSNet (whose
evaluation LSeg reuses), intersections and unions of both labels are summed per class over the episodes:

- ``mIoU``: foreground IoU of each class of the fold (summed intersection / summed union; 0 when a class's
  union is empty), averaged over the fold's classes;
- ``FB-IoU``: background and foreground IoU with intersections and unions summed over all the fold's classes,
  averaged over the two.

Pixels labelled ``ignore_index`` (PASCAL's object boundaries) count for neither prediction nor ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


class EpisodeIoU(Metric):
    """update(pred (B, H, W) in {0, 1}, target (B, H, W) in {0, 1, ignore_index}, class_id (B,)).

    class_ids: the classes the scores average over (the fold's held-out classes), 0-based into a list of
    ``num_classes``. ``compute()`` returns scores in percent (see the module docstring).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, class_ids: Sequence[int], num_classes: int, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        class_ids = [int(c) for c in class_ids]
        if not class_ids or min(class_ids) < 0 or max(class_ids) >= num_classes:
            raise ValueError(f"class_ids {class_ids[:5]}... must be non-empty ids in [0, {num_classes})")
        self.class_ids = class_ids
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        zeros = torch.zeros(2, num_classes, dtype=torch.long)
        self.add_state("intersection", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("union", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("ground_truth", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("episodes", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_id: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred, target = pred.reshape(pred.shape[0], -1).long(), target.reshape(target.shape[0], -1).long()
        class_id = torch.as_tensor(class_id, device=pred.device).reshape(-1).long()
        if class_id.numel() != pred.shape[0]:
            raise ValueError(f"{class_id.numel()} class ids for {pred.shape[0]} episodes")
        valid = target != self.ignore_index
        if ((target[valid] != 0) & (target[valid] != 1)).any() or ((pred != 0) & (pred != 1)).any():
            raise ValueError("episode labels and predictions must be 0 (others) or 1 (the class)")
        for label in (0, 1):
            pred_k = (pred == label) & valid
            gt_k = (target == label) & valid
            inter = (pred_k & gt_k).sum(dim=1)
            union = pred_k.sum(dim=1) + gt_k.sum(dim=1) - inter
            self.intersection[label].index_add_(0, class_id, inter)
            self.union[label].index_add_(0, class_id, union)
            self.ground_truth[label].index_add_(0, class_id, gt_k.sum(dim=1))
        self.episodes.index_add_(0, class_id, torch.ones_like(class_id))

    def compute(self) -> dict:
        fold = torch.tensor(self.class_ids, device=self.intersection.device)
        inter = self.intersection[:, fold].double()
        union = self.union[:, fold].double()
        iou = inter / union.clamp(min=1)  # (2, K): HSNet counts a class with an empty union as IoU 0
        summed_iou = inter.sum(dim=1) / union.sum(dim=1).clamp(min=1)  # (2,) background, foreground
        gt = self.ground_truth[:, fold].double().sum(dim=1)
        total = gt.sum()
        return {
            "mIoU": float(iou[1].mean() * 100),
            "FB-IoU": float(summed_iou.mean() * 100),
            "pixel_accuracy": float(inter.sum() / total * 100) if total > 0 else float("nan"),
            "fwIoU": float((gt / total * summed_iou).sum() * 100) if total > 0 else float("nan"),
            "per_class_iou": (iou[1] * 100).tolist(),
            "background_iou": float(summed_iou[0] * 100),
            "foreground_iou": float(summed_iou[1] * 100),
            "num_classes": len(self.class_ids),
            "num_classes_evaluated": int((self.episodes[fold] > 0).sum()),
            "num_episodes": int(self.episodes[fold].sum()),
            "num_pixels": int(total),
            "convention": "hsnet-episodes",
        }
