"""Single-image / folder open-vocabulary inference with any trained or converted checkpoint.

For each image: ``<stem>_overlay.png`` (prediction over the image, legend of the classes present),
``<stem>_labels.png`` (raw label map, uint8 or uint16), ``<stem>_areas.json`` (pixels and area per class).
Two inputs with one stem (``x.jpg``, ``x.png``) get ``x_jpg_*`` and ``x_png_*``. Our own PNG outputs carry a
``Software`` text chunk and are never read back as inputs, even when written into the input folder. An image that
cannot be read or predicted is reported and skipped; the others are written.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from ovseg_lab.data.benchmark import IMAGE_EXTENSIONS
from ovseg_lab.errors import DataError, SetupError
from ovseg_lab.eval.inference import InferenceConfig
from ovseg_lab.utils.io import atomic_path, write_json
from ovseg_lab.viz import legend_entries, overlay, with_legend
from ovseg_lab.vocab import Vocabulary, load_vocabulary, vocabulary_from_names


@dataclass
class Prediction:
    stem: str
    labels: np.ndarray  # (H, W) class ids into the vocabulary
    areas: dict[str, dict[str, float]]  # class -> {"pixels", "fraction"}, classes present only
    overlay_path: Path
    labels_path: Path
    areas_path: Path


SOFTWARE = "ovseg-lab predict"
OUTPUT_SUFFIXES = ("_overlay.png", "_labels.png")


@dataclass
class PredictReport:
    results: list[Prediction] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)  # (image, reason): reported and skipped


def is_own_output(path: Path) -> bool:
    """A PNG this module wrote (its ``Software`` text chunk), e.g. outputs of an earlier run in the input folder."""
    if not path.name.lower().endswith(OUTPUT_SUFFIXES):
        return False
    try:
        with Image.open(path) as img:
            return getattr(img, "text", {}).get("Software") == SOFTWARE
    except Exception:
        return False


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(
            p
            for p in path.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and not is_own_output(p)
        )
        if not images:
            raise DataError(f"No images (*.jpg / *.png) in {path}.")
        return images
    raise DataError(f"Image path not found: {path}")


def output_stems(paths: Iterable[Path]) -> dict[Path, str]:
    """Output name per input: the stem, or ``<stem>_<extension>`` where stems collide (x.jpg and x.png)."""
    paths = list(paths)
    counts = Counter(p.stem.casefold() for p in paths)
    return {p: p.stem if counts[p.stem.casefold()] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p in paths}


def read_photo(path: Path) -> np.ndarray:
    """An image as the camera meant it, (H, W, 3) uint8: EXIF orientation applied (phones store portraits as
    rotated landscapes), 16-bit grey scaled to 8 bits with a warning (converted directly it clips to white)."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I") or img.mode == "F":
            values = np.asarray(img, dtype=np.float64)
            top = float(values.max()) if values.size else 0.0
            if top > 255:
                scale = 257.0 if top <= 65535 else top / 255.0
                warnings.warn(
                    f"{path.name}: {img.mode} image with values up to {top:.0f}, scaled to 8 bits "
                    f"(divided by {scale:g}) for the model.",
                    stacklevel=2,
                )
                values = values / scale
            grey = values.clip(0, 255).round().astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.array(img.convert("RGB"))


def resolve_vocabulary(classes: str | None, vocab: str | None) -> Vocabulary:
    if bool(classes) == bool(vocab):
        raise SetupError(
            'Give exactly one of --classes "cat,sofa,..." or --vocab FILE (or a packaged name such as ade150).'
        )
    return vocabulary_from_names(classes) if classes else load_vocabulary(vocab)


def set_background_threshold(module, vocabulary: Vocabulary, threshold: float | None) -> None:
    """OVSegmentor / GroupViT: score the class "background" by thresholding (as on PASCAL VOC) for this vocabulary.

    Their thresholds are keyed by benchmark name (voc21: 0.95, ...); a vocabulary given on the command line has
    its own name, so without a threshold "background" would be matched as an ordinary text class.
    """
    if threshold is None:
        return
    thresholds = getattr(module.net, "background_thresholds", None)
    if thresholds is None:
        raise SetupError(
            f"--background-threshold applies to OVSegmentor / GroupViT only, not {type(module.net).__name__}."
        )
    if "background" not in vocabulary.classes:
        raise SetupError('--background-threshold needs a class named "background" in the vocabulary.')
    if not 0.0 < threshold <= 1.0:
        raise SetupError(f"--background-threshold must lie in (0, 1], got {threshold}.")
    thresholds[vocabulary.name] = float(threshold)


