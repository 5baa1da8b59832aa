"""OVSeg: MaskFormer set criterion, masked-region CLIP, mask prompts, ensemble, semantic inference, analysis modes,
SAM proposals, class equivariance."""

from __future__ import annotations

import itertools

import pytest
import torch

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.errors import SetupError
from ovseg_lab.models.maskformer import MaskFormer, SetCriterion, semantic_targets
from ovseg_lab.models.ovseg import (
    OVSeg,
    SAMProposals,
    geometric_ensemble,
    granularity_select,
    masked_region_crops,
    oracle_class_probs,
    patch_keep_mask,
    semantic_inference,
)

TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=3, width=64, patch_size=8, head_width=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
)
TINY_SWIN = dict(
    name="swin_tiny_patch4_window7_224",
    pretrained=False,
    model_kwargs=dict(
        img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4, strict_img_size=False
    ),
)
TINY_MASKFORMER = dict(
    backbone=TINY_SWIN,
    num_queries=6,
    hidden_dim=32,
    heads=2,
    ffn_dim=64,
    dec_layers=2,
    conv_dim=16,
    mask_dim=16,
    class_hidden=32,
)


def tiny_clip(**kwargs) -> CLIPBackbone:
    torch.manual_seed(0)
    return CLIPBackbone("tiny", None, model_cfg=TINY_CLIP, feature_layers=(0, 1), templates=["a {}"], **kwargs)


def tiny_ovseg(**kwargs) -> OVSeg:
    from functools import partial

    clip = tiny_clip(mask_prompt_depth=kwargs.pop("mask_prompt_depth", 0))
    torch.manual_seed(1)
    return OVSeg(clip, partial(MaskFormer, **TINY_MASKFORMER), SetCriterion(), templates=["a {}"], **kwargs).eval()


# ---------------------------------------------------------------------------------------------- stage 1
def test_criterion_matches_queries_to_segments_optimally():
    """A hand-made case: query 2 predicts segment 0, query 0 segment 1; the matcher must find exactly that."""
    masks = torch.zeros(2, 8, 8)
    masks[0, :4] = 1
    masks[1, 4:] = 1
    targets = [{"labels": torch.tensor([1, 0]), "masks": masks}]
    pred_masks = torch.full((1, 3, 8, 8), -10.0)
    pred_masks[0, 2] = masks[0] * 20 - 10
    pred_masks[0, 0] = masks[1] * 20 - 10
    pred_masks[0, 1] = masks[0] * 4 - 2  # a weaker copy of segment 0
    logits = torch.zeros(1, 3, 3)
    logits[0, 2, 1] = 5.0
    logits[0, 0, 0] = 5.0
    ((queries, segments),) = SetCriterion().match(logits, pred_masks, targets)
    assert dict(zip(queries.tolist(), segments.tolist())) == {0: 1, 2: 0}
    # brute force agrees on the total cost
    crit = SetCriterion()
    prob = logits[0].softmax(-1)[:, targets[0]["labels"]]
    from ovseg_lab.layers.matcher import pairwise_dice_cost, pairwise_sigmoid_focal_cost

    out, tgt = pred_masks[0].flatten(1), masks.flatten(1)
    cost = -prob + 20 * pairwise_sigmoid_focal_cost(out, tgt) + pairwise_dice_cost(out, tgt)
    best = min(itertools.permutations(range(3), 2), key=lambda p: cost[p[0], 0] + cost[p[1], 1])
    assert {best[0]: 0, best[1]: 1} == {q: s for q, s in zip(queries.tolist(), segments.tolist())}
    assert crit.weights == {"loss_ce": 1.0, "loss_mask": 20.0, "loss_dice": 1.0}


