"""MESS (Multi-domain Evaluation of Semantic Segmentation, Blumenstiel et al., NeurIPS 2023) as our benchmarks.

The field's package ``mess-benchmark`` (``pip install -e ".[mess]"``) downloads and converts its 22 datasets
(``DETECTRON2_DATASETS=<root> python -m mess.prepare_datasets.prepare_<name>``) and registers every one in its
detectron2-style catalog: image folder, label folder, file endings, class names, ignore value. We read the
prepared folders as they are; ``assets/mess_catalog.json`` records what that registration says (written from the
installed package by ``python -m ovseg_lab.data.mess --write-catalog``, compared with it by ``--check`` and by the
tests when the package is installed), so reading needs no import of ``mess`` and none of its heavy dependencies.

MESS conventions kept here:

- class names are MESS's registered ``stuff_classes`` (its prompt-ready names: ``others`` for background,
  ``tool`` rather than the official ``surgical instrument``); each method adds its own prompt templates, as the
  MESS forks of CAT-Seg and the others do;
- ISPRS Potsdam and WorldFloods are scored on their IRRG images, PAXRay-4 is the mean of four binary datasets
  (lungs, bones, mediastinum, diaphragm), the ids MESS's ``mess_evaluation.py`` reads;
- mIoU as ``MESSSemSegEvaluator`` computes it: the mean over classes present in the ground truth *or* the
  prediction (our ``mmseg`` convention), ignore 255;
- domain means and the overall mean are plain means over datasets (``mess_evaluation.py``: ``groupby().mean()``);
  we add the harmonic mean over datasets, which MESS does not report.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from ovseg_lab.data.benchmark import BenchmarkSpec
from ovseg_lab.errors import DataError

PREFIX = "mess_"  # our benchmark names: mess_<catalog key>, e.g. mess_chase_db1
FAKE_MARKER = "FAKE_MESS.txt"  # marks a root of fake datasets (write_fake_root)
# Datasets whose raw files MESS's scripts cannot download (its DATASETS.md): fetch them by hand into the root first.
MANUAL_DOWNLOAD = {
    "bdd100k": "https://bdd-data.berkeley.edu (10K Images and Segmentation zips)",
    "isprs_potsdam": "https://www.isprs.org/education/benchmarks/UrbanSemLab/default.aspx (Potsdam.zip)",
    "floodnet": "https://drive.google.com/drive/folders/1leN9eWVQcvWDVYwNb2GCo5ML_wBEycWD (test folder)",
    "uavid": "https://uavid.nl (Semantic Labelling with Images Only)",
    "cryonuseg": "Kaggle 'segmentation-of-nuclei-in-cryosectioned-he-images' (folder 'archive')",
}


@functools.cache
def load_catalog() -> dict[str, dict[str, Any]]:
    """Catalog key -> entry, in MESS's evaluation order (``mess_evaluation.py``); read once, do not modify."""
    path = resources.files("ovseg_lab") / "assets" / "mess_catalog.json"
    return json.loads(path.read_text())["datasets"]


def benchmark_name(key: str) -> str:
    return f"{PREFIX}{key}"


def slug(text: str) -> str:
    """"Earth Monitoring" -> "earth_monitoring" (domain benchmark names in metrics.json)."""
    return "_".join(text.lower().replace("-", " ").split())


def prepare_command(key: str, root: str | Path) -> str:
    entry = load_catalog()[key]
    command = f'pip install -e ".[mess]" && DETECTRON2_DATASETS={root} python -m {entry["prepare"]}'
    manual = MANUAL_DOWNLOAD.get(entry["prepare"].rsplit(".prepare_", 1)[-1])
    return f"{command} (download by hand first: {manual})" if manual else command


def mess_spec(name: str, key: str, root: str | Path | None, max_images: int | None = None) -> BenchmarkSpec:
    """The benchmark spec of catalog entry ``key`` under the MESS root (DETECTRON2_DATASETS of its scripts)."""
    catalog = load_catalog()
    if key not in catalog:
        raise DataError(f"{name}: '{key}' is not a MESS dataset of ours (known: {', '.join(catalog)}).")
    if root is None:
        raise DataError(f"{name} is a MESS dataset: set data.root to the MESS folder (data=mess sets it).")
    entry = catalog[key]
    return BenchmarkSpec(
        name=name,
        root=str(Path(root) / entry["folder"]),
        split=entry["split"],
        vocabulary=list(entry["classes"]),
        ignore_index=entry["ignore_index"],
        max_images=max_images,
        prepare=prepare_command(key, root),
        images=entry["images"],
        labels=entry["labels"],
        image_suffix=entry["image_ext"],
        label_suffix=entry["label_ext"],
        metric_convention="mmseg",  # MESSSemSegEvaluator: classes in the ground truth or the prediction
        extra={"mess": key, "title": entry["title"], "domain": entry["domain"], "dataset": entry["dataset"]},
    )


