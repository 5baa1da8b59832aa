"""LSeg equals the official release (isl-org/lang-seg): golden fixtures made by make_golden.py --method lseg.

Each test rebuilds the official state dict from the fixture's seed and recipe, converts it with OUR converter
(ovseg_lab.convert.lseg), loads it strictly into OUR LSegNet and compares OUR logits with the official ones
(relative error <= 1e-5, labels 100% equal). What each fixture ran on the official side: official_lseg.py.
"""

from __future__ import annotations

import pytest
import torch

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.convert.lseg import convert_lseg_state_dict
from ovseg_lab.models.lseg import LSegNet, SpatialRegularization, ViTPyramid
from ovseg_lab.vocab import Vocabulary
from tests.golden.harness import (
    TOLERANCE,
    convert_and_evaluate,
    digest_error,
    load_fixture,
    openai_clip_cfg,
    perturbed_state,
    seeded_input,
    undecided_pixels,
)

NET_FIXTURES = [f"lseg_net_{variant}_{size}" for variant in ("vitb32", "vitl16") for size in ("384", "480", "352x512")]
REGULARIZATION_FIXTURES = [f"lseg_regularization_arch{a}_depth{d}" for a in (1, 2) for d in (0, 1, 2, 3)]
ARCH_OPTIONS = {0: "none", 1: "bottleneck", 2: "depthwise"}  # lang-seg's arch_option -> our regularization kind


def our_clip(cfg: dict) -> CLIPBackbone:
    """Our CLIP tower with the official (OpenAI) one's architecture; LSeg sends the label strings as they are."""
    model_cfg = openai_clip_cfg(cfg)
    return CLIPBackbone(
        model_name="golden",
        pretrained=None,
        model_cfg=model_cfg,
        quick_gelu=True,
        feature_layers=(),
        templates="raw",
        synonyms="full",
    )


def our_lseg(fixture: dict, position_embedding: str = "forward") -> LSegNet:
    from timm.models.vision_transformer import VisionTransformer

    cfg = fixture["config"]
    variant = cfg["variant"]
    vit = VisionTransformer(
        img_size=384,
        patch_size=variant["patch"],
        embed_dim=variant["width"],
        depth=variant["depth"],
        num_heads=variant["heads"],
        num_classes=0,
        dynamic_img_size=True,
    )
    encoder = ViTPyramid(vit, variant["hooks"], variant["channels"], "project", position_embedding=position_embedding)
    regularization = SpatialRegularization(ARCH_OPTIONS[cfg["arch_option"]], cfg["block_depth"], cfg["activation"])
    net = LSegNet(
        our_clip(cfg["clip"]),
        encoder,
        features=variant["features"],
        use_bn=True,
        regularization=regularization,
        templates="raw",
    )
    state = convert_lseg_state_dict(perturbed_state(fixture["state"], fixture["seed"]), prefix="")
    net.load_state_dict(state, strict=True)
    return net.eval()


def run(fixture: dict, net: LSegNet) -> torch.Tensor:
    spec = fixture["inputs"]["images"]
    images = seeded_input(tuple(spec["shape"]), fixture["seed"], "images", spec["scale"], spec["offset"]).clamp(0, 1)
    with torch.no_grad():
        return net(images, Vocabulary("golden", tuple(fixture["config"]["labels"])))


def assert_equal_to_official(fixture: dict, logits: torch.Tensor) -> None:
    error = digest_error(logits, fixture["outputs"]["logits"])
    assert error <= TOLERANCE, f"{fixture['name']}: logits relative error {error:.2e} > {TOLERANCE:.0e}"
    changed = (logits.argmax(1).to(torch.uint8) != fixture["outputs"]["labels"]) & ~undecided_pixels(logits)
    assert not changed.any(), f"{fixture['name']}: {100 * changed.float().mean():.3f}% of decided pixels change label"


@pytest.mark.parametrize("name", NET_FIXTURES)
def test_lseg_net_equals_official(name):
    """ViT-B/32 and ViT-L/16 reassembly, DPT fusion, head, text tower, correlation, x2 upsampling at 384, 480
    (the position grid of 384 resized per forward) and a non-square size."""
    fixture = load_fixture(name)
    net = our_lseg(fixture)
    tokens = net.clip.tokenize(fixture["config"]["labels"])
    assert torch.equal(tokens.to(torch.int32), fixture["outputs"]["tokens"]), "token ids differ from clip.tokenize"
    assert_equal_to_official(fixture, run(fixture, net))


