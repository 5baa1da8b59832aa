"""The procedurally generated open-vocabulary toy benchmark.

Every image holds textured "stuff" regions and coloured "thing" shapes. Class names are compositional
phrases: things are "<colour> <shape>" ("red circle"), stuff is "<pattern> <surface>" ("striped grass").
Seen and unseen names are disjoint but every word of an unseen name occurs in some seen name, mirroring the
COCO-Stuff -> ADE transfer of the papers (new combinations of known concepts).

Benchmarks written (same on-disk layout as the prepared real benchmarks, see ``ovseg_lab.data.benchmark``)::

    OUT/toy_seen/   images/{train,val}/*.png  labels/{train,val}/*.png  vocab.json  captions/{train,val}.jsonl
    OUT/toy_unseen/ images/val  labels/val   vocab.json  captions/val.jsonl   (only unseen classes appear)
    OUT/toy_large/  images/val  labels/val   vocab.json  captions/val.jsonl   (all classes: the A-847 stand-in)
    OUT/manifest.json

Training uses ``toy_seen/train`` only. Labels are uint8 train ids, 255 = ignore (unused by the generator).
Generation is deterministic: image i of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg_lab.utils.io import atomic_path, write_json

TOY_VERSION = 1

THING_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 200),
    "orange": (250, 140, 20),
    "pink": (250, 120, 200),
    "cyan": (20, 220, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SURFACES: dict[str, tuple[int, int, int]] = {
    "grass": (80, 140, 60),
    "sky": (150, 200, 240),
    "sand": (210, 190, 140),
    "water": (40, 70, 140),
    "wall": (150, 80, 60),
    "snow": (225, 228, 235),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")


def thing_names() -> list[tuple[str, int, int]]:
    return [(f"{c} {s}", ci, si) for ci, c in enumerate(THING_COLOURS) for si, s in enumerate(SHAPES)]


def stuff_names() -> list[tuple[str, int, int]]:
    return [(f"{p} {s}", pi, si) for si, s in enumerate(SURFACES) for pi, p in enumerate(PATTERNS)]


def split_vocabularies() -> dict[str, list[str]]:
    """Seen / unseen / large vocabularies. A name is seen when its two word indices have an even sum, so each
    colour, shape, pattern and surface occurs in both halves."""
    seen, unseen = [], []
    for name, a, b in thing_names() + stuff_names():
        (seen if (a + b) % 2 == 0 else unseen).append(name)
    large = [name for name, _, _ in thing_names() + stuff_names()]
    return {"toy_seen": seen, "toy_unseen": unseen, "toy_large": large}


@dataclass
class ToyConfig:
    seed: int = 0
    image_size: int = 64
    num_train: int = 1200
    num_val: int = 120
    min_things: int = 1
    max_things: int = 3
    thing_size: tuple[int, int] = (9, 16)  # half-extent range in pixels
    splits: dict[str, list[str]] = field(default_factory=lambda: {
        "toy_seen": ["train", "val"], "toy_unseen": ["val"], "toy_large": ["val"],
    })

    def fingerprint(self) -> str:
        payload = json.dumps({"version": TOY_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


def _rng(seed: int, benchmark: str, split: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{benchmark}/{split}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _shape_mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up, base at cy + r
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "cross":
        arm = r * 0.35
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        return inside & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (r * 0.55) ** 2)
    raise ValueError(shape)


def _texture(pattern: str, base: tuple[int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float texture of a stuff class."""
    base_arr = np.clip(np.array(base, np.float32) + rng.normal(0, 8, 3), 0, 255)
    dark = base_arr * 0.55
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(5, 8))
    if pattern == "plain":
        select = np.zeros((size, size), bool)
    elif pattern == "striped":
        angle = rng.uniform(0, np.pi)
        coord = xx * np.cos(angle) + yy * np.sin(angle) + rng.uniform(0, period)
        select = (coord % period) < period / 2
    elif pattern == "dotted":
        oy, ox = rng.integers(0, period, 2)
        select = ((yy + oy) % period - period / 2) ** 2 + ((xx + ox) % period - period / 2) ** 2 <= (period / 3.2) ** 2
    elif pattern == "checkered":
        oy, ox = rng.integers(0, period, 2)
        select = (((yy + oy) // period) + ((xx + ox) // period)) % 2 == 0
    else:
        raise ValueError(pattern)
    tex = np.where(select[..., None], dark, base_arr)
    return tex + rng.normal(0, 6, (size, size, 3))


def _region_masks(size: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Split the canvas into ``count`` stuff regions along wavy lines."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    coord = xx * np.cos(angle) + yy * np.sin(angle)
    coord = coord + rng.uniform(2, 6) * np.sin((xx * np.sin(angle) - yy * np.cos(angle)) / rng.uniform(5, 12))
    cuts = np.sort(rng.uniform(np.percentile(coord, 25), np.percentile(coord, 75), count - 1))
    region = np.searchsorted(cuts, coord)
    return [region == i for i in range(count)]


def render_image(
    vocab: list[str], cfg: ToyConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """One toy image from the classes of ``vocab``.

    Returns image (S, S, 3) uint8, label (S, S) uint8 train ids into ``vocab``, a caption and its entities.
    """
    size = cfg.image_size
    stuff = [i for i, n in enumerate(vocab) if n.split(" ")[1] in SURFACES]
    things = [i for i, n in enumerate(vocab) if n.split(" ")[1] in SHAPES]
    image = np.zeros((size, size, 3), np.float32)
    label = np.zeros((size, size), np.uint8)
    num_regions = int(rng.integers(1, 3)) + 1 if len(stuff) > 1 else 1
    region_classes = rng.choice(stuff, size=num_regions, replace=len(stuff) < num_regions)
    for mask, cls in zip(_region_masks(size, num_regions, rng), region_classes):
        pattern, surface = vocab[cls].split(" ")
        image[mask] = _texture(pattern, SURFACES[surface], size, rng)[mask]
        label[mask] = cls
    num_things = int(rng.integers(cfg.min_things, cfg.max_things + 1)) if things else 0
    thing_classes = rng.choice(things, size=num_things, replace=len(things) < num_things) if num_things else []
    for cls in thing_classes:
        colour, shape = vocab[cls].split(" ")
        r = rng.uniform(*cfg.thing_size)
        cy, cx = rng.uniform(r * 0.6, size - r * 0.6, 2)
        mask = _shape_mask(shape, size, cy, cx, r)
        rgb = np.clip(np.array(THING_COLOURS[colour], np.float32) + rng.normal(0, 10, 3), 0, 255)
        image[mask] = rgb + rng.normal(0, 5, (int(mask.sum()), 3))
        label[mask] = cls
    image = np.clip(image, 0, 255).astype(np.uint8)

    present = [int(c) for c in np.unique(label)]
    visible_things = [vocab[c] for c in dict.fromkeys(int(c) for c in thing_classes) if c in present]
    visible_stuff = [vocab[c] for c in dict.fromkeys(int(c) for c in region_classes) if c in present]
    caption = _caption(visible_things, visible_stuff)
    return image, label, caption, visible_things + visible_stuff


def _caption(things: list[str], stuff: list[str]) -> str:
    def listing(names: list[str]) -> str:
        items = [f"a {n}" for n in names]
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

    if things and stuff:
        return f"{listing(things)} on {listing(stuff)}"
    return listing(things or stuff)


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def generate_toy(out_dir: str | Path, cfg: ToyConfig | None = None, progress: bool = True, force: bool = False) -> Path:
    """Write the toy benchmark under ``out_dir``; a complete one with the same config is left as it is."""
    cfg = cfg or ToyConfig()
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists() and not force:
        try:
            if json.loads(manifest_path.read_text()).get("fingerprint") == cfg.fingerprint():
                return out_dir
        except json.JSONDecodeError:
            pass
    if out_dir.exists():
        # A different or incomplete toy set: replace it, never mix two generations.
        for bench in cfg.splits:
            shutil.rmtree(out_dir / bench, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)

    vocabs = split_vocabularies()
    jobs = [(bench, split) for bench, splits in cfg.splits.items() for split in splits]
    counts = {"train": cfg.num_train, "val": cfg.num_val}
    total = sum(counts[split] for _, split in jobs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="toy benchmark", unit="img")
    summary: dict[str, dict] = {}
    for bench, split in jobs:
        vocab = vocabs[bench]
        root = out_dir / bench
        write_json(root / "vocab.json", vocab)
        pixel_counts = np.zeros(len(vocab), np.int64)
        captions = []
        for index in range(counts[split]):
            stem = f"{bench}_{split}_{index:05d}"
            image, label, caption, entities = render_image(vocab, cfg, _rng(cfg.seed, bench, split, index))
            _save_png(image, root / "images" / split / f"{stem}.png")
            _save_png(label, root / "labels" / split / f"{stem}.png")
            pixel_counts += np.bincount(label.ravel(), minlength=len(vocab))[: len(vocab)]
            captions.append(json.dumps({"stem": stem, "caption": caption, "entities": entities}))
            if bar is not None:
                bar.update(1)
        with atomic_path(root / "captions" / f"{split}.jsonl") as tmp:
            tmp.write_text("\n".join(captions) + "\n")
        summary[f"{bench}/{split}"] = {
            "images": counts[split],
            "classes": len(vocab),
            "classes_present": int((pixel_counts > 0).sum()),
        }
    if bar is not None:
        bar.close()
    write_json(manifest_path, {"fingerprint": cfg.fingerprint(), "version": TOY_VERSION, "config": asdict(cfg), "summary": summary})
    return out_dir


def generate_toy_from_config(options) -> None:
    """``data.generate_toy`` (``out`` + :class:`ToyConfig` fields) -> the toy benchmark in ``out`` (DataModules'
    prepare_data)."""
    options = dict(options)
    generate_toy(options.pop("out"), ToyConfig(**options))
