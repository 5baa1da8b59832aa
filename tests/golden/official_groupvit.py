"""The generator's side for GroupViT (NVlabs/GroupViT): builds the OFFICIAL modules from an extracted release, runs
them on seeded perturbed weights and saves fixtures (see tests/golden/README.md).

    git -C <GroupViT git dir> archive HEAD models datasets segmentation utils | tar -x -C /tmp/groupvit_official
    git -C <mmcv git dir> archive v1.3.14 mmcv/image/geometric.py | tar -x -C /tmp/mmcv_official
    # + mmseg 0.x's EncoderDecoder inference methods (mmseg/models/segmentors/encoder_decoder.py) under /tmp/mmseg_official
    python tests/golden/make_golden.py --method groupvit --official /tmp/groupvit_official \\
        --mmcv /tmp/mmcv_official --mmseg /tmp/mmseg_official

What runs unchanged: ``models/group_vit.py`` (``GroupViT``: patch embedding, position embedding and its eval-time
bicubic interpolation, grouping layers, Gumbel / hard assignment), ``models/transformer.py`` + ``models/utils.py``
(the text tower, QuickGELU), ``models/multi_label_contrastive.py`` (``MultiLabelContrastive``: projectors,
``loss``, ``multi_label_loss``, ``encode_image`` / ``encode_text`` / ``build_text_embedding``),
``datasets/builder.py`` (``WordAugTokenizeWrapper.__call__``, ``Tokenize``) with ``datasets/tokenizer.py`` and
``datasets/imagenet_template.py``, ``segmentation/evaluation/group_vit_seg.py`` (``GroupViTSegInference``:
chained soft maps, ``resize_attn_map``, top-5, background threshold), ``utils/misc.py``
``build_dataset_class_tokens``, mmseg 0.x ``EncoderDecoder.slide_inference`` / ``inference`` (run from their
source) and mmcv 1.3.14 ``rescale_size`` (run from its source).

Adaptations, all at the stub level:
- mmcv / mmseg / diffdist are not installed: ``mmcv.utils.Registry`` registers and builds by keyword,
  ``mmcv.Config`` is a dict with attribute access, mmseg's ``EncoderDecoder`` is an ``nn.Module`` carrying mmseg's
  own inference methods, ``mmseg.ops.resize`` is ``F.interpolate`` (its warnings dropped), ``diffdist``'s
  all-gather and ``torch.distributed`` are those of one process (rank 0 of 1).
- The image resize of mmcv's ``Resize(keep_ratio=True)`` is cv2's bilinear filter on uint8 pixels; these fixtures
  (made before cv2 was installable here) take the size from mmcv's ``rescale_size`` and the pixels from
  ``F.interpolate`` (bilinear, ``align_corners=False``, float) on both sides. cv2's fixed-point rounding to uint8
  is the one part not reproduced (docs/fidelity.md: within 0.77 grey level).
- nltk is not installed: ``WordAugTokenizeWrapper`` tags the caption with a stub whose nouns are the words of a
  fixed lexicon (``NOUN_LEXICON``), so the fixture tests the release's noun sampling, template draw and padding,
  not nltk's tagger.
- ``MultiLabelContrastive``'s SyncBatchNorm conversion is kept; in one process it is plain batch norm.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import logging
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.golden.harness import (
    digest,
    fixture_record,
    perturbed_state,
    save_fixture,
    seeded_image,
    seeded_input,
    state_recipe,
)
from tests.golden.official_stubs import import_official

REPO = "NVlabs/GroupViT"
MMCV_COMMIT = "be945648c4a9f01fc519814b1b0e8b4ada77c8b7"  # v1.3.14, GroupViT's pinned mmcv-full
MMSEG_COMMIT = "fb3391cf57824e22943b162b3476439aca12fec0"  # 0.x EncoderDecoder (GroupViT pins mmseg 0.18)
# small GroupViT (three stages, as the paper's ViT-S) and OVSegmentor-like (two stages) encoders. 6 heads of
# width 8 so that the converter's defaults (the paper's 6 heads) fit the checkpoints made from these recipes.
ENCODERS = {
    "groupvit": {
        "img_size": 224,
        "patch_size": 16,
        "embed_dim": 48,
        "depths": [2, 1, 1],
        "num_heads": [6, 6, 6],
        "num_group_tokens": [8, 4, 0],
        "num_output_groups": [8, 4],
        "embed_factors": [1, 1, 1],
    },
    "ovsegmentor": {
        "img_size": 224,
        "patch_size": 16,
        "embed_dim": 48,
        "depths": [2, 2],
        "num_heads": [6, 6],
        "num_group_tokens": [8, 0],
        "num_output_groups": [4],
        "embed_factors": [1, 1],
    },
}
TEXT = {"context_length": 77, "width": 64, "layers": 2, "vocab_size": 49408}
PROJECTION = {"output_dim": 32, "inner_dim": 96}
IMAGE_SIZES = {"224": (224, 224), "160x96": (160, 96)}  # train size; eval at another grid (position interpolation)
PROMPTS = ["a photo of a cat.", "a photo of a dining table.", "itap of a tv monitor.", "a person riding a horse"]
MMCV_MEAN, MMCV_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
PROTOCOL = {"img_scale": (2048, 448), "crop_size": (448, 448), "stride": (224, 224), "bg_thresh": 0.95}
PROTOCOL_IMAGES = {"voc": (150, 200), "elongated": (60, 400)}  # 60x400: the long side is capped at 2048
NOUN_LEXICON = {
    "dog",
    "dogs",
    "man",
    "woman",
    "bike",
    "street",
    "beach",
    "sunset",
    "table",
    "food",
    "car",
    "cars",
    "cat",
    "sofa",
    "tree",
    "trees",
    "sky",
    "boat",
    "water",
    "bird",
    "child",
    "ball",
    "park",
    "train",
    "station",
    "horse",
    "field",
    "kitchen",
    "bus",
    "road",
    "city",
    "mountain",
    "snow",
    "people",
    "plate",
}
CAPTIONS = [
    "a dog running on the beach at sunset",
    "a man riding a bike down the street",
    "the cat sleeps",
    "a woman sitting on a sofa with a cat and a dog",
    "trees under a blue sky",
    "a boat on the water",
    "a bird",
    "a child kicking a ball in the park",
    "a train arriving at the station",
    "horse in a field",
    "a kitchen table full of food",
    "a red bus on the road in the city",
    "snow on the mountain",
    "people",
    "an empty plate",
    "two dogs and a cat playing with a ball in the park near the trees",
    "sunset",
    "a car",
    "cars parked on the street of the city",
    "a man and a woman walking a dog in the snow",
    "beautiful",
    "a very nice view",
    "the water",
    "a bike and a bike",
    "a child on a horse in a field near a train",
    "food on a plate on the table in the kitchen",
    "a bird over the water at the beach",
    "the sky",
    "people waiting for the bus at the station",
    "a cat on a sofa",
]


# ------------------------------------------------------------------------------------------------ stubs
class _Registry:
    def __init__(self, name: str) -> None:
        self.name, self.modules = name, {}

    def register_module(self, name=None, force=False, module=None):
        def register(cls):
            self.modules[cls.__name__] = cls
            return cls

        return register(module) if module is not None else register

    def build(self, cfg):
        cfg = dict(cfg)
        return self.modules[cfg.pop("type")](**cfg)


class _Config(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def source_function(path: Path, qualname: str, namespace: dict):
    """A function (or ``Class.method``) of a source file, executed on its own in ``namespace``."""
    tree = ast.parse(path.read_text())
    body, node = tree.body, None
    for name in qualname.split("."):
        node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
        body = node.body
    node.decorator_list = []
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[node.name]


def _resize(input, size=None, scale_factor=None, mode="nearest", align_corners=None, warning=True):
    return F.interpolate(input, size, scale_factor, mode, align_corners)  # mmseg.ops.resize without its warnings


def install_stubs(mmseg_root: Path | None) -> None:
    """The stubs; without ``mmseg_root`` (the training fixtures) mmseg's ``EncoderDecoder`` is an empty module."""
    if "mmcv" in sys.modules:
        return
    _module("mmcv", Config=_Config, __path__=[])
    _module("mmcv.utils", Registry=_Registry)
    _module("mmcv.parallel", collate=None, DataContainer=None)  # datasets/builder.py's loader (not run here)
    import timm.data.transforms

    if not hasattr(timm.data.transforms, "_pil_interp"):  # removed from timm after 0.4 (training transforms only)
        timm.data.transforms._pil_interp = None
    namespace = {"torch": torch, "F": F, "nn": nn, "resize": _resize}
    methods = {
        m: source_function(mmseg_root / "mmseg/models/segmentors/encoder_decoder.py", f"EncoderDecoder.{m}", namespace)
        for m in (("slide_inference", "whole_inference", "inference") if mmseg_root else ())
    }
    encoder_decoder = type("EncoderDecoder", (nn.Module,), methods)
    _module("mmseg", __path__=[])
    _module("mmseg.models", EncoderDecoder=encoder_decoder)
    _module("utils", get_logger=lambda *a, **k: logging.getLogger("groupvit-official"), __path__=[])
    _module("diffdist", __path__=[])
    _module("diffdist.functional", all_gather=lambda out_list, x: [x])
    _module(
        "nltk",
        word_tokenize=lambda text: text.split(),
        pos_tag=lambda words: [(w, "NN" if w in NOUN_LEXICON else "DT") for w in words],
    )