def test_lseg_timm_position_embedding_is_the_documented_deviation():
    """position_embedding=timm (ours: bicubic + antialias) differs from the official at 480, not at 384."""
    at_384, at_480 = load_fixture("lseg_net_vitb32_384"), load_fixture("lseg_net_vitb32_480")
    assert digest_error(run(at_384, our_lseg(at_384, "timm")), at_384["outputs"]["logits"]) <= TOLERANCE
    assert digest_error(run(at_480, our_lseg(at_480, "timm")), at_480["outputs"]["logits"]) > TOLERANCE


@pytest.mark.parametrize("name", REGULARIZATION_FIXTURES)
def test_lseg_regularization_equals_official(name):
    """arch_option 1 (bottleneck) / 2 (depthwise), block_depth 0-3 (0: one block, as the official loop does)."""
    fixture = load_fixture(name)
    assert_equal_to_official(fixture, run(fixture, our_lseg(fixture)))


# ------------------------------------------------------------------------------------- released layouts
def _convert_and_evaluate(setting: str, tmp_path, toy_data_dir) -> None:
    """An official-layout LSegModule checkpoint (lang-seg's LSegNet key names and shapes, perturbed random
    weights) -> scripts/convert_checkpoint.py --format lseg with its own defaults -> eval.py with the printed line."""
    fixture = load_fixture("lseg_released")
    encoder = {"vitl16": "vit_large_16_384", "vitb32": "vit_base_32_384", "rn101_zs": "resnet101"}[setting]
    # the recipe's multi-scale protocol at one scale (0.5: one 480 window) and without flips keeps the test short;
    # one process: the recipe trains on 6 devices, and 6 ViT-L/16 evaluation processes need over 24 GiB
    convert_and_evaluate(
        "lseg",
        {"state_dict": perturbed_state(fixture["state"][setting], fixture["seed"])},
        tmp_path,
        toy_data_dir,
        ["experiment=lseg_ade20k", f"model.net.encoder.name={encoder}"],
        (
            "model.inference.scales=[0.5]",
            "model.inference.flip=false",
            "trainer.devices=1",
            "trainer.sync_batchnorm=false",
        ),
    )


@pytest.mark.parametrize("setting", ["vitl16", "vitb32", "rn101_zs"])
def test_lseg_released_layouts_map_onto_our_modules(setting):
    """Every key of each released layout is understood, and the image encoder + decoder keys and shapes are
    exactly ours (built on the meta device; the CLIP text tower is checked end to end by the slow tests below)."""
    from ovseg_lab.convert.lseg import lseg_overrides
    from ovseg_lab.models.lseg import LSegDecoder, build_encoder

    recipe = load_fixture("lseg_released")["state"][setting]
    official = {key: torch.empty(shape, device="meta") for key, shape, *_ in recipe}
    converted = convert_lseg_state_dict(official, prefix="")
    (override,) = lseg_overrides(official)
    with torch.device("meta"):
        encoder = build_encoder(override.split("=", 1)[1], pretrained=False)
        decoder = LSegDecoder(encoder.out_channels, 256, 512, SpatialRegularization("none"))
    expected = {
        **{f"encoder.{k}": v.shape for k, v in encoder.state_dict().items()},
        **{f"decoder.{k}": v.shape for k, v in decoder.state_dict().items()},
    }
    ours = {k: v.shape for k, v in converted.items() if k.startswith(("encoder.", "decoder."))}
    assert ours == expected
    assert sum(k.startswith("clip.model.") for k in converted) > 100


@pytest.mark.slow
def test_lseg_released_vitb32_checkpoint_converts_and_evaluates(tmp_path, toy_data_dir):
    """ViT-B/32 (clip_vitb32_384): 240M random weights, converted with the format's own defaults (about 100 s
    on 2 CPU cores: slow)."""
    _convert_and_evaluate("vitb32", tmp_path, toy_data_dir)


@pytest.mark.slow
def test_lseg_released_vitl16_checkpoint_converts_and_evaluates(tmp_path, toy_data_dir):
    """ViT-L/16 (clip_vitl16_384, demo_e200.ckpt's layout; position grid (577, 1024)): 1.8 GB, slow."""
    _convert_and_evaluate("vitl16", tmp_path, toy_data_dir)


