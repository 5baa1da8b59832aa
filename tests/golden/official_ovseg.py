"""Golden fixtures from the official OVSeg release (facebookresearch/ov-seg), run with seeded perturbed weights.

Called by ``make_golden.py --method ovseg``; never imported by the tests. The official modules are imported from
the extracted release (``--official``; its ``third_party/CLIP`` is the CLIP package it imports), detectron2 is
replaced by the stubs of :mod:`official_stubs` except where behaviour matters, which runs from detectron2's own
source (``--detectron2``): the ``Conv2d`` wrapper (conv, norm, activation), ``get_norm`` and
``FrozenBatchNorm2d``, the ResNet (``BottleneckBlock``, ``ResNet``, the DeepLab project's ``DeepLabStem`` and
``build_resnet_deeplab_backbone``), ``ResizeShortestEdge`` (test-time resize), ``sem_seg_postprocess`` and
``BitMasks.get_bounding_boxes``. ``MaskFormerClipAdapter.__init__`` downloads OpenAI's weights (``clip.load``), so the adapter
is assembled with the attributes its forward reads around a small CLIP built by the release's own
``clip.model.CLIP`` (with mask prompts); ``MetadataCatalog`` answers the class names. Every forward that produces
a fixture is the official code (``OVSeg.forward`` in eval mode, ``GeneralizedSemSegEvaluator.process/evaluate``).
"""

from __future__ import annotations

import ast
import functools
import json
import sys
import tempfile
import types
import warnings
from collections import OrderedDict, namedtuple
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.golden.harness import digest, fixture_record, perturbed_state, save_fixture, seeded_image, state_recipe
from tests.golden.official_stubs import detectron2_function, import_official, install_detectron2_stubs

REPO = "facebookresearch/ov-seg"
PACKAGES = (
    "open_vocab_seg",
    "open_vocab_seg.modeling",
    "open_vocab_seg.modeling.heads",
    "open_vocab_seg.modeling.transformer",
    "open_vocab_seg.modeling.backbone",
    "open_vocab_seg.utils",
    "open_vocab_seg.evaluation",
    "open_vocab_seg.data",
    "open_vocab_seg.data.datasets",
)
PIXEL_MEAN, PIXEL_STD = [123.675, 116.280, 103.530], [58.395, 57.120, 57.375]
# a small CLIP in the release's layout: 224 input (the adapter resizes regions to 224), ViT patch 16, 3 blocks for
# mask prompts of depth 3 (MASK_PROMPT_DEPTH of both released configs)
TINY_CLIP = dict(
    embed_dim=32,
    image_resolution=224,
    vision_layers=3,
    vision_width=64,
    vision_patch_size=16,
    mask_prompt_depth=3,
    context_length=77,
    vocab_size=49408,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=2,
)
# a small MaskFormer with the released structure (Swin with 4 stages and output norms, BasePixelDecoder with GN,
# DETR decoder without encoder layers, 2-layer class MLP into CLIP space, 3-layer mask MLP)
SMALL_SWIN = dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=3, drop_path_rate=0.0)
SMALL_HEAD = dict(
    conv_dim=32,
    mask_dim=32,
    hidden_dim=32,
    num_queries=12,
    nheads=4,
    dim_feedforward=64,
    dec_layers=3,
    embed_hidden_dim=48,
)
NAMES = [
    "wall",
    "building, edifice",
    "sky",
    "floor, flooring",
    "tree",
    "person, individual, someone",
    "grass",
    "road, route",
]
D2_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"  # the detectron2 the fixtures were made with
TEST_SHORT, TEST_MAX = 160, 2560  # MIN_SIZE_TEST / MAX_SIZE_TEST of the fixture (the release: 640 / 2560)


