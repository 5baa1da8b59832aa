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


def _two_images() -> torch.Tensor:
    # image A: three pixels of class 0, one of class 1 (and one ignored); image B: four of class 2; class 3 absent
    return torch.tensor([[[0, 0, 255], [0, 1, 255]], [[2, 2, 2], [2, 255, 255]]])


def test_chance_figures_hand_computed():
    target = _two_images()
    d2 = SegmentationMetric(4, ignore_index=255, convention="detectron2")
    mm = SegmentationMetric(4, ignore_index=255, convention="mmseg")
    for metric in (d2, mm):
        metric.update(torch.zeros_like(target).masked_fill(target == 255, 0), target)
    # uniform over 4 classes, 8 labelled pixels: E[tp_c] = n_c / 4, E[predicted_c] = 8 / 4 = 2
    iou_uniform = [(3 / 4) / (3 + 2 - 3 / 4), (1 / 4) / (1 + 2 - 1 / 4), 1 / (4 + 2 - 1)]
    assert d2.compute()["chance_uniform_mIoU"] == pytest.approx(sum(iou_uniform) / 3 * 100)
    # mmseg also averages class 3: predicted (2 expected pixels) but never labelled -> IoU 0
    assert mm.compute()["chance_uniform_mIoU"] == pytest.approx(sum(iou_uniform) / 4 * 100)
    # present-class oracle: image A guesses 0 or 1 (1/2 each), image B always 2
    # class 0: tp 1.5, gt 3, predicted 1.5 + 0.5; class 1: tp 0.5, gt 1, predicted 2; class 2: IoU 1
    iou_oracle = [1.5 / (3 + 2 - 1.5), 0.5 / (1 + 2 - 0.5), 1.0]
    for metric in (d2, mm):  # class 3 is never guessed either: both conventions leave it out
        assert metric.compute()["chance_present_classes_mIoU"] == pytest.approx(sum(iou_oracle) / 3 * 100)


def test_chance_figures_do_not_depend_on_batching_and_match_sampled_guessing():
    gen = torch.Generator().manual_seed(0)
    num_classes = 6
    target = torch.randint(0, num_classes, (8, 12, 12), generator=gen)
    target[:4] %= 2  # images hold two or four classes of six: the oracle differs from uniform guessing
    target[4:] %= 4
    target[:, 0] = 255
    batched, one_by_one = SegmentationMetric(num_classes), SegmentationMetric(num_classes)
    batched.update(target, target)
    for image in target:
        one_by_one.update(image, image)
    expected = batched.compute()
    assert one_by_one.compute()["chance_present_classes_mIoU"] == pytest.approx(expected["chance_present_classes_mIoU"])
    assert expected["mIoU"] == pytest.approx(100.0)
    assert expected["chance_present_classes_mIoU"] > 1.5 * expected["chance_uniform_mIoU"]
    # the figures are what sampling those guesses gives on average (the metric scores sampled predictions)
    uniform, oracle = [], []
    for _ in range(100):
        random_metric, oracle_metric = SegmentationMetric(num_classes), SegmentationMetric(num_classes)
        random_metric.update(torch.randint(0, num_classes, target.shape, generator=gen), target)
        guesses = torch.stack(
            [
                image.unique()[image.unique() != 255][
                    torch.randint(0, 10**6, image.shape, generator=gen) % int((image.unique() != 255).sum())
                ]
                for image in target
            ]
        )
        oracle_metric.update(guesses, target)
        uniform.append(random_metric.compute()["mIoU"])
        oracle.append(oracle_metric.compute()["mIoU"])
    assert sum(uniform) / len(uniform) == pytest.approx(expected["chance_uniform_mIoU"], rel=0.03)
    assert sum(oracle) / len(oracle) == pytest.approx(expected["chance_present_classes_mIoU"], rel=0.03)
