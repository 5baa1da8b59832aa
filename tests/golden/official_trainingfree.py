"""Golden fixtures from the training-free releases: SCLIP, NACLIP (OpenAI ``clip`` copies) and ClearCLIP (an
``open_clip`` copy), each an mmseg-1.x segmentor.

What runs is the release's own code: its CLIP copy with the changed last block (``encode_image``) and its
segmentor's ``predict`` (sliding window or whole pass, PAMR, ``postprocess_result``), on a small CLIP with seeded
perturbed weights. Stub-level adaptations:

- mmseg / mmengine are not installed: ``BaseSegmentor`` is ``nn.Module`` (taking ``data_preprocessor``),
  ``SegDataPreProcessor`` a no-op (the fixture's input is already the normalised RGB tensor the preprocessor
  would produce), ``PixelData`` a plain record, ``MODELS.register_module`` the identity.
- ``clip.load`` / ``create_model`` (downloads) answer the small perturbed CLIP, in fp32 (ClearCLIP asks for
  fp16 on GPU; our golden comparisons are fp32); ClearCLIP's ``BLIP`` and ``gem`` imports are empty modules.
- ``device`` is the CPU; ClearCLIP's ``inputs.half()`` is the identity while its ``predict`` runs.

The class-name files (``configs/cls_*.txt``) become ``ovseg_lab/assets/class_strings/<release>/`` (our packaged
vocabulary's names in the release's order, background paired with the release's first line).
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import torch
from torch import nn

from tests.golden.harness import fixture_record, perturbed_state, save_fixture, seeded_image, seeded_input, state_recipe

REPOS = {"sclip": "wangf3014/SCLIP", "naclip": "sinahmr/NACLIP", "clearclip": "mc-lan/ClearCLIP"}
SEGMENTOR = {"sclip": ("clip_segmentor", "CLIPForSegmentation"), "naclip": ("naclip", "NACLIP")}
SEGMENTOR["clearclip"] = ("clearclip_segmentor", "ClearCLIPSegmentation")
# a small OpenAI-layout CLIP: 16-pixel patches on a 4x4 stored grid, 2 vision heads, the real 77-token text side
CLIP_CFG = {
    "embed_dim": 32,
    "image_resolution": 64,
    "vision_layers": 2,
    "vision_width": 128,
    "vision_patch_size": 16,
    "context_length": 77,
    "vocab_size": 49408,
    "transformer_width": 64,
    "transformer_heads": 2,
    "transformer_layers": 2,
}
CLIP_MEAN = (122.771, 116.746, 104.094)  # the releases' SegDataPreProcessor
CLIP_STD = (68.501, 66.632, 70.323)
# classes of the protocol fixtures: background first as in the releases' VOC / Context files, one multi-name class
PROTOCOL_CLASSES = ("background, sky", "cat", "dog, puppy", "tree")
# (vocabulary here, the release's file, whether the release lists background first while ours lists it last)
CLASS_FILES = (
    ("voc21", "cls_voc21.txt", True),
    ("pc60", "cls_context60.txt", True),
    ("coco_object81", "cls_coco_object.txt", True),
    ("voc20", "cls_voc20.txt", False),
    ("pc59", "cls_context59.txt", False),
    ("coco_stuff171", "cls_coco_stuff.txt", False),
    ("ade150", "cls_ade20k.txt", False),
    ("cityscapes19", "cls_city_scapes.txt", False),
)
# per release: the protocol fixtures (name, image size (the resized picture), segmentor keywords)
PROTOCOLS = {
    "sclip": [
        (
            "slide",
            (64, 100),
            {"slide_crop": 48, "slide_stride": 24, "logit_scale": 40, "prob_thd": 0.4, "area_thd": 0.1},
        ),
    ],
    "naclip": [
        ("slide_pamr", (64, 100), {"slide_crop": 48, "slide_stride": 24, "prob_thd": 0.45, "pamr_steps": 3}),
        ("whole", (48, 88), {"slide_crop": 0, "prob_thd": 0.42, "pamr_steps": 0}),
    ],
    "clearclip": [
        ("slide", (72, 100), {"slide_crop": 43, "slide_stride": 24, "logit_scale": 50, "prob_thd": 0.45}),
    ],
}


def release_of(root: Path) -> str:
    for release, (module, _) in SEGMENTOR.items():
        if (root / f"{module}.py").is_file():
            return release
    raise SystemExit(f"{root} holds none of {[m + '.py' for m, _ in SEGMENTOR.values()]}")


class _PixelData:
    def __init__(self, **fields) -> None:
        self.__dict__.update(fields)


class _DataSample:
    def __init__(self, metainfo: dict) -> None:
        self.metainfo, self.fields = metainfo, {}

    def set_data(self, fields: dict) -> None:
        self.fields.update(fields)


class _BaseSegmentor(nn.Module):
    def __init__(self, data_preprocessor=None, **kwargs) -> None:
        super().__init__()


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def install_stubs() -> None:
    registry = types.SimpleNamespace(register_module=lambda *a, **k: lambda cls: cls)
    for name in ("mmseg", "mmseg.models", "mmengine"):
        _module(name, __path__=[])
    _module("mmseg.models.segmentors", BaseSegmentor=_BaseSegmentor)
    _module("mmseg.models.data_preprocessor", SegDataPreProcessor=lambda **k: None)
    _module("mmengine.structures", PixelData=_PixelData)
    _module("mmseg.registry", MODELS=registry)
    _module("BLIP", __path__=[])
    _module("BLIP.models", __path__=[])
    _module("BLIP.models.blip_retrieval", blip_retrieval=None)
    _module("gem")
    try:  # the OpenAI clip copies read packaging through setuptools' pkg_resources
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version

        _module("pkg_resources", packaging=packaging)


class Official:
    """One release imported from its extracted tree, with a small perturbed CLIP built by its own code."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root, self.release = root, release_of(root)
        install_stubs()
        sys.path.insert(0, str(root))
        if self.release == "clearclip":
            open_clip = importlib.import_module("open_clip")
            cfg = CLIP_CFG
            self.clip = open_clip.model.CLIP(
                embed_dim=cfg["embed_dim"],
                vision_cfg={
                    "image_size": cfg["image_resolution"],
                    "layers": cfg["vision_layers"],
                    "width": cfg["vision_width"],
                    "patch_size": cfg["vision_patch_size"],
                    "head_width": 64,
                },
                text_cfg={
                    "context_length": cfg["context_length"],
                    "vocab_size": cfg["vocab_size"],
                    "width": cfg["transformer_width"],
                    "heads": cfg["transformer_heads"],
                    "layers": cfg["transformer_layers"],
                },
                quick_gelu=True,
            )
        else:
            clip_model = importlib.import_module("clip.model")
            self.clip = clip_model.CLIP(*CLIP_CFG.values())
        self.clip = self.clip.float().eval()
        self.recipe = state_recipe(self.clip.state_dict())
        state = perturbed_state(self.recipe, seed)
        self.clip.load_state_dict(state, strict=True)
        module_name, class_name = SEGMENTOR[self.release]
        self.module = importlib.import_module(module_name)
        self.segmentor_class = getattr(self.module, class_name)
        if self.release == "clearclip":
            self.module.create_model = lambda *a, **k: self.clip
        else:
            self.module.clip.load = lambda *a, **k: (self.clip, None)
        self.templates = [
            t("{}") for t in importlib.import_module("prompts.imagenet_template").openai_imagenet_template
        ]

    def segmentor(self, name_path: Path, **kwargs):
        common = {"name_path": str(name_path), "device": torch.device("cpu")}
        if self.release == "clearclip":
            return self.segmentor_class("CLIP", "ViT-B/16", "ClearCLIP", **common, **kwargs)
        return self.segmentor_class("ViT-B/16", **common, **kwargs)

    def encode_dense(self, images: torch.Tensor) -> torch.Tensor:
        """The release's changed image tower: (B, 3, H, W) normalised -> (B, 1 + h*w, C)."""
        if self.release == "clearclip":
            return self.clip.encode_image(images, "ClearCLIP", True)  # tokens without CLS
        if self.release == "naclip":
            self.clip.visual.set_params("reduced", "naclip", 5.0)
            return self.clip.encode_image(images, return_all=True)
        return self.clip.encode_image(images, return_all=True, csa=True)


