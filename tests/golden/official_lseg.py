"""The generator's side for LSeg (isl-org/lang-seg): builds the OFFICIAL modules from an extracted release, runs
them on seeded perturbed weights and saves fixtures (see tests/golden/README.md).

    git -C <lang-seg git dir> archive HEAD modules label_files | tar -x -C /tmp/lang-seg
    git -C <openai/CLIP git dir> archive HEAD clip | tar -x -C /tmp/openai-clip
    python tests/golden/make_golden.py --method lseg --official /tmp/lang-seg --clip /tmp/openai-clip

What runs unchanged: ``modules/models/lseg_vit.py`` (``_make_vit_b16_backbone`` = the ViT-L/16 reassembly,
``_make_vit_b32_backbone`` = the ViT-B/32 one, ``forward_flex`` and ``_resize_pos_embed``, ``forward_vit``),
``modules/models/lseg_blocks.py`` (``_make_scratch``, ``FeatureFusionBlock_custom``, ``Interpolate``),
``modules/models/lseg_net.py`` (``LSeg.forward`` with its spatial-regularisation loop, ``_make_fusion_block``,
``bottleneck_block``, ``depthwise_block``) and OpenAI's ``clip.tokenize`` / ``CLIP.encode_text`` (the package
lang-seg pins).

Adaptations, all at the stub level:
- ``LSeg.__init__`` hard-codes full-size widths and hooks (ViT-L/16: 24 blocks of width 1024) and calls
  ``clip.load`` (a download). The net is assembled instead from the same official builders called with small
  widths and hooks [0, 1, 2, 3] (their parameters), with the attributes ``LSeg.forward`` reads, as the CAT-Seg
  generator assembles its predictor. The released layouts (key names and shapes) are recorded from the real
  ``LSegNet.__init__`` on the meta device with ``clip.load`` answered by OpenAI's ``build_model`` at ViT-B/32 size.
- ``LSeg.forward`` casts the pixel embeddings to fp16 (``image_features.half()``, lseg_net.py:194) to meet the fp16
  CLIP text features of a CUDA ``clip.load``. The fixtures are fp32 runs: ``Tensor.half`` is the identity while
  the official forward runs (docs/fidelity.md lists the fp16 correlation).
- timm: lang-seg pins timm 0.4.12; the installed timm's ``VisionTransformer`` is used (same parameter names and
  block maths; ``forward_flex`` only touches ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``pos_drop``,
  ``blocks`` and ``norm``, which both versions have).
- ``pandas`` (imported, unused by the net) is a fake module when absent.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import types
from pathlib import Path

import torch
from torch import nn

from tests.golden.harness import digest, fixture_record, perturbed_state, save_fixture, seeded_input, state_recipe
from tests.golden.official_stubs import detectron2_function, import_official

REPO = "isl-org/lang-seg"
# the small CLIP text tower (embed_dim 512 is what LSeg's head1 expects for ViT-B/32 CLIP)
TINY_CLIP = {
    "embed_dim": 512,
    "image_resolution": 64,
    "vision_layers": 1,
    "vision_width": 64,
    "vision_patch_size": 32,
    "context_length": 77,
    "vocab_size": 49408,
    "transformer_width": 64,
    "transformer_heads": 1,
    "transformer_layers": 2,
}
# ViT-L/16-like: patch 16, the ViT-L reassembly (x4, x2, x1, stride-2 conv); ViT-B/32-like: patch 32 (x8, x4, x2, x1)
VARIANTS = {
    "vitl16": {
        "builder": "_make_vit_b16_backbone",
        "patch": 16,
        "width": 48,
        "heads": 2,
        "depth": 4,
        "hooks": [0, 1, 2, 3],
        "channels": [16, 24, 32, 32],
        "features": 16,
    },
    "vitb32": {
        "builder": "_make_vit_b32_backbone",
        "patch": 32,
        "width": 48,
        "heads": 2,
        "depth": 4,
        "hooks": [0, 1, 2, 3],
        "channels": [16, 24, 32, 48],
        "features": 16,
    },
}
SIZES = {"384": (384, 384), "480": (480, 480), "352x512": (352, 512), "96x128": (96, 128)}
NET_SIZES = ("384", "480", "352x512")
LABELS = ["wall", "building, edifice", "sky", "other", "person;individual;someone"]


def _install_stubs(clip_root: Path) -> None:
    if "pandas" not in sys.modules:
        try:
            import pandas  # noqa: F401
        except ImportError:
            import importlib.machinery

            fake = types.ModuleType("pandas")
            fake.__spec__ = importlib.machinery.ModuleSpec("pandas", None)  # torch's import scans read __spec__
            sys.modules["pandas"] = fake
    if str(clip_root) not in sys.path:
        sys.path.insert(0, str(clip_root))


@contextlib.contextmanager
def fp32_half():
    """``Tensor.half`` as the identity (the official correlation's fp16 cast, run in fp32)."""
    original = torch.Tensor.half
    torch.Tensor.half = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.half = original


class Official:
    def __init__(self, root: Path, clip_root: Path) -> None:
        _install_stubs(clip_root)
        import clip  # OpenAI's package (lang-seg's requirements pin it)

        self.clip = clip
        self.clip_model = sys.modules["clip.model"]
        packages = ("modules", "modules.models")
        self.vit = import_official(root, "modules.models.lseg_vit", packages)
        self.blocks = import_official(root, "modules.models.lseg_blocks", packages)
        self.net = import_official(root, "modules.models.lseg_net", packages)
        self.net_zs = import_official(root, "modules.models.lseg_net_zs", packages)

    def build_clip(self, cfg: dict) -> nn.Module:
        keys = [
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
        ]
        model = self.clip_model.CLIP(*(cfg[k] for k in keys))
        return model.float()

    def build_timm_vit(self, variant: dict) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=384,
            patch_size=variant["patch"],
            embed_dim=variant["width"],
            depth=variant["depth"],
            num_heads=variant["heads"],
        )

    def build_lseg(
        self, variant: dict, arch_option: int = 0, block_depth: int = 0, activation: str = "lrelu"
    ) -> nn.Module:
        """An official ``LSeg`` assembled as ``LSeg.__init__`` + ``LSegNet.__init__`` do, at small widths."""
        net = self.net.LSeg.__new__(self.net.LSegNet)
        nn.Module.__init__(net)
        net.channels_last = False
        net.clip_pretrained = self.build_clip(TINY_CLIP)
        builder = getattr(self.vit, variant["builder"])
        net.pretrained = builder(
            self.build_timm_vit(variant),
            features=variant["channels"],
            hooks=variant["hooks"],
            vit_features=variant["width"],
            use_readout="project",
        )
        features = variant["features"]
        net.scratch = self.blocks._make_scratch(variant["channels"], features, groups=1, expand=False)
        for i in (1, 2, 3, 4):
            setattr(net.scratch, f"refinenet{i}", self.net._make_fusion_block(features, True))  # LSegNet: use_bn
        net.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07)).exp()
        net.out_c = 512
        net.scratch.head1 = nn.Conv2d(features, net.out_c, kernel_size=1)
        net.arch_option = arch_option
        if arch_option == 1:
            net.scratch.head_block = self.net.bottleneck_block(activation=activation)
            net.block_depth = block_depth
        elif arch_option == 2:
            net.scratch.head_block = self.net.depthwise_block(activation=activation)
            net.block_depth = block_depth
        net.scratch.output_conv = nn.Sequential(
            self.blocks.Interpolate(scale_factor=2, mode="bilinear", align_corners=True)
        )
        net.crop_size, net.scale_factor, net.labels = 480, 0.5, list(LABELS)
        return net


