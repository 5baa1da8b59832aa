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
from tests.golden.harness import (
    TOLERANCE,
    digest_error,
    load_fixture,
    openai_clip_cfg,
    perturbed_state,
    relative_error,
    seeded_input,
)


def assert_close(ours: torch.Tensor, expected: dict, what: str, floor: float = 1e-30) -> None:
    error = digest_error(ours, expected, floor=floor)
    assert error <= TOLERANCE, f"{what}: relative error {error:.2e} > {TOLERANCE:.0e}"


def our_clip(cfg: dict) -> CLIPBackbone:
    return CLIPBackbone(
        model_name="golden",
        pretrained=None,
        model_cfg=openai_clip_cfg(cfg),
        image_size=cfg["image_resolution"],
        position_embedding="forward",
        quick_gelu=True,
        templates="vild14",
        synonyms="full",
        mask_prompt_depth=cfg["mask_prompt_depth"],
        feature_layers=(),
    )


def our_ovseg(cfg: dict, **kwargs) -> OVSeg:
    swin, head = cfg["swin"], cfg["head"]
    backbone = {
        "type": "swin",
        "embed_dim": swin["embed_dim"],
        "depths": swin["depths"],
        "num_heads": swin["num_heads"],
        "window_size": swin["window_size"],
        "drop_path_rate": swin["drop_path_rate"],
    }

    def maskformer(embed_dim: int) -> MaskFormer:
        return MaskFormer(
            backbone,
            embed_dim,
            num_queries=head["num_queries"],
            hidden_dim=head["hidden_dim"],
            heads=head["nheads"],
            ffn_dim=head["dim_feedforward"],
            dec_layers=head["dec_layers"],
            conv_dim=head["conv_dim"],
            mask_dim=head["mask_dim"],
            class_hidden=head["embed_hidden_dim"],
        )

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
    protocol = InferenceConfig(
        mode="whole", score="identity", resize_short=cfg["test_short"], resize_max=cfg["test_max"]
    )
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
        backbone = {
            "type": "swin",
            "embed_dim": swin["embed_dim"],
            "depths": swin["depths"],
            "num_heads": swin["num_heads"],
            "window_size": swin["window_size"],
            "drop_path_rate": swin["drop_path_rate"],
        }
    else:  # experiment=ovseg ovseg.setting=r101c_vitb16's backbone
        backbone = {
            "type": "timm",
            "name": "resnet101c",
            "pretrained": False,
            "multi_grid": [1, 2, 4],
            "model_kwargs": {"stem_width": 64},
            "frozen_bn": True,
            "freeze_at": 2,
        }
    return MaskFormer(
        backbone,
        cfg["embed_dim"],
        num_queries=head["num_queries"],
        hidden_dim=head["hidden_dim"],
        heads=head["nheads"],
        ffn_dim=head["dim_feedforward"],
        dec_layers=head["dec_layers"],
        conv_dim=head["conv_dim"],
        mask_dim=head["mask_dim"],
        class_hidden=head["embed_hidden_dim"],
    )


@pytest.mark.parametrize("backbone", ["swin", "r101c"])
def test_ovseg_maskformer_equals_official(backbone):
    """Swin (relative position bias, windows padded on a 24x32 -> 3x4 map, shifted windows kept on maps smaller
    than the window, odd maps padded before merging, output norms norm0-norm3) or detectron2's deeplab R-101c
    (stem 64-64-128, stride in the 3x3, multi-grid 1/2/4 in res5, FrozenBN); BasePixelDecoder (GN); DETR decoder
    (post-norm, no encoder); CLIP-space class logits with the no-object embedding; last and auxiliary layers."""
    fixture = load_fixture(f"ovseg_maskformer_{backbone}")
    cfg, out = fixture["config"], fixture["outputs"]
    net = our_maskformer(cfg)
    state = convert_maskformer_state_dict(perturbed_state(fixture["state"], fixture["seed"]), prefix="")
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
    assert torch.equal(tokens[:, : expected.shape[1]], expected) and not tokens[:, expected.shape[1] :].any()


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


