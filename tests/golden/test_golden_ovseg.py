"""OVSeg equals the official release (facebookresearch/ov-seg): golden fixtures made by make_golden.py.

Each test rebuilds the official state dict from the fixture's seed and recipe, converts it with OUR converter
(ovseg_lab.convert.ovseg), loads it strictly into OUR modules and compares OUR outputs with the official ones
(relative error <= 1e-5, labels 100% equal where the official top two scores are apart). What each fixture ran on
the official side: official_ovseg.py.
"""

from __future__ import annotations

import pytest
import torch

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.convert.ovseg import convert_maskformer_state_dict, convert_ovseg_state_dict
from ovseg_lab.eval.inference import InferenceConfig, segment
from ovseg_lab.metrics import SegmentationMetric
from ovseg_lab.models.maskformer import MaskFormer
from ovseg_lab.models.ovseg import OVSeg
from ovseg_lab.vocab import Vocabulary
from tests.golden.harness import TOLERANCE, digest_error, load_fixture, openai_clip_cfg, perturbed_state, seeded_input


def assert_close(ours: torch.Tensor, expected: dict, what: str, floor: float = 1e-30) -> None:
    error = digest_error(ours, expected, floor=floor)
    assert error <= TOLERANCE, f"{what}: relative error {error:.2e} > {TOLERANCE:.0e}"


def our_clip(cfg: dict) -> CLIPBackbone:
    return CLIPBackbone(model_name="golden", pretrained=None, model_cfg=openai_clip_cfg(cfg), image_size=cfg["image_resolution"],
                        position_embedding="forward", quick_gelu=True, templates="vild14", synonyms="full",
                        mask_prompt_depth=cfg["mask_prompt_depth"], feature_layers=())


def our_ovseg(cfg: dict, **kwargs) -> OVSeg:
    swin, head = cfg["swin"], cfg["head"]
    backbone = {"type": "swin", "embed_dim": swin["embed_dim"], "depths": swin["depths"], "num_heads": swin["num_heads"],
                "window_size": swin["window_size"], "drop_path_rate": swin["drop_path_rate"]}

    def maskformer(embed_dim: int) -> MaskFormer:
        return MaskFormer(backbone, embed_dim, num_queries=head["num_queries"], hidden_dim=head["hidden_dim"],
                          heads=head["nheads"], ffn_dim=head["dim_feedforward"], dec_layers=head["dec_layers"],
                          conv_dim=head["conv_dim"], mask_dim=head["mask_dim"], class_hidden=head["embed_hidden_dim"])

    return OVSeg(our_clip(cfg["clip"]), maskformer, mask_threshold=cfg["mask_threshold"], templates="vild14", **kwargs)


def loaded_ovseg(fixture: dict, **kwargs) -> OVSeg:
    net = our_ovseg(fixture["config"], **kwargs)
    state = convert_ovseg_state_dict(perturbed_state(fixture["state"], fixture["seed"]), prefix="")
    net.load_state_dict(state, strict=True)
    return net.eval()


@pytest.mark.parametrize("weight", ["07", "00"])
def test_ovseg_inference_equals_official(weight):
    """detectron2's test resize (PIL bilinear, short side 160 -> 160x215: not a multiple of 32), normalisation then
    zero padding (the mean colour), the Swin MaskFormer (output norms, padded windows), CLIP-space class logits with
    the no-object embedding, masked crops classified by the CLIP with mask prompts (ViLD prompts), the ensemble at
    lambda 0.7 and the release's lambda 0 (CLIP only), the semantic map resized back to the original 75x101."""
    fixture = load_fixture(f"ovseg_inference_swin_w{weight}")
    cfg, out = fixture["config"], fixture["outputs"]
    net = loaded_ovseg(fixture, ensemble_weight=cfg["ensemble_weight"])
    captured = {}
    net.maskformer.register_forward_hook(lambda m, i, o: captured.update(o))
    protocol = InferenceConfig(mode="whole", score="identity", resize_short=cfg["test_short"], resize_max=cfg["test_max"])
    image = fixture["inputs"]["image"].permute(2, 0, 1)[None]  # uint8 (1, 3, 75, 101)
    vocabulary = Vocabulary("golden", tuple(cfg["names"]))
    with torch.no_grad():
        scores = segment(lambda x: net(x, vocabulary), image, protocol)[0]
        tokens = net.clip.tokenize([t.format(n) for n in cfg["names"] for t in cfg["templates"]])
    assert torch.equal(tokens.to(torch.int32), out["tokens"])
    assert_close(captured["pred_masks"], out["pred_masks"], "MaskFormer mask logits")
    assert_close(scores, out["scores"], "semantic scores")
    labels = scores.argmax(dim=0).to(torch.int16)
    decided = ~out["ties"]
    assert decided.float().mean() > 0.99
    assert torch.equal(labels[decided], out["labels"][decided])


def test_ovseg_metric_equals_official_evaluator():
    """GeneralizedSemSegEvaluator on hand-made cases (a class only predicted, predictions on void) = our mmseg
    convention; our detectron2 convention (classes present in the ground truth only) is really another number."""
    fixture = load_fixture("ovseg_metric")
    results = {}
    for convention in ("mmseg", "detectron2"):
        metric = SegmentationMetric(3, ignore_index=255, convention=convention)
        for case in fixture["inputs"]["cases"]:
            metric.update(torch.tensor(case["pred"])[None], torch.tensor(case["gt"])[None])
        results[convention] = metric.compute()
    official = fixture["outputs"]
    ours = results["mmseg"]
    for key, our_key in (("mIoU", "mIoU"), ("mACC", "mean_accuracy"), ("pACC", "pixel_accuracy")):
        assert abs(ours[our_key] - official[key]) <= TOLERANCE * abs(official[key]), (key, ours[our_key], official[key])
    assert abs(results["detectron2"]["mIoU"] - official["mIoU"]) > 1.0