class Official:
    def __init__(self, root: Path, mmcv_root: Path | None, mmseg_root: Path | None) -> None:
        install_stubs(mmseg_root)
        self.root = root
        self.group_vit = import_official(root, "models.group_vit", ("models",))
        self.transformer = import_official(root, "models.transformer", ("models",))
        self.mlc = import_official(root, "models.multi_label_contrastive", ("models",))
        self.mlc.dist = types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: 1)
        self.datasets = import_official(root, "datasets.builder", ("datasets",))
        self.tokenizer = import_official(root, "datasets.tokenizer", ("datasets",))
        self.templates = import_official(root, "datasets.imagenet_template", ("datasets",))
        self.seg = import_official(
            root, "segmentation.evaluation.group_vit_seg", ("segmentation", "segmentation.evaluation")
        )
        if mmcv_root is not None:  # the protocol's keep-ratio resize (not needed by the training fixtures)
            geometric = mmcv_root / "mmcv/image/geometric.py"
            namespace: dict = {}
            source_function(geometric, "_scale_size", namespace)
            self.rescale_size = source_function(geometric, "rescale_size", namespace)
        self.class_tokens = source_function(
            root / "utils/misc.py",
            "build_dataset_class_tokens",
            {"torch": torch, "template_meta": self.templates.template_meta},
        )
        self.tokenize = self.datasets.Tokenize(self.tokenizer.SimpleTokenizer(), max_seq_len=TEXT["context_length"])

    def build(self, encoder: str) -> nn.Module:
        """``MultiLabelContrastive`` as the release's config builds it (multi_label 3), at a small size."""
        cfg = ENCODERS[encoder]
        model = self.mlc.MultiLabelContrastive(
            img_encoder=dict(type="GroupViT", drop_rate=0.0, drop_path_rate=0.0, **cfg),
            text_encoder=dict(type="TextTransformer", **TEXT),
            output_dim=PROJECTION["output_dim"],
            contrast_temperature=0.07,
            proj_num_layers=2,
            multi_label=3,
        )
        for projector in (model.img_projector, model.text_projector):  # ProjectMLP's inner width (4096 released)
            hidden, out = projector.linear_hidden, projector.linear_out
            projector.linear_hidden = type(hidden)(
                nn.Conv1d(hidden[0].in_channels, PROJECTION["inner_dim"], 1),
                nn.BatchNorm1d(PROJECTION["inner_dim"]),
                nn.ReLU(inplace=True),
            )
            projector.linear_out = nn.Conv1d(PROJECTION["inner_dim"], out.out_channels, 1)
        return model


