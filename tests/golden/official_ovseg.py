"""Golden fixtures from the official OVSeg release (facebookresearch/ov-seg), run with seeded perturbed weights.

Called by ``make_golden.py --method ovseg``; never imported by the tests. The official modules are imported from
the extracted release (``--official``; its ``third_party/CLIP`` is the CLIP package it imports), detectron2 is
replaced by the stubs of :mod:`official_stubs` except where behaviour matters, which runs from detectron2's own
source (``--detectron2``): the ``Conv2d`` wrapper (conv, norm, activation), ``ResizeShortestEdge`` (test-time
resize), ``sem_seg_postprocess`` and ``BitMasks.get_bounding_boxes``. ``get_norm("GN", C)`` is detectron2's
``GroupNorm(32, C)``. ``MaskFormerClipAdapter.__init__`` downloads OpenAI's weights (``clip.load``), so the adapter
is assembled with the attributes its forward reads around a small CLIP built by the release's own
``clip.model.CLIP`` (with mask prompts); ``MetadataCatalog`` answers the class names. Every forward that produces
a fixture is the official code (``OVSeg.forward`` in eval mode, ``GeneralizedSemSegEvaluator.process/evaluate``).
"""

from __future__ import annotations

import ast
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

from tests.golden.harness import digest, perturbed_state, save_fixture, seeded_image, state_recipe
from tests.golden.official_stubs import detectron2_function, import_official, install_detectron2_stubs

REPO = "facebookresearch/ov-seg"
PACKAGES = ("open_vocab_seg", "open_vocab_seg.modeling", "open_vocab_seg.modeling.heads",
            "open_vocab_seg.modeling.transformer", "open_vocab_seg.modeling.backbone",
            "open_vocab_seg.utils", "open_vocab_seg.evaluation",
            "open_vocab_seg.data", "open_vocab_seg.data.datasets")
PIXEL_MEAN, PIXEL_STD = [123.675, 116.280, 103.530], [58.395, 57.120, 57.375]
# a small CLIP in the release's layout: 224 input (the adapter resizes regions to 224), ViT patch 16, 3 blocks for
# mask prompts of depth 3 (MASK_PROMPT_DEPTH of both released configs)
TINY_CLIP = dict(embed_dim=32, image_resolution=224, vision_layers=3, vision_width=64, vision_patch_size=16,
                 mask_prompt_depth=3, context_length=77, vocab_size=49408, transformer_width=64,
                 transformer_heads=1, transformer_layers=2)
# a small MaskFormer with the released structure (Swin with 4 stages and output norms, BasePixelDecoder with GN,
# DETR decoder without encoder layers, 2-layer class MLP into CLIP space, 3-layer mask MLP)
SMALL_SWIN = dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=3, drop_path_rate=0.0)
SMALL_HEAD = dict(conv_dim=32, mask_dim=32, hidden_dim=32, num_queries=12, nheads=4, dim_feedforward=64,
                  dec_layers=3, embed_hidden_dim=48)
NAMES = ["wall", "building, edifice", "sky", "floor, flooring", "tree", "person, individual, someone",
         "grass", "road, route"]
TEST_SHORT, TEST_MAX = 160, 2560  # MIN_SIZE_TEST / MAX_SIZE_TEST of the fixture (the release: 640 / 2560)