@pytest.mark.slow
def test_lseg_released_resnet101_zero_shot_checkpoint_converts_and_evaluates(tmp_path, toy_data_dir):
    """The zero-shot ResNet-101 (LSegRNNetZS: torchvision resnet101 regrouped into layer1..4)."""
    _convert_and_evaluate("rn101_zs", tmp_path, toy_data_dir)


def test_lseg_paper_recipes_keep_the_official_behaviour(compose_cfg):
    """The settings the golden tests prove are the paper recipes' defaults."""
    for experiment in ("lseg_ade20k", "lseg_ovs"):
        cfg = compose_cfg("train", [f"experiment={experiment}"])
        encoder = cfg.model.net.encoder
        assert encoder.position_embedding == "forward" and encoder.img_size is None
        assert cfg.model.net.regularization.activation == "lrelu"


# ------------------------------------------------------------------------------------------------ prompts
def test_lseg_ade_recipe_sends_the_official_label_strings_and_token_ids(compose_cfg):
    """experiment=lseg_ade20k embeds lang-seg's ADE strings (cut at the first ';', LSegModule.get_labels) as the
    raw prompt, with clip.tokenize's ids; model.net.label_strings=null sends our full names instead."""
    from ovseg_lab.vocab import load_vocabulary

    fixture = load_fixture("lseg_prompts_ade150")
    cfg = compose_cfg("train", ["experiment=lseg_ade20k"])
    net_fixture = load_fixture("lseg_net_vitb32_384")
    clip = our_clip(net_fixture["config"]["clip"])
    clip.synonyms = cfg.clip.synonyms  # as the recipe's CLIP tower splits names (no ADE-150 name has a comma)
    seen = []
    clip.encode_vocabulary = lambda names, templates=None: seen.extend(names) or torch.ones(len(names), 1, 512)
    net = LSegNet(clip, our_lseg(net_fixture).encoder, features=16, label_strings=cfg.model.net.label_strings)
    assert net.templates == cfg.model.net.templates == "raw"
    net.text_embeddings(load_vocabulary(cfg.data.eval.ade150.vocabulary))
    sent = list(seen)
    assert [s.strip() for s in sent] == fixture["outputs"]["labels"]
    assert torch.equal(clip.tokenize(sent).to(torch.int32), fixture["outputs"]["tokens"])
    full = LSegNet(clip, net.encoder, features=16, label_strings=None)
    seen.clear()
    full.text_embeddings(load_vocabulary("ade150"))
    assert sum(a.strip() != b for a, b in zip(seen, fixture["outputs"]["labels"])) == 15


# ------------------------------------------------------------------------------------------------ protocol
def test_lseg_multiscale_flip_protocol_equals_official():
    """lang-seg's LSeg_MultiEvalModule (6 scales, flips, long-side resize, black padding, crop windows at 2/3
    stride, raw logits summed) on a fixed 75x100 image, at a small base size / crop (130 / 96)."""
    from ovseg_lab.eval.inference import InferenceConfig, segment

    fixture = load_fixture("lseg_protocol_multiscale_flip")
    protocol = fixture["config"]["protocol"]
    net = our_lseg(fixture)
    vocabulary = Vocabulary("golden", tuple(fixture["config"]["labels"]))
    crop = protocol["crop_size"]
    cfg = InferenceConfig(
        mode="multiscale",
        score="identity",
        crop=crop,
        stride=int(crop * 2.0 / 3.0),
        base_size=protocol["base_size"],
        scales=tuple(protocol["scales"]),
        flip=protocol["flip"],
    )
    with torch.no_grad():
        scores = segment(lambda x: net(x, vocabulary), fixture["inputs"]["image"][None], cfg)
    error = digest_error(scores, fixture["outputs"]["scores"])
    assert error <= TOLERANCE, f"multi-scale scores: relative error {error:.2e}"
    assert torch.equal(scores.argmax(1).to(torch.uint8), fixture["outputs"]["labels"])


def test_lseg_ade_recipe_evaluates_with_the_official_protocol(compose_cfg):
    inference = compose_cfg("train", ["experiment=lseg_ade20k"]).model.inference
    assert inference.mode == "multiscale" and inference.score == "identity" and inference.flip is True
    assert list(inference.scales) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert (inference.base_size, inference.crop, inference.stride) == (520, 480, int(480 * 2.0 / 3.0))
