"""Pictures of segmentations: a stable palette, colourised label maps, overlays with a legend."""

from __future__ import annotations

import colorsys
import unicodedata
from collections.abc import Sequence
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) sRGB in [0, 1] -> CIELAB (D65), where Euclidean distance approximates perceived difference."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


@lru_cache(maxsize=1)
def _farthest_point_colours() -> np.ndarray:
    """Colours of a 17-level RGB grid in farthest-point order in CIELAB: each next colour is the one farthest from
    all colours before it. Class i gets colour i whatever the vocabulary size, and any prefix is as spread out as
    a greedy choice makes it (golden-ratio hues left neighbours within a few Delta-E from ~150 classes on).
    Near-black (ignore pixels) and near-white (the legend's background) are left out."""
    levels = np.linspace(0, 1, 17)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = _srgb_to_lab(grid)
    keep = (lab[:, 0] > 20) & (lab[:, 0] < 92)
    grid, lab = grid[keep], lab[keep]
    order = [int(np.argmin(np.abs(grid - np.array([0.9, 0.1, 0.1])).sum(1)))]  # start at a strong red
    nearest = np.linalg.norm(lab - lab[order[0]], axis=1)
    for _ in range(len(grid) - 1):
        pick = int(np.argmax(nearest))
        order.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[pick], axis=1))
    return (grid[order] * 255).round().astype(np.uint8)


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, the same for a class index in every picture, far apart in CIELAB (see
    :func:`_farthest_point_colours`; beyond its ~3,900 colours the golden-ratio hues take over)."""
    base = _farthest_point_colours()
    if num_classes <= len(base):
        return base[:num_classes].copy()
    colours = []
    for index in range(len(base), num_classes):
        hue = (index * 0.61803398875) % 1.0
        colours.append(colorsys.hsv_to_rgb(hue, (0.85, 0.6, 0.95)[index % 3], (0.95, 0.75)[(index // 3) % 2]))
    extra = (np.array(colours, dtype=np.float64).reshape(-1, 3) * 255).round().astype(np.uint8)
    return np.concatenate([base, extra])


def colorize(label: np.ndarray, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8; ignore pixels are black."""
    colours = palette(num_classes)
    out = np.zeros((*label.shape, 3), np.uint8)
    valid = (label >= 0) & (label < num_classes)
    if ignore_index is not None:
        valid &= label != ignore_index
    out[valid] = colours[label[valid]]
    return out


def overlay(
    image: np.ndarray, label: np.ndarray, num_classes: int, alpha: float = 0.55, ignore_index: int | None = 255
) -> np.ndarray:
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


FALLBACK_FONT = Path(__file__).resolve().parent / "assets" / "fonts" / "DroidSansFallback.ttf"


@lru_cache(maxsize=1)
def _font_files() -> tuple[str, ...]:
    """Fonts in the order a character looks for its glyph: matplotlib's DejaVu Sans (shipped with matplotlib:
    Latin, Greek, Cyrillic, Arabic, Hebrew, Armenian, Georgian), then every installed system font, then the packaged
    Droid Sans Fallback (CJK ideographs, Hangul, kana: assets/fonts/README.txt says why it is shipped)."""
    from matplotlib import font_manager

    files = [font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=True)]
    files += sorted(f for f in font_manager.findSystemFonts() if f.lower().endswith((".ttf", ".otf", ".ttc")))
    files.append(str(FALLBACK_FONT))
    return tuple(dict.fromkeys(files))


@cache
def _coverage(path: str) -> frozenset[int]:
    try:
        from fontTools.ttLib import TTFont

        with TTFont(path, fontNumber=0, lazy=True) as font:
            return frozenset(font.getBestCmap() or {})
    except Exception:
        return frozenset()


_WARNED: set[str] = set()


def _joins_run(char: str) -> bool:
    """Spaces, combining marks and joiners take the font of the character before them (shaping needs them there)."""
    return char.isspace() or unicodedata.category(char) in ("Mn", "Me", "Cf")


