"""The benchmark metric: a dataset-level confusion matrix, mIoU under a named convention.

Two conventions for which classes enter the mean (both computed from the same confusion matrix):

- ``detectron2`` (default; what CAT-Seg and OVSeg report): mean over classes present in the ground truth.
- ``mmseg`` (= torchmetrics ``MulticlassJaccardIndex(average="macro", ignore_index=...)``): mean over classes
  present in the ground truth or the prediction; a class predicted but never labelled counts with IoU 0.

Pixels whose label is ``ignore_index`` are dropped, wherever they were predicted. The confusion matrix is a
torchmetrics state summed across DDP ranks, so the distributed value equals the single-process one as long
as every image is evaluated exactly once (see ``ovseg_lab.data.samplers``).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

CONVENTIONS = ("detectron2", "mmseg")


class SegmentationMetric(Metric):
    """Accumulates ``confmat[gt, pred]`` over batches; ``compute()`` returns a dict of scores in percent.

    update(pred, target): pred (B, H, W) or (H, W) integer class ids in [0, num_classes); target the same shape
    with ids in [0, num_classes) or ``ignore_index``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = 255, convention: str = "detectron2", **kwargs) -> None:
        super().__init__(**kwargs)
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.convention = convention
        self.add_state("confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            bad = target[(target < 0) | (target >= self.num_classes)].unique()[:5].tolist()
            raise ValueError(f"target holds ids {bad} outside [0, {self.num_classes}) that are not ignore_index")
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"prediction holds ids outside [0, {self.num_classes})")
        index = target * self.num_classes + pred
        self.confmat += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def compute(self) -> dict:
        confmat = self.confmat.double()
        tp = confmat.diagonal()
        gt = confmat.sum(dim=1)
        predicted = confmat.sum(dim=0)
        union = gt + predicted - tp
        valid = gt > 0 if self.convention == "detectron2" else union > 0
        iou = torch.full_like(tp, float("nan"))
        iou[valid] = tp[valid] / union[valid]
        acc = torch.full_like(tp, float("nan"))
        acc[gt > 0] = tp[gt > 0] / gt[gt > 0]
        total = gt.sum()
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        miou = iou[valid].mean() if valid.any() else nan
        freq = gt / total if total > 0 else torch.zeros_like(gt)
        fwiou = (freq[valid] * iou[valid]).sum() if valid.any() else nan
        return {
            "mIoU": float(miou * 100),
            "fwIoU": float(fwiou * 100),
            "pixel_accuracy": float(tp.sum() / total * 100) if total > 0 else float("nan"),
            "mean_accuracy": float(acc[gt > 0].mean() * 100) if (gt > 0).any() else float("nan"),
            "per_class_iou": (iou * 100).tolist(),
            "per_class_accuracy": (acc * 100).tolist(),
            "num_classes": self.num_classes,
            "num_classes_evaluated": int(valid.sum()),
            "num_pixels": int(total),
            "convention": self.convention,
        }