def normalised(image) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) normalised with the releases' mean / std (their preprocessor's output)."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def block_fixture(off: Official, commit: str, seed: int) -> dict:
    images = seeded_input((2, 3, 48, 80), seed, "dense")
    with torch.no_grad():
        dense = off.encode_dense(images)
    return fixture_record(
        off.release,
        REPOS[off.release],
        f"{off.release}_last_block",
        commit,
        seed,
        {"clip": CLIP_CFG, "input": (2, 3, 48, 80)},
        off.recipe,
        {},
        {"dense": dense},
    )


def protocol_fixture(off: Official, name: str, size: tuple[int, int], kwargs: dict, commit: str, seed: int, tmp: Path):
    names = tmp / "cls_golden.txt"
    separator = "," if off.release == "clearclip" else ", "
    names.write_text("\n".join(c.replace(", ", separator) for c in PROTOCOL_CLASSES) + "\n")
    segmentor = off.segmentor(names, **kwargs)
    image = seeded_image(seed + 5, *size)
    inputs = normalised(image)
    sample = _DataSample({"ori_shape": size, "img_shape": size, "img_path": "golden.png"})
    half = torch.Tensor.half
    torch.Tensor.half = lambda self, *a, **k: self  # ClearCLIP's fp16 cast: our comparison is fp32
    try:
        with torch.no_grad():
            segmentor.predict(inputs, [sample])
    finally:
        torch.Tensor.half = half
    probs, pred = sample.fields["seg_logits"].data, sample.fields["pred_sem_seg"].data
    print(f"{off.release}_{name}: background below prob_thd on {(pred == 0).float().mean():.0%} of the pixels")
    return fixture_record(
        off.release,
        REPOS[off.release],
        f"{off.release}_protocol_{name}",
        commit,
        seed,
        {"clip": CLIP_CFG, "segmentor": kwargs, "classes": PROTOCOL_CLASSES, "separator": separator},
        off.recipe,
        {"image": torch.from_numpy(image.copy())},
        {"probs": probs.clone(), "pred": pred[0].clone()},
    )


