"""GroupViT equals the official release (NVlabs/GroupViT): golden fixtures made by make_golden.py --method groupvit.

Each test rebuilds the official state dict from the fixture's seed and recipe, converts it with OUR converter
(ovseg_lab.convert.groupvit), loads it strictly into OUR OVSegmentor (GroupViTEncoder + GroupViTTextEncoder) and
compares with the official outputs (relative error <= 1e-5, labels 100% equal). What each fixture ran on the
official side: official_groupvit.py. The encoder fixtures cover OVSegmentor's two-stage group ViT too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ovseg_lab.clip.prompts import resolve_templates
from ovseg_lab.convert.groupvit import convert_groupvit_hf_state_dict, convert_groupvit_state_dict
from ovseg_lab.data.captions import noun_prompts
from ovseg_lab.eval.inference import InferenceConfig, keep_ratio_size, segment
from ovseg_lab.layers.contrastive import info_nce, multi_label_info_nce
from ovseg_lab.models.ovsegmentor import GroupViTEncoder, OVSegmentor
from ovseg_lab.models.text_encoders import GroupViTTextEncoder
from ovseg_lab.vocab import Vocabulary, load_vocabulary, release_class_strings
from tests.golden.harness import (
    TOLERANCE,
    convert_and_evaluate,
    digest_error,
    load_fixture,
    perturbed_state,
    relative_error,
    seeded_input,
)


def our_net(fixture: dict, activation: str = "quick_gelu", **net_kwargs) -> OVSegmentor:
    cfg = fixture["config"]
    enc, text, projection = cfg["encoder"], cfg["text"], cfg["projection"]
    encoder = GroupViTEncoder(
        image_size=enc["img_size"],
        patch_size=enc["patch_size"],
        embed_dim=enc["embed_dim"],
        depths=enc["depths"],
        num_heads=enc["num_heads"][0],
        num_group_tokens=enc["num_group_tokens"],
        num_output_groups=enc["num_output_groups"],
        drop_path_rate=0.0,
        hard_assignment=True,
    )
    text_encoder = GroupViTTextEncoder(
        context_length=text["context_length"],
        width=text["width"],
        layers=text["layers"],
        vocab_size=text["vocab_size"],
        activation=activation,
    )
    net = OVSegmentor(
        encoder,
        text_encoder,
        embed_dim=projection["output_dim"],
        proj_hidden=projection["inner_dim"],
        objective="multi_label",
        prompt_template="a photo of a {}.",
        **net_kwargs,
    )
    state = convert_groupvit_state_dict(perturbed_state(fixture["state"], fixture["seed"]), prefix="")
    net.load_state_dict(state, strict=True)
    return net.eval()


def assert_close(name: str, ours: torch.Tensor, expected, floor: float = 1e-30) -> None:
    ours = ours.detach()
    error = (
        digest_error(ours, expected, floor=floor)
        if isinstance(expected, dict)
        else relative_error(ours, expected, floor)
    )
    assert error <= TOLERANCE, f"{name}: relative error {error:.2e} > {TOLERANCE:.0e}"


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("encoder", ["groupvit", "ovsegmentor"])
def test_groupvit_encoder_projectors_and_text_tower_equal_official(encoder):
    """Eval-mode group ViT (hard assignment; three stages as GroupViT, two as OVSegmentor) at its training grid and
    at another one (bicubic position interpolation): segment tokens, every stage's hard and soft assignment,
    projected image / group features; the QuickGELU text tower: clip token ids, pooled and projected features."""
    fixture = load_fixture(f"groupvit_model_{encoder}")
    net = our_net(fixture)
    with torch.no_grad():
        for size_name, (h, w) in fixture["config"]["image_sizes"].items():
            expected = fixture["outputs"][size_name]
            out = net.image_encoder(seeded_input((2, 3, h, w), fixture["seed"], f"images_{size_name}"))
            assert_close(f"{size_name} tokens", out.tokens, expected["tokens"])
            for stage, assignment in enumerate(out.assignments):
                assert_close(f"{size_name} soft {stage}", assignment.soft, expected["soft"][stage])
                assert_close(f"{size_name} hard {stage}", assignment.hard, expected["hard"][stage])
            assert_close(f"{size_name} image_x", net.image_head(out.tokens.mean(dim=1)), expected["image_x"])
            assert_close(f"{size_name} image_feat", net.image_head(out.tokens), expected["image_feat"])
        prompts = fixture["config"]["prompts"]
        text = fixture["outputs"]["text"]
        assert torch.equal(net.text_encoder.tokenizer(prompts).to(torch.int32), text["tokens"])
        pooled = net.text_encoder.encode(prompts)[0]
        assert_close("text pooled", pooled, text["pooled"])
        assert_close("text_x", net.text_head(pooled), text["text_x"])


def test_groupvit_text_tower_gelu_is_the_documented_deviation():
    """activation=gelu (open_clip's exact GELU) is not the release's QuickGELU."""
    fixture = load_fixture("groupvit_model_groupvit")
    net = our_net(fixture, activation="gelu")
    with torch.no_grad():
        pooled = net.text_encoder.encode(fixture["config"]["prompts"])[0]
    assert digest_error(pooled, fixture["outputs"]["text"]["pooled"]) > 1e-3


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("case", ["scale_init", "scale_clamped"])
def test_groupvit_losses_and_gradients_equal_official(case):
    """Image-caption InfoNCE and the multi-label loss (3 prompts per image, the release's uniform targets) on a
    fixed batch: values and the gradients of features and both logit scales (also above the clamp at 100)."""
    fixture = load_fixture("groupvit_losses")
    cfg, expected, seed = fixture["config"], fixture["outputs"][case], fixture["seed"]
    b, k, dim = cfg["batch"], cfg["k"], cfg["dim"]
    image = seeded_input((b, dim), seed, "loss_image").requires_grad_(True)
    text = seeded_input((b, dim), seed, "loss_text").requires_grad_(True)
    prompts = seeded_input((b, k, dim), seed, "loss_prompts").requires_grad_(True)
    log_scale = torch.tensor(cfg["log_scales"][case], requires_grad=True)
    log_multi = torch.tensor(cfg["log_scales"][case] + 0.1, requires_grad=True)
    contrastive = info_nce(image, text, log_scale.exp().clamp(max=100.0))
    multi_label = multi_label_info_nce(
        image, prompts, torch.ones(b, k, dtype=torch.bool), log_multi.exp().clamp(max=100.0)
    )
    (contrastive + multi_label).backward()
    assert_close("contrastive", contrastive, expected["contrastive"])
    assert_close("multi_label", multi_label, expected["multi_label"])
    for name, grad in (
        ("grad_image", image.grad),
        ("grad_text", text.grad),
        ("grad_prompts", prompts.grad),
        ("grad_logit_scale", log_scale.grad),
        ("grad_multi_label_logit_scale", log_multi.grad),
    ):
        assert_close(name, grad, expected[name], floor=1e-12)


# ------------------------------------------------------------------------------------------------ prompts
def test_groupvit_noun_prompts_equal_official_draws_and_token_ids():
    """30 captions in order with numpy's generator seeded once: the nouns drawn, one of the 80 ImageNet templates per
    noun, the caption itself padding captions with fewer than 3 nouns; and the clip token ids of caption + prompts."""
    fixture = load_fixture("groupvit_prompts")
    cfg = fixture["config"]
    templates = resolve_templates("imagenet80")
    assert list(templates) == cfg["templates"]
    rng = np.random.RandomState(fixture["seed"])
    tokenizer = GroupViTTextEncoder(context_length=77, width=64, layers=1).tokenizer
    for index, (caption, nouns, expected) in enumerate(zip(cfg["captions"], cfg["nouns"], fixture["outputs"]["texts"])):
        prompts, valid = noun_prompts(caption, nouns, cfg["max_word"], templates, rng, padding="caption")
        assert [caption] + prompts == expected, caption
        assert all(valid)
        assert torch.equal(tokenizer([caption] + prompts).to(torch.int32), fixture["outputs"]["tokens"][index])


def test_groupvit_model_draws_the_official_prompts_and_mask_is_ours():
    """OVSegmentor.multi_label_prompts (prompt_seed = the release's numpy seed) sends the same strings;
    multi_label_padding=mask leaves the padding out instead (our option)."""
    fixture = load_fixture("groupvit_prompts")
    cfg = fixture["config"]
    net = our_net(load_fixture("groupvit_model_groupvit"), prompt_seed=fixture["seed"])
    prompts, valid = net.multi_label_prompts(cfg["nouns"], cfg["captions"])
    assert prompts == [p for texts in fixture["outputs"]["texts"] for p in texts[1:]] and bool(valid.all())
    masked = our_net(load_fixture("groupvit_model_groupvit"), prompt_seed=fixture["seed"], multi_label_padding="mask")
    prompts, valid = masked.multi_label_prompts([["dog"], []], ["a dog", "beautiful"])
    assert valid.tolist() == [[True, False, False], [False, False, False]] and prompts[1:3] == ["", ""]


# ------------------------------------------------------------------------------------------------ protocol
PROTOCOL = InferenceConfig(
    mode="slide",
    slide_size=448,
    slide_max=2048,
    crop=448,
    stride=224,
    keep_ratio=True,
    global_view=False,
    score="identity",
)


def run_protocol(
    fixture: dict, cfg: InferenceConfig = PROTOCOL, net_kwargs: dict | None = None
) -> tuple[torch.Tensor, OVSegmentor, Vocabulary]:
    classes = fixture["config"]["classes"]
    net = our_net(
        fixture,
        background_thresholds={"voc": fixture["config"]["protocol"]["bg_thresh"]},
        topk_classes=5,
        **(net_kwargs or {}),
    )
    vocabulary = Vocabulary("voc", tuple(classes))  # background first, as the release's channel 0
    with torch.no_grad():
        scores = segment(lambda x: net(x, vocabulary), fixture["inputs"]["image"][None], cfg)
    return scores, net, vocabulary


@pytest.mark.parametrize("image", ["voc", "elongated"])
def test_groupvit_zero_shot_protocol_equals_official(image):
    """mmcv's keep-ratio resize (short side 448, long side capped at 2048: the 60x400 image becomes 307x2048 and
    is run with 307x448 windows), mmseg's slide inference (stride 224, averaged, resized back), the release's
    chained soft maps, top-5 classes, background threshold 0.95 and 'a photo of a {}.' class embeddings."""
    fixture = load_fixture(f"groupvit_protocol_{image}")
    height, width = fixture["inputs"]["image"].shape[-2:]
    assert keep_ratio_size(height, width, 448, 2048) == tuple(fixture["config"]["resized"])  # mmcv's rescale_size
    scores, net, vocabulary = run_protocol(fixture)
    with torch.no_grad():
        text = net.class_embeddings([c for c in vocabulary.classes if c != "background"])
    assert_close("text embedding", text, fixture["outputs"]["text_embedding"])
    assert_close("scores", scores, fixture["outputs"]["logits"])
    agree = (scores.argmax(1).to(torch.uint8) == fixture["outputs"]["labels"]).float().mean().item()
    assert agree == 1.0, f"{100 * (1 - agree):.3f}% of pixels change label"


@pytest.mark.slow
def test_groupvit_long_side_cap_and_patch_remainder_matter_for_the_elongated_image():
    """Without mmcv's 2048 cap the 60x400 image would be resized to 448x2987: other windows, other scores (14
    windows of 448: slow). patch_remainder=resize (ours) resizes the 307-row windows to 304 rows where the release's
    strided patch convolution drops the last 3."""
    fixture = load_fixture("groupvit_protocol_elongated")
    uncapped = InferenceConfig(**{**PROTOCOL.__dict__, "slide_max": None})
    scores, _, _ = run_protocol(fixture, uncapped)
    assert digest_error(scores, fixture["outputs"]["logits"]) > 1e-3
    scores, _, _ = run_protocol(fixture, net_kwargs={"patch_remainder": "resize"})
    assert digest_error(scores, fixture["outputs"]["logits"]) > 1e-2


# ------------------------------------------------------------------------------------------------ class strings
def test_groupvit_class_strings_are_the_release_classes(compose_cfg):
    """assets/class_strings/groupvit/ maps our packaged names to the release's CLASSES in order ("diningtable" ->
    "table", "pottedplant" -> "plant", "tvmonitor" -> "monitor", Context's "aeroplane" -> "airplane"), and
    model=groupvit sends them."""
    classes = load_fixture("groupvit_released")["config"]["classes"]
    for vocabulary, entry in classes.items():
        strings = release_class_strings("groupvit", vocabulary)
        ours = [c for c in load_vocabulary(vocabulary).classes if c != "background"]
        assert [strings[c] for c in ours] == [c for c in entry["classes"] if c != "background"]
        assert strings.get("background", "background") == "background"
    voc = release_class_strings("groupvit", "voc21")
    assert (voc["diningtable"], voc["pottedplant"], voc["tvmonitor"]) == ("table", "plant", "monitor")
    assert release_class_strings("groupvit", "pc60")["aeroplane"] == "airplane"
    assert compose_cfg("train", ["model=groupvit"]).model.class_strings == "groupvit"


# ------------------------------------------------------------------------------------------------ checkpoints
def test_groupvit_released_layout_maps_onto_our_modules():
    """Every key of the released ViT-S checkpoint (group_vit_gcc_yfcc_30e) is understood and the converted keys and
    shapes are exactly those of model=groupvit (built on the meta device)."""
    from ovseg_lab.build import build_net
    from ovseg_lab.convert.groupvit import groupvit_overrides

    recipe = load_fixture("groupvit_released")["state"]
    official = {key: torch.empty(shape, device="meta") for key, shape, *_ in recipe}
    converted = convert_groupvit_state_dict(official, prefix="")
    with torch.device("meta"):
        net = build_net(["model=groupvit", *groupvit_overrides(official)])
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in net.state_dict().items()}


def _tiny_hf_model(seed: int = 0):
    from transformers import GroupViTConfig, GroupViTModel

    config = GroupViTConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=1,
            max_position_embeddings=77,
            vocab_size=49408,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=192,
            depths=[2, 1, 1],
            num_hidden_layers=4,
            num_group_tokens=[8, 4, 0],
            num_output_groups=[8, 4, 4],
            num_attention_heads=6,
            image_size=224,
            patch_size=16,
        ),
        projection_dim=32,
        projection_intermediate_dim=96,
    )
    torch.manual_seed(seed)
    model = GroupViTModel(config).eval()
    from tests.golden.harness import state_recipe

    state = perturbed_state(state_recipe(model.state_dict()), seed)
    current = model.state_dict()
    model.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()}, strict=True)
    return model, state


def test_groupvit_hf_layout_converts_exactly():
    """transformers' GroupViTModel (perturbed random weights) -> --format groupvit_hf -> our modules give its image
    and text features (q/k/v fused, projections, QuickGELU text tower)."""
    model, state = _tiny_hf_model()
    fixture = load_fixture("groupvit_model_groupvit")  # the same sizes as the tiny transformers model
    net = our_net(fixture)
    net.load_state_dict(convert_groupvit_hf_state_dict(state, prefix=""), strict=True)
    images = seeded_input((2, 3, 224, 224), 0, "hf_images")
    prompts = fixture["config"]["prompts"]
    with torch.no_grad():
        ids = net.text_encoder.tokenizer(prompts)
        expected_image = model.get_image_features(pixel_values=images)
        expected_text = model.get_text_features(input_ids=ids)
        ours_image = net.image_head(net.image_encoder(images).tokens.mean(dim=1))
        ours_text = net.encode_text(prompts)
    expected_image = getattr(expected_image, "pooler_output", expected_image)
    expected_text = getattr(expected_text, "pooler_output", expected_text)
    assert_close("hf image features", ours_image, expected_image)
    assert_close("hf text features", ours_text, expected_text)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["groupvit", "groupvit_hf"])
def test_groupvit_release_and_hf_checkpoints_convert_and_evaluate(layout, tmp_path, toy_data_dir):
    """Random-weight checkpoints in the release's layout ({"model": ...}, DDP prefix) and in transformers' layout ->
    scripts/convert_checkpoint.py with the format's own defaults (sizes read off the file) -> eval.py on a toy
    image with the printed line (two subprocesses, about 30 s of CPU each: slow)."""
    if layout == "groupvit":
        fixture = load_fixture("groupvit_model_groupvit")
        checkpoint = {
            "model": {"module." + k: v for k, v in perturbed_state(fixture["state"], fixture["seed"]).items()}
        }
    else:
        checkpoint = _tiny_hf_model()[1]
    convert_and_evaluate(
        layout,
        checkpoint,
        tmp_path,
        toy_data_dir,
        ["model=groupvit", "model.net.image_encoder.embed_dim=48", "model.net.text_encoder.width=64"],
    )


def test_groupvit_paper_recipe_keeps_the_official_behaviour(compose_cfg):
    cfg = compose_cfg("train", ["model=groupvit"])
    net = cfg.model.net
    assert net.text_encoder.activation == "quick_gelu"
    assert (net.multi_label_padding, net.multi_label_templates, net.patch_remainder) == (
        "caption",
        "imagenet80",
        "crop",
    )
    inference = cfg.model.inference
    assert (inference.mode, inference.keep_ratio, inference.slide_size, inference.slide_max) == (
        "slide",
        True,
        448,
        2048,
    )
    assert (inference.crop, inference.stride, inference.global_view) == (448, 224, False)
    assert dict(net.background_thresholds) == {"voc21": 0.95, "pc60": 0.35, "coco_object81": 0.95}
    assert json.loads(json.dumps(list(net.keys())))  # composes without interpolation errors
