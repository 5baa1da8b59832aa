"""The training image transform of GroupViT and OVSegmentor, run as the releases ran it: each release's own
``build_img_transform`` (datasets/builder.py) executed from its source, under the timm version the release pins
(GroupViT 0.4.12, its README; OVSegmentor 0.6.12, requirements.txt), extracted from
github:huggingface/pytorch-image-models at that tag and imported as a bare ``timm`` namespace (``timm.data`` only:
the model zoo of those versions does not import on this Python).

Random draws: before each image Python's ``random``, numpy's global generator and torch's are seeded with
:func:`draw_seed` (timm's crop, RandAugment and random erasing draw from ``random`` / ``np.random``, the flip and
the erasing noise from torch, torchvision's crop from torch); the crop boxes (top, left, height, width) the
release drew are recorded by wrapping ``get_params`` (:func:`crop_boxes`). Our side seeds the same way and must
draw the same boxes and give the same pixels (within 1 grey level).

The images are small (:data:`TRANSFORM_SIZE` instead of 224) so that the fixture stays small; nothing in the
transform depends on the size but the crop box, which is compared.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.golden.harness import seeded_image
from tests.golden.official_stubs import detectron2_function

TRANSFORM_SIZE = 64
IMAGE_SHAPES = [(96, 128), (150, 100), (80, 80), (60, 200), (128, 96), (100, 150), (90, 90), (120, 160)]  # (H, W)


def transform_inputs(seed: int) -> list[torch.Tensor]:
    """uint8 (3, H, W) pictures of several aspect ratios (regenerated on both sides)."""
    return [
        torch.from_numpy(seeded_image(seed * 100 + i, h, w)).permute(2, 0, 1).contiguous()
        for i, (h, w) in enumerate(IMAGE_SHAPES)
    ]


def draw_seed(seed: int, index: int) -> int:
    return seed * 1000 + index


def seed_all(value: int) -> None:
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


@contextlib.contextmanager
def crop_boxes(classes: list[type]) -> Iterator[list[list[int]]]:
    """Record the (top, left, height, width) every ``get_params`` of ``classes`` returns."""
    boxes: list[list[int]] = []
    saved = {cls: cls.__dict__["get_params"] for cls in classes}
    for cls, original in saved.items():
        function = original.__func__

        def recorded(*args, _function=function, **kwargs):
            box = _function(*args, **kwargs)
            boxes.append([int(v) for v in box[:4]])
            return box

        cls.get_params = staticmethod(recorded)
    try:
        yield boxes
    finally:
        for cls, original in saved.items():
            cls.get_params = original


@contextlib.contextmanager
def release_timm(timm_dir: Path) -> Iterator[types.ModuleType]:
    """``import timm`` answers the release's timm (``timm_dir``/timm) inside the block, the installed one after."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "timm" or k.startswith("timm.")}
    package = types.ModuleType("timm")
    package.__path__ = [str(Path(timm_dir) / "timm")]
    sys.modules["timm"] = package
    try:
        import timm.data

        yield timm.data
    finally:
        for key in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
            del sys.modules[key]
        sys.modules.update(saved)


def release_transform(root: Path, img_aug: dict[str, Any], timm_data: types.ModuleType):
    """The release's ``build_img_transform(True, img_aug, with_dc=False)`` from datasets/builder.py."""
    from omegaconf import OmegaConf
    from torchvision import transforms

    transforms_module = sys.modules["timm.data.transforms"]
    build = detectron2_function(root, "datasets/builder.py", "build_img_transform")
    build.__globals__.update(
        create_transform=timm_data.create_transform,
        transforms=transforms,
        IMAGENET_DEFAULT_MEAN=timm_data.IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD=timm_data.IMAGENET_DEFAULT_STD,
        _pil_interp=getattr(transforms_module, "_pil_interp", None)
        or getattr(transforms_module, "str_to_pil_interp", None),
        ToDataContainer=None,
    )
    return build(True, OmegaConf.create(img_aug), with_dc=False)


