"""Training augmentation (CAT-Seg / MaskFormer recipe) on uint8 tensors.

Short-side resize, random crop with a category-area constraint, SSD colour jitter, horizontal flip and
padding to the crop size (image ``pad_value``, label ``ignore_index``). Each step follows detectron2's
implementation (ResizeShortestEdge with PIL bilinear / nearest, RandomCrop_CategoryAreaConstraint,
ColorAugSSDTransform), so the training distribution is the papers'. Randomness comes from torch's global
generator, which Lightning seeds per worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def resize_pair(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image and label to ``size`` = (H, W) as detectron2's ResizeTransform does with PIL: antialiased
    bilinear for the image, nearest with pixel-centre sampling for the label (no new ids appear)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    image = image.round().clamp(0, 255).to(torch.uint8)
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(label.dtype)
    return image, label


def short_side_size(height: int, width: int, short: int, max_size: int | None = None) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge output size: short side -> ``short``, long side capped at ``max_size``,
    rounded half up."""
    scale = short / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max_size is not None and max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 255] and truncate, as ``np.clip(x, 0, 255).astype(np.uint8)`` in the reference."""
    return values.clamp(0, 255).floor()


def _hsv_channel_change(image: torch.Tensor, channel: int, change) -> torch.Tensor:
    """Apply ``change`` to the hue (0) or saturation (1) of a float (3, H, W) image in [0, 255] through HSV."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(image.permute(1, 2, 0).numpy() / 255.0)
    hsv[..., channel] = change(hsv[..., channel])
    rgb = hsv_to_rgb(hsv) * 255.0
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)


def ssd_color_jitter(image: torch.Tensor, brightness_delta: int = 32, contrast: tuple[float, float] = (0.5, 1.5),
                     saturation: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> torch.Tensor:
    """SSD photometric distortion (detectron2's ColorAugSSDTransform) on a uint8 (3, H, W) image.

    Brightness +-32 first; then contrast, saturation, hue or saturation, hue, contrast (coin flip); each step
    applied with probability 0.5 and followed by clipping to uint8. Contrast multiplies the pixel values,
    saturation multiplies the HSV saturation by [0.5, 1.5], hue adds an integer in [-18, 18] in OpenCV's
    0..180 hue units (= +-36 degrees).
    """

    def maybe() -> bool:
        return bool(torch.rand(()) < 0.5)

    def uniform(low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high))

    def adjust_contrast(x: torch.Tensor) -> torch.Tensor:
        return _to_uint8(x * uniform(*contrast)) if maybe() else x

    def adjust_saturation(x: torch.Tensor) -> torch.Tensor:
        if not maybe():
            return x
        factor = uniform(*saturation)
        return _to_uint8(_hsv_channel_change(x, 1, lambda s: np.clip(s * factor, 0.0, 1.0)))

    def adjust_hue(x: torch.Tensor) -> torch.Tensor:
        if not maybe():
            return x
        shift = int(torch.randint(-hue_delta, hue_delta + 1, ())) / 180.0
        return _to_uint8(_hsv_channel_change(x, 0, lambda h: (h + shift) % 1.0))

    out = image.float()
    if maybe():
        out = _to_uint8(out + uniform(-brightness_delta, brightness_delta))
    if maybe():
        out = adjust_hue(adjust_saturation(adjust_contrast(out)))
    else:
        out = adjust_contrast(adjust_hue(adjust_saturation(out)))
    return out.to(torch.uint8)


@dataclass
class TrainTransform:
    """image uint8 (3, H, W), label int64 (H, W) -> both cropped/padded to (crop_size, crop_size).

    short_side: resize the short side to a value drawn from this list (detectron2's ResizeShortestEdge
    "choice" sampling); None keeps the size.
    max_size: cap on the long side after the resize (detectron2's MAX_SIZE_TRAIN, 1333 by default).
    cat_max_ratio: a crop is redrawn (up to 10 times) while one class covers this fraction of its labelled
    pixels or more (1.0 disables the constraint, the CAT-Seg default).
    """

    crop_size: int = 384
    short_side: Sequence[int] | None = (384,)
    max_size: int | None = None
    cat_max_ratio: float = 1.0
    color_jitter: bool = True
    flip: bool = True
    pad_value: int = 128
    ignore_index: int = 255

    def _crop_box(self, label: torch.Tensor) -> tuple[int, int]:
        height, width = label.shape
        ch, cw = min(self.crop_size, height), min(self.crop_size, width)

        def draw() -> tuple[int, int]:
            top = int(torch.randint(0, height - ch + 1, ()))
            left = int(torch.randint(0, width - cw + 1, ()))
            return top, left

        if self.cat_max_ratio >= 1.0:
            return draw()
        # detectron2: up to 10 draws; stop at the first whose largest class covers < cat_max_ratio of its
        # labelled pixels (and that holds more than one class), else keep the 10th
        for _ in range(10):
            top, left = draw()
            crop = label[top : top + ch, left : left + cw]
            _, counts = crop[crop != self.ignore_index].unique(return_counts=True)
            if len(counts) > 1 and counts.max() < counts.sum() * self.cat_max_ratio:
                break
        return top, left

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.short_side:
            choices = list(self.short_side)
            short = choices[int(torch.randint(0, len(choices), ()))]
            image, label = resize_pair(image, label, short_side_size(*label.shape, short, self.max_size))
        top, left = self._crop_box(label)
        size = self.crop_size
        image = image[:, top : top + size, left : left + size]
        label = label[top : top + size, left : left + size]
        if self.color_jitter:
            image = ssd_color_jitter(image)
        if self.flip and bool(torch.rand(()) < 0.5):
            image, label = image.flip(-1), label.flip(-1)
        pad_h, pad_w = size - label.shape[0], size - label.shape[1]
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=self.pad_value)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image.contiguous(), label.contiguous()