def test_criterion_losses_vanish_on_perfect_predictions_and_count_aux_layers():
    label = torch.zeros(1, 16, 16, dtype=torch.long)
    label[0, 8:] = 2
    label[0, :2] = 255  # ignore pixels are background of every target mask
    targets = semantic_targets(label)
    assert targets[0]["labels"].tolist() == [0, 2]
    perfect_masks = torch.full((1, 4, 16, 16), -40.0)
    perfect_masks[0, 1] = targets[0]["masks"][0] * 80 - 40
    perfect_masks[0, 3] = targets[0]["masks"][1] * 80 - 40
    logits = torch.full((1, 4, 4), -50.0)  # 3 classes + no object
    logits[0, 1, 0] = logits[0, 3, 2] = 50.0
    logits[0, 0, 3] = logits[0, 2, 3] = 50.0  # unmatched queries say "no object"
    layer = {"pred_logits": logits, "pred_masks": perfect_masks}
    losses = SetCriterion()({**layer, "aux_outputs": [layer, layer]}, targets)
    for key in ("loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_dice_1"):
        assert losses[key].item() == pytest.approx(0.0, abs=1e-4), key
    wrong = {"pred_logits": logits.roll(1, dims=1), "pred_masks": -perfect_masks}
    bad = SetCriterion()({**wrong, "aux_outputs": [wrong]}, targets)
    assert bad["loss"] > 10 and bad["loss_ce_0"] > 1


def test_no_object_weight_scales_the_unmatched_queries():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    targets = semantic_targets(label)
    logits = torch.zeros(1, 5, 3)  # uniform: every query pays log(3)
    masks = torch.zeros(1, 5, 8, 8)
    ce = SetCriterion(no_object_weight=0.1)._losses(logits, masks, targets, 1.0)["loss_ce"]
    # weighted mean: (1 * log3 + 4 * 0.1 * log3) / (1 + 0.4) = log 3
    assert ce.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-5)


def test_maskformer_shapes_deep_supervision_and_class_equivariance():
    torch.manual_seed(0)
    model = MaskFormer(embed_dim=8, **TINY_MASKFORMER).eval()
    images, text = torch.randn(2, 3, 64, 64), torch.randn(5, 8)
    out = model(images, text)
    assert out["pred_logits"].shape == (2, 6, 6) and out["pred_masks"].shape == (2, 6, 16, 16)
    assert len(out["aux_outputs"]) == 1
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted = model(images, text[perm])["pred_logits"]
    torch.testing.assert_close(permuted[..., :-1], out["pred_logits"][..., :-1][..., perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(permuted[..., -1], out["pred_logits"][..., -1], atol=1e-4, rtol=1e-4)
    # logits are 100 * cosine
    assert out["pred_logits"].abs().max() <= 100.0 + 1e-3


def test_paper_parameter_counts():
    """MaskFormer paper: R101c 60M, Swin-B 102M (our class head maps to CLIP space, a few 100k more)."""
    with torch.device("meta"):
        swin = MaskFormer(
            dict(type="swin", embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12),
            embed_dim=768,
        )
        r101c = MaskFormer(
            dict(name="resnet101c", multi_grid=[1, 2, 4], model_kwargs={"stem_width": 64}), embed_dim=512
        )
    for model, paper in ((swin, 102e6), (r101c, 60e6)):
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - paper) / paper < 0.03, (count, paper)
    assert r101c.backbone.body.layer4[2].conv2.dilation == (4, 4)
    assert (
        r101c.backbone.body.conv1[0].out_channels == 64 and r101c.backbone.body.conv1[6].out_channels == 128
    )  # deeplab stem


# ---------------------------------------------------------------------------------------------- stage 2 pieces
def test_masked_crop_is_the_tight_box_with_background_at_the_clip_mean():
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8) + 1
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 3:7] = True
    masks[0, 3, 3] = False  # a hole: background inside the box
    masks[2, 5, 5] = True
    crops, crop_masks, valid = masked_region_crops(image, masks, size=8)
    assert valid.tolist() == [True, False, True] and crops.shape == (2, 3, 8, 8)
    # box 2x4 resized to 8x8: rows 0-3 come from image row 2, rows 4-7 from row 3
    assert crop_masks[0, 4:6, 0:2].eq(False).all() and crop_masks[0, :4].all()
    assert (crops[0][:, crop_masks[0]] != 0).all()
    single = crops[1]
    torch.testing.assert_close(single, image[:, 5, 5][:, None, None].expand(3, 8, 8), atol=1e-3, rtol=1e-4)