class Official:
    """The official modules, imported once from an extracted release."""

    def __init__(self, root: Path, d2: Path) -> None:
        install_detectron2_stubs()
        self.d2 = d2
        shape_spec = namedtuple("ShapeSpec", ["channels", "height", "width", "stride"], defaults=[None] * 4)
        conv2d = detectron2_function(d2, "detectron2/layers/wrappers.py", "Conv2d")
        conv2d.forward.__globals__.update(warnings=warnings, check_if_dynamo_compiling=lambda: False)

        norms = exec_definitions(
            d2,
            [("detectron2/layers/batch_norm.py", ["FrozenBatchNorm2d", "get_norm"])],
            {
                "torch": torch,
                "nn": nn,
                "F": torch.nn.functional,
                "BatchNorm2d": nn.BatchNorm2d,
                "NaiveSyncBatchNorm": None,
                "LayerNorm": None,
                "env": types.SimpleNamespace(TORCH_VERSION=tuple(int(v) for v in torch.__version__.split(".")[:2])),
            },
        )
        get_norm = norms["get_norm"]
        for name in ("detectron2.layers", "detectron2.modeling"):
            sys.modules[name].ShapeSpec = shape_spec
        sys.modules["detectron2.layers"].Conv2d = conv2d
        sys.modules["detectron2.layers"].get_norm = get_norm
        self.bit_boxes = detectron2_function(d2, "detectron2/structures/masks.py", "BitMasks.get_bounding_boxes")
        boxes = type(
            "Boxes", (), {"__init__": lambda s, t: setattr(s, "tensor", t), "__iter__": lambda s: iter(s.tensor)}
        )
        self.bit_boxes.__globals__["Boxes"] = boxes
        bit_masks = type(
            "BitMasks", (), {"__init__": lambda s, t: setattr(s, "tensor", t), "get_bounding_boxes": self.bit_boxes}
        )
        sys.modules["detectron2.structures"].BitMasks = bit_masks
        stubs = {
            "detectron2.utils.logger": dict(log_first_n=lambda *a, **k: None),
            "detectron2.utils.comm": dict(
                get_local_rank=lambda: 0,
                synchronize=lambda: None,
                get_world_size=lambda: 1,
                all_gather=lambda x: [x],
                is_main_process=lambda: True,
            ),
            "detectron2.utils.file_io": dict(PathManager=types.SimpleNamespace(open=open, mkdirs=lambda p: None)),
            "detectron2.evaluation": dict(SemSegEvaluator=object),
            "detectron2.utils.env": dict(TORCH_VERSION=(2, 0)),
        }
        for name, attrs in stubs.items():
            mod = types.ModuleType(name)
            mod.__dict__.update(attrs)
            sys.modules[name] = mod
        if str(root / "third_party" / "CLIP") not in sys.path:
            sys.path.insert(0, str(root / "third_party" / "CLIP"))
        import clip  # the release's fork of OpenAI's CLIP (mask prompts)

        self.clip = clip
        self.clip_model = importlib_module("clip.model")
        self.swin = import_official(root, "open_vocab_seg.modeling.backbone.swin", PACKAGES)
        self.pixel_decoder = import_official(root, "open_vocab_seg.modeling.heads.pixel_decoder", PACKAGES)
        self.head = import_official(root, "open_vocab_seg.modeling.heads.open_vocab_mask_former_head", PACKAGES)
        self.predictor = import_official(
            root, "open_vocab_seg.modeling.transformer.open_vocab_transformer_predictor", PACKAGES
        )
        self.adapter = import_official(root, "open_vocab_seg.modeling.clip_adapter.adapter", PACKAGES)
        self.templates = import_official(root, "open_vocab_seg.modeling.clip_adapter.text_template", PACKAGES)
        self.meta = import_official(root, "open_vocab_seg.ovseg_model", PACKAGES)
        self.meta.sem_seg_postprocess = detectron2_function(
            d2, "detectron2/modeling/postprocessing.py", "sem_seg_postprocess"
        )
        self.evaluator = import_official(root, "open_vocab_seg.evaluation.generalized_sem_seg_evaluation", PACKAGES)
        self.output_shape = detectron2_function(
            d2, "detectron2/data/transforms/augmentation_impl.py", "ResizeShortestEdge.get_output_shape"
        )
        self.apply_image = detectron2_function(
            d2, "detectron2/data/transforms/transform.py", "ResizeTransform.apply_image"
        )

    # ------------------------------------------------------------------ builders
    def build_clip(self, cfg: dict) -> nn.Module:
        model = self.clip_model.CLIP(**cfg)
        # clip.load fills these from OpenAI's weights; the constructor leaves them uninitialised (torch.empty)
        nn.init.normal_(model.positional_embedding, std=0.01)
        nn.init.normal_(model.text_projection, std=cfg["transformer_width"] ** -0.5)
        return model.float()

    def build_adapter(self, clip_cfg: dict, mask_thr: float) -> nn.Module:
        """MaskFormerClipAdapter with the attributes its forward reads (its __init__ calls clip.load)."""
        cls = self.adapter.MaskFormerClipAdapter
        adapter = cls.__new__(cls)
        nn.Module.__init__(adapter)
        adapter.clip_model = self.build_clip(clip_cfg)
        adapter.text_templates = self.templates.VILDPromptExtractor()
        adapter.text_feature_buffer = {}
        adapter.non_object_embedding = nn.Parameter(torch.empty(1, adapter.clip_model.text_projection.shape[-1]))
        nn.init.normal_(adapter.non_object_embedding.data, std=adapter.clip_model.transformer.width**-0.5)
        adapter.mask_fill = [255.0 * c for c in self.adapter.PIXEL_MEAN]
        adapter.mask_expand_ratio, adapter.mask_thr, adapter.mask_matting = 1.0, mask_thr, False
        adapter.region_resized, adapter.mask_prompt_fwd = True, True
        adapter.register_buffer("pixel_mean", torch.Tensor(self.adapter.PIXEL_MEAN).reshape(1, 3, 1, 1) * 255.0)
        adapter.register_buffer("pixel_std", torch.Tensor(self.adapter.PIXEL_STD).reshape(1, 3, 1, 1) * 255.0)
        return adapter

    def build_swin(self, cfg: dict) -> nn.Module:
        return self.swin.SwinTransformer(
            patch_size=4,
            embed_dim=cfg["embed_dim"],
            depths=cfg["depths"],
            num_heads=cfg["num_heads"],
            window_size=cfg["window_size"],
            drop_path_rate=cfg["drop_path_rate"],
            ape=False,
            patch_norm=True,
            out_indices=(0, 1, 2, 3),
        )

    def build_head(self, channels: list[int], head: dict, embed_dim: int) -> nn.Module:
        spec = self.swin.ShapeSpec if hasattr(self.swin, "ShapeSpec") else sys.modules["detectron2.layers"].ShapeSpec
        shapes = {f"res{i + 2}": spec(channels=c, stride=2 ** (i + 2)) for i, c in enumerate(channels)}
        decoder = self.pixel_decoder.BasePixelDecoder(
            input_shape=shapes, conv_dim=head["conv_dim"], mask_dim=head["mask_dim"], norm="GN"
        )
        predictor = self.predictor.OpenVocabTransformerPredictor(
            in_channels=channels[-1],
            mask_classification=True,
            embedding_dim=embed_dim,
            embed_hidden_dim=head["embed_hidden_dim"],
            embed_layers=2,
            hidden_dim=head["hidden_dim"],
            num_queries=head["num_queries"],
            nheads=head["nheads"],
            dropout=0.1,
            dim_feedforward=head["dim_feedforward"],
            enc_layers=0,
            dec_layers=head["dec_layers"],
            pre_norm=False,
            deep_supervision=True,
            mask_dim=head["mask_dim"],
            enforce_input_project=False,
        )
        return self.head.OpenVocabMaskFormerHead(
            input_shape=shapes,
            num_classes=171,
            pixel_decoder=decoder,
            loss_weight=1.0,
            ignore_value=255,
            transformer_predictor=predictor,
            transformer_in_feature="res5",
        )

    def build_ovseg(
        self,
        backbone: nn.Module,
        channels: list[int],
        head: dict,
        clip_cfg: dict,
        mask_thr: float,
        ensemble_weight: float,
        names: list[str],
    ) -> nn.Module:
        model = self.meta.OVSeg(
            backbone=backbone,
            sem_seg_head=self.build_head(channels, head, clip_cfg["embed_dim"]),
            clip_adapter=self.build_adapter(clip_cfg, mask_thr),
            criterion=None,
            num_queries=head["num_queries"],
            panoptic_on=False,
            object_mask_threshold=0.8,
            overlap_threshold=0.8,
            metadata=None,
            size_divisibility=32,
            sem_seg_postprocess_before_inference=False,
            clip_ensemble=True,
            clip_ensemble_weight=ensemble_weight,
            pixel_mean=PIXEL_MEAN,
            pixel_std=PIXEL_STD,
        )
        self.meta.MetadataCatalog = types.SimpleNamespace(
            get=lambda name: types.SimpleNamespace(stuff_classes=list(names))
        )
        return model


