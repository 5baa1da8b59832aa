"""Golden fixtures from the official CAT-Seg release (cvlab-kaist/CAT-Seg), run with seeded perturbed weights.

Called by ``make_golden.py --method catseg``; never imported by the tests. The official modules are imported from
the extracted release (``--official``); detectron2 is replaced by the stubs of :mod:`official_stubs`, except for
the two detectron2 functions the evaluation protocol runs (the test-time resize and ``sem_seg_postprocess``),
which execute from detectron2's own source (``--detectron2``). ``CATSegPredictor.__init__`` downloads OpenAI's
weights and reads class-name files, so the predictor object is assembled here with the attributes its forward
methods read; every forward that produces a fixture is the official code.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ovseg_lab.tools.compare_official import RELEASED_AGGREGATOR as RELEASED_AGGREGATOR_EVAL
from tests.golden.harness import (
    digest,
    fixture_record,
    perturbed_state,
    save_fixture,
    seeded_image,
    seeded_input,
    seeded_labels,
    state_recipe,
)
from tests.golden.official_stubs import detectron2_function, import_official, install_detectron2_stubs

REPO = "cvlab-kaist/CAT-Seg"
TEMPLATES = ["A photo of a {} in the scene"]  # PROMPT_ENSEMBLE_TYPE "single", the shipped configs
PIXEL_MEAN, PIXEL_STD = [123.675, 116.280, 103.530], [58.395, 57.120, 57.375]
CLIP_MEAN, CLIP_STD = [122.7709383, 116.7460125, 104.09373615], [68.5005327, 66.6321579, 70.3231630]

# Small CLIPs with the released structure (one block past the last hooked one, which the dense pass replaces): the ViT-B/16 one keeps a 224 position grid and runs at 384 (as the
# release does), the ViT-L/14 one is built at 336. Hooked blocks and sizes are what cat_seg_model.py hard-codes.
TINY_CLIPS = {
    "vitb": dict(
        embed_dim=32,
        image_resolution=224,
        vision_layers=9,
        vision_width=128,
        vision_patch_size=16,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=2,
        clip_pretrained="ViT-B/16",
        hooked=[3, 7],
        run_resolution=384,
    ),
    "vitl": dict(
        embed_dim=48,
        image_resolution=336,
        vision_layers=17,
        vision_width=128,
        vision_patch_size=14,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=2,
        clip_pretrained="ViT-L/14@336px",
        hooked=[7, 15],
        run_resolution=336,
    ),
}
# The released models (configs/vitb_384.yaml, configs/vitl_336.yaml over OpenAI's ViT-B/16 and ViT-L/14@336px).
RELEASED_CLIPS = {
    "vitb": dict(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=16,
        context_length=77,
        vocab_size=49408,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
        clip_pretrained="ViT-B/16",
        hooked=[3, 7],
        run_resolution=384,
    ),
    "vitl": dict(
        embed_dim=768,
        image_resolution=336,
        vision_layers=24,
        vision_width=1024,
        vision_patch_size=14,
        context_length=77,
        vocab_size=49408,
        transformer_width=768,
        transformer_heads=12,
        transformer_layers=12,
        clip_pretrained="ViT-L/14@336px",
        hooked=[7, 15],
        run_resolution=336,
    ),
}
# the release's Aggregator arguments (configs/vitb_384.yaml, vitl_336.yaml: one home, the speed tool's), with the
# training pooling 2 of the configs
RELEASED_AGGREGATOR = dict(RELEASED_AGGREGATOR_EVAL, pooling_size=(2, 2))
SMALL_AGGREGATOR = dict(RELEASED_AGGREGATOR, hidden_dim=64)  # the whole-model fixtures: a narrower head, same structure
VOC20 = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
# PAS-20b: the 20 VOC classes + non-VOC context classes; every prediction >= 20 is background (train_net.py:59)
VOC20B = VOC20 + ["bag", "bed", "bench", "book", "building, edifice"]
TEXT_NAMES = [
    "wall",
    "building, edifice",
    "sky",
    "floor, flooring",
    "tree",
    "person, individual, someone",
    "pool table, billiard table, snooker table",
    "tvmonitor",
    "traffic light, traffic signal, stoplight",
]


class Official:
    """The official modules, imported once from an extracted release."""

    def __init__(self, root: Path, detectron2_root: Path) -> None:
        install_detectron2_stubs()
        torch.Tensor.cuda = lambda self, *a, **k: self  # the release moves tokens to CUDA unconditionally
        packages = (
            "cat_seg",
            "cat_seg.modeling",
            "cat_seg.modeling.transformer",
            "cat_seg.modeling.heads",
            "cat_seg.third_party",
        )
        self.model_vpt = import_official(root, "cat_seg.third_party.model_vpt", packages)
        self.clip = import_official(root, "cat_seg.third_party.clip", packages)
        self.aggregator = import_official(root, "cat_seg.modeling.transformer.model", packages)
        self.predictor = import_official(root, "cat_seg.modeling.transformer.cat_seg_predictor", packages)
        self.head = import_official(root, "cat_seg.modeling.heads.cat_seg_head", packages)
        self.meta = import_official(root, "cat_seg.cat_seg_model", packages)
        postprocess = detectron2_function(
            detectron2_root, "detectron2/modeling/postprocessing.py", "sem_seg_postprocess"
        )
        self.meta.sem_seg_postprocess = postprocess  # the name cat_seg_model.py imported from detectron2
        self.output_shape = detectron2_function(
            detectron2_root, "detectron2/data/transforms/augmentation_impl.py", "ResizeShortestEdge.get_output_shape"
        )
        self.apply_image = detectron2_function(
            detectron2_root, "detectron2/data/transforms/transform.py", "ResizeTransform.apply_image"
        )

    # ------------------------------------------------------------------ builders
    def build_clip(self, cfg: dict, prompt_depth: int = 0, prompt_length: int = 0) -> nn.Module:
        keys = (
            "embed_dim",
            "image_resolution",
            "vision_layers",
            "vision_width",
            "vision_patch_size",
            "context_length",
            "vocab_size",
            "transformer_width",
            "transformer_heads",
            "transformer_layers",
        )
        clip = self.model_vpt.CLIP(*(cfg[k] for k in keys), prompt_depth=prompt_depth, prompt_length=prompt_length)
        # clip.load fills these from OpenAI's weights; the constructor leaves them uninitialised (torch.empty)
        nn.init.normal_(clip.positional_embedding, std=0.01)
        nn.init.normal_(clip.text_projection, std=cfg["transformer_width"] ** -0.5)
        return clip.float()

    def build_predictor(self, clip: nn.Module, agg: dict, train_names, test_names) -> nn.Module:
        """A CATSegPredictor holding what its forward reads (its __init__ downloads weights)."""
        pred = self.predictor.CATSegPredictor.__new__(self.predictor.CATSegPredictor)
        nn.Module.__init__(pred)
        pred.tokenizer, pred.prompt_ensemble_type, pred.prompt_templates = None, "single", list(TEMPLATES)
        pred.class_texts, pred.test_class_texts = list(train_names), list(test_names)
        pred.clip_model = clip
        embed = clip.text_projection.shape[1]
        pred.transformer = self.aggregator.Aggregator(text_guidance_dim=embed, appearance_guidance_dim=embed, **agg)
        pred.tokens, pred.cache = None, None
        return pred

    def build_model(
        self, clip_cfg: dict, agg: dict, train_names, test_names, finetune="attention", prompt_depth=0, prompt_length=0
    ) -> nn.Module:
        clip = self.build_clip(clip_cfg, prompt_depth, prompt_length)
        pred = self.build_predictor(clip, agg, train_names, test_names)
        head = self.head.CATSegHead(
            num_classes=len(train_names),
            ignore_value=255,
            feature_resolution=list(agg["feature_resolution"]),
            transformer_predictor=pred,
        )
        model = self.meta.CATSeg(
            backbone=None,
            sem_seg_head=head,
            size_divisibility=32,
            pixel_mean=PIXEL_MEAN,
            pixel_std=PIXEL_STD,
            clip_pixel_mean=CLIP_MEAN,
            clip_pixel_std=CLIP_STD,
            train_class_json="",
            test_class_json="",
            sliding_window=True,
            clip_finetune=finetune,
            backbone_multiplier=0.0,
            clip_pretrained=clip_cfg["clip_pretrained"],
        )
        # cat_seg_model.py sizes these for the released widths (768 / 1024); same modules at the tiny width
        width = clip_cfg["vision_width"]
        model.upsample1 = nn.ConvTranspose2d(width, 256, kernel_size=2, stride=2)
        model.upsample2 = nn.ConvTranspose2d(width, 128, kernel_size=4, stride=4)
        return model


def perturb(module: nn.Module, seed: int, rename=lambda key: key) -> list[tuple]:
    """Give ``module`` the seeded perturbed weights of its recipe; returns the recipe under the key names a
    checkpoint has (``rename``: module key -> checkpoint key), the names the values are seeded by."""
    names = {rename(k): k for k in module.state_dict()}
    recipe = state_recipe({rename(k): v for k, v in module.state_dict().items()}, derived=("attn_mask",))
    state = {names[k]: v for k, v in perturbed_state(recipe, seed).items() if not k.endswith("attn_mask")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("attn_mask") for k in missing), (missing, unexpected)
    return recipe


fixture = functools.partial(fixture_record, "catseg", REPO)


# ---------------------------------------------------------------------------------------------- fixtures
def aggregator_fixture(
    off: Official,
    commit: str,
    seed: int,
    setting: str,
    num_classes: int,
    pool: int,
    truncate: bool,
    resolution: int = 24,
) -> dict:
    """The aggregator with the decoder-guidance upsamplers (cat_seg_model.py forward lines 155-160 + Aggregator)."""
    embed = RELEASED_CLIPS[setting]["embed_dim"]
    width = RELEASED_CLIPS[setting]["vision_width"]
    window = 12 if resolution == 24 else resolution // 2
    agg_cfg = dict(
        RELEASED_AGGREGATOR, pooling_size=(pool, pool), feature_resolution=(resolution, resolution), window_size=window
    )
    official = nn.Module()
    official.upsample1 = nn.ConvTranspose2d(width, 256, kernel_size=2, stride=2)
    official.upsample2 = nn.ConvTranspose2d(width, 128, kernel_size=4, stride=4)
    official.transformer = off.aggregator.Aggregator(text_guidance_dim=embed, appearance_guidance_dim=embed, **agg_cfg)
    # key names as they stand in a released checkpoint
    recipe = perturb(official, seed, lambda k: k if k.startswith("upsample") else "sem_seg_head.predictor." + k)
    if not truncate:
        official.transformer.pad_len = 0  # the release's switch for "score every class" (its padding stays)
    shapes = {
        "dense": (1, embed, resolution, resolution),
        "inter0": (1, width, resolution, resolution),
        "inter1": (1, width, resolution, resolution),
        "text": (1, num_classes, 1, embed),
    }
    x = {k: seeded_input(s, seed, k) for k, s in shapes.items()}
    official.eval()
    with torch.no_grad():
        res4, res5 = official.upsample1(x["inter0"]), official.upsample2(x["inter1"])
        logits = official.transformer(x["dense"], x["text"], [x["dense"], res4, res5])
    name = f"catseg_aggregator_{setting}_c{num_classes}_pool{pool}" + ("_trunc" if truncate else "")
    config = {
        "setting": setting,
        "num_classes": num_classes,
        "pool": pool,
        "truncate": truncate,
        "aggregator": {k: list(v) if isinstance(v, tuple) else v for k, v in agg_cfg.items()},
        "embed_dim": embed,
        "width": width,
    }
    return fixture(name, commit, seed, config, recipe, {"shapes": shapes}, {"logits": digest(logits)})


def clip_fixture(off: Official, commit: str, seed: int, setting: str) -> dict:
    """Dense features at the hooked layers (encode_image(dense=True) + the forward hooks) and text embeddings."""
    cfg = TINY_CLIPS[setting]
    clip = off.build_clip(cfg)
    recipe = perturb(clip, seed, lambda k: "sem_seg_head.predictor.clip_model." + k)
    clip.eval()
    layers: list[torch.Tensor] = []
    for index in cfg["hooked"]:
        clip.visual.transformer.resblocks[index].register_forward_hook(lambda m, _, o: layers.append(o))
    size = cfg["run_resolution"]
    images = seeded_input((1, 3, size, size), seed, "clip_images")
    pred = off.build_predictor(clip, RELEASED_AGGREGATOR, TEXT_NAMES, TEXT_NAMES)
    with torch.no_grad():
        dense = clip.encode_image(images, dense=True)  # (B, 1 + L, C) after ln_post and proj
        grid = size // cfg["vision_patch_size"]
        pos = (
            clip.visual.resized_pos_embed(clip.visual.input_resolution, grid * grid + 1)
            if clip.visual.positional_embedding.shape[0] != grid * grid + 1
            else clip.visual.positional_embedding
        )
        text = pred.get_text_embeds(TEXT_NAMES, TEMPLATES, clip)  # (T, 1, C), L2-normalised
    tokens = torch.cat([off.clip.tokenize(t.format(n.split(", ")[0])) for n in TEXT_NAMES for t in TEMPLATES])
    # the layouts cat_seg_model.py hands to the head: CLS dropped, (B, C, 24, 24)
    to_map = lambda t: t.permute(1, 2, 0).reshape(t.shape[1], t.shape[2], grid, grid)  # noqa: E731  (L, B, C) -> map
    outputs = {
        "dense": digest(dense[:, 1:].transpose(1, 2).reshape(1, -1, grid, grid)),
        "cls": digest(dense[:, 0]),
        "inter0": digest(to_map(layers[0][1:])),
        "inter1": digest(to_map(layers[1][1:])),
        "position_embedding": digest(pos),
        "text": digest(text),
        "tokens": tokens.to(torch.int32),
    }
    config = {"setting": setting, "clip": cfg, "names": TEXT_NAMES, "templates": TEMPLATES}
    return fixture(f"catseg_clip_{setting}", commit, seed, config, recipe, {"image_shape": (1, 3, size, size)}, outputs)


def protocol_fixture(off: Official, commit: str, seed: int, setting: str, height: int = 150, width: int = 200) -> dict:
    """detectron2's test resize (short side 640, max 2560) + CATSeg.inference_sliding_window + PAS-20b mapping."""
    model = off.build_model(TINY_CLIPS[setting], dict(SMALL_AGGREGATOR, pooling_size=(1, 1)), VOC20B, VOC20B)
    recipe = perturb(model, seed)
    model.eval()
    image = seeded_image(seed, height, width)
    new_h, new_w = off.output_shape(height, width, 640, 2560)
    resize = types.SimpleNamespace(h=height, w=width, new_h=new_h, new_w=new_w, interp=None)
    from PIL import Image

    resize.interp = Image.BILINEAR  # ResizeShortestEdge's default interp
    resized = off.apply_image(resize, image)
    inputs = [
        {"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))), "height": height, "width": width}
    ]
    with torch.no_grad():
        scores = model(inputs)[0]["sem_seg"]  # (T, H, W)
    labels = scores.argmax(dim=0)
    top2 = scores.topk(2, dim=0).values
    ties = (top2[0] - top2[1]) <= 1e-6  # random weights leave a few exact fp32 ties, decided by rounding alone
    background = labels.clone().numpy()
    background[background >= 20] = 20  # train_net.py VOCbEvaluator.process
    config = {
        "setting": setting,
        "clip": TINY_CLIPS[setting],
        "aggregator": _plain(SMALL_AGGREGATOR),
        "pool": 1,
        "names": VOC20B,
        "background_from": 20,
        "resized": (new_h, new_w),
    }
    outputs = {
        "scores": digest(scores),
        "labels": labels.to(torch.int16),
        "ties": ties,
        "labels_pas20b": torch.from_numpy(background).to(torch.int16),
    }
    return fixture(
        f"catseg_protocol_{setting}", commit, seed, config, recipe, {"image": torch.from_numpy(image.copy())}, outputs
    )


def loss_fixture(off: Official, commit: str, seed: int) -> dict:
    """CATSeg.forward in training mode (QV fine-tuning, class pooling 2): the loss with void pixels and the gradient
    of every trainable parameter.

    Run in float64 (both here and in the test): gradients that pass through a dozen blocks differ by ~1e-5 in fp32
    from summation order alone, which would drown the 1e-5 criterion. The release's float32 casts are made float64
    for that, nothing else: its fp16-safe ``LayerNorm`` (casts to float32), the loss target (``torch.zeros``, default
    dtype) and the one-hot labels (``.float()``; 0/1 values, exact in either precision).
    """
    names = ["wall", "floor", "tree", "person", "car", "sky"]
    layer_norm = off.model_vpt.LayerNorm.forward
    to_float = torch.Tensor.float
    off.model_vpt.LayerNorm.forward = nn.LayerNorm.forward
    torch.set_default_dtype(torch.float64)
    torch.Tensor.float = lambda self, *args, **kwargs: self.to(torch.float64)
    try:
        model = off.build_model(TINY_CLIPS["vitb"], SMALL_AGGREGATOR, names, names, finetune="attention").double()
        recipe = perturb(model, seed)
        model.train()
        images = [torch.from_numpy(seeded_image(seed + i, 384, 384).transpose(2, 0, 1).copy()) for i in range(2)]
        label_spec = {"num_classes": len(names), "block": 32, "void": [(0, 0, 100, 0, 150), (1, 300, 384, 0, 384)]}
        labels = seeded_labels(seed, (2, 384, 384), **label_spec)  # 32x32 blocks of classes, void boxes
        batch = [{"image": img, "sem_seg": lab} for img, lab in zip(images, labels)]
        loss = model(batch)["loss_sem_seg"]
        loss.backward()
    finally:
        torch.Tensor.float = to_float
        torch.set_default_dtype(torch.float32)
        off.model_vpt.LayerNorm.forward = layer_norm
    # every trainable parameter's gradient, in brief (the file stays small): 256 elements + projections each
    grads = {
        n: digest(p.grad, whole=256, sample=256)
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    config = {
        "clip": TINY_CLIPS["vitb"],
        "aggregator": _plain(SMALL_AGGREGATOR),
        "names": names,
        "pool": 2,
        "finetune": "attention",
        "dtype": "float64",
    }
    inputs = {"image_seeds": [seed, seed + 1], "size": 384, "labels": label_spec}
    return fixture("catseg_loss", commit, seed, config, recipe, inputs, {"loss": loss.detach().float(), "grads": grads})


def finetune_fixture(off: Official, commit: str, seed: int) -> dict:
    """Which CLIP parameters each official ``CLIP_FINETUNE`` value trains (CATSeg.__init__)."""
    trainable = {}
    recipes = {}
    for option in ("none", "prompt", "attention", "full"):
        prompt = (TINY_CLIPS["vitb"]["vision_layers"], 4) if option == "prompt" else (0, 0)
        model = off.build_model(
            TINY_CLIPS["vitb"],
            SMALL_AGGREGATOR,
            VOC20,
            VOC20,
            finetune=option,
            prompt_depth=prompt[0],
            prompt_length=prompt[1],
        )
        trainable[option] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        recipes[option] = state_recipe(model.state_dict(), derived=("attn_mask",))
    config = {"clip": TINY_CLIPS["vitb"], "aggregator": _plain(SMALL_AGGREGATOR), "prompt_length": 4}
    return fixture("catseg_finetune", commit, seed, config, recipes, {}, {"trainable": trainable})


def released_fixture(off: Official, commit: str, seed: int) -> dict:
    """Key names and shapes of the released ViT-B/16 and ViT-L/14 checkpoints (recipes only, no values)."""
    recipes = {}
    for setting, cfg in RELEASED_CLIPS.items():
        model = off.build_model(cfg, RELEASED_AGGREGATOR, VOC20, VOC20)
        width = cfg["vision_width"]
        assert model.upsample1.in_channels == width  # cat_seg_model.py's own sizes at the released widths
        recipes[setting] = state_recipe(model.state_dict(), derived=("attn_mask",))
        del model
    return fixture("catseg_released", commit, seed, {"clips": RELEASED_CLIPS}, recipes, {}, {})


def _plain(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def make(official_root: Path, detectron2_root: Path, out_dir: Path, commit: str, seed: int = 0) -> list[Path]:
    torch.manual_seed(seed)
    off = Official(official_root, detectron2_root)
    fixtures = []
    for setting in ("vitb", "vitl"):
        for pool in (1, 2):
            fixtures.append(aggregator_fixture(off, commit, seed, setting, 20, pool, truncate=True))
    for truncate in (True, False):
        fixtures.append(aggregator_fixture(off, commit, seed, "vitb", 300, 1, truncate, resolution=12))
    fixtures += [clip_fixture(off, commit, seed, s) for s in ("vitb", "vitl")]
    fixtures += [protocol_fixture(off, commit, seed, s) for s in ("vitb", "vitl")]
    fixtures += [
        loss_fixture(off, commit, seed),
        finetune_fixture(off, commit, seed),
        released_fixture(off, commit, seed),
    ]
    return [save_fixture(f, out_dir / f"{f['name']}.pt") for f in fixtures]