def test_fully_masked_patch_gets_the_prompt_and_a_partly_masked_one_does_not():
    clip = tiny_clip(mask_prompt_depth=2).eval()
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 0:8, 0:8] = True  # patch 0: all foreground
    mask[0, 9, 12] = True  # patch 5 (row 1, col 1): a single foreground pixel
    keep = patch_keep_mask(mask, clip.patch_size)
    assert keep.shape == (1, 16)
    assert keep[0, 0] == 1 and keep[0, 5] == 1 and keep[0].sum() == 2
    captured = {}
    visual = clip.model.visual
    handle = visual.ln_pre.register_forward_hook(lambda m, i, o: captured.setdefault("pre", i[0]))
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        clip.encode_image(image, keep)
    handle.remove()
    tokens = captured["pre"][0, 1:] - clip._positional_embedding((4, 4))[1:]
    patches = visual.conv1(image).flatten(2).transpose(1, 2)[0]
    torch.testing.assert_close(tokens[0], patches[0].detach(), atol=1e-5, rtol=1e-5)  # kept
    torch.testing.assert_close(tokens[5], patches[5].detach(), atol=1e-5, rtol=1e-5)  # partly masked: kept
    torch.testing.assert_close(tokens[7], clip.mask_prompts[0, 7].detach(), atol=1e-5, rtol=1e-5)  # replaced


def test_geometric_ensemble_on_hand_made_probabilities():
    p_mf = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    p_clip = torch.tensor([[0.1, 0.9], [1.0, 1.0]])  # row 2: an invalid mask (p_CLIP = 1)
    p = geometric_ensemble(p_mf, p_clip, 0.7)
    expected = torch.tensor([[0.8**0.3 * 0.1**0.7, 0.2**0.3 * 0.9**0.7], [0.5**0.3, 0.5**0.3]])
    torch.testing.assert_close(p, expected)
    assert p[0].argmax() == 1  # CLIP's vote wins at lambda 0.7 ...
    assert geometric_ensemble(p_mf, p_clip, 0.2)[0].argmax() == 0  # ... MaskFormer's at 0.2
    torch.testing.assert_close(geometric_ensemble(p_mf, p_clip, 0.0), p_mf)
    torch.testing.assert_close(geometric_ensemble(p_mf, p_clip, 1.0), p_clip)


def test_semantic_inference_sums_class_scores_over_masks():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    masks = torch.tensor([[[1.0, 0.0], [0.5, 0.0]], [[0.0, 1.0], [0.5, 0.0]]])
    seg = semantic_inference(probs, masks)
    torch.testing.assert_close(seg[:, 0, 0], torch.tensor([0.9, 0.1]))
    torch.testing.assert_close(seg[:, 1, 0], torch.tensor([0.55, 0.45]))
    torch.testing.assert_close(seg[:, 1, 1], torch.tensor([0.0, 0.0]))


def test_oracle_labels_pick_the_best_overlapping_class():
    label = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [255, 255, 255, 255]])
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2, 1:4] = True  # 2 px of class 0, 4 px of class 1 -> class 1
    masks[1, 2:, :] = True  # class 2 (ignore pixels do not count)
    probs = oracle_class_probs(masks, label, num_classes=4)
    assert probs.argmax(1)[:2].tolist() == [1, 2] and probs[2].sum() == 0 and probs.sum() == 2


def test_granularity_keeps_the_best_mask_per_class_or_all_close_ones():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    best_only = granularity_select(probs, 1.0)
    assert (best_only > 0).nonzero().tolist() == [[0, 0], [2, 1]]
    loose = granularity_select(probs, 0.75)
    assert (loose > 0).nonzero().tolist() == [[0, 0], [1, 0], [2, 1], [3, 1]]