def transform_fixture(root: Path, img_aug: dict[str, Any], timm_dir: Path, seed: int) -> tuple[dict, dict, dict]:
    """(config, inputs, outputs) of the release's training transform on :func:`transform_inputs`."""
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    release_aug = dict(img_aug)
    config = {"release_img_aug": release_aug, "img_size": TRANSFORM_SIZE, "image_shapes": IMAGE_SHAPES}
    with release_timm(timm_dir) as timm_data:
        config["timm_version"] = importlib.import_module("timm.version").__version__
        transform = release_transform(root, {**release_aug, "img_size": TRANSFORM_SIZE}, timm_data)
        config["release_transform"] = re.sub(r" at 0x[0-9a-f]+", "", repr(transform))  # no object addresses
        classes = [RandomResizedCrop, sys.modules["timm.data.transforms"].RandomResizedCropAndInterpolation]
        images, boxes = [], []
        for index, image in enumerate(transform_inputs(seed)):
            seed_all(draw_seed(seed, index))
            with crop_boxes(classes) as drawn:
                out = transform(Image.fromarray(image.permute(1, 2, 0).numpy()))
            assert isinstance(out, torch.Tensor), f"the release's transform returned {type(out).__name__}"
            images.append(out.float())
            boxes.append(drawn)
    return (
        config,
        {"draw_seeds": [draw_seed(seed, i) for i in range(len(IMAGE_SHAPES))]},
        {
            "images": torch.stack(images),
            "boxes": boxes,
        },
    )


# ----------------------------------------------------------------------------------------------- our side (tests)
def grey_levels(normalised: torch.Tensor) -> torch.Tensor:
    """The release's normalised (3, H, W) tensor on the 0-255 scale."""
    from ovseg_lab.layers.normalize import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (normalised * std + mean) * 255


def run_our_transform(fixture: dict, augment: str, scale, flip: bool) -> tuple[list[torch.Tensor], list]:
    """Our ``CaptionTransform`` on the fixture's pictures (0-255 scale), seeded as the release was before each."""
    import timm.data.transforms
    from torchvision.transforms import RandomResizedCrop

    from ovseg_lab.data.captions import CaptionTransform
    from ovseg_lab.eval.inference import to_unit_float

    transform = CaptionTransform(fixture["config"]["img_size"], scale, flip, augment)
    images, boxes = [], []
    for index, picture in enumerate(transform_inputs(fixture["seed"])):
        seed_all(draw_seed(fixture["seed"], index))
        with crop_boxes([RandomResizedCrop, timm.data.transforms.RandomResizedCropAndInterpolation]) as drawn:
            images.append(to_unit_float(transform(picture)) * 255)
        boxes.append(drawn)
    return images, boxes


def assert_transform_equals_release(fixture: dict, data) -> None:
    """Our transform as the composed ``data`` config sets it draws the release's crop boxes and gives its pixels
    within 1 grey level; our own augmentation (``ours``) does not (so the comparison can fail)."""
    release = fixture["config"]["release_img_aug"]
    assert data.image_size == release["img_size"]
    expected_scale = (0.08, 1.0) if release["deit_aug"] else tuple(release["img_scale"])  # timm: its default
    assert tuple(data.scale) == expected_scale and data.flip
    images, boxes = run_our_transform(fixture, data.augment, data.scale, data.flip)
    assert boxes == fixture["outputs"]["boxes"], "crop boxes differ from the release's draws"
    erased = 0
    for index, (ours, theirs) in enumerate(zip(images, fixture["outputs"]["images"])):
        release_grey = grey_levels(theirs)
        worst = (ours - release_grey).abs().max().item()
        assert worst <= 1.0, f"picture {index}: pixels up to {worst:.2f} grey levels from the release's"
        erased += bool((release_grey < -5).any())  # the erasing noise leaves the 0-255 range
    if release["deit_aug"]:
        assert erased >= 1, "no picture of the fixture was randomly erased: the test would not see erasing"
    own, _ = run_our_transform(fixture, "ours", data.scale, data.flip)
    assert max((a - grey_levels(b)).abs().max().item() for a, b in zip(own, fixture["outputs"]["images"])) > 1
