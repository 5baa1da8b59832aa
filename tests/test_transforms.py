"""The CAT-Seg / MaskFormer training augmentation against detectron2's definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_lab.data.transforms import (
    TrainTransform,
    _hsv_channel_change,
    resize_pair,
    short_side_size,
    ssd_color_jitter,
)


def test_short_side_size_follows_resize_shortest_edge():
    assert short_side_size(480, 640, 384) == (384, 512)
    assert short_side_size(640, 480, 384) == (512, 384)
    assert short_side_size(3, 5, 4) == (4, 7)  # 6.67 rounds up
    assert short_side_size(100, 1000, 384, 1333) == (133, 1333)  # the long side is capped
    assert short_side_size(480, 640, 384, 1333) == (384, 512)


def test_resize_matches_pil_as_detectron2_uses_it():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    label = rng.integers(0, 7, (37, 53)).astype(np.uint8)
    label[:5] = 255
    out_image, out_label = resize_pair(
        torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label.astype(np.int64)), (24, 34)
    )
    pil_label = np.array(Image.fromarray(label).resize((34, 24), Image.NEAREST))
    np.testing.assert_array_equal(out_label.numpy(), pil_label)  # no new ids, PIL's pixel-centre sampling
    pil_image = np.array(Image.fromarray(image).resize((34, 24), Image.BILINEAR)).astype(int)
    assert np.abs(out_image.permute(1, 2, 0).numpy().astype(int) - pil_image).mean() < 1.0


def hue_degrees(image: torch.Tensor) -> np.ndarray:
    from matplotlib.colors import rgb_to_hsv

    return rgb_to_hsv(image.permute(1, 2, 0).numpy() / 255.0)[..., 0] * 360


def test_hue_shift_is_in_opencv_units():
    red = torch.zeros(3, 2, 2)
    red[0] = 255
    # +18 OpenCV hue units = +36 degrees: red (0 deg) -> orange (255, 153, 0)
    shifted = _hsv_channel_change(red, 0, lambda h: (h + 18 / 180) % 1.0)
    np.testing.assert_allclose(shifted[:, 0, 0].numpy(), [255, 153, 0], atol=0.01)


def test_ssd_colour_jitter_ranges():
    torch.manual_seed(0)
    red = torch.zeros(3, 4, 4, dtype=torch.uint8)
    red[0] = 80  # dark enough that no step clips at 255 (clipping would move the hue)
    hues, unchanged = [], 0
    for _ in range(300):
        out = ssd_color_jitter(red)
        assert out.dtype == torch.uint8 and out.shape == red.shape
        pixel = out[:, 0, 0].int()
        if pixel.max() - pixel.min() > 60:  # coloured enough that uint8 rounding moves the hue < 1 degree
            hues.append((hue_degrees(out)[0, 0] + 180) % 360 - 180)  # the other steps keep the hue
        unchanged += bool(torch.equal(out, red))
    hues = np.abs(np.array(hues))
    assert len(hues) > 100
    assert hues.max() <= 37.5 and hues.max() > 30  # +-18 OpenCV units (36 degrees), not +-18 degrees
    assert 0.02 < unchanged / 300 < 0.15  # each of the 4 steps is skipped with probability 1/2 (1/16 all skipped)


def test_category_area_constraint_redraws_dominated_crops():
    label = torch.zeros(64, 64, dtype=torch.long)
    label[:, 56:] = 1  # most 16x16 crops hold class 0 only
    constrained = TrainTransform(crop_size=16, short_side=None, cat_max_ratio=0.75, color_jitter=False, flip=False)
    free = TrainTransform(crop_size=16, short_side=None, cat_max_ratio=1.0, color_jitter=False, flip=False)

    def mixed_fraction(transform) -> float:
        torch.manual_seed(0)
        mixed = 0
        for _ in range(200):
            top, left = transform._crop_box(label)
            crop = label[top : top + 16, left : left + 16]
            counts = crop.unique(return_counts=True)[1]
            mixed += bool(len(counts) > 1 and counts.max() < 0.75 * counts.sum())
        return mixed / 200

    assert mixed_fraction(free) < 0.15 and mixed_fraction(constrained) > 0.5


@pytest.mark.parametrize("flip", [True, False])
def test_train_transform_keeps_image_and_label_aligned_and_pads(flip):
    torch.manual_seed(1)
    label = torch.randint(0, 5, (20, 30))
    label[0] = 255
    colours = torch.tensor([[10, 0, 0], [60, 0, 0], [110, 0, 0], [160, 0, 0], [210, 0, 0]], dtype=torch.uint8)
    image = colours[label.clamp(max=4)].permute(2, 0, 1).contiguous()  # the colour encodes the class
    transform = TrainTransform(
        crop_size=24, short_side=None, color_jitter=False, flip=flip, pad_value=128, ignore_index=255
    )
    for _ in range(10):
        out_image, out_label = transform(image, label)
        assert out_image.shape == (3, 24, 24) and out_label.shape == (24, 24)
        padded = out_label == 255
        assert (out_image[:, 20:, :] == 128).all() and padded[20:].all()  # 20 rows padded to 24
        inside = ~padded
        np.testing.assert_array_equal(out_image[0][inside].numpy(), colours[out_label[inside], 0].numpy())
