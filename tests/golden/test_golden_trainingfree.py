"""Golden tests of the training-free methods against their releases (SCLIP, NACLIP, ClearCLIP): the changed last
block, the whole protocol on a non-square picture (sliding window or whole pass, PAMR, post-processing), the
templates and the released class-name files. Fixtures: tests/golden/official_trainingfree.py."""

from __future__ import annotations

import json

import pytest
import torch

from ovseg_lab.clip import CLIPBackbone, resolve_templates
from ovseg_lab.clip.dense_paths import LastBlock, dense_embeddings
from ovseg_lab.convert.common import split_attention_projections
from ovseg_lab.lit.trainingfree import Protocol, TrainingFreeModule
from ovseg_lab.models.trainingfree import TrainingFreeSegmenter
from ovseg_lab.vocab import Vocabulary, load_vocabulary, with_release_strings
from tests.golden.harness import (
    TOLERANCE,
    load_fixture,
    openai_clip_cfg,
    perturbed_state,
    relative_error,
    seeded_input,
)
from tests.golden.official_trainingfree import CLASS_FILES, PROTOCOLS

# the last block each release runs in its main setting, and how it reads the window
LAST_BLOCK = {
    "sclip": LastBlock("qq+kk", residual=True, ffn=True),
    "naclip": LastBlock("kk+neighbourhood", residual=False, ffn=False, gaussian_std=5.0),
    "clearclip": LastBlock("qq", residual=False, ffn=False),
}
SEPARATOR = {"sclip": ", ", "naclip": ", ", "clearclip": ","}
PAD_TO_PATCH = {"sclip": False, "naclip": False, "clearclip": True}
DEFAULT_LOGIT_SCALE = {"sclip": 40.0, "naclip": 40.0, "clearclip": 50.0}  # the segmentors' __init__ defaults


def our_clip(fixture: dict) -> CLIPBackbone:
    clip = CLIPBackbone(
        model_name="golden",
        pretrained=None,
        model_cfg=openai_clip_cfg(fixture["config"]["clip"]),
        quick_gelu=True,
        feature_layers=(),
        templates="imagenet80",
    )
    state = split_attention_projections(perturbed_state(fixture["state"], fixture["seed"]))
    clip.model.load_state_dict(state, strict=True)
    return clip.eval()


def our_module(release: str, fixture: dict) -> TrainingFreeModule:
    net = TrainingFreeSegmenter(
        our_clip(fixture), LAST_BLOCK[release], "imagenet80", SEPARATOR[release], PAD_TO_PATCH[release]
    )
    return TrainingFreeModule(net=net).eval()


@pytest.mark.parametrize("release", sorted(LAST_BLOCK))
def test_golden_trainingfree_last_block_equals_official(release):
    """The changed last block on a 48x80 input (3x5 patches: the position embeddings are resampled from 4x4)."""
    fixture = load_fixture(f"{release}_last_block")
    clip = our_clip(fixture)
    images = seeded_input(tuple(fixture["config"]["input"]), fixture["seed"], "dense")
    with torch.no_grad():
        ours = dense_embeddings(clip, images, LAST_BLOCK[release])  # (B, C, h, w)
    official = fixture["outputs"]["dense"]
    if official.shape[1] == ours.shape[2] * ours.shape[3] + 1:  # SCLIP / NACLIP keep the CLS token
        official = official[:, 1:]
    assert relative_error(ours.flatten(2).transpose(1, 2), official) <= TOLERANCE
    # the switches matter: another attention is far from the release
    other = LastBlock("qk", residual=LAST_BLOCK[release].residual, ffn=LAST_BLOCK[release].ffn)
    with torch.no_grad():
        vanilla = dense_embeddings(clip, images, other)
    assert relative_error(vanilla.flatten(2).transpose(1, 2), official) > 1e-2