ASSIGN_GAIN = 10.0  # std factor of the assignment's q/k projections: at the init std (0.02) every patch of a random
# net goes to one group and the chained maps, argmax and background threshold would be tested on a constant map.
# Not more: the per-pixel argmax over interpolated group maps is discontinuous, and a larger gain amplifies the
# 1e-7 differences of two correct implementations enough to flip pixels that sit exactly on a group boundary
# (30: 2 pixels of one 448x448 window flipped; 10: none in either protocol fixture)


def perturb(module: nn.Module, seed: int) -> list[tuple]:
    recipe = [
        (k, shape, mean, std * ASSIGN_GAIN if ".assign.q_proj.weight" in k or ".assign.k_proj.weight" in k else std)
        for k, shape, mean, std in state_recipe(module.state_dict())
    ]
    state = perturbed_state(recipe, seed)
    current = module.state_dict()
    module.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()}, strict=True)
    return recipe


_fixture = functools.partial(fixture_record, "groupvit", REPO)


def model_fixture(off: Official, encoder: str, commit: str, seed: int) -> dict:
    """Eval-mode encoder (hard assignment, soft maps), projectors and text tower on seeded inputs."""
    torch.manual_seed(seed)
    model = off.build(encoder)
    recipe = perturb(model, seed)
    model.eval()
    outputs: dict = {}
    with torch.no_grad():
        for size_name, (h, w) in IMAGE_SIZES.items():
            images = seeded_input((2, 3, h, w), seed, f"images_{size_name}")
            x, _, attn = model.img_encoder.forward_features(images, return_attn=True)
            outs = model.encode_image(images, return_feat=True, as_dict=True)
            outputs[size_name] = {
                "tokens": digest(x),
                "image_x": digest(outs["image_x"]),
                "image_feat": digest(outs["image_feat"]),
                "soft": [digest(a["soft"][:, 0]) for a in attn if a is not None],
                "hard": [digest(a["hard"][:, 0]) for a in attn if a is not None],
            }
        tokens = off.tokenize(PROMPTS)
        outputs["text"] = {
            "tokens": tokens.to(torch.int32),
            "pooled": digest(model.text_encoder(tokens)),
            "text_x": digest(model.encode_text(tokens)),
        }
    config = {
        "encoder": ENCODERS[encoder],
        "text": TEXT,
        "projection": PROJECTION,
        "prompts": PROMPTS,
        "image_sizes": {k: list(v) for k, v in IMAGE_SIZES.items()},
    }
    return _fixture(f"groupvit_model_{encoder}", commit, seed, config, recipe, {}, outputs)