def exec_definitions(root: Path, sources: list[tuple[str, list[str]]], namespace: dict) -> dict:
    """Run the named top-level classes / functions of detectron2 source files (decorators dropped) in one
    namespace, in order, so later ones see earlier ones (CNNBlockBase -> BottleneckBlock -> ResNet)."""
    for relative, names in sources:
        tree = ast.parse((root / relative).read_text())
        for name in names:
            node = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
            node.decorator_list = []
            exec(compile(ast.Module(body=[node], type_ignores=[]), relative, "exec"), namespace)
    return namespace


def deeplab_resnet(d2: Path, depth: int = 101) -> nn.Module:
    """detectron2's ``build_resnet_deeplab_backbone`` with the R-101c config of the release
    (configs/ovseg_R101c_vitB_bs32_120k.yaml: deeplab stem 128, STRIDE_IN_1X1 False, RES5_MULTI_GRID [1, 2, 4],
    detectron2's defaults NORM FrozenBN, FREEZE_AT 2, RES5_DILATION 1)."""
    layers = sys.modules["detectron2.layers"]
    namespace = {
        "torch": torch,
        "nn": nn,
        "F": torch.nn.functional,
        "np": np,
        "Conv2d": layers.Conv2d,
        "ShapeSpec": layers.ShapeSpec,
        "Backbone": nn.Module,
        "BatchNorm2d": nn.BatchNorm2d,
        "weight_init": types.SimpleNamespace(c2_msra_fill=lambda m: None, c2_xavier_fill=lambda m: None),
        "comm": types.SimpleNamespace(get_world_size=lambda: 1),
        "DeformConv": None,
        "ModulatedDeformConv": None,
    }
    namespace["get_norm"] = layers.get_norm  # detectron2's own (FrozenBN, GN), run in Official.__init__
    namespace["FrozenBatchNorm2d"] = layers.get_norm.__globals__["FrozenBatchNorm2d"]
    exec_definitions(
        d2,
        [
            ("detectron2/layers/blocks.py", ["CNNBlockBase"]),
            ("detectron2/modeling/backbone/resnet.py", ["BottleneckBlock", "BasicStem", "ResNet"]),
            ("projects/DeepLab/deeplab/resnet.py", ["DeepLabStem", "build_resnet_deeplab_backbone"]),
        ],
        namespace,
    )
    namespace["DeformBottleneckBlock"] = None
    resnets = types.SimpleNamespace(
        NORM="FrozenBN",
        STEM_TYPE="deeplab",
        STEM_OUT_CHANNELS=128,
        OUT_FEATURES=["res2", "res3", "res4", "res5"],
        DEPTH=depth,
        NUM_GROUPS=1,
        WIDTH_PER_GROUP=64,
        RES2_OUT_CHANNELS=256,
        STRIDE_IN_1X1=False,
        RES4_DILATION=1,
        RES5_DILATION=1,
        DEFORM_ON_PER_STAGE=[False] * 4,
        DEFORM_MODULATED=False,
        DEFORM_NUM_GROUPS=1,
        RES5_MULTI_GRID=[1, 2, 4],
    )
    cfg = types.SimpleNamespace(
        MODEL=types.SimpleNamespace(RESNETS=resnets, BACKBONE=types.SimpleNamespace(FREEZE_AT=2))
    )
    return namespace["build_resnet_deeplab_backbone"](cfg, layers.ShapeSpec(channels=3))


