"""CAT-Seg equals the official release (cvlab-kaist/CAT-Seg): golden fixtures made by make_golden.py.

Each test rebuilds the official state dict from the fixture's seed and recipe, converts it with OUR converter
(ovseg_lab.convert.catseg), loads it strictly into OUR modules and compares OUR outputs with the official ones
(relative error <= 1e-5, labels 100% equal). What each fixture ran on the official side: official_catseg.py.
"""

from __future__ import annotations

import pytest
import torch

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.convert.catseg import convert_catseg_state_dict
from ovseg_lab.eval.inference import InferenceConfig, segment
from ovseg_lab.layers.losses import per_pixel_bce
from ovseg_lab.models.catseg import CATSeg, CATSegHead
from ovseg_lab.tools.compare_official import aggregator_head_kwargs
from tests.golden.harness import (
    TOLERANCE,
    convert_and_evaluate,
    digest_error,
    load_fixture,
    openai_clip_cfg,
    perturbed_state,
    relative_error,
    seeded_image,
    seeded_input,
    seeded_labels,
)

AGGREGATOR_FIXTURES = [
    "catseg_aggregator_vitb_c20_pool1_trunc",
    "catseg_aggregator_vitb_c20_pool2_trunc",
    "catseg_aggregator_vitl_c20_pool1_trunc",
    "catseg_aggregator_vitl_c20_pool2_trunc",
    "catseg_aggregator_vitb_c300_pool1_trunc",
    "catseg_aggregator_vitb_c300_pool1",
]
# official CLIP_FINETUNE value -> our finetune strategy (the official code has these four)
FINETUNE = {
    "none": {"strategy": "freeze"},
    "attention": {"strategy": "qv"},
    "full": {"strategy": "full"},
    "prompt": {"strategy": "prompt", "prompt_length": 4},
}


def converted_state(fixture: dict, recipe=None) -> dict[str, torch.Tensor]:
    """The fixture's official state dict, through our converter (keys relative to CATSeg)."""
    return convert_catseg_state_dict(perturbed_state(recipe or fixture["state"], fixture["seed"]), prefix="")


def our_clip(cfg: dict, finetune=None) -> CLIPBackbone:
    """Our CLIP tower with the official one's architecture; the position grid stays the checkpoint's."""
    model_cfg = openai_clip_cfg(cfg)
    return CLIPBackbone(
        model_name="golden",
        pretrained=None,
        model_cfg=model_cfg,
        image_size=cfg["run_resolution"],
        position_embedding="forward",
        quick_gelu=True,
        feature_layers=cfg["hooked"],
        templates="catseg",
        synonyms="first",
        finetune=finetune,
    )


def our_catseg(fixture: dict, finetune=None, **kwargs) -> CATSeg:
    cfg = fixture["config"]
    clip = our_clip(cfg["clip"], finetune)
    return CATSeg(clip, head=aggregator_head_kwargs(cfg["aggregator"]), class_pool_train=2, class_pool_eval=1, **kwargs)


def assert_close(ours: torch.Tensor, expected: dict, what: str, floor: float = 1e-30) -> None:
    error = digest_error(ours, expected, floor=floor)
    assert error <= TOLERANCE, f"{what}: relative error {error:.2e} > {TOLERANCE:.0e}"


# ---------------------------------------------------------------------------------------------- aggregator
@pytest.mark.parametrize("name", AGGREGATOR_FIXTURES)
def test_catseg_aggregator_equals_official(name):
    """Cost embedding, spatial + class aggregation, upsampling decoder, class padding / top-256 truncation."""
    fixture = load_fixture(name)
    cfg = fixture["config"]
    head = CATSegHead(cfg["embed_dim"], cfg["width"], num_templates=1, **aggregator_head_kwargs(cfg["aggregator"]))
    state = {k.removeprefix("head."): v for k, v in converted_state(fixture).items()}
    head.load_state_dict(state, strict=True)
    head.eval()
    x = {k: seeded_input(tuple(s), fixture["seed"], k) for k, s in fixture["inputs"]["shapes"].items()}
    with torch.no_grad():
        logits = head(
            x["dense"],
            [x["inter0"], x["inter1"]],
            x["text"],
            class_pool=cfg["pool"],
            truncate=256 if cfg["truncate"] else None,
        )
    assert_close(logits, fixture["outputs"]["logits"], name)
    if cfg["num_classes"] > 256:  # truncation gives exactly -100 to the classes it drops, as the release does
        dropped = (logits == -100).all(dim=(-2, -1)).sum().item()
        assert dropped == (cfg["num_classes"] - 256 if cfg["truncate"] else 0)