LOSS_CASES = {"scale_init": math.log(1 / 0.07), "scale_clamped": math.log(150.0)}


def loss_fixture(off: Official, commit: str, seed: int) -> dict:
    """``MultiLabelContrastive.loss`` (image-caption InfoNCE) and ``multi_label_loss`` (3 prompts per image) on
    seeded features, value and gradient, at the initial logit scale and above the clamp at 100."""
    torch.manual_seed(seed)
    model = off.build("groupvit")
    batch, k, dim = 5, 3, PROJECTION["output_dim"]
    outputs = {}
    for case, log_scale in LOSS_CASES.items():
        image = seeded_input((batch, dim), seed, "loss_image").requires_grad_(True)
        text = seeded_input((batch, dim), seed, "loss_text").requires_grad_(True)
        prompts = seeded_input((batch, k, dim), seed, "loss_prompts").requires_grad_(True)
        with torch.no_grad():
            model.logit_scale.fill_(log_scale)
            model.multi_label_logit_scale.fill_(log_scale + 0.1)
        model.zero_grad()
        contrastive = model.loss(image, text)
        multi_label = model.multi_label_loss(image.unsqueeze(1), prompts)
        (contrastive + multi_label).backward()
        outputs[case] = {
            "contrastive": contrastive.detach(),
            "multi_label": multi_label.detach(),
            "grad_image": image.grad.clone(),
            "grad_text": text.grad.clone(),
            "grad_prompts": prompts.grad.clone(),
            "grad_logit_scale": model.logit_scale.grad.clone(),
            "grad_multi_label_logit_scale": model.multi_label_logit_scale.grad.clone(),
        }
    config = {"batch": batch, "k": k, "dim": dim, "log_scales": LOSS_CASES}
    return _fixture("groupvit_losses", commit, seed, config, [], {}, outputs)