OPENAI_VITB32 = {
    "embed_dim": 512,
    "image_resolution": 224,
    "vision_layers": 12,
    "vision_width": 768,
    "vision_patch_size": 32,
    "context_length": 77,
    "vocab_size": 49408,
    "transformer_width": 512,
    "transformer_heads": 8,
    "transformer_layers": 12,
}
RELEASED = {
    "vitl16": "clip_vitl16_384",
    "vitb32": "clip_vitb32_384",  # lang-seg's --backbone of each release
    "rn101_zs": "clip_resnet101",
}  # LSegRNNetZS (modules/models/lseg_net_zs.py:240-360)


@contextlib.contextmanager
def offline_builders(off: Official):
    """``clip.load("ViT-B/32")`` answered by OpenAI's ``CLIP`` at ViT-B/32 size (random init, no download) and
    timm models built without pretrained weights: the released layouts' key names and shapes."""
    import timm
    import torchvision

    original_load, original_create = off.clip.load, timm.create_model
    original_resnet = torchvision.models.resnet101
    off.clip.load = lambda name, device=None, jit=False: (off.build_clip(OPENAI_VITB32), None)
    timm.create_model = lambda name, pretrained=False, **kw: original_create(name, pretrained=False, **kw)
    torchvision.models.resnet101 = lambda pretrained=False, **kw: original_resnet(weights=None)
    try:
        yield
    finally:
        off.clip.load, timm.create_model = original_load, original_create
        torchvision.models.resnet101 = original_resnet