def predict_scores_image(
    module, image: np.ndarray, vocabulary: Vocabulary, inference: InferenceConfig | None = None
) -> torch.Tensor:
    """(H, W, 3) uint8 -> (K, H, W) per-class scores (on the module's device), with the module's evaluation protocol
    (or ``inference``); :func:`predict_image` takes their argmax, the web demo also shows them per class."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(module.device)
    return module.predict_scores(tensor, vocabulary, inference)[0]


def predict_image(
    module, image: np.ndarray, vocabulary: Vocabulary, inference: InferenceConfig | None = None
) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) class ids, with the module's evaluation protocol (or ``inference``)."""
    return labels_from_scores(predict_scores_image(module, image, vocabulary, inference))


def labels_from_scores(scores: torch.Tensor) -> np.ndarray:
    """(K, H, W) scores -> (H, W) class ids (argmax)."""
    return scores.argmax(dim=0).cpu().numpy()


def write_outputs(
    stem: str, image: np.ndarray, labels: np.ndarray, vocabulary: Vocabulary, out_dir: Path
) -> Prediction:
    entries = legend_entries(labels, list(vocabulary.classes))
    picture = with_legend(overlay(image, labels, len(vocabulary), ignore_index=None), entries, len(vocabulary))
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)  # never read back as an input (is_own_output)
    info.add_text("legend", json.dumps([name for _, name, _ in entries]))  # machine-readable legend
    overlay_path, labels_path, areas_path = (
        out_dir / f"{stem}_overlay.png",
        out_dir / f"{stem}_labels.png",
        out_dir / f"{stem}_areas.json",
    )
    with atomic_path(overlay_path) as tmp:
        picture.save(tmp, format="PNG", pnginfo=info)
    dtype = np.uint8 if len(vocabulary) <= 255 else np.uint16
    marker = PngImagePlugin.PngInfo()
    marker.add_text("Software", SOFTWARE)
    with atomic_path(labels_path) as tmp:
        Image.fromarray(labels.astype(dtype)).save(tmp, format="PNG", pnginfo=marker)
    areas = {name: {"pixels": int(round(frac * labels.size)), "fraction": float(frac)} for _, name, frac in entries}
    write_json(areas_path, {"image": stem, "classes": list(vocabulary.classes), "areas": areas})
    return Prediction(stem, labels, areas, overlay_path, labels_path, areas_path)


def check_same_classes(out_dir: Path, vocabulary: Vocabulary) -> None:
    """An output folder holding predictions for another class list is refused: the new run would replace the files
    of the images they share (same names, other label ids) and leave the others, a folder of two class lists.
    The same class list may write again (a rerun, e.g. after Ctrl-C, writes the same files)."""
    classes = list(vocabulary.classes)
    for areas in sorted(out_dir.glob("*_areas.json")) if out_dir.is_dir() else []:
        try:
            earlier = json.loads(areas.read_text(encoding="utf-8")).get("classes")
        except (OSError, ValueError, AttributeError):
            earlier = None
        if earlier != classes:
            shown = ", ".join(map(str, earlier[:8])) if isinstance(earlier, list) else "unreadable"
            raise SetupError(
                f"--output {out_dir} holds predictions for another class list ({areas.name}: [{shown}]; this run: "
                f"[{', '.join(classes[:8])}]); writing there would replace some of them and mix two vocabularies. "
                "Give another --output folder."
            )


def predict_paths(
    module,
    paths: Iterable[Path],
    vocabulary: Vocabulary,
    out_dir: Path,
    inference: InferenceConfig | None = None,
    progress: bool = True,
) -> PredictReport:
    """Predict every image; one that cannot be read or predicted is reported (``failures``) and skipped."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = list(paths)
    stems = output_stems(paths)
    report = PredictReport()
    for path in tqdm(paths, desc="predict", unit="img", disable=not progress or len(paths) < 2):
        try:
            image = read_photo(path)
            labels = predict_image(module, image, vocabulary, inference)
            report.results.append(write_outputs(stems[path], image, labels, vocabulary, out_dir))
        except SetupError:
            raise  # a full disk, a config problem: every next image would fail the same way
        except Exception as err:  # a corrupt or odd file: the other images still get their outputs
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            tqdm.write(f"FAILED {path}: {reason}")
            report.failures.append((path, reason))
    return report