def prompts_fixture(off: Official, commit: str, seed: int) -> dict:
    """``WordAugTokenizeWrapper(max_word=3, template_set='full', word_type='noun')`` on 30 captions in order, with
    numpy's global generator seeded once: the strings sent to the text tower (caption + 3 prompts) and their ids."""
    wrapper = off.datasets.WordAugTokenizeWrapper(lambda texts: texts, max_word=3)
    np.random.seed(seed)
    texts = [list(wrapper(caption)) for caption in CAPTIONS]
    nouns = [[w for w in c.split() if w in NOUN_LEXICON] for c in CAPTIONS]
    tokens = torch.stack([off.tokenize(t) for t in texts]).to(torch.int32)
    config = {
        "captions": CAPTIONS,
        "nouns": nouns,
        "max_word": 3,
        "template_set": "full",
        "templates": list(off.templates.full_imagenet_templates),
    }
    return _fixture("groupvit_prompts", commit, seed, config, [], {}, {"texts": texts, "tokens": tokens})


def protocol_fixture(off: Official, image_name: str, commit: str, seed: int) -> dict:
    """mmcv keep-ratio resize to (2048, 448), mmseg slide inference (448 windows, stride 224) around
    ``GroupViTSegInference`` (VOC classes with background, threshold 0.95, top-5) on a fixed image."""
    torch.manual_seed(seed)
    model = off.build("groupvit")
    recipe = perturb(model, seed)
    model.eval()
    classes = off.seg_classes()
    text_tokens = off.class_tokens(off.tokenize, "simple", classes[1:])
    text_embedding = model.build_text_embedding(text_tokens)
    seg = off.seg.GroupViTSegInference(
        model,
        text_embedding,
        with_bg=True,
        test_cfg=dict(
            mode="slide", bg_thresh=PROTOCOL["bg_thresh"], stride=PROTOCOL["stride"], crop_size=PROTOCOL["crop_size"]
        ),
    )
    seg.eval()
    height, width = PROTOCOL_IMAGES[image_name]
    image = seeded_image(seed + 11, height, width)  # uint8 (H, W, 3), RGB
    new_w, new_h = off.rescale_size((width, height), PROTOCOL["img_scale"])
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    resized = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False)  # cv2 stand-in
    mean, std = torch.tensor(MMCV_MEAN).view(1, 3, 1, 1), torch.tensor(MMCV_STD).view(1, 3, 1, 1)
    normalized = (resized - mean) / std
    meta = [{"ori_shape": (height, width, 3), "img_shape": (new_h, new_w, 3), "flip": False}]
    with torch.no_grad():
        logits = seg.slide_inference(normalized, meta, rescale=True)
        probabilities = seg.inference(normalized, meta, rescale=True)
    config = {
        "encoder": ENCODERS["groupvit"],
        "text": TEXT,
        "projection": PROJECTION,
        "protocol": dict(PROTOCOL),
        "classes": list(classes),
        "resized": [new_h, new_w],
        "mmcv_commit": MMCV_COMMIT,
        "mmseg_commit": MMSEG_COMMIT,
    }
    outputs = {
        "logits": digest(logits),
        "labels": probabilities.argmax(1).to(torch.uint8),
        "text_embedding": digest(text_embedding),
    }
    return _fixture(
        f"groupvit_protocol_{image_name}",
        commit,
        seed,
        config,
        recipe,
        {"image": torch.from_numpy(image).permute(2, 0, 1).clone()},
        outputs,
    )


def dataset_classes(root: Path) -> dict[str, list[str]]:
    """``CLASSES`` of the release's segmentation datasets (read from the source: mmseg is not importable)."""
    out = {}
    for name, file in (("voc21", "pascal_voc.py"), ("pc60", "pascal_context.py"), ("coco_object81", "coco_object.py")):
        path = root / "segmentation/datasets" / file
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CLASSES" for t in node.targets):
                out[name] = {
                    "classes": list(ast.literal_eval(node.value)),
                    "file": f"segmentation/datasets/{file}",
                    "line": node.lineno,
                }
    return out