def prompts_fixture(off: Official, commit: str) -> dict:
    """The templates, and the release's class-name files as it splits them."""
    files = {}
    for _, file_name, _ in CLASS_FILES:
        lines = (off.root / "configs" / file_name).read_text().splitlines()
        files[file_name] = [line for line in lines if line.strip()]
    return fixture_record(
        off.release,
        REPOS[off.release],
        f"{off.release}_prompts",
        commit,
        0,
        {},
        [],
        {},
        {"templates": off.templates, "files": files},
    )


CLASS_STRINGS_DIR = Path(__file__).resolve().parents[2] / "ovseg_lab" / "assets" / "class_strings"


def write_class_strings(off: Official, commit: str) -> list[Path]:
    """``assets/class_strings/<release>/<vocabulary>.json``: each of our packaged classes -> the release's line."""
    from ovseg_lab.vocab import load_vocabulary

    paths = []
    for vocabulary, file_name, background_first in CLASS_FILES:
        lines = [line for line in (off.root / "configs" / file_name).read_text().splitlines() if line.strip()]
        ours = list(load_vocabulary(vocabulary).classes)
        if background_first:  # the release's line 0 is background, ours is the last class
            lines = lines[1:] + lines[:1]
        if len(ours) != len(lines):
            raise SystemExit(f"{vocabulary}: {len(ours)} classes here, {len(lines)} in {file_name}")
        path = CLASS_STRINGS_DIR / off.release / f"{vocabulary}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        citation = (
            f"{REPOS[off.release]}@{commit} configs/{file_name} (one line per class"
            f"{', background first' if background_first else ''}; written by tests/golden/make_golden.py "
            f"--method {off.release})"
        )
        path.write_text(json.dumps({"citation": citation, "strings": dict(zip(ours, lines))}, indent=1) + "\n")
        paths.append(path)
    return paths


def make(official_root: Path, extra, out_dir: Path, commit: str, seed: int = 0) -> list[Path]:
    import tempfile

    off = Official(official_root, seed)
    fixtures = [block_fixture(off, commit, seed), prompts_fixture(off, commit)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, kwargs in PROTOCOLS[off.release]:
            fixtures.append(protocol_fixture(off, name, size, kwargs, commit, seed, Path(tmp)))
    paths = [save_fixture(f, out_dir / f"{f['name']}.pt") for f in fixtures]
    return paths + (write_class_strings(off, commit) if off.release != "naclip" else [])