def importlib_module(name: str):
    import importlib

    return importlib.import_module(name)


def perturb(module: nn.Module, seed: int, adjust=None) -> list[tuple]:
    """Give ``module`` the seeded perturbed weights of its recipe (derived buffers kept); returns the recipe.
    ``adjust``: recipe entry -> entry (e.g. other scales for some tensors)."""
    derived = ("relative_position_index", "pixel_mean", "pixel_std")
    own = module.state_dict()
    recipe = state_recipe(own, derived=derived)
    if adjust is not None:
        recipe = [adjust(entry) for entry in recipe]
    state = OrderedDict((k, v) for k, v in perturbed_state(recipe, seed).items() if not k.endswith(derived))
    # module versions as a saved checkpoint carries them (OpenVocabMaskFormerHead renames keys of version < 2)
    state._metadata = own._metadata
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(derived) for k in missing), (missing, unexpected)
    return recipe


fixture = functools.partial(fixture_record, "ovseg", REPO)


# ---------------------------------------------------------------------------------------------- fixtures
def inference_fixture(
    off: Official, commit: str, seed: int, ensemble_weight: float, height: int = 75, width: int = 101
) -> dict:
    """detectron2's test resize (short side 160: 160x215, not a multiple of 32) + ``OVSeg.forward`` (eval):
    normalise, pad to 32 (0 = mean colour), Swin MaskFormer, CLIP-space class logits, masked-crop CLIP with mask
    prompts, ensemble (or CLIP only at weight 0), semantic map, resize to the original size."""
    torch.manual_seed(seed)
    model = off.build_ovseg(
        off.build_swin(SMALL_SWIN),
        [SMALL_SWIN["embed_dim"] * 2**i for i in range(4)],
        SMALL_HEAD,
        TINY_CLIP,
        mask_thr=0.4,
        ensemble_weight=ensemble_weight,
        names=NAMES,
    )
    recipe = perturb(model, seed)
    model.eval()
    image = seeded_image(seed, height, width)
    new_h, new_w = off.output_shape(height, width, TEST_SHORT, TEST_MAX)
    from PIL import Image

    resize = types.SimpleNamespace(h=height, w=width, new_h=new_h, new_w=new_w, interp=Image.BILINEAR)
    resized = off.apply_image(resize, image)
    captured = {}
    model.sem_seg_head.register_forward_hook(
        lambda m, i, o: captured.update(
            pred_masks=o["pred_masks"].detach().clone(), class_embed=o["pred_logits"].detach().clone()
        )
    )
    model.clip_adapter.register_forward_hook(
        lambda m, i, o: (
            captured.update(clip_logits=o[0].detach().clone(), valid=o[2].clone()) if o[0] is not None else None
        )
    )
    inputs = [
        {
            "image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
            "height": height,
            "width": width,
            "meta": {"dataset_name": "golden"},
        }
    ]
    with torch.no_grad():
        scores = model(inputs)[0]["sem_seg"]  # (K, H, W)
    labels = scores.argmax(dim=0)
    top2 = scores.topk(2, dim=0).values
    outputs = {
        "scores": digest(scores),
        "labels": labels.to(torch.int16),
        "ties": (top2[0] - top2[1]) <= 1e-6 * top2[0].abs().clamp_min(1),
        "pred_masks": digest(captured["pred_masks"]),
        "class_embed": digest(captured["class_embed"]),
        "clip_logits": digest(captured["clip_logits"]),
        "valid": captured["valid"],
        "resized_shape": (new_h, new_w),
    }
    tokens = torch.cat([off.clip.tokenize(t.format(n)) for n in NAMES for t in off.templates.VILD_PROMPT])
    outputs["tokens"] = tokens.to(torch.int32)
    config = {
        "swin": SMALL_SWIN,
        "head": SMALL_HEAD,
        "clip": TINY_CLIP,
        "names": NAMES,
        "mask_threshold": 0.4,
        "ensemble_weight": ensemble_weight,
        "test_short": TEST_SHORT,
        "test_max": TEST_MAX,
        "templates": list(off.templates.VILD_PROMPT),
    }
    name = f"ovseg_inference_swin_w{str(ensemble_weight).replace('.', '')}"
    return fixture(name, commit, seed, config, recipe, {"image": torch.from_numpy(image)}, outputs)