class Official:
    """The official modules, imported once from an extracted release."""

    def __init__(self, root: Path, d2: Path) -> None:
        install_detectron2_stubs()
        self.d2 = d2
        shape_spec = namedtuple("ShapeSpec", ["channels", "height", "width", "stride"], defaults=[None] * 4)
        conv2d = detectron2_function(d2, "detectron2/layers/wrappers.py", "Conv2d")
        conv2d.forward.__globals__.update(warnings=warnings, check_if_dynamo_compiling=lambda: False)

        def get_norm(norm, channels):
            return {"GN": lambda c: nn.GroupNorm(32, c), "": lambda c: None}[norm](channels) if isinstance(norm, str) else norm(channels)

        for name in ("detectron2.layers", "detectron2.modeling"):
            sys.modules[name].ShapeSpec = shape_spec
        sys.modules["detectron2.layers"].Conv2d = conv2d
        sys.modules["detectron2.layers"].get_norm = get_norm
        self.bit_boxes = detectron2_function(d2, "detectron2/structures/masks.py", "BitMasks.get_bounding_boxes")
        boxes = type("Boxes", (), {"__init__": lambda s, t: setattr(s, "tensor", t), "__iter__": lambda s: iter(s.tensor)})
        self.bit_boxes.__globals__["Boxes"] = boxes
        bit_masks = type("BitMasks", (), {"__init__": lambda s, t: setattr(s, "tensor", t), "get_bounding_boxes": self.bit_boxes})
        sys.modules["detectron2.structures"].BitMasks = bit_masks
        stubs = {"detectron2.utils.logger": dict(log_first_n=lambda *a, **k: None),
                 "detectron2.utils.comm": dict(get_local_rank=lambda: 0, synchronize=lambda: None, get_world_size=lambda: 1,
                                               all_gather=lambda x: [x], is_main_process=lambda: True),
                 "detectron2.utils.file_io": dict(PathManager=types.SimpleNamespace(open=open, mkdirs=lambda p: None)),
                 "detectron2.evaluation": dict(SemSegEvaluator=object),
                 "detectron2.utils.env": dict(TORCH_VERSION=(2, 0))}
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
        self.predictor = import_official(root, "open_vocab_seg.modeling.transformer.open_vocab_transformer_predictor", PACKAGES)
        self.adapter = import_official(root, "open_vocab_seg.modeling.clip_adapter.adapter", PACKAGES)
        self.templates = import_official(root, "open_vocab_seg.modeling.clip_adapter.text_template", PACKAGES)
        self.meta = import_official(root, "open_vocab_seg.ovseg_model", PACKAGES)
        self.meta.sem_seg_postprocess = detectron2_function(d2, "detectron2/modeling/postprocessing.py", "sem_seg_postprocess")
        self.evaluator = import_official(root, "open_vocab_seg.evaluation.generalized_sem_seg_evaluation", PACKAGES)
        self.output_shape = detectron2_function(d2, "detectron2/data/transforms/augmentation_impl.py",
                                                "ResizeShortestEdge.get_output_shape")
        self.apply_image = detectron2_function(d2, "detectron2/data/transforms/transform.py", "ResizeTransform.apply_image")

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
        nn.init.normal_(adapter.non_object_embedding.data, std=adapter.clip_model.transformer.width ** -0.5)
        adapter.mask_fill = [255.0 * c for c in self.adapter.PIXEL_MEAN]
        adapter.mask_expand_ratio, adapter.mask_thr, adapter.mask_matting = 1.0, mask_thr, False
        adapter.region_resized, adapter.mask_prompt_fwd = True, True
        adapter.register_buffer("pixel_mean", torch.Tensor(self.adapter.PIXEL_MEAN).reshape(1, 3, 1, 1) * 255.0)
        adapter.register_buffer("pixel_std", torch.Tensor(self.adapter.PIXEL_STD).reshape(1, 3, 1, 1) * 255.0)
        return adapter

    def build_swin(self, cfg: dict) -> nn.Module:
        return self.swin.SwinTransformer(patch_size=4, embed_dim=cfg["embed_dim"], depths=cfg["depths"],
                                         num_heads=cfg["num_heads"], window_size=cfg["window_size"],
                                         drop_path_rate=cfg["drop_path_rate"], ape=False, patch_norm=True,
                                         out_indices=(0, 1, 2, 3))

    def build_head(self, channels: list[int], head: dict, embed_dim: int) -> nn.Module:
        spec = self.swin.ShapeSpec if hasattr(self.swin, "ShapeSpec") else sys.modules["detectron2.layers"].ShapeSpec
        shapes = {f"res{i + 2}": spec(channels=c, stride=2 ** (i + 2)) for i, c in enumerate(channels)}
        decoder = self.pixel_decoder.BasePixelDecoder(input_shape=shapes, conv_dim=head["conv_dim"], mask_dim=head["mask_dim"], norm="GN")
        predictor = self.predictor.OpenVocabTransformerPredictor(
            in_channels=channels[-1], mask_classification=True, embedding_dim=embed_dim,
            embed_hidden_dim=head["embed_hidden_dim"], embed_layers=2, hidden_dim=head["hidden_dim"],
            num_queries=head["num_queries"], nheads=head["nheads"], dropout=0.1, dim_feedforward=head["dim_feedforward"],
            enc_layers=0, dec_layers=head["dec_layers"], pre_norm=False, deep_supervision=True,
            mask_dim=head["mask_dim"], enforce_input_project=False)
        return self.head.OpenVocabMaskFormerHead(input_shape=shapes, num_classes=171, pixel_decoder=decoder, loss_weight=1.0,
                                                 ignore_value=255, transformer_predictor=predictor, transformer_in_feature="res5")

    def build_ovseg(self, backbone: nn.Module, channels: list[int], head: dict, clip_cfg: dict, mask_thr: float,
                    ensemble_weight: float, names: list[str]) -> nn.Module:
        model = self.meta.OVSeg(
            backbone=backbone, sem_seg_head=self.build_head(channels, head, clip_cfg["embed_dim"]),
            clip_adapter=self.build_adapter(clip_cfg, mask_thr), criterion=None, num_queries=head["num_queries"],
            panoptic_on=False, object_mask_threshold=0.8, overlap_threshold=0.8, metadata=None, size_divisibility=32,
            sem_seg_postprocess_before_inference=False, clip_ensemble=True, clip_ensemble_weight=ensemble_weight,
            pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
        self.meta.MetadataCatalog = types.SimpleNamespace(get=lambda name: types.SimpleNamespace(stuff_classes=list(names)))
        return model


def importlib_module(name: str):
    import importlib

    return importlib.import_module(name)


def perturb(module: nn.Module, seed: int) -> list[tuple]:
    """Give ``module`` the seeded perturbed weights of its recipe (derived buffers kept); returns the recipe."""
    derived = ("relative_position_index", "pixel_mean", "pixel_std")
    own = module.state_dict()
    recipe = state_recipe(own, derived=derived)
    state = OrderedDict((k, v) for k, v in perturbed_state(recipe, seed).items() if not k.endswith(derived))
    # module versions as a saved checkpoint carries them (OpenVocabMaskFormerHead renames keys of version < 2)
    state._metadata = own._metadata
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(derived) for k in missing), (missing, unexpected)
    return recipe


