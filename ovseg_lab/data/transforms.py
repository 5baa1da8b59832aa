"""Training augmentation (CAT-Seg / MaskFormer recipe) on uint8 tensors.

Short-side resize, random crop with a category-area constraint, SSD colour jitter, horizontal flip and
padding to the crop size (image ``pad_value``, label ``ignore_index``). Each step follows detectron2's
implementation (ResizeShortestEdge, RandomCrop_CategoryAreaConstraint, ColorAugSSDTransform, RandomFlip; the
padding of CAT-Seg's / OVSeg's ``MaskFormerSemanticDatasetMapper``), so the training distribution is the papers'.

``arithmetic="detectron2"`` (the paper recipes) computes every pixel as the release does: PIL's bilinear resize of
the uint8 image, torch's legacy ``nearest`` on the label, the HSV steps of the colour jitter through OpenCV's uint8
conversion (the ``cv2`` extra); the golden tests replay the release's random draws on it and match it exactly.
``arithmetic="torch"`` is our own arithmetic (antialiased torch bilinear, ``nearest-exact``, matplotlib HSV on
floats), the same distribution up to rounding.

Randomness comes from a :class:`TorchDraws` (torch's global generator, which Lightning seeds per worker); the
draws are the release's in kind and order (a choice of size, crop corners, coin flips, uniform factors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


class TorchDraws:
    """The random draws of :class:`TrainTransform`, from torch's global generator (one call per draw, in the order
    the release draws them; a golden test substitutes the release's recorded values)."""

    def index(self, n: int) -> int:
        """One of ``range(n)`` (detectron2's ``np.random.choice`` over a list of sizes)."""
        return int(torch.randint(0, n, ()))

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high) (``np.random.randint`` / ``random.randint(low, high - 1)``)."""
        return int(torch.randint(low, high, ()))

    def uniform(self, low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high))

    def chance(self) -> bool:
        """A fair coin (``random.randrange(2)``, ``np.random.uniform() < 0.5``)."""
        return bool(torch.rand(()) < 0.5)


def resize_pair_detectron2(
    image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """detectron2's ResizeTransform: the uint8 image (3, H, W) through PIL's bilinear resize, the label (H, W) as
    float64 through torch's legacy ``nearest`` (the mapper reads labels as double, which PIL cannot take)."""
    from PIL import Image

    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    pil = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
    resized = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
    image = torch.from_numpy(resized.copy()).permute(2, 0, 1).contiguous()
    label = F.interpolate(label[None, None].double(), size=size, mode="nearest")[0, 0].to(label.dtype)
    return image, label