def maskformer_fixture(off: Official, commit: str, seed: int, kind: str, height: int = 96, width: int = 128) -> dict:
    """The MaskFormer alone: backbone (Swin with output norms, or detectron2's deeplab R-101c with FrozenBN),
    BasePixelDecoder, DETR decoder with deep supervision, class embeddings turned into logits against text
    features + the no-object embedding exactly as ``OVSeg.forward`` does (``get_sim_logits``, ``normalize_feature``),
    for the last and every auxiliary layer."""
    torch.manual_seed(seed)
    embed_dim = TINY_CLIP["embed_dim"]
    if kind == "swin":
        backbone, channels = off.build_swin(SMALL_SWIN), [SMALL_SWIN["embed_dim"] * 2**i for i in range(4)]
    else:
        backbone, channels = deeplab_resnet(off.d2), [256, 512, 1024, 2048]
    model = nn.Module()
    model.backbone = backbone
    model.sem_seg_head = off.build_head(channels, SMALL_HEAD, embed_dim)
    model.clip_adapter = nn.Module()
    model.clip_adapter.non_object_embedding = nn.Parameter(torch.randn(1, embed_dim) * embed_dim**-0.5)

    # FrozenBN's running_var starts at 1 - 1e-5: float32 rounding gives it a std of 4e-7 over 512 channels, which
    # the recipe would read as "random around 0" (negative variances, NaN): draw it around 1 like its siblings
    def damp(entry):
        return (entry[0], entry[1], 1.0, 0.1) if entry[0].endswith("running_var") else entry

    recipe = perturb(model, seed, damp)
    model.eval()
    from tests.golden.harness import seeded_input

    images = seeded_input((1, 3, height, width), seed, "maskformer_images")
    text = seeded_input((len(NAMES), embed_dim), seed, "maskformer_text")
    adapter = off.adapter.ClipAdapter
    norm = lambda x: adapter.normalize_feature(None, x)  # noqa: E731
    with torch.no_grad():
        out = model.sem_seg_head(model.backbone(images))
        classifier = torch.cat([norm(text), norm(model.clip_adapter.non_object_embedding)])
        logits = [adapter.get_sim_logits(None, classifier, norm(o["pred_logits"])) for o in [out] + out["aux_outputs"]]
    assert all(torch.isfinite(x).all() for x in logits) and torch.isfinite(out["pred_masks"]).all()
    outputs = {
        "pred_logits": [digest(x) for x in logits],
        "pred_masks": [digest(o["pred_masks"]) for o in [out] + out["aux_outputs"]],
    }
    config = {
        "backbone": kind,
        "swin": SMALL_SWIN,
        "head": SMALL_HEAD,
        "embed_dim": embed_dim,
        "num_classes": len(NAMES),
    }
    return fixture(
        f"ovseg_maskformer_{kind}",
        commit,
        seed,
        config,
        recipe,
        {"image_shape": (1, 3, height, width), "text_shape": (len(NAMES), embed_dim)},
        outputs,
    )