# ---------------------------------------------------------------------------------------------- scoring
def _aggregate(entries: list[dict[str, Any]], how: str, **info: Any) -> dict[str, Any]:
    """One summary entry: every figure aggregated over ``entries`` (mean, or harmonic mean) the way MESS
    aggregates mIoU; it carries the keys every metrics.json entry has, so tables and printouts read it alike."""
    def combine(values: list[float]) -> float:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return float("nan")
        return statistics.fmean(values) if how == "mean" else statistics.harmonic_mean(values)

    return {
        "mIoU": combine([e["mIoU"] for e in entries]),
        "pixel_accuracy": combine([e.get("pixel_accuracy") for e in entries]),
        "fwIoU": combine([e.get("fwIoU") for e in entries]),
        "mean_accuracy": combine([e.get("mean_accuracy") for e in entries]),
        "num_classes": sum(int(e.get("num_classes", 0)) for e in entries),
        "convention": entries[0].get("convention"),
        "aggregate": how,
        **info,
    }


def summarize(results: Mapping[str, dict[str, Any]], specs: Iterable[BenchmarkSpec]) -> dict[str, dict[str, Any]]:
    """MESS's figures from the per-benchmark scores: a dataset made of parts (PAXRay-4) as the mean of its parts,
    per-domain means, the mean and the harmonic mean over datasets. Keys: ``mess_<dataset>`` for combined
    datasets, ``mess_domain_<domain>``, ``mess_mean``, ``mess_hmean``; {} when no MESS benchmark was scored."""
    datasets: dict[str, list[tuple[BenchmarkSpec, dict]]] = {}
    for spec in specs:
        if "mess" in spec.extra and spec.name in results:
            datasets.setdefault(spec.extra["dataset"], []).append((spec, results[spec.name]))
    if not datasets:
        return {}
    out: dict[str, dict[str, Any]] = {}
    per_dataset: dict[str, tuple[str, dict]] = {}  # dataset title -> (domain, scores)
    for title, parts in datasets.items():
        spec, scores = parts[0]
        if len(parts) > 1 or spec.extra["title"] != title:  # PAXRay-4: the mean of its binary parts
            scores = _aggregate([s for _, s in parts], "mean", dataset=title, of=[p.name for p, _ in parts])
            out[benchmark_name(slug(title))] = scores
        per_dataset[title] = (spec.extra["domain"], scores)
    domains: dict[str, list[str]] = {}
    for title, (domain, _) in per_dataset.items():
        domains.setdefault(domain, []).append(title)
    for domain, titles in domains.items():
        out[f"{PREFIX}domain_{slug(domain)}"] = _aggregate([per_dataset[t][1] for t in titles], "mean", domain=domain, of=titles)
    every = [scores for _, scores in per_dataset.values()]
    out[f"{PREFIX}mean"] = _aggregate(every, "mean", of=list(per_dataset))
    out[f"{PREFIX}hmean"] = _aggregate(every, "hmean", of=list(per_dataset))
    return out


# ---------------------------------------------------------------------------------------------- fakes
def write_fake_dataset(root: str | Path, key: str, num_images: int = 2, size: tuple[int, int] = (48, 64),
                       seed: int = 0, ignore_fraction: float = 0.0) -> Path:
    """A small random copy of MESS dataset ``key`` in its prepared layout under ``root`` (tests, demos, memory
    checks): images and label maps with the catalog's folders, file endings and class ids; ``ignore_fraction`` of
    the label pixels set to the ignore value. Returns the dataset folder."""
    import numpy as np
    from PIL import Image

    entry = load_catalog()[key]
    folder = Path(root) / entry["folder"]
    rng = np.random.default_rng(seed)
    height, width = size
    for i in range(num_images):
        label = rng.integers(0, len(entry["classes"]), size=(height, width), dtype=np.uint8)
        if ignore_fraction:
            label[rng.random((height, width)) < ignore_fraction] = entry["ignore_index"]
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        stem = f"fake_{i:04d}"
        for sub, ext, array in ((entry["images"], entry["image_ext"], image), (entry["labels"], entry["label_ext"], label)):
            path = folder / sub / f"{stem}{ext if ext.startswith(('.', '_')) else '.' + ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
            Image.fromarray(array).save(path, format=fmt)
    return folder


def write_fake_root(root: str | Path, keys: Iterable[str] | None = None, num_images: int = 2,
                    size: tuple[int, int] = (64, 64), seed: int = 0, ignore_fraction: float = 0.05) -> None:
    """Fake copies of the MESS datasets ``keys`` (default: all) under ``root``, skipping those already there
    (data=mess_toy's ``generate_mess_fake``). Only into an empty folder or one it made: a real MESS root passed
    by mistake must not gain fake datasets beside the real ones."""
    root = Path(root)
    marker = root / FAKE_MARKER
    if root.is_dir() and any(root.iterdir()) and not marker.exists():
        raise DataError(f"{root} is not a folder of fake MESS datasets (no {FAKE_MARKER}): data=mess_toy writes its "
                        "fakes only into an empty folder or its own (data.root, default <paths.data_dir>/mess_fake).")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text("Fake MESS datasets (random pixels) written by ovseg_lab.data.mess.write_fake_root.\n")
    catalog = load_catalog()
    for index, key in enumerate(keys or catalog):
        entry = catalog[key]
        if not (Path(root) / entry["folder"] / entry["labels"]).is_dir():
            write_fake_dataset(root, key, num_images, tuple(size), seed + index, ignore_fraction)