def released_recipes(off: Official) -> dict[str, list[tuple]]:
    """(key, shape, mean, std) of the released LSegNet checkpoints (``net.`` keys of LSegModule), built by the
    real ``LSegNet.__init__`` (features 256, arch_option 0, as lang-seg's train.sh / test.sh)."""
    recipes = {}
    with offline_builders(off):
        for name, backbone in RELEASED.items():
            torch.manual_seed(0)
            if backbone == "clip_resnet101":
                net = off.net_zs.LSegRNNetZS(
                    label_list=["other"],
                    backbone=backbone,
                    features=256,
                    arch_option=0,
                    block_depth=0,
                    activation="lrelu",
                    use_pretrained=False,
                )
            else:
                net = off.net.LSegNet(
                    labels=["other"],
                    backbone=backbone,
                    features=256,
                    crop_size=480,
                    arch_option=0,
                    block_depth=0,
                    activation="lrelu",
                )
            recipes[name] = [("net." + r[0],) + tuple(r[1:]) for r in state_recipe(net.state_dict())]
            del net
    return recipes


def perturb(module: nn.Module, seed: int, prefix: str = "net.") -> list[tuple]:
    """Redraw the module's weights from its recipe; the recipe's keys (which seed the draws) carry ``prefix``,
    the key of the LSegNet inside LSegModule's checkpoints."""
    recipe = [(prefix + r[0],) + tuple(r[1:]) for r in state_recipe(module.state_dict())]
    state = perturbed_state(recipe, seed)
    current = module.state_dict()
    module.load_state_dict(
        {k[len(prefix) :]: v.to(current[k[len(prefix) :]].dtype) for k, v in state.items()}, strict=True
    )
    return recipe


_fixture = functools.partial(fixture_record, "lseg", REPO)


def net_fixture(
    off: Official,
    variant_name: str,
    size_name: str,
    commit: str,
    seed: int,
    arch_option: int = 0,
    block_depth: int = 0,
    activation: str = "lrelu",
    name: str | None = None,
) -> dict:
    variant = VARIANTS[variant_name]
    torch.manual_seed(seed)
    net = off.build_lseg(variant, arch_option, block_depth, activation)
    recipe = perturb(net, seed)
    net.eval()
    height, width = SIZES[size_name]
    images = seeded_input((1, 3, height, width), seed, "images", scale=0.25, offset=0.5).clamp(0, 1)
    with torch.no_grad(), fp32_half():
        logits = net((images - 0.5) / 0.5, LABELS)
    tokens = off.clip.tokenize(LABELS)
    name = name or f"lseg_net_{variant_name}_{size_name}"
    config = {
        "variant": {k: v for k, v in variant.items()},
        "clip": dict(TINY_CLIP),
        "size": [height, width],
        "labels": list(LABELS),
        "arch_option": arch_option,
        "block_depth": block_depth,
        "activation": activation,
    }
    outputs = {"logits": digest(logits), "labels": logits.argmax(1).to(torch.uint8), "tokens": tokens.to(torch.int32)}
    return _fixture(
        name,
        commit,
        seed,
        config,
        recipe,
        {"images": {"shape": [1, 3, height, width], "scale": 0.25, "offset": 0.5}},
        outputs,
    )


PROTOCOL = {
    "base_size": 130,
    "crop_size": 96,
    "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
    "flip": True,
    "image": [75, 100],
}  # lang-seg's ADE protocol (520 / 480, stride 2/3) at a small size