@lru_cache(maxsize=256)
def font_runs(text: str) -> tuple[tuple[str, str], ...]:
    """``text`` split into (substring, font file) runs: each character in the first font of :func:`_font_files`
    that has its glyph, kept in the current run's font when that one has it too (fewer, better-shaped runs).

    A legend name may mix scripts ("猫 (12.3%)": no single font has both the ideograph and the digits everywhere),
    so this is per character, not per name. A character no font has is drawn in the run's font (a box) and a
    warning says what to install (e.g. fonts-noto-core for Devanagari or Thai).
    """
    runs: list[list[str]] = []
    missing = []
    for char in text:
        current = runs[-1][1] if runs else None
        code = ord(char)
        if current is not None and (_joins_run(char) or code in _coverage(current)):
            runs[-1][0] += char
            continue
        font = next((f for f in _font_files() if code in _coverage(f)), None)
        if font is None:
            if not _joins_run(char):
                missing.append(char)
            font = current or _font_files()[0]
        if runs and runs[-1][1] == font:
            runs[-1][0] += char
        else:
            runs.append([char, font])
    gap = "".join(sorted(set(missing)))
    if gap and gap not in _WARNED:
        _WARNED.add(gap)
        import warnings

        warnings.warn(
            f"No installed or packaged font has glyphs for {gap!r} (legend of {text!r}); install one that "
            "does (e.g. Debian/Ubuntu: apt-get install fonts-noto-core) and it will be used.",
            stacklevel=2,
        )
    return tuple((chunk, font) for chunk, font in runs)


@lru_cache(maxsize=64)
def _truetype(path: str, size: int):
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default(size)


def text_width(text: str, size: int) -> float:
    """Width in pixels of ``text`` drawn by :func:`draw_text` at ``size``."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return sum(probe.textlength(chunk, font=_truetype(font, size)) for chunk, font in font_runs(text))


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int, fill=(0, 0, 0)) -> float:
    """``text`` at ``xy`` (its top left; the baseline at y + size) in ``size`` px, font by font (:func:`font_runs`),
    so names in any script (CJK, Hangul, Arabic, Cyrillic ...) render as glyphs, not boxes. Returns the x where
    the text ends. Each call is one paragraph to Pillow's layout (with libraqm: Arabic joined, right to left)."""
    x, baseline = xy[0], xy[1] + size
    for chunk, font in font_runs(text):
        face = _truetype(font, size)
        draw.text((x, baseline), chunk, fill=fill, font=face, anchor="ls")
        x += draw.textlength(chunk, font=face)
    return x


def with_legend(picture: np.ndarray, entries: Sequence[tuple[int, str, float]], num_classes: int) -> Image.Image:
    """A PIL image: the picture with a legend panel listing ``entries`` (colour swatch, name, area).

    The text is sized with the picture (a 4000x3000 photo gets a legend as readable as a 64x64 toy image's), and
    drawn character by character in a font that has the glyph (:func:`draw_text`).
    """
    colours = palette(num_classes)
    size = max(11, round(max(picture.shape[:2]) / 40))
    row_height, swatch, margin = round(size * 1.5), size, max(4, size // 2)
    # name and area drawn as two paragraphs: one would be laid out right to left after an Arabic or Hebrew name
    # ("(%20.0) قطة"); this way the area stays on the right in every script
    labels = [(name, f" ({area * 100:.1f}%)") for _, name, area in entries]
    widest = max((text_width(name, size) + text_width(area, size) for name, area in labels), default=0)
    width = picture.shape[1] + 3 * margin + swatch + int(np.ceil(widest))
    height = max(picture.shape[0], row_height * len(entries) + 2 * margin)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = picture.shape[1] + margin
    for row, ((cls, _, _), (name, area)) in enumerate(zip(entries, labels)):
        y = margin + row * row_height
        draw.rectangle([x0, y, x0 + swatch, y + swatch], fill=tuple(int(c) for c in colours[cls]), outline=(0, 0, 0))
        draw_text(draw, (draw_text(draw, (x0 + swatch + margin, y), name, size), y), area, size)
    return canvas