# The released models (configs/ovseg_swinB_vitL_bs32_120k.yaml, configs/ovseg_R101c_vitB_bs32_120k.yaml) over OpenAI's
# ViT-L/14 and ViT-B/16 at 224 with mask prompts of depth 3 (the ft_mpt checkpoints)
RELEASED = {
    "swinb_vitl14": dict(
        swin=dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12, drop_path_rate=0.3),
        clip=dict(
            embed_dim=768,
            image_resolution=224,
            vision_layers=24,
            vision_width=1024,
            vision_patch_size=14,
            mask_prompt_depth=3,
            context_length=77,
            vocab_size=49408,
            transformer_width=768,
            transformer_heads=12,
            transformer_layers=12,
        ),
        mask_thr=0.4,
    ),
    "r101c_vitb16": dict(
        swin=None,
        clip=dict(
            embed_dim=512,
            image_resolution=224,
            vision_layers=12,
            vision_width=768,
            vision_patch_size=16,
            mask_prompt_depth=3,
            context_length=77,
            vocab_size=49408,
            transformer_width=512,
            transformer_heads=8,
            transformer_layers=12,
        ),
        mask_thr=0.5,
    ),
}
RELEASED_HEAD = dict(
    conv_dim=256,
    mask_dim=256,
    hidden_dim=256,
    num_queries=100,
    nheads=8,
    dim_feedforward=2048,
    dec_layers=6,
    embed_hidden_dim=1024,
)


def released_fixture(off: Official, commit: str, seed: int) -> dict:
    """Key names and shapes of the released OVSeg models as ``OVSeg`` holds them (recipes only, no values)."""
    recipes = {}
    for setting, spec in RELEASED.items():
        if spec["swin"] is not None:
            backbone, channels = off.build_swin(spec["swin"]), [128 * 2**i for i in range(4)]
        else:
            backbone, channels = deeplab_resnet(off.d2), [256, 512, 1024, 2048]
        model = off.build_ovseg(backbone, channels, RELEASED_HEAD, spec["clip"], spec["mask_thr"], 0.7, NAMES)
        derived = ("relative_position_index", "pixel_mean", "pixel_std")
        recipe = state_recipe(model.state_dict(), derived=derived)
        # FrozenBN's running_var (1 - 1e-5) is drawn around 1 (see maskformer_fixture)
        recipes[setting] = [
            (k, shape, 1.0, 0.1) if k.endswith("running_var") else (k, shape, mean, std)
            for k, shape, mean, std in recipe
        ]
        del model
    return fixture("ovseg_released", commit, seed, {"settings": list(RELEASED)}, recipes, {}, {})


# hand-made metric cases (3 classes, ignore 255): class 2 only predicted (never in GT), class 1 partly right,
# pixels predicted on ignored ground truth
METRIC_CASES = [
    {"gt": [[0, 0, 1, 1], [0, 0, 1, 255], [0, 0, 255, 255]], "pred": [[0, 2, 1, 0], [0, 0, 2, 2], [1, 0, 2, 0]]},
    {"gt": [[1, 1, 1, 1], [0, 0, 0, 0], [255, 0, 0, 0]], "pred": [[1, 1, 0, 0], [0, 0, 0, 2], [2, 0, 0, 0]]},
]


def metric_fixture(off: Official, commit: str, seed: int) -> dict:
    """``GeneralizedSemSegEvaluator.process`` + ``evaluate`` on hand-made label maps (3 classes, ignore 255)."""
    from PIL import Image

    np.float, np.int, np.bool = float, int, bool  # the release's evaluator predates numpy 1.24
    cls = off.evaluator.GeneralizedSemSegEvaluator
    ev = cls.__new__(cls)
    ev._num_classes, ev._ignore_label, ev._class_names = 3, 255, ["a", "b", "c"]
    ev._conf_matrix = np.zeros((4, 4), dtype=np.int64)
    ev._predictions, ev._distributed, ev._output_dir, ev._evaluation_set = [], False, None, None
    ev._cpu_device = torch.device("cpu")
    import logging

    ev._logger = logging.getLogger("golden")
    ev.post_process_func = lambda x, **kwargs: x
    ev.encode_json_sem_seg = lambda pred, name: []
    with tempfile.TemporaryDirectory() as tmp:
        ev.input_file_to_gt_file = {}
        for i, case in enumerate(METRIC_CASES):
            image, gt = Path(tmp) / f"{i}.png", Path(tmp) / f"{i}_gt.png"
            Image.fromarray(np.zeros((3, 4, 3), dtype=np.uint8)).save(image)
            Image.fromarray(np.array(case["gt"], dtype=np.uint8)).save(gt)
            ev.input_file_to_gt_file[str(image)] = str(gt)
            scores = torch.nn.functional.one_hot(torch.tensor(case["pred"]), 3).permute(2, 0, 1).float()
            ev.process([{"file_name": str(image)}], [{"sem_seg": scores}])
        result = ev.evaluate()["sem_seg"]
    outputs = {k: float(result[k]) for k in ("mIoU", "mACC", "pACC")}
    return fixture(
        "ovseg_metric", commit, seed, {"num_classes": 3, "ignore_index": 255}, [], {"cases": METRIC_CASES}, outputs
    )