# ---------------------------------------------------------------------------------------------- CLIP
@pytest.mark.parametrize("setting", ["vitb", "vitl"])
def test_catseg_clip_dense_features_position_embedding_and_text_equal_official(setting):
    """Dense pass (last block without token mixing), hooked layers, the 224 -> 384 position grid resized per
    forward (ViT-B) or kept (ViT-L at 336), template strings, token ids and text embeddings."""
    fixture = load_fixture(f"catseg_clip_{setting}")
    cfg = fixture["config"]
    clip = our_clip(cfg["clip"])
    state = {k.removeprefix("clip."): v for k, v in converted_state(fixture).items()}
    clip.load_state_dict(state, strict=True)
    clip.eval()
    images = seeded_input(tuple(fixture["inputs"]["image_shape"]), fixture["seed"], "clip_images")
    out = fixture["outputs"]
    with torch.no_grad():
        feats = clip.encode_dense(images)
        grid = images.shape[-1] // cfg["clip"]["vision_patch_size"]
        position = clip._positional_embedding((grid, grid))
        prompts = [t.format(n.split(", ")[0]) for n in cfg["names"] for t in cfg["templates"]]
        tokens = clip.tokenize(prompts)
        text = clip.encode_vocabulary(cfg["names"])  # (T, P, C)
    assert torch.equal(tokens.to(torch.int32), out["tokens"])
    assert_close(feats.dense, out["dense"], "dense features")
    assert_close(feats.cls, out["cls"], "CLS token")
    assert_close(feats.intermediates[0], out["inter0"], "first hooked layer")
    assert_close(feats.intermediates[1], out["inter1"], "second hooked layer")
    assert_close(position, out["position_embedding"], "position embedding")
    assert_close(text, out["text"], "text embeddings")


def test_catseg_position_embedding_load_mode_differs_from_the_release():
    """The alternative (open_clip's antialiased resize at build time) is really another computation: this is why
    the paper recipes keep ``position_embedding: forward``."""
    fixture = load_fixture("catseg_clip_vitb")
    import open_clip

    state = {k.removeprefix("clip.model."): v for k, v in converted_state(fixture).items() if "positional" in k}
    pos = state["visual.positional_embedding"]
    resized = {"visual.positional_embedding": pos.clone()}
    model = open_clip.model.CLIP(
        embed_dim=8,
        vision_cfg={"image_size": 384, "layers": 1, "width": pos.shape[1], "patch_size": 16, "head_width": 64},
        text_cfg={"context_length": 8, "vocab_size": 10, "width": 8, "heads": 1, "layers": 1},
    )
    open_clip.factory.resize_pos_embed(resized, model)
    assert (
        digest_error(resized["visual.positional_embedding"], fixture["outputs"]["position_embedding"]) > 100 * TOLERANCE
    )


# ---------------------------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("setting", ["vitb", "vitl"])
def test_catseg_inference_protocol_equals_official(setting):
    """detectron2's short-side-640 resize (PIL), squash to 640x640, 384 windows (stride 256) + global view,
    50/50 average, resize to the original 150x200, argmax and PAS-20b background mapping."""
    fixture = load_fixture(f"catseg_protocol_{setting}")
    cfg = fixture["config"]
    net = our_catseg(fixture)
    net.load_state_dict(converted_state(fixture), strict=True)
    net.eval()
    protocol = InferenceConfig(
        mode="slide",
        score="sigmoid",
        slide_size=640,
        crop=384,
        stride=256,
        global_view=True,
        global_weight=0.5,
        resize_short=640,
        resize_max=2560,
    )
    image = fixture["inputs"]["image"].permute(2, 0, 1)[None]  # uint8 (1, 3, 150, 200)
    with torch.no_grad():
        scores = segment(lambda x: net(x, cfg["names"]), image, protocol)[0]
    assert_close(scores, fixture["outputs"]["scores"], "averaged sigmoid scores")
    labels = scores.argmax(dim=0).to(torch.int16)
    # every pixel whose official top two scores are apart by more than fp32 resolution gets the official label
    decided = ~fixture["outputs"]["ties"]
    assert decided.float().mean() > 0.995  # 99.7-99.9% here: the rest are ties within 1e-6
    assert torch.equal(labels[decided], fixture["outputs"]["labels"][decided])
    pas20b = labels.clamp(max=cfg["background_from"])
    assert torch.equal(pas20b[decided], fixture["outputs"]["labels_pas20b"][decided])


