"""The benchmark metric against torchmetrics and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from ovseg_lab.metrics import SegmentationMetric


def test_detectron2_convention_hand_computed():
    # 3 classes; class 2 is predicted but never in the ground truth; 255 is ignored wherever it is.
    target = torch.tensor([[0, 0, 1, 1], [0, 1, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 1, 0, 2]])
    metric = SegmentationMetric(3, ignore_index=255, convention="detectron2")
    metric.update(pred, target)
    out = metric.compute()
    # class 0: tp 1, gt 3, pred 1 -> 1/3 ; class 1: tp 3, gt 3, pred 4 -> 3/4 ; class 2 absent from GT: excluded
    assert out["mIoU"] == pytest.approx((1 / 3 + 3 / 4) / 2 * 100)
    assert out["pixel_accuracy"] == pytest.approx(4 / 6 * 100)
    assert math.isnan(out["per_class_iou"][2])
    assert out["num_classes_evaluated"] == 2
    # fwIoU: frequency-weighted by GT pixels
    assert out["fwIoU"] == pytest.approx((3 / 6 * 1 / 3 + 3 / 6 * 3 / 4) * 100)


def test_mmseg_convention_matches_torchmetrics():
    gen = torch.Generator().manual_seed(0)
    metric = SegmentationMetric(7, ignore_index=255, convention="mmseg")
    reference = MulticlassJaccardIndex(num_classes=7, average="macro", ignore_index=255)
    for _ in range(5):  # accumulated across batches into one dataset-level matrix
        target = torch.randint(0, 6, (2, 16, 16), generator=gen)  # class 6 never labelled
        target[:, :3] = 255
        pred = torch.randint(0, 7, (2, 16, 16), generator=gen)
        metric.update(pred, target)
        reference.update(pred, target)
    assert metric.compute()["mIoU"] == pytest.approx(reference.compute().item() * 100, abs=1e-4)


def test_conventions_differ_when_a_class_is_only_predicted():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    d2 = SegmentationMetric(3, convention="detectron2")
    mm = SegmentationMetric(3, convention="mmseg")
    for m in (d2, mm):
        m.update(pred, target)
    assert d2.compute()["mIoU"] == pytest.approx((0.5 + 1.0) / 2 * 100)
    assert mm.compute()["mIoU"] == pytest.approx((0.5 + 1.0 + 0.0) / 3 * 100)


def test_uint16_ignore_and_bad_ids():
    metric = SegmentationMetric(300, ignore_index=65535)
    target = torch.tensor([299, 65535, 5])
    metric.update(torch.tensor([299, 3, 5]), target)
    assert metric.compute()["mIoU"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="outside"):
        metric.update(torch.tensor([1]), torch.tensor([300]))