def make(root: Path, detectron2_root: Path, out_dir: Path, commit: str, seed: int) -> list[Path]:
    if detectron2_root is None:
        raise SystemExit("--method ovseg needs --detectron2 (an extracted detectron2)")
    off = Official(root, detectron2_root)
    fixtures = [
        inference_fixture(off, commit, seed, 0.7),
        inference_fixture(off, commit, seed, 0.0),
        metric_fixture(off, commit, seed),
        maskformer_fixture(off, commit, seed, "swin"),
        maskformer_fixture(off, commit, seed, "r101c"),
        class_strings_fixture(off, root, detectron2_root, commit, seed),
        released_fixture(off, commit, seed),
        adaptation_fixture(root, commit, seed),
    ]
    strings_dir = Path(__file__).resolve().parents[2] / "ovseg_lab" / "assets" / "class_strings" / "ovseg"
    return [save_fixture(f, out_dir / f"{f['name']}.pt") for f in fixtures] + write_class_strings(
        root, detectron2_root, commit, strings_dir
    )


# ---------------------------------------------------------------------------------------------- CLIP adaptation
ADAPT_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(layers=3, width=64, head_width=64, patch_size=16, image_size=224, mask_emb_depth=3),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
)


def adaptation_fixture(root: Path, commit: str, seed: int) -> dict:
    """The release's CLIP adaptation (open_clip_training): its optimiser's weight-decay split (main.py:173-186,
    the lambdas run as written) on its CLIP with mask prompts; ``ClipLoss`` and its gradients on a fixed batch of
    features with a repeated text (a false negative, as the release trains); the masked-crop training transform
    (``image_transform(is_train=True, with_mask=True)``: RandomResizedCrop + ``Maskget``) on a fixed crop."""
    src = root / "open_clip_training" / "src"
    if "ovseg_open_clip" not in sys.modules:
        package = types.ModuleType("ovseg_open_clip")
        package.__path__ = [str(src / "open_clip")]
        sys.modules["ovseg_open_clip"] = package
    model_mod = importlib_module("ovseg_open_clip.model")
    loss_mod = importlib_module("ovseg_open_clip.loss")
    transform_mod = importlib_module("ovseg_open_clip.transform")
    torch.manual_seed(seed)
    model = model_mod.CLIP(**ADAPT_CLIP, quick_gelu=True)
    tree = ast.parse((src / "training" / "main.py").read_text())
    exclude_node = next(
        n for n in ast.walk(tree) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "exclude"
    )
    exclude = eval(compile(ast.Expression(exclude_node.value), "main.py", "eval"))
    names = [n for n, _ in model.named_parameters()]
    no_decay = [n for n, p in model.named_parameters() if exclude(n, p)]
    # the loss on a fixed batch: 6 region embeddings, their nouns' text embeddings (text 4 repeats text 1)
    gen = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(6, 32, generator=gen), dim=-1).requires_grad_(True)
    text = torch.nn.functional.normalize(torch.randn(6, 32, generator=gen), dim=-1)
    text[4] = text[1]
    text.requires_grad_(True)
    logit_scale = torch.tensor(100.0 / 3)
    loss = loss_mod.ClipLoss()(image, text, logit_scale)
    loss.backward()
    # the training transform on a 40x40 crop whose background is the release's mask colour
    crop = np.full((40, 40, 3), (124, 116, 103), dtype=np.uint8)
    crop[8:30, 12:33] = np.asarray(seeded_image(seed, 22, 21))
    transform = transform_mod.image_transform(40, is_train=True, with_mask=True)
    from PIL import Image

    torch.manual_seed(seed)
    tensor, mask = transform(Image.fromarray(crop))
    outputs = {
        "parameters": names,
        "no_decay": no_decay,
        "loss": loss.detach(),
        "grad_image": image.grad,
        "grad_text": text.grad,
        "crop_tensor": digest(tensor),
        "crop_mask": torch.as_tensor(mask).bool(),
    }
    inputs = {
        "image": image.detach(),
        "text": text.detach(),
        "logit_scale": logit_scale,
        "crop": torch.from_numpy(crop),
    }
    return fixture("ovseg_adaptation", commit, seed, {"clip": ADAPT_CLIP}, [], inputs, outputs)


