"""Benchmark preparation: tiny fake raw archives in each official layout -> prepared labels, pixel by pixel.

Expected labels are computed here from the documented mappings (the id-map JSON files and the rules in
docs/data.md), one pixel at a time, independently of the vectorised code under test. Real samples
(tests/fixtures/realdata) cover the VOC and ADE formats.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_lab.data.prepare import make_preparer, prepare_benchmark
from ovseg_lab.errors import DataError
from tests.conftest import ROOT

VOCAB = ROOT / "ovseg_lab" / "assets" / "vocab"
REAL = ROOT / "tests" / "fixtures" / "realdata"


# ---------------------------------------------------------------------------------------------------- helpers
def write_jpg(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


def per_pixel(raw: np.ndarray, rule) -> np.ndarray:
    """Apply ``rule(raw_id) -> train_id`` to every pixel, one at a time (the reference computation)."""
    return np.array([[rule(int(v)) for v in row] for row in raw])


def summary_of(summaries, target: str, split: str = "val"):
    return next(s for s in summaries if s.target == target and s.split == split)


def prepared(out: Path, target: str, split: str, stem: str, suffix: str = ".png") -> np.ndarray:
    return read(out / target / "labels" / split / f"{stem}{suffix}")


COCO_STUFF_MAP = {e["raw_id"]: e["train_id"] for e in json.loads((VOCAB / "coco_stuff171_id_map.json").read_text())}
COCO_THINGS = {
    e["raw_id"]: e["train_id"] for e in json.loads((VOCAB / "coco_stuff171_id_map.json").read_text()) if e["isthing"]
}


# ---------------------------------------------------------------------------------------------------- COCO
# raw stuff-thing ids: person, bicycle, an unused id, toothbrush, unused, banner (first stuff), wood (last), unused, unlabelled
COCO_RAW_IDS = np.array(
    [[0, 1, 11, 89, 90, 91], [181, 182, 255, 0, 0, 91], [123, 123, 255, 255, 1, 1], [89, 89, 89, 91, 91, 181]],
    dtype=np.uint8,
)


@pytest.mark.parametrize("layout", ["cat_seg", "official_zips"])
def test_coco_stuff_labels_follow_the_id_map(tmp_path, layout):
    raw, out = tmp_path / "raw", tmp_path / "out"
    if layout == "cat_seg":  # coco-stuff/images/val2017 + coco-stuff/annotations/val2017
        image = write_jpg(raw / "images" / "val2017" / "000000000139.jpg", 4, 6)
        write_png(raw / "annotations" / "val2017" / "000000000139.png", COCO_RAW_IDS)
    else:  # val2017.zip and stuffthingmaps_trainval2017.zip unpacked into the same folder
        image = write_jpg(raw / "val2017" / "000000000139.jpg", 4, 6)
        write_png(raw / "val2017" / "000000000139.png", COCO_RAW_IDS)
    summaries = prepare_benchmark("coco_stuff", raw, out, splits=["val"], progress=False)

    label = prepared(out, "coco_stuff", "val", "000000000139")
    assert label.dtype == np.uint8
    expected = per_pixel(COCO_RAW_IDS, lambda v: COCO_STUFF_MAP.get(v, 255))
    np.testing.assert_array_equal(label, expected)
    assert label[0, 5] == 80 and label[1, 0] == 170 and label[0, 3] == 79  # banner, wood, toothbrush
    assert (out / "coco_stuff" / "images" / "val2017").exists() is False
    assert (out / "coco_stuff" / "images" / "val" / "000000000139.jpg").read_bytes() == image.read_bytes()
    assert json.loads((out / "coco_stuff" / "vocab.json").read_text()) == json.loads(
        (VOCAB / "coco_stuff171.json").read_text()
    )
    summary = summary_of(summaries, "coco_stuff")
    assert summary.images == 1 and summary.classes_seen == len(set(expected.ravel().tolist()) - {255}) == 6
    assert summary.ignored_fraction == pytest.approx(np.isin(COCO_RAW_IDS, [11, 90, 182, 255]).mean())


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    counts, current, run = [], 0, 0
    for value in mask.flatten(order="F"):
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def test_coco_object_from_instances_polygon_and_rle(tmp_path):
    from pycocotools import mask as mask_utils

    raw, out = tmp_path / "coco", tmp_path / "out"
    height, width = 10, 12
    write_jpg(raw / "val2017" / "000000000001.jpg", height, width)
    person = np.zeros((height, width), np.uint8)
    person[1:4, 1:5] = 1  # the polygon below covers pixel centres of rows 1-3, columns 1-4
    bicycle = np.zeros((height, width), np.uint8)
    bicycle[5:8, 2:10] = 1
    toothbrush = np.zeros((height, width), np.uint8)
    toothbrush[2:4, 3:7] = 1  # overlaps the person; drawn later, so it wins
    compressed = mask_utils.encode(np.asfortranarray(toothbrush))
    annotations = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": height, "width": width}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 90, "name": "toothbrush"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]},
            {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": uncompressed_rle(bicycle)},
            {
                "id": 3,
                "image_id": 1,
                "category_id": 90,
                "iscrowd": 0,
                "segmentation": {"size": [height, width], "counts": compressed["counts"].decode("ascii")},
            },
        ],
    }
    (raw / "annotations").mkdir(parents=True)
    (raw / "annotations" / "instances_val2017.json").write_text(json.dumps(annotations))

    summaries = prepare_benchmark("coco_object", raw, out, progress=False)
    expected = np.full((height, width), 80)  # background
    expected[person == 1] = 0
    expected[bicycle == 1] = 1
    expected[toothbrush == 1] = 79
    np.testing.assert_array_equal(prepared(out, "coco_object", "val", "000000000001"), expected)
    vocab = json.loads((out / "coco_object" / "vocab.json").read_text())
    assert (
        len(vocab) == 81
        and vocab[80] == "background"
        and vocab[:80] == json.loads((VOCAB / "coco_stuff171.json").read_text())[:80]
    )
    assert summary_of(summaries, "coco_object").classes_seen == 4
    assert (
        "instances" in json.loads((out / "coco_object" / "prepare_summary.json").read_text())["splits"]["val"]["source"]
    )


def test_coco_object_from_stuffthing_maps_puts_stuff_into_background(tmp_path):
    raw, out = tmp_path / "coco", tmp_path / "out"
    write_jpg(raw / "images" / "val2017" / "000000000139.jpg", 4, 6)
    write_png(raw / "annotations" / "val2017" / "000000000139.png", COCO_RAW_IDS)
    prepare_benchmark("coco_object", raw, out, source="stuffthingmaps", progress=False)
    expected = per_pixel(COCO_RAW_IDS, lambda v: COCO_THINGS.get(v, 80))
    np.testing.assert_array_equal(prepared(out, "coco_object", "val", "000000000139"), expected)


# ---------------------------------------------------------------------------------------------------- ADE
def make_ade150_raw(raw: Path) -> Path:
    root = raw / "ADEChallengeData2016"
    for kind, name in (("images", "ADE_val_00000001.jpg"), ("annotations", "ADE_val_00000001.png")):
        (root / kind / "validation").mkdir(parents=True, exist_ok=True)
        shutil.copy(REAL / name, root / kind / "validation" / name)
    synthetic = np.array([[0, 1, 150], [75, 0, 2]], dtype=np.uint8)
    write_jpg(root / "images" / "validation" / "ADE_val_00000002.jpg", 2, 3)
    write_png(root / "annotations" / "validation" / "ADE_val_00000002.png", synthetic)
    write_jpg(root / "images" / "training" / "ADE_train_00000001.jpg", 2, 3)
    write_png(root / "annotations" / "training" / "ADE_train_00000001.png", synthetic[::-1].copy())
    return root


def test_ade150_real_and_synthetic_samples(tmp_path):
    root = make_ade150_raw(tmp_path / "raw")
    out = tmp_path / "out"
    summaries = prepare_benchmark("ade150", tmp_path / "raw", out, splits=["val", "train"], progress=False)
    rule = lambda v: 255 if v == 0 else v - 1  # noqa: E731  (0 = "other" -> ignore)
    for split, stem, ade_split in (
        ("val", "ADE_val_00000001", "validation"),
        ("val", "ADE_val_00000002", "validation"),
        ("train", "ADE_train_00000001", "training"),
    ):
        raw_label = read(root / "annotations" / ade_split / f"{stem}.png")
        np.testing.assert_array_equal(prepared(out, "ade150", split, stem), per_pixel(raw_label, rule))
        # images are passed through unchanged
        assert (out / "ade150" / "images" / split / f"{stem}.jpg").read_bytes() == (
            root / "images" / ade_split / f"{stem}.jpg"
        ).read_bytes()
    real = prepared(out, "ade150", "val", "ADE_val_00000001")
    assert set(np.unique(real)) >= {0, 1, 255}  # wall, building, ignored "other"
    assert summary_of(summaries, "ade150").images == 2 and summary_of(summaries, "ade150", "train").images == 1


ADE847_MAP = {e["ade_id"]: e["train_id"] for e in json.loads((VOCAB / "ade847_id_map.json").read_text())}


def encode_ade(classes: np.ndarray, seed: int = 0) -> np.ndarray:
    """An ADE20K _seg.png for object class indices: R = class // 256 * 10 + noise (0..9), G = class % 256, B = instance."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((*classes.shape, 3), np.uint8)
    seg[..., 0] = (classes // 256) * 10 + rng.integers(0, 10, classes.shape)  # R // 10 drops the noise
    seg[..., 1] = classes % 256
    seg[..., 2] = rng.integers(0, 256, classes.shape)
    return seg


def make_ade847_raw(raw: Path, with_index: bool = True) -> tuple[Path, np.ndarray]:
    root = raw / "ADE20K_2021_17_01"
    train_dir = root / "images" / "ADE" / "training" / "urban" / "street"
    train_dir.mkdir(parents=True)
    shutil.copy(REAL / "ADE_train_00016900.jpg", train_dir)
    shutil.copy(REAL / "ADE_train_00016900_seg.png", train_dir)
    # a validation image taller than 512 on its short side: resized to short side 512
    # wall (train id 0), pier (255: a class, not ignore, in 16 bits), shanties (256), adding machine (846),
    # index 5 (not among the 847) and 0 (unlabelled)
    ids = np.array([2978, 1857, 2315, 3148, 5, 0])
    rng = np.random.default_rng(1)
    classes = ids[rng.integers(0, len(ids), (600 // 50, 700 // 50))].repeat(50, 0).repeat(50, 1)
    classes[:7, :9] = ids[rng.integers(0, len(ids), (7, 9))]  # single-pixel detail near the origin
    val_dir = root / "images" / "ADE" / "validation" / "abbey"
    write_jpg(val_dir / "ADE_val_00000001.jpg", 600, 700)
    write_png(val_dir / "ADE_val_00000001_seg.png", encode_ade(classes))
    if with_index:
        index = {
            "folder": [
                "ADE20K_2021_17_01/images/ADE/training/urban/street",
                "ADE20K_2021_17_01/images/ADE/validation/abbey",
            ],
            "filename": ["ADE_train_00016900.jpg", "ADE_val_00000001.jpg"],
            "objectnames": ["-"],
        }
        (root / "index_ade20k.pkl").write_bytes(pickle.dumps(index))
    return root, classes


def test_ade847_decodes_object_masks_above_255_and_resizes_like_the_official_script(tmp_path):
    root, classes = make_ade847_raw(tmp_path / "raw")
    out = tmp_path / "out"
    summaries = prepare_benchmark("ade847", root, out, splits=["val", "train"], progress=False)
    rule = lambda v: ADE847_MAP.get(v, 65535)  # noqa: E731

    # validation: 600x700 -> short side 512 = 512x597 (round(700 / 600 * 512)); nearest sampling at floor(i * in / out)
    label = prepared(out, "ade847", "val", "ADE_val_00000001", ".tif")
    assert label.dtype == np.uint16 and label.shape == (512, 597)
    rows = [int(i * 600 / 512) for i in range(512)]
    cols = [int(j * 700 / 597) for j in range(597)]
    np.testing.assert_array_equal(label, per_pixel(classes[np.ix_(rows, cols)], rule))
    assert {0, 255, 256, 846, 65535} <= set(np.unique(label).tolist())
    with Image.open(out / "ade847" / "images" / "val" / "ADE_val_00000001.jpg") as img:
        assert img.size == (597, 512) and img.format == "JPEG"

    # the real training sample: class index R // 10 * 256 + G of the official mask, no resize (short side 120)
    seg = read(REAL / "ADE_train_00016900_seg.png").astype(np.int64)
    real = prepared(out, "ade847", "train", "ADE_train_00016900", ".tif")
    np.testing.assert_array_equal(real, per_pixel(seg[..., 0] // 10 * 256 + seg[..., 1], rule))
    names = json.loads((out / "ade847" / "vocab.json").read_text())
    present = {names[i] for i in np.unique(real) if i != 65535}
    assert {"tree", "person, individual, someone, somebody, mortal, soul", "building, edifice"} <= present
    assert summary_of(summaries, "ade847").num_classes == 847


def test_ade847_without_index_file_lists_images_from_the_folders(tmp_path):
    root, _ = make_ade847_raw(tmp_path / "raw", with_index=False)
    with_index_root, _ = make_ade847_raw(tmp_path / "raw2", with_index=True)
    prepare_benchmark("ade847", root, tmp_path / "a", progress=False)
    prepare_benchmark("ade847", with_index_root, tmp_path / "b", progress=False)
    a = prepared(tmp_path / "a", "ade847", "val", "ADE_val_00000001", ".tif")
    b = prepared(tmp_path / "b", "ade847", "val", "ADE_val_00000001", ".tif")
    np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "a" / "ade847" / "labels" / "train").exists()  # val only by default


# ---------------------------------------------------------------------------------------------------- Pascal-Context
PC59_RAW = json.loads((VOCAB / "pc59_raw_ids.json").read_text())["raw_ids"]
PC_LABELS = np.array([[0, 1, 2, 9, 18], [458, 459, 300, 2, 0], [22, 22, 459, 1, 9]], dtype=np.uint16)


def pc_ids() -> tuple[str, str]:
    val = [line.strip() for line in (VOCAB / "pascalcontext_val.txt").read_text().splitlines() if line.strip()]
    train = next(f"2008_{i:06d}" for i in range(100000) if f"2008_{i:06d}" not in set(val))
    return val[0], train


def make_pascal_context_raw(raw: Path) -> Path:
    import scipy.io

    voc = raw / "VOCdevkit" / "VOC2010"
    val_id, train_id = pc_ids()
    for image_id, label in ((val_id, PC_LABELS), (train_id, PC_LABELS[::-1].copy())):
        write_jpg(voc / "JPEGImages" / f"{image_id}.jpg", *label.shape)
        (voc / "trainval").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(voc / "trainval" / f"{image_id}.mat", {"LabelMap": label})
    return voc


def test_pascal_context_459_from_trainval_mat(tmp_path):
    voc = make_pascal_context_raw(tmp_path / "raw")
    out = tmp_path / "out"
    summaries = prepare_benchmark("pc459", tmp_path / "raw", out, splits=["val", "train"], progress=False)
    val_id, train_id = pc_ids()
    rule = lambda v: 65535 if v == 0 else v - 1  # noqa: E731
    label = prepared(out, "pc459", "val", val_id, ".tif")
    assert label.dtype == np.uint16
    np.testing.assert_array_equal(label, per_pixel(PC_LABELS, rule))
    np.testing.assert_array_equal(prepared(out, "pc459", "train", train_id, ".tif"), per_pixel(PC_LABELS[::-1], rule))
    names = json.loads((out / "pc459" / "vocab.json").read_text())
    assert names[label[0, 2]] == "aeroplane" and names[label[1, 1]] == names[-1]
    assert summary_of(summaries, "pc459").images == 1 and (voc / "JPEGImages").is_dir()


def _pc59_rules():
    index = {raw_id: i - 1 for i, raw_id in enumerate(PC59_RAW) if i > 0}
    return (lambda v: index.get(v, 255)), (lambda v: index.get(v, 59))


def test_pascal_context_59_and_59b_from_mat(tmp_path):
    make_pascal_context_raw(tmp_path / "raw")
    out = tmp_path / "out"
    prepare_benchmark("pc59", tmp_path / "raw", out, progress=False)
    val_id, _ = pc_ids()
    pc59_rule, pc59b_rule = _pc59_rules()
    pc59 = prepared(out, "pc59", "val", val_id)
    np.testing.assert_array_equal(pc59, per_pixel(PC_LABELS, pc59_rule))
    np.testing.assert_array_equal(prepared(out, "pc59b", "val", val_id), per_pixel(PC_LABELS, pc59b_rule))
    names = json.loads((out / "pc59" / "vocab.json").read_text())
    assert names[pc59[0, 2]] == "aeroplane" and pc59[0, 1] == 255  # accordion (raw 1) is not among the 59
    assert json.loads((out / "pc59b" / "vocab.json").read_text()) == names + ["background"]


def test_pascal_context_59_from_merged_json_equals_mat(tmp_path):
    from pycocotools import mask as mask_utils

    voc = make_pascal_context_raw(tmp_path / "raw")
    val_id, train_id = pc_ids()
    images, annos = [], []
    for n, (image_id, label, phase) in enumerate(((val_id, PC_LABELS, "val"), (train_id, PC_LABELS[::-1], "train"))):
        images.append(
            {
                "image_id": n + 7,
                "file_name": f"{image_id}.jpg",
                "height": label.shape[0],
                "width": label.shape[1],
                "phase": phase,
            }
        )
        for category in np.unique(label):
            if category:
                rle = mask_utils.encode(np.asfortranarray((label == category).astype(np.uint8)))
                annos.append(
                    {
                        "image_id": n + 7,
                        "category_id": int(category),
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    }
                )
    (voc / "trainval_merged.json").write_text(json.dumps({"images": images, "annos_segmentation": annos}))
    prepare_benchmark(
        "pc59", tmp_path / "raw", tmp_path / "json", splits=["val", "train"], source="json", progress=False
    )
    prepare_benchmark("pc59", tmp_path / "raw", tmp_path / "mat", splits=["val", "train"], source="mat", progress=False)
    info = json.loads((tmp_path / "json" / "pc59" / "prepare_summary.json").read_text())
    assert info["splits"]["val"]["source"] == "trainval_merged.json"
    for target in ("pc59", "pc59b"):
        for split, image_id in (("val", val_id), ("train", train_id)):
            np.testing.assert_array_equal(
                prepared(tmp_path / "json", target, split, image_id),
                prepared(tmp_path / "mat", target, split, image_id),
            )


# ---------------------------------------------------------------------------------------------------- VOC
def make_voc_raw(raw: Path) -> Path:
    voc = raw / "VOCdevkit" / "VOC2012"
    for n in (294, 582):
        shutil.copy(
            REAL / f"voc_{n}_image.jpg",
            (voc / "JPEGImages").mkdir(parents=True, exist_ok=True) or voc / "JPEGImages" / f"2007_000{n}.jpg",
        )
        (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        shutil.copy(REAL / f"voc_{n}_label.png", voc / "SegmentationClass" / f"2007_000{n}.png")
    background_only = np.zeros((5, 6), np.uint8)
    background_only[0] = 255
    write_jpg(voc / "JPEGImages" / "2007_000001.jpg", 5, 6)
    write_png(voc / "SegmentationClass" / "2007_000001.png", background_only)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000294\n2007_000582\n2007_000001\n")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("")
    return voc


VOC20_RULE = lambda v: 255 if v in (0, 255) else v - 1  # noqa: E731
VOC20B_RULE = lambda v: 20 if v == 0 else (255 if v == 255 else v - 1)  # noqa: E731


def test_voc20_and_voc20b_from_real_samples(tmp_path):
    voc = make_voc_raw(tmp_path / "raw")
    out = tmp_path / "out"
    summaries = prepare_benchmark("voc20", tmp_path / "raw", out, progress=False)
    for n in (294, 582):
        raw_label = read(REAL / f"voc_{n}_label.png")  # palette PNG: read as indices 0..20, 255
        stem = f"2007_000{n}"
        np.testing.assert_array_equal(prepared(out, "voc20", "val", stem), per_pixel(raw_label, VOC20_RULE))
        np.testing.assert_array_equal(prepared(out, "voc20b", "val", stem), per_pixel(raw_label, VOC20B_RULE))
        # one image file, two benchmarks
        assert (out / "voc20b" / "images" / "val" / f"{stem}.jpg").read_bytes() == (
            voc / "JPEGImages" / f"{stem}.jpg"
        ).read_bytes()
    names = json.loads((out / "voc20" / "vocab.json").read_text())
    assert names[prepared(out, "voc20", "val", "2007_000582")[read(REAL / "voc_582_label.png") == 15][0]] == "person"
    # an image with background only: nothing to score in PAS-20 (left out, as officially), kept in PAS-20b
    assert not (out / "voc20" / "labels" / "val" / "2007_000001.png").exists()
    np.testing.assert_array_equal(prepared(out, "voc20b", "val", "2007_000001")[1:], 20)
    assert summary_of(summaries, "voc20").images == 2 and summary_of(summaries, "voc20").left_out == 1
    assert summary_of(summaries, "voc20b").images == 3
    assert json.loads((out / "voc20b" / "vocab.json").read_text())[:20] == names


def test_voc_prefers_segmentation_class_aug_and_uses_it_for_train(tmp_path):
    voc = make_voc_raw(tmp_path / "raw")
    aug = voc / "SegmentationClassAug"
    for stem in ("2007_000294", "2007_000582", "2007_000001"):
        write_png(aug / f"{stem}.png", read(voc / "SegmentationClass" / f"{stem}.png"))  # grey PNGs, as in the zip
    changed = read(aug / "2007_000294.png").copy()
    changed[:10] = 3
    write_png(aug / "2007_000294.png", changed)
    extra = np.array([[0, 5, 5], [255, 20, 0]], dtype=np.uint8)  # an SBD training image
    write_jpg(voc / "JPEGImages" / "2008_000010.jpg", 2, 3)
    write_png(aug / "2008_000010.png", extra)
    out = tmp_path / "out"
    prepare_benchmark("voc20", tmp_path / "raw", out, splits=["val", "train"], progress=False)
    np.testing.assert_array_equal(prepared(out, "voc20", "val", "2007_000294"), per_pixel(changed, VOC20_RULE))
    assert sorted(p.name for p in (out / "voc20" / "labels" / "train").iterdir()) == ["2008_000010.png"]
    np.testing.assert_array_equal(prepared(out, "voc20b", "train", "2008_000010"), per_pixel(extra, VOC20B_RULE))


def test_rgb_encoded_voc_labels_decode_to_class_indices():
    from ovseg_lab.data.prepare.voc import read_voc_label, voc_colormap

    for n in (294, 582):
        np.testing.assert_array_equal(read_voc_label(REAL / f"voc_{n}_target.png"), read(REAL / f"voc_{n}_label.png"))
    palette = voc_colormap()
    assert (
        palette[1].tolist() == [128, 0, 0]
        and palette[15].tolist() == [192, 128, 128]
        and palette[255].tolist() == [224, 224, 192]
    )


# ---------------------------------------------------------------------------------------------------- engine
def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_rerun_skips_finished_files_rebuilds_missing_ones_and_leaves_no_temporaries(tmp_path):
    make_ade150_raw(tmp_path / "raw")
    out = tmp_path / "out"
    prepare_benchmark("ade150", tmp_path / "raw", out, progress=False)
    label_dir = out / "ade150" / "labels" / "val"
    before = _files(label_dir)
    (label_dir / "ADE_val_00000002.png").unlink()
    (label_dir / ".ADE_val_00000001.png.abc.tmp.png").write_bytes(b"half")  # what a killed run could leave
    summaries = prepare_benchmark("ade150", tmp_path / "raw", out, progress=False)
    summary = summary_of(summaries, "ade150")
    assert (summary.kept, summary.written, summary.images) == (1, 1, 2)
    after = _files(label_dir)
    assert set(after) == {"ADE_val_00000001.png", "ADE_val_00000002.png"}
    assert after["ADE_val_00000001.png"] == before["ADE_val_00000001.png"]  # untouched
    # the statistics of kept files are read back: same summary as a fresh run
    fresh = summary_of(prepare_benchmark("ade150", tmp_path / "raw", tmp_path / "fresh", progress=False), "ade150")
    assert (summary.classes_seen, summary.ignored_fraction) == (fresh.classes_seen, fresh.ignored_fraction)
    forced = summary_of(prepare_benchmark("ade150", tmp_path / "raw", out, force=True, progress=False), "ade150")
    assert forced.written == 2


def test_worker_processes_give_the_same_result(tmp_path):
    make_ade847_raw(tmp_path / "raw")
    one = prepare_benchmark("ade847", tmp_path / "raw", tmp_path / "one", splits=["val", "train"], progress=False)
    two = prepare_benchmark(
        "ade847", tmp_path / "raw", tmp_path / "two", splits=["val", "train"], workers=2, progress=False
    )
    assert [s.line() for s in one] == [s.line() for s in two]
    for split, stem in (("val", "ADE_val_00000001"), ("train", "ADE_train_00016900")):
        np.testing.assert_array_equal(
            prepared(tmp_path / "one", "ade847", split, stem, ".tif"),
            prepared(tmp_path / "two", "ade847", split, stem, ".tif"),
        )


def test_bad_raw_data_is_reported_with_the_file_it_concerns(tmp_path):
    with pytest.raises(DataError, match="ADEChallengeData2016"):
        prepare_benchmark("ade150", tmp_path, tmp_path / "out", progress=False)
    root = make_ade150_raw(tmp_path / "raw")
    write_png(root / "annotations" / "validation" / "ADE_val_00000002.png", np.zeros((3, 3), np.uint8))  # wrong size
    with pytest.raises(
        DataError, match=r"ADE_val_00000002.jpg is 3x2 but its annotation .*ADE_val_00000002.png is 3x3"
    ):
        prepare_benchmark("ade150", tmp_path / "raw", tmp_path / "out", progress=False)
    (root / "annotations" / "validation" / "ADE_val_00000002.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="Cannot read label .*ADE_val_00000002.png"):
        prepare_benchmark("ade150", tmp_path / "raw", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="Unknown benchmark 'ade20k'"):
        make_preparer("ade20k")
    with pytest.raises(DataError, match="no split 'test'"):
        prepare_benchmark("ade150", tmp_path / "raw", tmp_path / "out", splits=["test"], progress=False)
    assert not list((tmp_path / "out").rglob(".*.tmp*"))


def test_command_line_prepares_and_explains_failures(tmp_path):
    make_voc_raw(tmp_path / "raw")
    script = [sys.executable, "scripts/prepare_datasets.py"]
    env = dict(os.environ, OVSEG_DATA_DIR=str(tmp_path / "unused"))
    proc = subprocess.run(
        [
            *script,
            "voc20",
            "--raw",
            str(tmp_path / "raw"),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "2",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "voc20b" in proc.stdout and "21/59 classes seen" not in proc.stdout
    assert "data/eval=[voc20,voc20b]" in proc.stdout
    assert (tmp_path / "out" / "voc20b" / "labels" / "val" / "2007_000001.png").is_file()
    proc = subprocess.run(
        [*script, "pc459", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("ERROR:") and "trainval" in proc.stderr


def test_prepared_benchmark_is_read_by_the_data_layer(tmp_path, compose_cfg):
    from omegaconf import OmegaConf

    from ovseg_lab.data.benchmark import BenchmarkSpec, SegmentationFolder

    make_ade847_raw(tmp_path / "raw")
    prepare_benchmark("ade847", tmp_path / "raw", tmp_path / "data", progress=False)
    cfg = compose_cfg("eval", ["data/eval=[ade847]", f"paths.data_dir={tmp_path / 'data'}"])
    spec = BenchmarkSpec.from_config("ade847", OmegaConf.to_container(cfg.data.eval.ade847, resolve=True))
    assert spec.missing() is None and spec.num_eval_classes == 847 and spec.ignore_index == 65535
    item = SegmentationFolder(spec)[0]
    assert item["label"].shape == (512, 597) and item["image"].shape == (3, 512, 597)
    assert {256, 65535} <= set(item["label"].unique().tolist())


def test_ade847_image_resize_matches_half_pixel_bilinear_and_nearest_sampling():
    import torch
    import torch.nn.functional as F

    from ovseg_lab.data.prepare.ade import resize_bilinear, resize_nearest, short_side_resize_shape

    assert short_side_resize_shape(600, 700) == (512, 597)
    assert short_side_resize_shape(1650, 2200) == (512, 683)
    assert short_side_resize_shape(2200, 1650) == (683, 512)
    assert short_side_resize_shape(512, 4000) is None and short_side_resize_shape(300, 200) is None
    image = np.random.default_rng(0).integers(0, 256, (61, 83, 3), dtype=np.uint8)
    ours = resize_bilinear(image, (40, 52)).astype(int)
    reference = (
        F.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None].double(),
            size=(40, 52),
            mode="bilinear",
            align_corners=False,
            antialias=False,
        )[0]
        .permute(1, 2, 0)
        .round()
        .numpy()
    )
    assert np.abs(ours - reference).max() <= 1
    label = np.arange(7 * 9).reshape(7, 9)
    np.testing.assert_array_equal(resize_nearest(label, (3, 4)), label[np.ix_([0, 2, 4], [0, 2, 4, 6])])


def _benchmark_configs():
    import yaml

    conf = ROOT / "conf" / "data"
    for path in sorted((conf / "eval").glob("*.yaml")):
        name, node = next(iter(yaml.safe_load(path.read_text()).items()))
        if name != "defaults":  # a collection of other options (data/eval=mess)
            yield path, name, node
    for path in sorted((conf / "train").glob("*.yaml")):
        node = yaml.safe_load(path.read_text())
        yield path, node["name"], node


def test_benchmark_configs_agree_with_what_the_prepare_script_writes():
    from ovseg_lab.data.prepare import ALIASES, PREPARERS
    from ovseg_lab.vocab import load_vocabulary

    checked = 0
    for path, name, node in _benchmark_configs():
        if name.startswith("toy") or "mess" in node:  # generated; MESS's own scripts prepare it (tests/test_mess.py)
            continue
        command = node["prepare"].split()
        prepare_name = command[command.index("scripts/prepare_datasets.py") + 1]
        # A benchmark may read another's prepared folder (voc21 -> voc20b, pc60 -> pc59b): its root names it.
        folder = node["root"].rsplit("/", 1)[-1]
        assert folder in PREPARERS.get(ALIASES.get(prepare_name, prepare_name), ("", "", ()))[2], path
        (target,) = [t for t in make_preparer(prepare_name).targets if t.name == folder]
        assert node["ignore_index"] == target.ignore_index, path
        background = node.get("background_from")
        if node["vocabulary"]:  # the names of the labelled classes must agree; background names may differ
            known = slice(background)
            assert load_vocabulary(node["vocabulary"]).classes[known] == target.classes[known], path
        if background is not None:  # names from background_from on stand for background
            assert 0 < background < target.num_classes, path
        checked += 1
    assert checked >= 14


# ---------------------------------------------------------------------------------------------------- Cityscapes
CITYSCAPES_RULE = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12}
CITYSCAPES_RULE |= {26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # cityscapesscripts labels.py trainId


def test_cityscapes19_maps_label_ids_to_train_ids(tmp_path):
    """A fake leftImg8bit + gtFine archive (two cities, every label id 0..33 and -1 as 255): train ids of the 19
    evaluated classes, everything else ignored; PNG images kept as they are."""
    raw = tmp_path / "raw"
    label_ids = np.arange(36, dtype=np.uint8).reshape(4, 9)
    label_ids[-1, -1] = 255  # license plate (-1) is stored as 255
    stems = []
    for city, index in (("frankfurt", 1), ("lindau", 2)):
        stem = f"{city}_000000_{index:06d}"
        stems.append(stem)
        write_png(
            raw / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", np.full((4, 9, 3), index * 40, np.uint8)
        )
        write_png(raw / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", label_ids)
    out = tmp_path / "out"
    summaries = prepare_benchmark("cityscapes", raw, out, progress=False)
    for stem in stems:
        expected = per_pixel(label_ids, lambda v: CITYSCAPES_RULE.get(v, 255))
        np.testing.assert_array_equal(prepared(out, "cityscapes19", "val", stem), expected)
        assert (out / "cityscapes19" / "images" / "val" / f"{stem}.png").is_file()
    names = json.loads((out / "cityscapes19" / "vocab.json").read_text())
    assert len(names) == 19 and names[0] == "road" and names[13] == "car" and names[18] == "bicycle"
    assert summary_of(summaries, "cityscapes19").images == 2


def test_cityscapes_without_labels_names_the_missing_file(tmp_path):
    raw = tmp_path / "raw"
    write_png(
        raw / "leftImg8bit" / "val" / "bonn" / "bonn_000000_000001_leftImg8bit.png", np.zeros((2, 2, 3), np.uint8)
    )
    with pytest.raises(DataError, match="bonn_000000_000001_gtFine_labelIds.png"):
        prepare_benchmark("cityscapes", raw, tmp_path / "out", progress=False)
