"""The benchmark metric: a dataset-level confusion matrix, mIoU under a named convention.

Two conventions for which classes enter the mean (both computed from the same confusion matrix):

- ``detectron2`` (default; what CAT-Seg and OVSeg report): mean over classes present in the ground truth.
- ``mmseg`` (= torchmetrics ``MulticlassJaccardIndex(average="macro", ignore_index=...)``): mean over classes
  present in the ground truth or the prediction; a class predicted but never labelled counts with IoU 0.

Pixels whose label is ``ignore_index`` are dropped, wherever they were predicted. The confusion matrix is a
torchmetrics state summed across DDP ranks, so the distributed value equals the single-process one as long
as every image is evaluated exactly once (see ``ovseg_lab.data.samplers``).

Two chance figures come with every score, computed from the same labels with the same convention (docs/toy.md):

- ``chance_uniform_mIoU``: uniform random labels over the metric's ``num_classes`` at every pixel. Its expected
  confusion matrix is ``confmat[g, p] = n_g / K`` (n_g: labelled pixels of class g, K classes); the figure is the
  mIoU of that matrix, i.e. the value random guessing converges to as the pixel count grows.
- ``chance_present_classes_mIoU``: the "oracle of present classes", guessing uniformly at every pixel among the
  classes that occur in that image's labels (a model that knows which classes an image holds but not where). Its
  expected confusion matrix sums, per image, ``n_{i,g} / k_i`` into ``confmat[g, p]`` for each of the image's
  k_i present classes p.
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
        # expected confusion matrix of guessing uniformly among each image's labelled classes (module docstring)
        self.add_state(
            "present_oracle_confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.float64),
            dist_reduce_fx="sum",
        )

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        images = target
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            bad = target[(target < 0) | (target >= self.num_classes)].unique()[:5].tolist()
            raise ValueError(f"target holds ids {bad} outside [0, {self.num_classes}) that are not ignore_index")
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"prediction holds ids outside [0, {self.num_classes})")
        self._update_present_oracle(images)  # after the checks: a rejected batch leaves no trace
        index = target * self.num_classes + pred
        self.confmat += torch.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def _update_present_oracle(self, target: torch.Tensor) -> None:
        """target (B, H, W): B images; (H, W) or (N,): one image."""
        per_image = target.reshape(target.shape[0] if target.dim() >= 3 else 1, -1).long()
        image_index = torch.arange(per_image.shape[0], device=per_image.device)[:, None].expand_as(per_image)
        valid = (per_image != self.ignore_index) & (per_image >= 0) & (per_image < self.num_classes)
        counts = (
            torch.bincount(
                image_index[valid] * self.num_classes + per_image[valid],
                minlength=per_image.shape[0] * self.num_classes,
            )
            .reshape(-1, self.num_classes)
            .double()
        )
        present = (counts > 0).double()
        guess = present / present.sum(dim=1, keepdim=True).clamp(min=1)  # (B, K): 1/k_i on each present class
        self.present_oracle_confmat += counts.T @ guess

    def compute(self) -> dict:
        scores = confmat_scores(self.confmat.double(), self.convention)
        gt = self.confmat.sum(dim=1).double()
        uniform = gt[:, None].expand(-1, self.num_classes) / self.num_classes
        scores["chance_uniform_mIoU"] = confmat_scores(uniform, self.convention)["mIoU"]
        scores["chance_present_classes_mIoU"] = confmat_scores(self.present_oracle_confmat, self.convention)["mIoU"]
        return {**scores, "num_classes": self.num_classes}


def confmat_scores(confmat: torch.Tensor, convention: str = "detectron2") -> dict:
    """Scores in percent of a (K, K) confusion matrix ``confmat[gt, pred]`` (counts, or expected counts)."""
    confmat = confmat.double()
    num_classes = confmat.shape[0]
    tp = confmat.diagonal()
    gt = confmat.sum(dim=1)
    predicted = confmat.sum(dim=0)
    union = gt + predicted - tp
    valid = gt > 0 if convention == "detectron2" else union > 0
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
        "num_classes": num_classes,
        "num_classes_evaluated": int(valid.sum()),
        "num_pixels": int(total),
        "convention": convention,
    }