# ---------------------------------------------------------------------------------------------- catalog
def catalog_from_package() -> dict[str, dict[str, Any]]:
    """Read the catalog from the installed ``mess`` package: what its registration passes to ``load_sem_seg``
    (folders, file endings) and its metadata (classes, ignore value); names, domains and preparation modules from
    its evaluation and preparation scripts, read as source (they import pandas, rasterio, ...)."""
    import ast
    import importlib
    import importlib.util
    import pkgutil

    import mess.datasets  # registers every dataset under its module's _root (DETECTRON2_DATASETS at import)

    try:
        from detectron2.data import DatasetCatalog, MetadataCatalog
    except ImportError:
        from mess.utils.catalog import DatasetCatalog, MetadataCatalog

    def source_dicts(module: str) -> dict[str, ast.AST]:
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
        return {t.id: node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Dict)}

    evaluation = source_dicts("mess.evaluation.mess_evaluation")
    titles, domains = ast.literal_eval(evaluation["dataset_names"]), ast.literal_eval(evaluation["dataset_domains"])
    prepare_dict = source_dicts("mess.prepare_all_datasets")["dataset_dict"]
    prepare = {ast.literal_eval(k): v.id for k, v in zip(prepare_dict.keys, prepare_dict.values)}

    calls: dict[str, tuple] = {}
    for info in pkgutil.iter_modules(mess.datasets.__path__):
        if not info.name.startswith("register_"):  # the other modules wrap mmseg / torchvision datasets
            continue
        module = importlib.import_module(f"mess.datasets.{info.name}")
        if hasattr(module, "load_sem_seg"):  # record the arguments instead of listing files
            module.load_sem_seg = (lambda root: lambda gt_root, image_root, gt_ext="png", image_ext="jpg":
                                   (root, gt_root, image_root, gt_ext, image_ext))(module._root)
    for name in DatasetCatalog.list():
        calls[name] = DatasetCatalog.get(name)

    parts = {"PAXRay-Lungs", "PAXRay-Bones", "PAXRay-Mediastinum", "PAXRay-Diaphragm"}
    catalog: dict[str, dict[str, Any]] = {}
    for mess_name, title in titles.items():
        if mess_name not in calls:  # paxray_combined: MESS's mean of the four parts, not a registered dataset
            continue
        root, gt_root, image_root, gt_ext, image_ext = calls[mess_name]
        meta = MetadataCatalog.get(mess_name)
        prefix, split = mess_name.split("_sem_seg_")
        folder = Path(image_root).relative_to(root).parts[0]
        key = f"{prefix}_{split.split('_', 1)[1]}" if title in parts else prefix
        module = prepare.get(mess_name) or next(m for n, m in prepare.items() if n.startswith(prefix + "_sem_seg"))
        catalog[key] = {
            "mess_name": mess_name,
            "title": title,
            "dataset": "PAXRay-4" if title in parts else title,
            "domain": domains[mess_name],
            "split": split,
            "folder": folder,
            "images": str(Path(image_root).relative_to(Path(root) / folder)),
            "labels": str(Path(gt_root).relative_to(Path(root) / folder)),
            "image_ext": image_ext,
            "label_ext": gt_ext,
            "ignore_index": int(meta.ignore_label),
            "classes": list(meta.stuff_classes),
            "classes_of_interest": [int(c) for c in meta.classes_of_interest],
            "background_class": int(meta.background_class),
            "prepare": f"mess.prepare_datasets.{module}",
        }
    return catalog


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="MESS catalog: write it from the installed mess-benchmark, or check it.")
    parser.add_argument("--write-catalog", action="store_true", help="rewrite ovseg_lab/assets/mess_catalog.json")
    parser.add_argument("--check", action="store_true", help="compare the packaged catalog with the installed package")
    args = parser.parse_args(argv)
    from importlib.metadata import version

    catalog = catalog_from_package()
    if args.write_catalog:
        from ovseg_lab.utils.io import write_json

        path = Path(__file__).resolve().parents[1] / "assets" / "mess_catalog.json"
        write_json(path, {"source": f"mess-benchmark {version('mess-benchmark')} (python -m ovseg_lab.data.mess --write-catalog)",
                          "datasets": catalog})
        print(f"wrote {len(catalog)} entries to {path}")
        return 0
    differ = [k for k in set(catalog) | set(load_catalog()) if catalog.get(k) != load_catalog().get(k)]
    print("catalog matches the installed mess-benchmark" if not differ else f"entries differ: {sorted(differ)}")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