# ---------------------------------------------------------------------------------------------- the net
def test_ovseg_outputs_scores_at_image_size_and_is_class_equivariant():
    net = tiny_ovseg(classify="ensemble", ensemble_weight=0.7, mask_threshold=0.4)
    images = torch.rand(2, 3, 48, 64)  # padded to 64x64 inside, cropped back
    names = ["red circle", "blue square", "striped grass", "plain sky"]
    with torch.no_grad():
        scores = net(images, names)
        permuted = net(images, [names[i] for i in (2, 0, 3, 1)])
    assert scores.shape == (2, 4, 48, 64) and (scores >= 0).all()
    torch.testing.assert_close(permuted, scores[:, [2, 0, 3, 1]], atol=1e-5, rtol=1e-4)


def test_classify_modes_follow_the_ensemble_formula():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64)
    names = ["red circle", "blue square", "striped grass"]
    results = {}
    for mode in ("maskformer", "clip", "ensemble"):
        net = tiny_ovseg(classify=mode, ensemble_weight=0.5, mask_threshold=0.5)
        with torch.no_grad():
            results[mode] = net(images, names)
    # hand-computed ensemble from the same pieces
    net = tiny_ovseg(ensemble_weight=0.5, mask_threshold=0.5)
    with torch.no_grad():
        text = net.region.text_features(names)
        out = net.maskformer(net.normalize_for_maskformer(images), text)
        masks = torch.nn.functional.interpolate(out["pred_masks"], size=(64, 64), mode="bilinear")[0].sigmoid()
        p_mf = out["pred_logits"][0].softmax(-1)[:, :-1]
        ((p_clip, valid),) = net.region_probs(images, [masks > 0.5], text)
        expected = semantic_inference(p_mf.sqrt() * p_clip.sqrt(), masks)
    torch.testing.assert_close(results["ensemble"][0], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results["maskformer"][0], semantic_inference(p_mf, masks), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        results["clip"][0], semantic_inference(p_clip * valid[:, None], masks), atol=1e-5, rtol=1e-4
    )


def test_lambda_zero_is_clip_only_and_lambda_follows_the_benchmark():
    """As the release: lambda 0 uses the CLIP classes alone (not MaskFormer's); ``ensemble_weights`` picks lambda by
    the benchmark (vocabulary name), other benchmarks use ``ensemble_weight``."""
    from ovseg_lab.vocab import Vocabulary

    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64)
    names = ("red circle", "blue square", "striped grass")
    with torch.no_grad():
        clip_only = tiny_ovseg(classify="clip", mask_threshold=0.5)(images, list(names))
        zero = tiny_ovseg(classify="ensemble", ensemble_weight=0.0, mask_threshold=0.5)(images, list(names))
        net = tiny_ovseg(ensemble_weight=0.7, ensemble_weights={"voc20": 0.2}, mask_threshold=0.5)
        listed = net(images, Vocabulary("voc20", names))
        other = net(images, Vocabulary("ade150", names))
        at_02 = tiny_ovseg(ensemble_weight=0.2, mask_threshold=0.5)(images, list(names))
        at_07 = tiny_ovseg(ensemble_weight=0.7, mask_threshold=0.5)(images, list(names))
    torch.testing.assert_close(zero, clip_only)
    torch.testing.assert_close(listed, at_02)
    torch.testing.assert_close(other, at_07)
    assert not torch.allclose(at_02, at_07)
    with pytest.raises(SetupError, match="ensemble_weights.voc20"):
        tiny_ovseg(ensemble_weights={"voc20": 1.5})