# ---------------------------------------------------------------------------------------------- loss
def test_catseg_loss_and_gradients_equal_official():
    """Training forward (QV fine-tuning, class pooling 2) on a batch with void pixels: the official BCE (void =
    all-negative targets) and the gradient of every trainable parameter (in float64 on both sides)."""
    fixture = load_fixture("catseg_loss")
    cfg = fixture["config"]
    net = our_catseg(fixture, finetune={"strategy": "qv"}, ignore_pixels="negative").double()  # see the fixture
    net.load_state_dict(converted_state(fixture), strict=True)
    net.train()
    inputs = fixture["inputs"]
    size = inputs["size"]
    images = torch.stack(
        [torch.from_numpy(seeded_image(s, size, size).transpose(2, 0, 1).copy()) for s in inputs["image_seeds"]]
    )
    images = images.double() / 255
    labels = seeded_labels(fixture["seed"], (len(images), size, size), **inputs["labels"])
    assert (labels == 255).any()
    logits = net(images, cfg["names"])
    loss = net.loss(logits, labels)
    loss.backward()
    assert relative_error(loss.detach(), fixture["outputs"]["loss"]) <= TOLERANCE
    grads = convert_catseg_state_dict({k: torch.zeros(0) for k in fixture["outputs"]["grads"]}, prefix="")
    ours = dict(net.named_parameters())
    assert sorted(n for n, p in ours.items() if p.requires_grad) == sorted(grads)
    for official_name, our_name in zip(fixture["outputs"]["grads"], grads):
        # the dense last block never computes q (or k); the release computes q and drops it: a zero gradient
        grad = ours[our_name].grad if ours[our_name].grad is not None else torch.zeros_like(ours[our_name])
        # floor: gradients that are zero in exact arithmetic (Swin key biases: softmax ignores a per-row constant)
        # come out as 1e-20 rounding noise on both sides, 1e15 below the smallest real one here
        assert_close(grad, fixture["outputs"]["grads"][official_name], f"grad of {our_name}", floor=1e-12)
    # the named option (void pixels left out) is really another objective on this batch
    excluded = per_pixel_bce(logits.detach(), labels, 255, ignore_pixels="exclude")
    assert relative_error(excluded, fixture["outputs"]["loss"]) > 10 * TOLERANCE


# ---------------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("option", list(FINETUNE))
def test_catseg_finetune_options_train_the_official_parameters(option):
    """The official CLIP_FINETUNE values (none, prompt, attention = QV, full) train the same parameters here."""
    fixture = load_fixture("catseg_finetune")
    finetune = dict(FINETUNE[option])
    if option == "prompt":
        finetune["prompt_depth"] = fixture["config"]["clip"]["vision_layers"]
    net = our_catseg(fixture, finetune=finetune)
    net.load_state_dict(converted_state(fixture, fixture["state"][option]), strict=True)
    official = convert_catseg_state_dict(
        {k: torch.zeros(0) for k in fixture["outputs"]["trainable"][option]}, prefix=""
    )
    assert sorted(n for n, p in net.named_parameters() if p.requires_grad) == sorted(official)


# ---------------------------------------------------------------------------------------------- released checkpoints
def _convert_and_evaluate(setting: str, tmp_path, toy_data_dir) -> None:
    fixture = load_fixture("catseg_released")
    experiment = f"experiment=catseg_{'vitb16' if setting == 'vitb' else 'vitl14'}_coco"
    convert_and_evaluate(
        "catseg",
        {"model": perturbed_state(fixture["state"][setting], fixture["seed"])},
        tmp_path,
        toy_data_dir,
        [experiment],
    )


def test_catseg_released_vitb16_checkpoint_converts_and_evaluates(tmp_path, toy_data_dir):
    """An official ViT-B/16 checkpoint at its released shapes (CLIP position grid (197, 768)) converts without
    overrides and evaluates with the command the converter prints."""
    _convert_and_evaluate("vitb", tmp_path, toy_data_dir)


@pytest.mark.slow
def test_catseg_released_vitl14_checkpoint_converts_and_evaluates(tmp_path, toy_data_dir):
    """The same for ViT-L/14@336 (1.7 GB of random weights: slow)."""
    _convert_and_evaluate("vitl", tmp_path, toy_data_dir)


@pytest.mark.parametrize("experiment", ["catseg_vitb16_coco", "catseg_vitl14_coco"])
def test_catseg_paper_recipes_keep_the_official_behaviour(compose_cfg, experiment):
    """The settings the golden tests prove are the paper recipes' defaults; the toy keeps our named fixes."""
    cfg = compose_cfg("train", [f"experiment={experiment}"])
    assert cfg.model.net.ignore_pixels == "negative" and cfg.model.net.truncate_classes is True
    assert (cfg.model.inference.resize_short, cfg.model.inference.resize_max) == (640, 2560)
    assert cfg.model.inference.mode == "slide" and cfg.clip.position_embedding == "forward"
    toy = compose_cfg("train", ["experiment=quickstart", "model=catseg"])
    assert toy.model.net.ignore_pixels == "exclude" and toy.model.inference.resize_short is None


def test_catseg_converter_refuses_unknown_keys():
    fixture = load_fixture("catseg_aggregator_vitb_c20_pool1_trunc")
    state = perturbed_state(fixture["state"], fixture["seed"])
    state["sem_seg_head.predictor.transformer.mystery.weight"] = torch.zeros(1)
    from ovseg_lab.errors import SetupError

    with pytest.raises(SetupError, match="mystery"):
        convert_catseg_state_dict(state)
