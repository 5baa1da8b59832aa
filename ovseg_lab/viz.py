"""Pictures of segmentations: a stable palette, colourised label maps, overlays with a legend."""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, the same for a class index in every picture.

    Hues step by the golden ratio so neighbouring ids differ strongly; saturation and value alternate.
    """
    colours = []
    for index in range(num_classes):
        hue = (index * 0.61803398875) % 1.0
        saturation = (0.85, 0.6, 0.95)[index % 3]
        value = (0.95, 0.75)[(index // 3) % 2]
        colours.append(colorsys.hsv_to_rgb(hue, saturation, value))
    return (np.array(colours, dtype=np.float64).reshape(-1, 3) * 255).round().astype(np.uint8)


def colorize(label: np.ndarray, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8; ignore pixels are black."""
    colours = palette(num_classes)
    out = np.zeros((*label.shape, 3), np.uint8)
    valid = (label >= 0) & (label < num_classes)
    if ignore_index is not None:
        valid &= label != ignore_index
    out[valid] = colours[label[valid]]
    return out


def overlay(image: np.ndarray, label: np.ndarray, num_classes: int, alpha: float = 0.55, ignore_index: int | None = 255) -> np.ndarray:
    """Blend the colourised label map onto an (H, W, 3) uint8 image."""
    colours = colorize(label, num_classes, ignore_index).astype(np.float32)
    blended = image.astype(np.float32) * (1 - alpha) + colours * alpha
    return blended.clip(0, 255).astype(np.uint8)


def legend_entries(label: np.ndarray, class_names: Sequence[str]) -> list[tuple[int, str, float]]:
    """(class id, name, area fraction) of the classes present in ``label``, largest first."""
    ids, counts = np.unique(label[(label >= 0) & (label < len(class_names))], return_counts=True)
    total = max(1, label.size)
    order = np.argsort(-counts)
    return [(int(ids[i]), class_names[int(ids[i])], counts[i] / total) for i in order]


def with_legend(picture: np.ndarray, entries: Sequence[tuple[int, str, float]], num_classes: int) -> Image.Image:
    """A PIL image: the picture with a legend panel listing ``entries`` (colour swatch, name, area)."""
    colours = palette(num_classes)
    font = ImageFont.load_default()
    row_height, swatch = 16, 12
    height = max(picture.shape[0], row_height * len(entries) + 8)
    width = picture.shape[1] + 220
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = picture.shape[1] + 8
    for row, (cls, name, area) in enumerate(entries):
        y = 4 + row * row_height
        draw.rectangle([x0, y, x0 + swatch, y + swatch], fill=tuple(int(c) for c in colours[cls]), outline=(0, 0, 0))
        draw.text((x0 + swatch + 6, y), f"{name} ({area * 100:.1f}%)", fill=(0, 0, 0), font=font)
    return canvas