def resize_pair(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image and label to ``size`` = (H, W) as detectron2's ResizeTransform does with PIL: antialiased
    bilinear for the image, nearest with pixel-centre sampling for the label (no new ids appear)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    image = image.round().clamp(0, 255).to(torch.uint8)
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(label.dtype)
    return image, label


def pil_resize_pair(
    image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image and label to ``size`` = (H, W) with PIL itself, as PyTorch-Encoding's datasets do: bilinear
    for the uint8 image, nearest for the label (as 32-bit integers: PIL's nearest samples pixel centres in 16.16
    fixed point, which a floating-point nearest misses on a few rows and columns)."""
    from PIL import Image

    height, width = size
    if tuple(image.shape[-2:]) == (height, width):
        return image, label
    pixels = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).resize((width, height), Image.BILINEAR)
    ids = Image.fromarray(label.to(torch.int32).numpy(), mode="I").resize((width, height), Image.NEAREST)
    image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).contiguous()
    return image, torch.from_numpy(np.array(ids)).to(label.dtype)


def short_side_size(height: int, width: int, short: int, max_size: int | None = None) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge output size: short side -> ``short``, long side capped at ``max_size``,
    rounded half up."""
    scale = short / min(height, width)
    # the short side is ``short`` itself, not short / min * min (ResizeShortestEdge.get_output_shape)
    new_h, new_w = (float(short), width * scale) if height < width else (height * scale, float(short))
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


def _hsv_channel_change_cv2(image: torch.Tensor, channel: int, change) -> torch.Tensor:
    """The same through OpenCV's uint8 BGR <-> HSV (hue 0..179, saturation 0..255), as ColorAugSSDTransform runs it:
    ``change`` maps the uint8 channel to its new values."""
    import cv2

    bgr = np.ascontiguousarray(image.permute(1, 2, 0).numpy().astype(np.uint8)[:, :, ::-1])
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hsv[:, :, channel] = change(hsv[:, :, channel])
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)


def ssd_color_jitter(
    image: torch.Tensor,
    brightness_delta: int = 32,
    contrast: tuple[float, float] = (0.5, 1.5),
    saturation: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
    hsv: str = "matplotlib",
    draws: TorchDraws | None = None,
) -> torch.Tensor:
    """SSD photometric distortion (detectron2's ColorAugSSDTransform) on a uint8 (3, H, W) image.

    Brightness +-32 first; then contrast, saturation, hue or saturation, hue, contrast (coin flip); each step
    applied with probability 0.5 and followed by clipping to uint8. Contrast multiplies the pixel values,
    saturation multiplies the HSV saturation by [0.5, 1.5], hue adds an integer in [-18, 18] in OpenCV's
    0..180 hue units (= +-36 degrees). ``hsv``: ``cv2`` runs the HSV steps through OpenCV's uint8 conversion as
    the release does (its saturation is truncated to uint8 in HSV space); ``matplotlib`` in float HSV (ours).
    """
    if hsv not in ("cv2", "matplotlib"):
        raise ValueError(f"unknown hsv arithmetic {hsv!r} (cv2 or matplotlib)")
    draws = draws or TorchDraws()

    def adjust_contrast(x: torch.Tensor) -> torch.Tensor:
        return _to_uint8(x * draws.uniform(*contrast)) if draws.chance() else x

    def adjust_saturation(x: torch.Tensor) -> torch.Tensor:
        if not draws.chance():
            return x
        factor = draws.uniform(*saturation)
        if hsv == "cv2":  # ColorAugSSDTransform.convert on the uint8 channel: float32 product, clip, truncate
            scale = lambda s: np.clip(s.astype(np.float32) * factor, 0, 255).astype(np.uint8)  # noqa: E731
            return _hsv_channel_change_cv2(x, 1, scale)
        return _to_uint8(_hsv_channel_change(x, 1, lambda s: np.clip(s * factor, 0.0, 1.0)))

    def adjust_hue(x: torch.Tensor) -> torch.Tensor:
        if not draws.chance():
            return x
        shift = draws.integer(-hue_delta, hue_delta + 1)
        if hsv == "cv2":
            return _hsv_channel_change_cv2(x, 0, lambda h: (h.astype(int) + shift) % 180)
        return _to_uint8(_hsv_channel_change(x, 0, lambda h: (h + shift / 180.0) % 1.0))

    out = image.float()
    if draws.chance():
        out = _to_uint8(out + draws.uniform(-brightness_delta, brightness_delta))
    if draws.chance():
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
    arithmetic: ``detectron2`` (the paper recipes: PIL / legacy-nearest resize, OpenCV HSV, as the release) or
    ``torch`` (ours, see the module docstring).
    draws: where the random draws come from (torch's generator; the golden tests replay the release's).
    """

    crop_size: int = 384
    short_side: Sequence[int] | None = (384,)
    max_size: int | None = None
    cat_max_ratio: float = 1.0
    color_jitter: bool = True
    flip: bool = True
    pad_value: int = 128
    ignore_index: int = 255
    arithmetic: str = "torch"
    draws: TorchDraws = field(default_factory=TorchDraws)

    def __post_init__(self) -> None:
        if self.arithmetic not in ("torch", "detectron2"):
            raise ValueError(f"unknown transform arithmetic {self.arithmetic!r} (torch or detectron2)")

    def _crop_box(self, label: torch.Tensor) -> tuple[int, int]:
        height, width = label.shape
        ch, cw = min(self.crop_size, height), min(self.crop_size, width)

        def draw() -> tuple[int, int]:
            top = self.draws.integer(0, height - ch + 1)
            left = self.draws.integer(0, width - cw + 1)
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
            short = choices[self.draws.index(len(choices))]
            resize = resize_pair_detectron2 if self.arithmetic == "detectron2" else resize_pair
            image, label = resize(image, label, short_side_size(*label.shape, short, self.max_size))
        top, left = self._crop_box(label)
        size = self.crop_size
        image = image[:, top : top + size, left : left + size]
        label = label[top : top + size, left : left + size]
        if self.color_jitter:
            hsv = "cv2" if self.arithmetic == "detectron2" else "matplotlib"
            image = ssd_color_jitter(image, hsv=hsv, draws=self.draws)
        if self.flip and self.draws.chance():
            image, label = image.flip(-1), label.flip(-1)
        pad_h, pad_w = size - label.shape[0], size - label.shape[1]
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=self.pad_value)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image.contiguous(), label.contiguous()


@dataclass(frozen=True)
class LongSideDraw:
    """The random draws of one :class:`LongSideTransform` call, in the order the release draws them."""

    flip: bool
    long_side: int
    left: int
    top: int


@dataclass
class LongSideTransform:
    """PyTorch-Encoding's ``BaseDataset._sync_transform`` (LSeg's training transform): image uint8 (3, H, W),
    label int64 (H, W) -> both (crop_size, crop_size).

    In the release's order: a horizontal flip with probability 1/2; the long side resized to an integer drawn
    uniformly from ``long_side`` = [low, high] (the release: [base_size * 0.5, base_size * 2.0] = [260, 1040]),
    aspect kept, the other side rounded half up (PIL's bilinear for the image, nearest for the label); right /
    bottom padding to the crop size when the short side is smaller (image ``pad_value``, black in the release;
    label ``ignore_index``: the release pads the raw mask with 0, which its ``mask - 1`` turns into its ignore
    value -1); a random crop_size square.
    """

    crop_size: int = 480
    long_side: Sequence[int] = (260, 1040)
    flip: bool = True
    pad_value: int = 0
    ignore_index: int = 255

    def draw(self, height: int, width: int) -> LongSideDraw:
        """The draws for an image of ``height`` x ``width`` (torch's global generator, seeded per worker)."""
        flip = self.flip and bool(torch.rand(()) < 0.5)
        low, high = self.long_side
        long_side = int(torch.randint(int(low), int(high) + 1, ()))
        out_h, out_w = self.resized_size(height, width, long_side)
        left = int(torch.randint(0, max(out_w, self.crop_size) - self.crop_size + 1, ()))
        top = int(torch.randint(0, max(out_h, self.crop_size) - self.crop_size + 1, ()))
        return LongSideDraw(flip, long_side, left, top)

    @staticmethod
    def resized_size(height: int, width: int, long_side: int) -> tuple[int, int]:
        """(H, W) with the long side ``long_side``: ``int(side * long / long_of_image + 0.5)`` as the release."""
        if height > width:
            return long_side, int(1.0 * width * long_side / height + 0.5)
        return int(1.0 * height * long_side / width + 0.5), long_side

    def apply(self, image: torch.Tensor, label: torch.Tensor, draw: LongSideDraw) -> tuple[torch.Tensor, torch.Tensor]:
        if draw.flip:
            image, label = image.flip(-1), label.flip(-1)
        image, label = pil_resize_pair(image, label, self.resized_size(*label.shape, draw.long_side))
        pad_h, pad_w = max(0, self.crop_size - label.shape[0]), max(0, self.crop_size - label.shape[1])
        if pad_h or pad_w:  # only when the short side is below the crop (the release's condition)
            image = F.pad(image, (0, pad_w, 0, pad_h), value=self.pad_value)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
        size = self.crop_size
        image = image[:, draw.top : draw.top + size, draw.left : draw.left + size]
        label = label[draw.top : draw.top + size, draw.left : draw.left + size]
        return image.contiguous(), label.contiguous()

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(image, label, self.draw(*label.shape))


TRAIN_TRANSFORMS = {"detectron2": TrainTransform, "encoding": LongSideTransform}
# TrainTransform's keys that LongSideTransform has no use for: the data configs set them, so a recipe choosing
# style encoding must switch them off (a value left on would otherwise be dropped without a word)
_DETECTRON2_ONLY = {"short_side": None, "max_size": None, "cat_max_ratio": 1.0, "color_jitter": False}


def build_train_transform(style: str = "detectron2", **kwargs):
    """``data.transform``: ``style`` detectron2 (:class:`TrainTransform`, CAT-Seg / OVSeg and our default) or
    encoding (:class:`LongSideTransform`, PyTorch-Encoding's ``_sync_transform``, LSeg's paper recipes)."""
    if style not in TRAIN_TRANSFORMS:
        raise ValueError(f"data.transform.style={style!r}: one of {sorted(TRAIN_TRANSFORMS)}")
    if style == "encoding":
        for key, off in _DETECTRON2_ONLY.items():
            value = kwargs.pop(key, off)
            if value != off and not (off is None and not value):
                raise ValueError(f"data.transform.{key}={value!r} has no effect with style=encoding: set it to {off}")
    return TRAIN_TRANSFORMS[style](**kwargs)