def test_no_valid_proposal_and_a_single_one_do_not_crash():
    """The release crashes on both (no valid mask: an unpacking error; one: the mask-prompt pooling); ours scores
    p_MF^(1 - lambda) without valid masks and classifies a single valid mask like any other."""
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64)
    names = ["red circle", "blue square"]
    none_valid = tiny_ovseg(mask_threshold=1.0, mask_prompt_depth=2)
    with torch.no_grad():
        scores = none_valid(images, names)
    assert torch.isfinite(scores).all() and scores.shape == (1, 2, 64, 64)
    net = tiny_ovseg(mask_threshold=0.5, mask_prompt_depth=2)
    one = torch.zeros(1, 64, 64, dtype=torch.bool)
    one[0, 10:30, 5:40] = True
    with torch.no_grad():
        ((probs, valid),) = net.region_probs(images, [one], net.region.text_features(names))
    assert valid.tolist() == [True] and torch.allclose(probs.sum(-1), torch.ones(1))


def test_analysis_modes_need_labels_and_oracle_labels_score_perfectly_on_exact_masks():
    net = tiny_ovseg(analysis="gt_masks")
    label = torch.zeros(1, 64, 64, dtype=torch.long)
    label[0, 20:40, 10:50] = 2
    with pytest.raises(SetupError):
        net(torch.rand(1, 3, 64, 64), ["a", "b", "c"])
    with torch.no_grad():
        scores = net(torch.rand(1, 3, 64, 64), ["a", "b", "c"], labels=label)
    assert scores.shape == (1, 3, 64, 64)
    # every pixel of a segment carries that segment's CLIP distribution (sums to 1)
    torch.testing.assert_close(scores.sum(1), torch.ones(1, 64, 64))
    oracle = tiny_ovseg(analysis="oracle_labels", mask_threshold=0.5)
    with torch.no_grad():
        # stub proposals: exactly the two ground-truth segments
        oracle.maskformer.forward = lambda images, text: {
            "pred_logits": torch.zeros(1, 2, 4),
            "pred_masks": torch.stack([(label[0] != 2).float(), (label[0] == 2).float()])[None] * 40 - 20,
        }
        pred = oracle(torch.rand(1, 3, 64, 64), ["a", "b", "c"], labels=label).argmax(1)
    assert torch.equal(pred, label)


def test_adapted_weights_without_mask_prompts_switch_prompts_off(tmp_path):
    net = tiny_ovseg(mask_prompt_depth=2)
    state = {k: v for k, v in net.clip.state_dict().items() if k != "mask_prompts"}
    torch.save(state, tmp_path / "clip.pt")
    loaded = OVSeg(tiny_clip(mask_prompt_depth=2), None, analysis="gt_masks", clip_weights=str(tmp_path / "clip.pt"))
    assert loaded.clip.mask_prompts is None
    with pytest.raises(SetupError, match="do not fit"):
        torch.save({**state, "mask_prompts": torch.zeros(1, 16, 64)}, tmp_path / "bad.pt")
        OVSeg(tiny_clip(mask_prompt_depth=2), None, analysis="gt_masks", clip_weights=str(tmp_path / "bad.pt"))


def test_sam_proposals_feed_the_region_classifier():
    sam_cfg = dict(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            output_channels=16,
            window_size=4,
            global_attn_indexes=[1],
            mlp_dim=64,
            num_pos_feats=8,
        ),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(
            hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=16
        ),
    )
    torch.manual_seed(0)
    sam = SAMProposals(
        None,
        sam_cfg,
        points_per_side=3,
        points_per_batch=9,
        pred_iou_thresh=-1e9,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
    )
    masks, scores = sam(torch.rand(3, 40, 56))
    assert masks.dtype == torch.bool and masks.shape[1:] == (40, 56) and masks.shape[0] == scores.shape[0] >= 1
    net = OVSeg(tiny_clip(), None, proposals="sam", sam=sam, templates=["a {}"], granularity=1.0)
    with torch.no_grad():
        seg = net(torch.rand(1, 3, 40, 56), ["red circle", "grass"])
    assert seg.shape == (1, 2, 40, 56) and (seg >= 0).all() and (seg <= 1).all()
