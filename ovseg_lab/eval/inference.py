"""From a model to per-class score maps at the input resolution, under a configurable protocol.

- ``whole``: one forward pass; the model resizes to its own input size, scores are resized back.
- ``slide`` (CAT-Seg): squash the image to ``slide_size``, run overlapping ``crop`` windows with ``stride``
  plus one global view of the whole image at ``crop`` size, average window scores per pixel, then average
  local and global maps 50/50, and resize back. With ``keep_ratio`` the image is resized as mmcv's
  ``Resize(img_scale=(slide_max, slide_size), keep_ratio=True)`` does (mmseg's slide protocol, GroupViT /
  OVSegmentor: ``mmcv.rescale_size``, scale = min(slide_size / short side, slide_max / long side), sizes rounded
  half up), and a side shorter than ``crop`` is run with windows of that side (mmseg's ``slide_inference``: "the
  small patch will be used to decode without padding").

- ``multiscale`` (LSeg, lang-seg's ``LSeg_MultiEvalModule``, ``additional_utils/models.py:55-143``): for each of
  ``scales``, resize (bilinear, ``align_corners=True``) so that the long side is ``ceil(base_size * scale)``
  keeping the aspect ratio, pad bottom/right with black up to ``crop``, run ``crop`` windows with ``stride``
  (the last window of a row/column is cut at the border and padded), add the horizontally flipped pass when
  ``flip``, average overlapping windows, resize back (``align_corners=True``) and SUM the raw scores over scales.

Any mode may first resize the image so that its short side is ``resize_short`` (long side at most
``resize_max``), as detectron2's test-time ``ResizeShortestEdge`` does before CAT-Seg's sliding window: on uint8
images with PIL's bilinear filter, like detectron2. Scores always come back at the size of the image passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ovseg_lab.errors import SetupError
from ovseg_lab.layers.losses import upsample_to


@dataclass
class InferenceConfig:
    mode: str = "whole"
    score: str = "sigmoid"  # sigmoid | softmax | identity: applied to logits before averaging views
    slide_size: int = 640
    crop: int = 384
    stride: int = 256
    global_view: bool = True
    global_weight: float = 0.5
    batch_windows: bool = True
    keep_ratio: bool = False
    slide_max: int | None = None  # keep_ratio: the long side at most this (mmcv img_scale (2048, 448): 2048)
    resize_short: int | None = None  # CAT-Seg: 640 (detectron2 MIN_SIZE_TEST) before squashing to slide_size
    resize_max: int | None = None  # CAT-Seg: 2560 (MAX_SIZE_TEST)
    scales: tuple[float, ...] = (1.0,)  # multiscale: long side = ceil(base_size * scale) (LSeg: 0.5 .. 1.75)
    base_size: int = 520  # multiscale (LSeg's ADE base size)
    flip: bool = False  # multiscale: add the horizontally flipped pass

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide", "multiscale"):
            raise SetupError(f"inference.mode must be 'whole', 'slide' or 'multiscale', got '{self.mode}'.")
        self.scales = tuple(float(x) for x in self.scales)
        if self.mode == "multiscale" and (not self.scales or not 0 < self.stride <= self.crop):
            raise SetupError("inference mode 'multiscale' needs scales and 0 < stride <= crop.")
        if self.score not in ("sigmoid", "softmax", "identity"):
            raise SetupError(f"inference.score must be sigmoid, softmax or identity, got '{self.score}'.")
        if self.mode == "slide" and not 0 < self.stride <= self.crop <= self.slide_size:
            raise SetupError("inference needs 0 < stride <= crop <= slide_size for sliding windows.")
        if self.resize_short is not None and self.resize_short <= 0:
            raise SetupError(f"inference.resize_short must be a positive size or null, got {self.resize_short}.")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | InferenceConfig | None) -> InferenceConfig:
        if cfg is None:
            return cls()
        if isinstance(cfg, InferenceConfig):
            return cfg
        return cls(**dict(cfg))


def _score(logits: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sigmoid":
        return logits.sigmoid()
    if kind == "softmax":
        return logits.softmax(dim=1)
    return logits


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): regular steps plus a last window flush with the end."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] + crop < length:
        starts.append(length - crop)
    return starts


def shortest_edge_size(height: int, width: int, short: int, max_size: int | None) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``: (new_h, new_w) with the short side ``short`` and the long
    side at most ``max_size``, each rounded half up."""
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max_size is not None and max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_shortest_edge(images: torch.Tensor, short: int, max_size: int | None) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, h, w) with the short side ``short``. uint8 images go through PIL's bilinear filter
    (what detectron2 applies to uint8 arrays; it antialiases when shrinking), float images through
    ``F.interpolate`` (bilinear, no antialias)."""
    size = shortest_edge_size(*images.shape[-2:], short, max_size)
    if tuple(size) == tuple(images.shape[-2:]):
        return images
    if images.dtype != torch.uint8:
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    import numpy as np
    from PIL import Image

    resized = [
        torch.from_numpy(
            np.asarray(Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).resize(size[::-1], Image.BILINEAR)).copy()
        )
        for img in images
    ]
    return torch.stack(resized).permute(0, 3, 1, 2).to(images.device)


def keep_ratio_size(height: int, width: int, short: int, long_max: int | None) -> tuple[int, int]:
    """mmcv ``rescale_size(.., (long_max, short))`` + ``_scale_size``: (new_h, new_w) scaled by
    min(short / short side, long_max / long side), each rounded half up (mmcv/image/geometric.py, v1.3.14)."""
    scale = short / min(height, width)
    if long_max is not None:
        scale = min(scale, long_max / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float input is assumed to be in [0, 1] already."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def segment(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, cfg: InferenceConfig
) -> torch.Tensor:
    """Per-class scores (B, T, H, W) for images (B, 3, H, W), uint8 or float in [0, 1].

    ``forward`` maps a batch of float images in [0, 1] to logits (B, T, h, w) at any resolution (vocabulary
    already bound).
    """
    height, width = images.shape[-2:]
    if cfg.resize_short is not None:
        images = resize_shortest_edge(images, cfg.resize_short, cfg.resize_max)
    images = to_unit_float(images)
    if cfg.mode == "whole":
        return _score(upsample_to(forward(images), (height, width)), cfg.score)
    if cfg.mode == "multiscale":
        return _multiscale(forward, images, cfg)

    crop_h = crop_w = cfg.crop
    if cfg.keep_ratio:
        size_hw = keep_ratio_size(height, width, cfg.slide_size, cfg.slide_max)
        crop_h, crop_w = min(crop_h, size_hw[0]), min(crop_w, size_hw[1])
    else:
        size_hw = (cfg.slide_size, cfg.slide_size)
    squashed = F.interpolate(images, size=size_hw, mode="bilinear", align_corners=False)
    offsets = [
        (top, left)
        for top in window_starts(size_hw[0], crop_h, cfg.stride)
        for left in window_starts(size_hw[1], crop_w, cfg.stride)
    ]
    windows = [squashed[:, :, t : t + crop_h, l : l + crop_w] for t, l in offsets]
    views = windows + (
        [F.interpolate(images, size=(crop_h, crop_w), mode="bilinear", align_corners=False)] if cfg.global_view else []
    )
    batch = images.shape[0]
    if cfg.batch_windows:
        view_logits = forward(torch.cat(views, dim=0)).split(batch, dim=0)
    else:
        view_logits = (forward(v) for v in views)  # lazily: one view's logits alive at a time
    # Views are scored and accumulated one at a time: only one view is ever held at crop resolution, which
    # is what bounds memory for large vocabularies (T maps of crop x crop per view).
    total = count = global_scores = None
    for index, logits in enumerate(view_logits):
        scores = _score(upsample_to(logits, (crop_h, crop_w)), cfg.score)
        if index == len(offsets):  # the global view
            global_scores = upsample_to(scores, size_hw)
            continue
        if total is None:
            total = images.new_zeros(batch, scores.shape[1], *size_hw)
            count = images.new_zeros(1, 1, *size_hw)
        top, left = offsets[index]
        total[:, :, top : top + crop_h, left : left + crop_w] += scores
        count[:, :, top : top + crop_h, left : left + crop_w] += 1
        del scores
    local = total / count
    if global_scores is not None:
        local = (1 - cfg.global_weight) * local + cfg.global_weight * global_scores
    return upsample_to(local, (height, width))


def _multiscale(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, cfg: InferenceConfig
) -> torch.Tensor:
    """lang-seg's ``LSeg_MultiEvalModule.forward`` (``additional_utils/models.py:55-132``) on [0, 1] images:
    padding with 0 here is its padding with ``-mean / std`` in normalised space (black)."""
    import math

    height, width = images.shape[-2:]
    crop, stride = cfg.crop, cfg.stride

    def infer(view: torch.Tensor) -> torch.Tensor:  # module_inference: the pass plus the flipped pass
        out = _score(upsample_to(forward(view), tuple(view.shape[-2:])), cfg.score)
        if cfg.flip:
            out = out + _score(upsample_to(forward(view.flip(3)), tuple(view.shape[-2:])), cfg.score).flip(3)
        return out

    def pad(view: torch.Tensor) -> torch.Tensor:
        ph, pw = max(crop - view.shape[-2], 0), max(crop - view.shape[-1], 0)
        return F.pad(view, (0, pw, 0, ph), value=0.0) if ph or pw else view

    scores = None
    for scale in cfg.scales:
        long_size = int(math.ceil(cfg.base_size * scale))
        if height > width:
            h, w = long_size, int(1.0 * width * long_size / height + 0.5)
            short_size = w
        else:
            h, w = int(1.0 * height * long_size / width + 0.5), long_size
            short_size = h
        current = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=True)
        if long_size <= crop:
            outputs = infer(pad(current))[:, :, :h, :w]
        else:
            padded = pad(current) if short_size < crop else current
            ph, pw = padded.shape[-2:]
            h_grids = int(math.ceil(1.0 * (ph - crop) / stride)) + 1
            w_grids = int(math.ceil(1.0 * (pw - crop) / stride)) + 1
            outputs = count = None
            for idh in range(h_grids):
                for idw in range(w_grids):
                    h0, w0 = idh * stride, idw * stride
                    h1, w1 = min(h0 + crop, ph), min(w0 + crop, pw)
                    out = infer(pad(padded[:, :, h0:h1, w0:w1]))
                    if outputs is None:
                        outputs = images.new_zeros(images.shape[0], out.shape[1], ph, pw)
                        count = images.new_zeros(1, 1, ph, pw)
                    outputs[:, :, h0:h1, w0:w1] += out[:, :, : h1 - h0, : w1 - w0]
                    count[:, :, h0:h1, w0:w1] += 1
            outputs = (outputs / count)[:, :, :h, :w]
        score = F.interpolate(outputs, size=(height, width), mode="bilinear", align_corners=True)
        scores = score if scores is None else scores + score
    return scores