def fixture(name: str, commit: str, seed: int, config: dict, recipe, inputs: dict, outputs: dict) -> dict:
    return {"method": "ovseg", "name": name, "official_repo": REPO, "official_commit": commit, "seed": seed,
            "config": config, "state": recipe, "inputs": inputs, "outputs": outputs}


# ---------------------------------------------------------------------------------------------- fixtures
def inference_fixture(off: Official, commit: str, seed: int, ensemble_weight: float, height: int = 75, width: int = 101) -> dict:
    """detectron2's test resize (short side 160: 160x215, not a multiple of 32) + ``OVSeg.forward`` (eval):
    normalise, pad to 32 (0 = mean colour), Swin MaskFormer, CLIP-space class logits, masked-crop CLIP with mask
    prompts, ensemble (or CLIP only at weight 0), semantic map, resize to the original size."""
    torch.manual_seed(seed)
    model = off.build_ovseg(off.build_swin(SMALL_SWIN), [SMALL_SWIN["embed_dim"] * 2 ** i for i in range(4)], SMALL_HEAD,
                            TINY_CLIP, mask_thr=0.4, ensemble_weight=ensemble_weight, names=NAMES)
    recipe = perturb(model, seed)
    model.eval()
    image = seeded_image(seed, height, width)
    new_h, new_w = off.output_shape(height, width, TEST_SHORT, TEST_MAX)
    from PIL import Image

    resize = types.SimpleNamespace(h=height, w=width, new_h=new_h, new_w=new_w, interp=Image.BILINEAR)
    resized = off.apply_image(resize, image)
    captured = {}
    model.sem_seg_head.register_forward_hook(lambda m, i, o: captured.update(
        pred_masks=o["pred_masks"].detach().clone(), class_embed=o["pred_logits"].detach().clone()))
    model.clip_adapter.register_forward_hook(lambda m, i, o: captured.update(clip_logits=o[0].detach().clone(), valid=o[2].clone())
                                             if o[0] is not None else None)
    inputs = [{"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))), "height": height, "width": width,
               "meta": {"dataset_name": "golden"}}]
    with torch.no_grad():
        scores = model(inputs)[0]["sem_seg"]  # (K, H, W)
    labels = scores.argmax(dim=0)
    top2 = scores.topk(2, dim=0).values
    outputs = {"scores": digest(scores), "labels": labels.to(torch.int16), "ties": (top2[0] - top2[1]) <= 1e-6 * top2[0].abs().clamp_min(1),
               "pred_masks": digest(captured["pred_masks"]), "class_embed": digest(captured["class_embed"]),
               "clip_logits": digest(captured["clip_logits"]), "valid": captured["valid"],
               "resized_shape": (new_h, new_w)}
    tokens = torch.cat([off.clip.tokenize(t.format(n)) for n in NAMES for t in off.templates.VILD_PROMPT])
    outputs["tokens"] = tokens.to(torch.int32)
    config = {"swin": SMALL_SWIN, "head": SMALL_HEAD, "clip": TINY_CLIP, "names": NAMES, "mask_threshold": 0.4,
              "ensemble_weight": ensemble_weight, "test_short": TEST_SHORT, "test_max": TEST_MAX,
              "templates": list(off.templates.VILD_PROMPT)}
    name = f"ovseg_inference_swin_w{str(ensemble_weight).replace('.', '')}"
    return fixture(name, commit, seed, config, recipe, {"image": torch.from_numpy(image)}, outputs)


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
    return fixture("ovseg_metric", commit, seed, {"num_classes": 3, "ignore_index": 255}, [], {"cases": METRIC_CASES}, outputs)


def make(root: Path, detectron2_root: Path, out_dir: Path, commit: str, seed: int) -> list[Path]:
    if detectron2_root is None:
        raise SystemExit("--method ovseg needs --detectron2 (an extracted detectron2)")
    off = Official(root, detectron2_root)
    fixtures = [inference_fixture(off, commit, seed, 0.7), inference_fixture(off, commit, seed, 0.0), metric_fixture(off, commit, seed)]
    return [save_fixture(f, out_dir / f"{f['name']}.pt") for f in fixtures]