# ---------------------------------------------------------------------------------------------- class strings
# (our packaged vocabulary, official file, variable, how our classes pair with the official ones):
#   index: the same order (the official train ids and ours come from the same annotation ids);
#   name: another order (PC-59's 59_labels.txt puts the VOC classes first; PC-459 writes "air conditioner" where
#   our list has "airconditioner"): paired by the name without spaces, the one class left on each side paired
#   with each other (PC-59's "table" / our "diningtable").
CLASS_STRING_SOURCES = {
    "ade150": ("detectron2", "detectron2/data/datasets/builtin_meta.py", "ADE20K_SEM_SEG_CATEGORIES", "index"),
    "ade847": (
        "ov-seg",
        "open_vocab_seg/data/datasets/register_ade20k_full.py",
        "ADE20K_SEM_SEG_FULL_CATEGORIES",
        "index",
    ),
    "pc59": ("ov-seg", "open_vocab_seg/data/datasets/register_pascal_context.py", "PASCALCONTEX59_NAMES", "name"),
    "pc459": ("ov-seg", "open_vocab_seg/data/datasets/register_pascal_context.py", "PASCALCONTEX459_NAMES", "name"),
    "voc20": ("ov-seg", "open_vocab_seg/data/datasets/register_voc_seg.py", "PASCALVOC20_NAMES", "index"),
    "coco_stuff171": ("ov-seg", "open_vocab_seg/data/datasets/register_coco_stuff.py", "COCO_CATEGORIES", "index"),
}


def official_class_list(path: Path, variable: str) -> tuple[list[str], int, int]:
    """The class strings a registration file defines (dict entries: their "name"), as ``OVSeg.get_class_name_list``
    reads them (``c.strip()``, ovseg_model.py:258-262), with the variable's first and last line."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == variable)
    values = ast.literal_eval(node.value)
    names = [v["name"] if isinstance(v, dict) else v for v in values]
    return [n.strip() for n in names], node.lineno, node.end_lineno


def pair_classes(ours: list[str], official: list[str], how: str) -> dict[str, str]:
    if len(ours) != len(official):
        raise SystemExit(f"{len(ours)} classes here, {len(official)} in the release")
    if how == "index":
        return dict(zip(ours, official))
    key = lambda name: name.replace(" ", "").lower()  # noqa: E731
    by_key = {key(o): o for o in official}
    pairs = {name: by_key.pop(key(name)) for name in ours if key(name) in by_key}
    left_ours, left_official = [n for n in ours if n not in pairs], list(by_key.values())
    if len(left_ours) > 1:
        raise SystemExit(f"cannot pair {left_ours} with {left_official}")
    pairs.update(zip(left_ours, left_official))
    return {name: pairs[name] for name in ours}


def class_strings_fixture(off: Official, root: Path, d2: Path, commit: str, seed: int) -> dict:
    """Per benchmark OVSeg evaluates (and COCO-Stuff, which it trains on): the class strings in the release's order
    and the token ids of the first ViLD template the text tower receives (``clip.tokenize``, trimmed to the
    longest prompt)."""
    outputs, template = {}, off.templates.VILD_PROMPT[0]
    for vocabulary, (repo, relative, variable, how) in CLASS_STRING_SOURCES.items():
        official, _, _ = official_class_list((d2 if repo == "detectron2" else root) / relative, variable)
        tokens = off.clip.tokenize([template.format(name) for name in official])
        length = int((tokens != 0).sum(dim=1).max())
        outputs[vocabulary] = {"strings": official, "paired_by": how, "tokens": tokens[:, :length].to(torch.int32)}
    return fixture("ovseg_class_strings", commit, seed, {"template": template}, [], {}, outputs)


def write_class_strings(root: Path, d2: Path, commit: str, out_dir: Path) -> list[Path]:
    """ovseg_lab/assets/class_strings/ovseg/<vocabulary>.json from the release's registration files (ADE-150 is
    detectron2's built-in registration, which OVSeg evaluates as ade20k_sem_seg_val)."""
    import subprocess

    from ovseg_lab.vocab import load_vocabulary

    try:
        d2_commit = subprocess.run(
            ["git", "-C", str(d2), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        d2_commit = D2_COMMIT
    written = []
    for vocabulary, (repo, relative, variable, how) in CLASS_STRING_SOURCES.items():
        base, repo_name, repo_commit = (
            (d2, "facebookresearch/detectron2", d2_commit) if repo == "detectron2" else (root, REPO, commit)
        )
        official, first, last = official_class_list(base / relative, variable)
        ours = list(load_vocabulary(vocabulary).classes)
        strings = pair_classes(ours, official, how)
        path = out_dir / f"{vocabulary}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        citation = (
            f"{repo_name}@{repo_commit} {relative}:{first}-{last} ({variable}; OVSeg strips each name, "
            f"{REPO}@{commit} open_vocab_seg/ovseg_model.py:258-262); paired with ours by {how}; generated by "
            "tests/golden/make_golden.py --method ovseg"
        )
        path.write_text(json.dumps({"citation": citation, "strings": strings}, indent=1, ensure_ascii=False) + "\n")
        written.append(path)
    return written