@contextlib.contextmanager
def cpu_cuda():
    """``Tensor.cuda`` as the identity (LSeg_MultiEvalModule allocates its score maps with ``.cuda()``)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def protocol_fixture(off: Official, root: Path, commit: str, seed: int) -> dict:
    """``LSeg_MultiEvalModule`` (additional_utils/models.py:23-160: scales, flip, long-side resize with
    align_corners=True, black padding, crop windows with stride 2/3 of the crop, raw logits summed) around the
    small ViT-B/32-like net on a fixed uint8 image; the module's ``evaluate_random`` is LSegModule's
    (``net.forward(x, labelset)``, modules/lsegmentation_module.py:54-59)."""
    from tests.golden.harness import seeded_image

    models = import_official(root, "additional_utils.models", ("additional_utils",))
    torch.manual_seed(seed)
    net = off.build_lseg(VARIANTS["vitb32"])
    recipe = perturb(net, seed)
    net.eval()

    class Module(nn.Module):  # the attributes LSeg_MultiEvalModule reads off LSegModule
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.base_size, self.crop_size = PROTOCOL["base_size"], PROTOCOL["crop_size"]
            self._up_kwargs = dict(models.up_kwargs)  # encoding's up_kwargs: bilinear, align_corners=True
            self.mean, self.std = [0.5] * 3, [0.5] * 3

        def evaluate_random(self, x, labelset, target=None):
            return self.net.forward(x, labelset)

    evaluator = models.LSeg_MultiEvalModule(Module(), scales=PROTOCOL["scales"], flip=PROTOCOL["flip"])
    evaluator.eval()
    image = torch.from_numpy(seeded_image(seed, *PROTOCOL["image"])).permute(2, 0, 1)[None]
    normalized = (image.float() / 255 - 0.5) / 0.5  # LSegModule's val_transform: ToTensor + Normalize(0.5, 0.5)
    with torch.no_grad(), fp32_half(), cpu_cuda():
        scores = evaluator(normalized, LABELS)
    config = {
        "variant": dict(VARIANTS["vitb32"]),
        "clip": dict(TINY_CLIP),
        "labels": list(LABELS),
        "arch_option": 0,
        "block_depth": 0,
        "activation": "lrelu",
        "protocol": dict(PROTOCOL),
    }
    return _fixture(
        "lseg_protocol_multiscale_flip",
        commit,
        seed,
        config,
        recipe,
        {"image": image[0].clone()},
        {"scores": digest(scores), "labels": scores.argmax(1).to(torch.uint8)},
    )


def prompts_fixture(off: Official, root: Path, commit: str, seed: int) -> dict:
    """The ADE20K-150 label strings of ``LSegModule.get_labels('ade20k')`` (modules/lseg_module.py:96-108: the
    name column split on ';', first piece; header dropped) and their ``clip.tokenize`` ids."""
    import os

    get_labels = detectron2_function(root, "modules/lseg_module.py", "LSegModule.get_labels")
    cwd = os.getcwd()
    os.chdir(root)  # the official code opens label_files/... relative to the working directory
    try:
        labels = get_labels(None, "ade20k")
    finally:
        os.chdir(cwd)
    tokens = off.clip.tokenize(labels).to(torch.int32)
    return _fixture(
        "lseg_prompts_ade150",
        commit,
        seed,
        {"dataset": "ade20k", "templates": "raw"},
        [],
        {},
        {"labels": list(labels), "tokens": tokens},
    )


def make(official_root: Path, extra_root: Path | None, out_dir: Path, commit: str, seed: int = 0) -> list[Path]:
    if extra_root is None:
        raise SystemExit("--clip <extracted openai/CLIP> is needed for LSeg (lang-seg imports OpenAI's clip package)")
    off = Official(official_root, extra_root)
    paths = []
    for variant in VARIANTS:
        for size in NET_SIZES:
            fixture = net_fixture(off, variant, size, commit, seed)
            paths.append(save_fixture(fixture, out_dir / f"{fixture['name']}.pt"))
    for arch_option in (1, 2):
        for depth in (0, 1, 2, 3):
            fixture = net_fixture(
                off,
                "vitb32",
                "96x128",
                commit,
                seed,
                arch_option,
                depth,
                "lrelu",
                name=f"lseg_regularization_arch{arch_option}_depth{depth}",
            )
            paths.append(save_fixture(fixture, out_dir / f"{fixture['name']}.pt"))
    fixture = protocol_fixture(off, official_root, commit, seed)
    paths.append(save_fixture(fixture, out_dir / f"{fixture['name']}.pt"))
    fixture = prompts_fixture(off, official_root, commit, seed)
    paths.append(save_fixture(fixture, out_dir / f"{fixture['name']}.pt"))
    fixture = _fixture(
        "lseg_released",
        commit,
        seed,
        {"backbones": dict(RELEASED), "clip": dict(OPENAI_VITB32)},
        released_recipes(off),
        {},
        {},
    )
    paths.append(save_fixture(fixture, out_dir / "lseg_released.pt"))
    return paths