def released_recipe() -> list[tuple]:
    """Key names and shapes of the released model (configs/group_vit_gcc_yfcc_30e.yml)."""
    off = _OFFICIAL
    if True:  # GroupViT.__init__ reads tensor values (drop-path rates): not on the meta device
        model = off.mlc.MultiLabelContrastive(
            img_encoder=dict(
                type="GroupViT",
                embed_dim=384,
                num_heads=[6, 6, 6],
                depths=[6, 3, 3],
                num_group_tokens=[64, 8, 0],
                num_output_groups=[64, 8],
                drop_rate=0.0,
                drop_path_rate=0.1,
            ),
            text_encoder=dict(type="TextTransformer", context_length=77, width=256, layers=12, vocab_size=49408),
            contrast_temperature=0.07,
            proj_num_layers=2,
            output_dim=256,
            multi_label=3,
        )
    return [
        (k, tuple(v.shape), 1.0 if k.endswith("running_var") else 0.0, 0.1 if k.endswith("running_var") else 0.02)
        for k, v in model.state_dict().items()
    ]


CLASS_STRINGS_DIR = Path(__file__).resolve().parents[2] / "ovseg_lab" / "assets" / "class_strings" / "groupvit"


def write_class_strings(classes: dict, commit: str, out_dir: Path = CLASS_STRINGS_DIR) -> list[Path]:
    """``assets/class_strings/groupvit/<vocabulary>.json``: our packaged benchmark names (same class order as the
    release, background apart) -> the release's ``CLASSES`` strings; "background" is never embedded (a threshold
    scores it) and keeps its name, which the model looks for."""
    import json

    from ovseg_lab.vocab import load_vocabulary

    paths = []
    for vocabulary, entry in classes.items():
        ours = [c for c in load_vocabulary(vocabulary).classes if c != "background"]
        official = [c for c in entry["classes"] if c != "background"]
        if len(ours) != len(official):
            raise SystemExit(f"{vocabulary}: {len(ours)} classes here, {len(official)} in {entry['file']}")
        strings = dict(zip(ours, official)) | {"background": "background"}
        path = out_dir / f"{vocabulary}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        citation = f"{REPO}@{commit} {entry['file']}:{entry['line']} (CLASSES; written by tests/golden/make_golden.py --method groupvit)"
        path.write_text(json.dumps({"citation": citation, "strings": strings}, indent=1) + "\n")
        paths.append(path)
    return paths


_OFFICIAL: Official | None = None


def make(official_root: Path, extra: dict, out_dir: Path, commit: str, seed: int = 0) -> list[Path]:
    global _OFFICIAL
    if not extra.get("mmcv") or not extra.get("mmseg"):
        raise SystemExit(
            "--mmcv <extracted mmcv v1.3.14> and --mmseg <mmseg 0.x encoder_decoder.py tree> are needed for GroupViT"
        )
    off = _OFFICIAL = Official(official_root, Path(extra["mmcv"]), Path(extra["mmseg"]))
    classes = dataset_classes(official_root)
    off.seg_classes = lambda: classes["voc21"]["classes"]
    fixtures = [
        model_fixture(off, "groupvit", commit, seed),
        model_fixture(off, "ovsegmentor", commit, seed),
        loss_fixture(off, commit, seed),
        prompts_fixture(off, commit, seed),
    ]
    fixtures += [protocol_fixture(off, name, commit, seed) for name in PROTOCOL_IMAGES]
    fixtures.append(
        _fixture(
            "groupvit_released",
            commit,
            seed,
            {"classes": classes, "config": "group_vit_gcc_yfcc_30e"},
            released_recipe(),
            {},
            {},
        )
    )
    return [save_fixture(f, out_dir / f"{f['name']}.pt") for f in fixtures] + write_class_strings(classes, commit)
