"""Training augmentation (CAT-Seg / MaskFormer recipe) on uint8 tensors.

Short-side resize, random crop with a category-area constraint, SSD colour jitter, horizontal flip and
padding to the crop size (image ``pad_value``, label ``ignore_index``). Randomness comes from torch's global
generator, which Lightning seeds per worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


def resize_pair(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image (bilinear) and label (nearest) to ``size`` = (H, W)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    image = image.round().clamp(0, 255).to(torch.uint8)
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(label.dtype)
    return image, label


def short_side_size(height: int, width: int, short: int, max_size: int | None = None) -> tuple[int, int]:
    scale = short / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def ssd_color_jitter(image: torch.Tensor) -> torch.Tensor:
    """SSD photometric distortion: brightness +-32, contrast and saturation x[0.5, 1.5], hue +-18 degrees,
    each applied with probability 0.5 (contrast before or after the HSV changes at random)."""
    out = image.float()

    def maybe(p: float = 0.5) -> bool:
        return bool(torch.rand(()) < p)

    if maybe():
        out = out + torch.empty(()).uniform_(-32, 32)
    contrast_first = maybe()
    if contrast_first and maybe():
        out = out * torch.empty(()).uniform_(0.5, 1.5)
    out = out.clamp(0, 255)
    if maybe():
        out = TF.adjust_saturation(out / 255, float(torch.empty(()).uniform_(0.5, 1.5))) * 255
    if maybe():
        out = TF.adjust_hue(out / 255, float(torch.empty(()).uniform_(-18, 18)) / 360) * 255
    if not contrast_first and maybe():
        out = out * torch.empty(()).uniform_(0.5, 1.5)
    return out.clamp(0, 255).round().to(torch.uint8)


@dataclass
class TrainTransform:
    """image uint8 (3, H, W), label int64 (H, W) -> both cropped/padded to (crop_size, crop_size).

    short_side: resize the short side to a value drawn from this list (detectron2's ResizeShortestEdge
    "choice" sampling); None keeps the size.
    cat_max_ratio: a crop is redrawn (up to 10 times) while one class covers more than this fraction of its
    labelled pixels (1.0 disables the constraint, the CAT-Seg default).
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

        top, left = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = label[top : top + ch, left : left + cw]
                ids, counts = crop[crop != self.ignore_index].unique(return_counts=True)
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = draw()
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
