"""Shared layers: the Hungarian matcher and the mask losses."""

from __future__ import annotations

import itertools

import pytest
import torch

from ovseg_lab.layers.losses import dice_loss, per_pixel_bce, sigmoid_focal_loss
from ovseg_lab.layers.matcher import hungarian_match, pairwise_dice_cost, pairwise_sigmoid_focal_cost


def test_matcher_finds_the_optimal_assignment_on_a_hand_made_cost():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = hungarian_match(cost)
    # brute force over all permutations
    best = min(itertools.permutations(range(3)), key=lambda p: sum(cost[i, p[i]] for i in range(3)))
    assert cols.tolist() == list(best) and rows.tolist() == [0, 1, 2]
    assert sum(cost[r, c] for r, c in zip(rows, cols)) == 5.0


def test_matcher_rectangular_and_nan():
    cost = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [float("nan"), 0.0]])
    rows, cols = hungarian_match(cost)
    assert len(rows) == 2
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(1, 0), (3, 1)]


def test_mask_losses_are_zero_on_perfect_predictions_and_positive_otherwise():
    target = (torch.rand(4, 64) > 0.5).float()
    perfect = target * 60 - 30
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert sigmoid_focal_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    wrong = -perfect
    assert dice_loss(wrong, target) > 0.9 and sigmoid_focal_loss(wrong, target) > 1.0


def test_pairwise_costs_rank_the_right_target_first():
    target = (torch.rand(3, 100) > 0.5).float()
    pred = target[[2, 0, 1]] * 20 - 10
    for cost in (pairwise_dice_cost(pred, target), pairwise_sigmoid_focal_cost(pred, target)):
        assert cost.argmin(dim=1).tolist() == [2, 0, 1]


def test_bce_excludes_ignore_pixels():
    logits = torch.zeros(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 255]]])
    with_void = per_pixel_bce(logits, labels)
    logits_changed = logits.clone()
    logits_changed[0, :, 1, :] = 50.0  # anything on ignore pixels does not matter
    assert per_pixel_bce(logits_changed, labels) == pytest.approx(with_void.item())


def test_palette_and_overlay():
    import numpy as np

    from ovseg_lab.viz import colorize, legend_entries, palette

    colours = palette(150)
    assert colours.shape == (150, 3) and len({tuple(c) for c in colours}) == 150
    label = np.array([[0, 1], [255, 2]])
    rgb = colorize(label, 3)
    assert (rgb[1, 0] == 0).all() and (rgb[0, 0] == colours[0]).all()
    entries = legend_entries(label, ["a", "b", "c"])
    assert [name for _, name, _ in entries] == ["a", "b", "c"] and abs(sum(f for *_, f in entries) - 0.75) < 1e-9