# ---------------------------------------------------------------------------------------------- released checkpoints
@pytest.mark.slow
@pytest.mark.parametrize("setting", ["swinb_vitl14", "r101c_vitb16"])
def test_ovseg_released_layouts_convert_into_the_paper_models(setting):
    """Every key of the released detectron2 checkpoints (Swin-B with norm0-norm3 or R-101c, the DETR head, the CLIP
    with mask prompts, ``clip_adapter.non_object_embedding``) lands on a parameter of experiment=ovseg's model with
    its shape, and nothing of that model is left out (shapes only; building the full-size model is slow)."""
    from ovseg_lab.build import build_net
    from ovseg_lab.convert.common import check_against
    from ovseg_lab.convert.ovseg import ovseg_overrides

    recipe = load_fixture("ovseg_released")["state"][setting]
    official = {key: torch.empty(shape) for key, shape, _, _ in recipe}
    overrides = ["experiment=ovseg", *ovseg_overrides(official)]
    assert ("ovseg.setting=r101c_vitb16" in overrides) == (setting == "r101c_vitb16")
    net = build_net(overrides)
    converted = convert_ovseg_state_dict(official)
    check_against(converted, {f"net.{k}": v for k, v in net.state_dict().items()}, setting)
    assert converted["net.maskformer.no_object_embedding"].shape == official["clip_adapter.non_object_embedding"].shape


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["r101c_vitb16", "swinb_vitl14"])
def test_ovseg_released_checkpoint_converts_and_evaluates(setting, tmp_path, toy_data_dir):
    """An official OVSeg checkpoint at its released shapes (random weights from the generator's recipe) converts
    with ``--format ovseg`` without overrides and evaluates with the command the converter prints (0.8 GB / 2 GB
    of weights: slow)."""
    from tests.golden.harness import convert_and_evaluate

    fixture = load_fixture("ovseg_released")
    expect = ["experiment=ovseg", "clip.mask_prompt_depth=3"] + (
        ["ovseg.setting=r101c_vitb16"] if setting == "r101c_vitb16" else []
    )
    run_dir = convert_and_evaluate(
        "ovseg",
        {"model": perturbed_state(fixture["state"][setting], fixture["seed"])},
        tmp_path,
        toy_data_dir,
        expect,
        eval_overrides=("model.inference.resize_short=64",),
    )
    assert (run_dir / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------- CLIP adaptation
def test_ovseg_adaptation_loss_parameter_groups_and_crop_transform_equal_official():
    """The release's CLIP adaptation: ``ClipLoss`` and its gradients on a fixed batch with a repeated noun (ours:
    ``duplicate_texts=keep``), the optimiser's weight-decay exemption (``param_groups=release``: norms, biases,
    1-d parameters and the logit scale) mapped through our converter, and the masked-crop transform
    (``augment=random_resized_crop``, ``mask_from=colour``) on a fixed crop with the same torch seed."""
    from ovseg_lab.convert.ovseg import convert_ovseg_clip_state_dict
    from ovseg_lab.data.mask_pairs import RELEASE_MASK_COLOUR, release_crop_transform
    from ovseg_lab.layers.contrastive import info_nce
    from ovseg_lab.lit.ovseg import release_no_decay

    fixture = load_fixture("ovseg_adaptation")
    inputs, out = fixture["inputs"], fixture["outputs"]
    image, text = inputs["image"].clone().requires_grad_(True), inputs["text"].clone().requires_grad_(True)
    loss = info_nce(image, text, inputs["logit_scale"], gather=False)
    loss.backward()
    assert relative_error(loss.detach(), out["loss"]) <= TOLERANCE

    # the release's ClipLoss takes unit vectors as they are; info_nce normalises its inputs itself, so the gradient
    # it returns is the release's through that normalisation: (I - x x^T) g / |x| (the same for every parameter
    # upstream of the unit features, whose radial component the Jacobian of their own normalisation removes)
    def through_normalisation(grad, x):
        unit = x / x.norm(dim=-1, keepdim=True)
        return (grad - (grad * unit).sum(-1, keepdim=True) * unit) / x.norm(dim=-1, keepdim=True)

    assert relative_error(image.grad, through_normalisation(out["grad_image"], inputs["image"])) <= TOLERANCE
    assert relative_error(text.grad, through_normalisation(out["grad_text"], inputs["text"])) <= TOLERANCE

    cfg = fixture["config"]["clip"]
    vision, text_cfg = cfg["vision_cfg"], cfg["text_cfg"]
    clip = CLIPBackbone(
        model_name="golden",
        pretrained=None,
        model_cfg={
            "embed_dim": cfg["embed_dim"],
            "vision_cfg": {k: vision[k] for k in ("layers", "width", "head_width", "patch_size", "image_size")},
            "text_cfg": text_cfg,
        },
        quick_gelu=True,
        feature_layers=(),
        mask_prompt_depth=vision["mask_emb_depth"],
    )
    shapes = {name: torch.zeros(1) for name in out["parameters"]}
    renamed = {
        official: next(iter(convert_ovseg_clip_state_dict({official: shapes[official]}, prefix="")))
        for official in out["parameters"]
    }
    ours = dict(clip.named_parameters())
    expected_exempt = set()
    for official, our_key in renamed.items():
        our_key = our_key.removeprefix("clip.")
        for key in (
            [our_key] if our_key in ours else [our_key.replace("in_proj_weight", f"{q}_proj_weight") for q in "qkv"]
        ):
            assert key in ours, key
            if official in out["no_decay"]:
                expected_exempt.add(key)
    assert {n for n, p in ours.items() if release_no_decay(n, p)} == expected_exempt

    torch.manual_seed(fixture["seed"])
    crop = inputs["crop"].permute(2, 0, 1).contiguous()
    tensor, mask = release_crop_transform(
        crop, torch.ones(crop.shape[1:], dtype=torch.bool), "colour", RELEASE_MASK_COLOUR
    )
    assert torch.equal(mask, out["crop_mask"]) and 0 < mask.float().mean() < 1
    normalised = clip.normalize(tensor.float()[None] / 255)[0]
    assert_close(normalised, out["crop_tensor"], "RandomResizedCrop (PIL bicubic) + normalisation")
