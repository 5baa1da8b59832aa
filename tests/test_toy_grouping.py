"""Caption-supervised grouping on the toy: group naming scores and shared prompts in the multi-label loss."""

from __future__ import annotations

import math

import torch

from ovseg_lab.layers.contrastive import multi_label_info_nce, shared_prompt_masks
from ovseg_lab.tools.toy_report import grouping_scores  # noqa: E402


def test_group_naming_scores_hand_computed():
    groups = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]]])
    labels = torch.tensor([[[3, 3, 1, 1], [3, 2, 1, 255], [255, 255, 255, 255]]])
    pred = torch.tensor([[[3, 3, 0, 0], [3, 3, 0, 0], [1, 1, 1, 1]]])
    scores = grouping_scores(groups, pred, labels, num_classes=4)
    # group 0 covers 3, 3, 3, 2 -> majority 3, named 3: right; group 1 covers 1, 1, 1 -> named 0: wrong;
    # group 2 covers no labelled pixel: not counted
    assert (scores["groups"], scores["named_right"]) == (2, 1)
    assert (scores["pure_pixels"], scores["pixels"]) == (6, 7)
    expected = torch.tensor([[[3, 3, 1, 1], [3, 3, 1, 255], [255, 255, 255, 255]]])
    assert torch.equal(scores["oracle_labels"], expected)


def test_shared_prompt_masks_hand_made():
    # ids: a=1, b=2, c=3, d=4. Image 0 holds a, b, d and sampled a, b; image 1 holds a, c, d and sampled d, c;
    # image 2 holds b only (one prompt and a padding slot).
    prompts = torch.tensor([[1, 2], [4, 3], [2, -1]])
    holds = torch.tensor([[1, 2, 4], [1, 3, 4], [2, -1, -1]])
    image_side, prompt_side = shared_prompt_masks(prompts, holds)
    # columns: (0,a) (0,b) (1,d) (1,c) (2,b) (2,pad). Image 0 holds d (not sampled) and b: image 1's d and
    # image 2's b are not its negatives; its own columns stay (they are its positives)
    assert image_side.tolist() == [
        [False, False, True, False, True, False],
        [True, False, False, False, False, False],
        [False, True, False, False, False, False],
    ]
    # rows: prompts in the same order; columns: images 0, 1, 2
    assert prompt_side.tolist() == [
        [False, True, False],
        [False, False, True],
        [True, False, False],
        [False, False, False],
        [True, False, False],
        [False, False, False],
    ]


def test_shared_prompts_are_not_negatives_in_the_multi_label_loss():
    # three images, each with the one prompt "a", all perfectly aligned: official counts the two copies as
    # negatives (loss log 3 on both sides), the option leaves them out (loss 0)
    embedding = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    image, texts = embedding.expand(3, 8), embedding.expand(3, 1, 8)
    valid = torch.ones(3, 1, dtype=torch.bool)
    scale = torch.tensor(10.0)
    official = multi_label_info_nce(image, texts, valid, scale)
    assert math.isclose(official.item(), math.log(3), rel_tol=1e-5)
    masks = shared_prompt_masks(torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long))
    assert multi_label_info_nce(image, texts, valid, scale, masks).item() < 1e-6
    # prompts of different entities stay negatives: with distinct ids the option changes nothing
    ids = torch.arange(3)[:, None]
    other = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert torch.allclose(
        multi_label_info_nce(other, other[:, None], valid, scale, shared_prompt_masks(ids, ids)),
        multi_label_info_nce(other, other[:, None], valid, scale),
    )