@pytest.mark.parametrize(
    "release, name", [(release, name) for release, cases in sorted(PROTOCOLS.items()) for name, _, _ in cases]
)
def test_golden_trainingfree_protocol_equals_official(release, name):
    """The release's ``predict`` on a non-square picture: windows (or one whole pass), per-name cosines averaged,
    PAMR (NACLIP), x logit scale, softmax, best name per class, SCLIP's area filter, background below prob_thd."""
    fixture = load_fixture(f"{release}_protocol_{name}")
    cfg = fixture["config"]["segmentor"]
    image = fixture["inputs"]["image"].permute(2, 0, 1)[None]  # the resized picture: short side = short_side
    module = our_module(release, fixture)
    protocol = Protocol(
        logit_scale=float(cfg.get("logit_scale", DEFAULT_LOGIT_SCALE[release])),
        prob_thd=float(cfg["prob_thd"]),
        area_thd=cfg.get("area_thd"),
        short_side=min(image.shape[-2:]),
        slide_crop=cfg["slide_crop"],
        slide_stride=cfg.get("slide_stride", 112),
        pamr_steps=cfg.get("pamr_steps", 0),
    )
    classes = ("background", "cat", "dog", "tree")
    strings = Vocabulary(
        "golden", tuple(c.replace(", ", fixture["config"]["separator"]) for c in fixture["config"]["classes"])
    )
    with torch.no_grad():
        scores = module.release_scores(image, Vocabulary("golden", classes), strings, protocol)
        probs = module.release_scores(
            image, Vocabulary("golden", classes), strings, Protocol(**{**protocol.__dict__, "prob_thd": 0.0})
        )[0]
    official = fixture["outputs"]
    if release == "naclip":  # NACLIP returns the per-class maxima renormalised to sum 1
        probs = probs / probs.sum(0, keepdim=True)
    assert relative_error(probs, official["probs"]) <= TOLERANCE
    pred = scores.argmax(dim=1)[0]
    assert torch.equal(pred, official["pred"].long())
    assert 0 < (pred == 0).float().mean() < 1  # background wins somewhere, not everywhere


@pytest.mark.parametrize("release", sorted(LAST_BLOCK))
def test_golden_trainingfree_templates_and_class_files_are_the_release(release):
    """The 80 ImageNet templates; every packaged class string is the release's line (ClearCLIP's own files, NACLIP's
    byte-identical to SCLIP's)."""
    fixture = load_fixture(f"{release}_prompts")
    assert tuple(fixture["outputs"]["templates"]) == resolve_templates("imagenet80")
    strings_release = "sclip" if release == "naclip" else release
    for vocabulary, file_name, background_first in CLASS_FILES:
        lines = fixture["outputs"]["files"][file_name]
        vocab = load_vocabulary(vocabulary)
        sent = with_release_strings(vocab, strings_release).classes
        expected = (lines[1:] + lines[:1]) if background_first else lines
        assert list(sent) == expected, (vocabulary, file_name)


RECIPES = {  # last block, logit scale, short side, window, stride, PAMR steps, class strings (configs/cfg_*.py)
    "sclip": ({"attention": "qq+kk", "residual": True, "ffn": True}, 40.0, 336, 224, 112, 0, "sclip"),
    "naclip": ({"attention": "kk+neighbourhood", "residual": False, "ffn": False}, 40.0, 336, 224, 112, 10, "sclip"),
    "clearclip": ({"attention": "qq", "residual": False, "ffn": False}, 50.0, 448, 448, 224, 0, "clearclip"),
    "maskclip": ({"attention": "value", "residual": True, "ffn": True}, 40.0, 336, 224, 112, 0, "sclip"),
}
BENCHMARK_SETTINGS = {  # the releases' per-benchmark changes
    "sclip": {"voc21": {"logit_scale": 65.0, "prob_thd": 0.1, "area_thd": 0.1}, "cityscapes19": {"short_side": 560}},
    "naclip": {"voc21": {"prob_thd": 0.1, "slide_crop": 0}, "voc20": {"slide_crop": 0}, "pc60": {"prob_thd": 0.1}},
    "clearclip": {"voc21": {"prob_thd": 0.5}, "pc60": {"prob_thd": 0.15}, "cityscapes19": {"slide_crop": 224}},
    "maskclip": {"voc21": {"logit_scale": 65.0, "prob_thd": 0.1, "area_thd": 0.1}},
}


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_golden_trainingfree_recipe_uses_the_release_settings(model, compose_cfg):
    """The model file carries its release's protocol (configs/cfg_*.py), class files and last block."""
    block, scale, short, crop, stride, pamr_steps, strings = RECIPES[model]
    cfg = compose_cfg("eval", [f"model={model}", "clip=tiny"])
    assert {k: cfg.model.net.last_block[k] for k in block} == block
    p = cfg.model.protocol
    assert (p.logit_scale, p.short_side, p.slide_crop, p.slide_stride, p.pamr_steps) == (
        scale,
        short,
        crop,
        stride,
        pamr_steps,
    )
    assert cfg.model.class_strings == strings
    for benchmark, changes in BENCHMARK_SETTINGS[model].items():
        assert {k: cfg.model.benchmarks[benchmark][k] for k in changes} == changes, benchmark
    for vocabulary, _, _ in CLASS_FILES:
        path = f"ovseg_lab/assets/class_strings/{strings}/{vocabulary}.json"
        assert "@" in json.loads(open(path).read())["citation"]