def our_maskformer(cfg: dict) -> MaskFormer:
    head = cfg["head"]
    if cfg["backbone"] == "swin":
        swin = cfg["swin"]
        backbone = {"type": "swin", "embed_dim": swin["embed_dim"], "depths": swin["depths"], "num_heads": swin["num_heads"],
                    "window_size": swin["window_size"], "drop_path_rate": swin["drop_path_rate"]}
    else:  # experiment=ovseg ovseg.setting=r101c_vitb16's backbone
        backbone = {"type": "timm", "name": "resnet101c", "pretrained": False, "multi_grid": [1, 2, 4],
                    "model_kwargs": {"stem_width": 64}, "frozen_bn": True, "freeze_at": 2}
    return MaskFormer(backbone, cfg["embed_dim"], num_queries=head["num_queries"], hidden_dim=head["hidden_dim"],
                      heads=head["nheads"], ffn_dim=head["dim_feedforward"], dec_layers=head["dec_layers"],
                      conv_dim=head["conv_dim"], mask_dim=head["mask_dim"], class_hidden=head["embed_hidden_dim"])


@pytest.mark.parametrize("backbone", ["swin", "r101c"])
def test_ovseg_maskformer_equals_official(backbone):
    """Swin (relative position bias, windows padded on a 24x32 -> 3x4 map, shifted windows kept on maps smaller
    than the window, odd maps padded before merging, output norms norm0-norm3) or detectron2's deeplab R-101c
    (stem 64-64-128, stride in the 3x3, multi-grid 1/2/4 in res5, FrozenBN); BasePixelDecoder (GN); DETR decoder
    (post-norm, no encoder); CLIP-space class logits with the no-object embedding; last and auxiliary layers."""
    fixture = load_fixture(f"ovseg_maskformer_{backbone}")
    cfg, out = fixture["config"], fixture["outputs"]
    net = our_maskformer(cfg)
    state = convert_maskformer_state_dict(
        perturbed_state(fixture["state"], fixture["seed"]), prefix="")
    net.load_state_dict(state, strict=True)
    net.eval()
    images = seeded_input(tuple(fixture["inputs"]["image_shape"]), fixture["seed"], "maskformer_images")
    text = seeded_input(tuple(fixture["inputs"]["text_shape"]), fixture["seed"], "maskformer_text")
    with torch.no_grad():
        result = net(images, text)
    layers = [result] + result["aux_outputs"]
    assert len(layers) == len(out["pred_logits"]) == cfg["head"]["dec_layers"]
    for i, layer in enumerate(layers):
        assert_close(layer["pred_logits"], out["pred_logits"][i], f"class logits of layer {i}")
        assert_close(layer["pred_masks"], out["pred_masks"][i], f"mask logits of layer {i}")
    if backbone == "r101c":  # FREEZE_AT 2: the stem and res2 do not train
        frozen = {n for n, p in net.backbone.named_parameters() if not p.requires_grad}
        assert frozen and all(n.startswith(("body.conv1.", "body.bn1.", "body.layer1.")) for n in frozen)


@pytest.mark.parametrize("vocabulary", ["ade150", "ade847", "pc59", "pc459", "voc20", "coco_stuff171"])
def test_ovseg_class_strings_and_token_ids_equal_official(vocabulary):
    """``model.class_strings: ovseg`` sends each class the string the release embeds (its registration lists,
    stripped; ADE-150 from detectron2's built-in list), and the text tower receives the release's token ids."""
    from ovseg_lab.vocab import load_vocabulary, with_release_strings

    official = load_fixture("ovseg_class_strings")["outputs"][vocabulary]
    ours = list(with_release_strings(load_vocabulary(vocabulary), "ovseg").classes)
    if official["paired_by"] == "index":
        assert ours == official["strings"]
    else:  # PC-59 / PC-459: the release orders its train ids otherwise; every class gets its own official string
        assert sorted(ours) == sorted(official["strings"])
    clip = our_clip(load_fixture("ovseg_inference_swin_w07")["config"]["clip"])
    template = load_fixture("ovseg_class_strings")["config"]["template"]
    tokens = clip.tokenize([template.format(name) for name in ours])
    index = [official["strings"].index(name) for name in ours]
    expected = official["tokens"][index].long()
    assert torch.equal(tokens[:, : expected.shape[1]], expected) and not tokens[:, expected.shape[1]:].any()


@pytest.mark.parametrize("setting", ["swinb_vitl14", "r101c_vitb16"])
def test_ovseg_paper_recipe_keeps_the_official_behaviour(compose_cfg, setting):
    """What the golden tests prove is what experiment=ovseg runs; the toy keeps the project defaults."""
    cfg = compose_cfg("train", ["experiment=ovseg", f"ovseg.setting={setting}"])
    model = cfg.model
    assert model.class_strings == "ovseg" and cfg.clip.synonyms == "full" and cfg.clip.templates == "vild14"
    assert model.metric_convention == "mmseg"
    assert dict(model.net.ensemble_weights) == {"ade150": 0.7, "ade847": 0.7, "pc59": 0.6, "pc459": 0.6, "voc20": 0.45}
    expected = (640, 2560) if setting == "swinb_vitl14" else (512, 2048)
    assert (model.inference.resize_short, model.inference.resize_max) == expected and model.net.short_side is None
    backbone = model.net.maskformer.backbone
    assert backbone.type == ("swin" if setting == "swinb_vitl14" else "timm")
    toy = compose_cfg("train", ["experiment=quickstart", "model=ovseg"])
    assert toy.model.class_strings is None and toy.model.metric_convention == "detectron2"
