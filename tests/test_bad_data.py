"""Corrupt and malformed data: unreadable samples are skipped, counted and reported; malformed data (ids outside
the vocabulary, a vocabulary of the wrong length, a missing split, a size mismatch) is an error naming the file."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_lab.data.bad_samples import BadSampleLog
from ovseg_lab.data.benchmark import BenchmarkSpec, SegmentationFolder
from ovseg_lab.data.datamodule import SegmentationDataModule
from ovseg_lab.errors import DataError, SetupError
from tests.conftest import ROOT, small_toy_overrides


def _damaged_toy(toy_data_dir: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the small toy benchmark with one truncated JPEG training image and one garbage training label."""
    data_dir = tmp_path / "data"
    shutil.copytree(toy_data_dir / "toy", data_dir / "toy")
    images = data_dir / "toy" / "toy_seen" / "images" / "train"
    labels = data_dir / "toy" / "toy_seen" / "labels" / "train"
    stems = sorted(p.stem for p in images.glob("*.png"))
    # stem 3: a JPEG cut in the middle of its entropy-coded data
    png = images / f"{stems[3]}.png"
    buffer = io.BytesIO()
    Image.open(png).convert("RGB").save(buffer, format="JPEG", quality=95)
    png.unlink()
    jpg = images / f"{stems[3]}.jpg"
    jpg.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    # stem 10: a label file overwritten with garbage
    label = labels / f"{stems[10]}.png"
    label.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    return data_dir, [str(jpg), str(label)]


def _toy_datamodule(data_dir: Path, **kwargs) -> SegmentationDataModule:
    root = data_dir / "toy" / "toy_seen"
    return SegmentationDataModule(
        train={"name": "toy_seen", "root": str(root), "split": "train"},
        eval={"toy_seen": {"root": str(root), "split": "val"}},
        batch_size=8,
        num_workers=0,
        transform={"crop_size": 32, "short_side": None, "color_jitter": False},
        **kwargs,
    )


def test_folder_epoch_skips_and_reports_exactly_the_corrupt_files(toy_data_dir, tmp_path):
    data_dir, bad = _damaged_toy(toy_data_dir, tmp_path)
    datamodule = _toy_datamodule(data_dir, max_bad_fraction=0.1)
    datamodule.setup("fit")
    good = 0
    for batch in datamodule.train_dataloader():
        batch = datamodule.on_before_batch_transfer(batch, 0)
        assert "bad" not in batch and batch["image"].shape[1:] == (3, 32, 32)
        good += len(batch["stem"])
    report = datamodule.bad_samples.end_period("training epoch 0")
    assert sorted(datamodule.bad_samples.files) == sorted(bad)
    assert good == 64 - 2  # 64 images, batch 8, drop_last: every readable sample was trained on
    assert "skipped 2 unreadable sample(s) of 64" in report and Path(bad[0]).name in report
    assert "truncated" in datamodule.bad_samples.files[bad[0]]


def test_a_flood_of_corrupt_files_is_an_error(toy_data_dir, tmp_path):
    data_dir, bad = _damaged_toy(toy_data_dir, tmp_path)
    datamodule = _toy_datamodule(data_dir, max_bad_samples=1)
    datamodule.setup("fit")
    with pytest.raises(DataError, match="Too many corrupt samples.*max_bad_samples=1"):
        for batch in datamodule.train_dataloader():
            datamodule.on_before_batch_transfer(batch, 0)
    log = BadSampleLog(max_bad_samples=None, max_bad_fraction=0.01)
    log.record(["a.jpg", "b.jpg"], good=98)
    with pytest.raises(DataError, match=r"2 of 100 samples .*2\.0%.*a\.jpg"):
        log.end_period("training epoch 3")


def test_webdataset_shard_with_corrupt_samples_completes_an_epoch(tmp_path):
    import webdataset as wds

    from ovseg_lab.data.captions import CaptionDataModule

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    shard = tmp_path / "shard-000000.tar"
    meta = json.dumps({"entities": ["dog"], "mentions": []}).encode()
    with wds.TarWriter(str(shard)) as writer:
        writer.write({"__key__": "good0", "png": png(1), "txt": "a dog", "json": meta})
        writer.write({"__key__": "broken_image", "png": png(2)[:40], "txt": "a dog", "json": meta})
        writer.write({"__key__": "good1", "png": png(3), "txt": "a dog", "json": meta})
        writer.write({"__key__": "broken_json", "png": png(4), "txt": "a dog", "json": b"{not json"})
        writer.write({"__key__": "good2", "png": png(5), "txt": "a dog", "json": meta})
        writer.write({"__key__": "good3", "png": png(6), "txt": "a dog", "json": meta})
    datamodule = CaptionDataModule(
        shards=[str(shard)],
        steps_per_epoch=2,
        batch_size=2,
        num_workers=0,
        image_size=16,
        scale=(1.0, 1.0),
        shuffle_buffer=1,
        seed=0,
        max_bad_fraction=0.5,
    )
    batches = [datamodule.on_before_batch_transfer(b, 0) for b in datamodule.train_dataloader()]
    assert [len(b["key"]) for b in batches] == [2, 2]
    assert sorted(k for b in batches for k in b["key"]) == ["good0", "good1", "good2", "good3"]
    report = datamodule.bad_samples.end_period("training epoch 0")
    assert sorted(datamodule.bad_samples.files) == [f"{shard}:broken_image", f"{shard}:broken_json"]
    assert "skipped 2 unreadable sample(s) of 6" in report


@pytest.mark.slow
def test_training_run_skips_corrupt_files_and_lists_them_in_metrics(toy_data_dir, tmp_path):
    """End to end through Lightning (DataModule hook, epoch report, metrics.json)."""
    data_dir, bad = _damaged_toy(toy_data_dir, tmp_path)
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "experiment=quickstart",
        "model=costvolume",
        "logger=none",
        "trainer.max_steps=9",
        "trainer.val_check_interval=1000",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.max_bad_fraction=0.1",
        f"hydra.run.dir={run_dir}",
        *small_toy_overrides(data_dir),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["bad_samples"]["count"] == 2 and sorted(metrics["bad_samples"]["files"]) == sorted(bad)
    assert "skipped 2 unreadable sample(s) of 64" in proc.stdout + proc.stderr


def test_malformed_data_is_an_error_naming_the_file(toy_data_dir, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(toy_data_dir / "toy" / "toy_seen", data_dir / "toy_seen")
    root = data_dir / "toy_seen"
    spec = BenchmarkSpec.from_config("toy_seen", {"root": str(root), "split": "val"})
    labels = sorted((root / "labels" / "val").glob("*.png"))
    # a label id outside the vocabulary
    array = np.array(Image.open(labels[0]))
    array[0, 0] = 200
    Image.fromarray(array).save(labels[0])
    with pytest.raises(DataError, match=rf"{labels[0]}.*\[200\].*36-class vocabulary.*vocab.json"):
        SegmentationFolder(spec)[0]
    # an image and label of different sizes
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(labels[1])
    with pytest.raises(DataError, match=rf"is 64x64 but its label {labels[1]} is 12x10"):
        SegmentationFolder(spec)[1]
    # a vocabulary file of the wrong length (num_classes stated in the config)
    spec = BenchmarkSpec.from_config("toy_seen", {"root": str(root), "split": "val", "num_classes": 40})
    with pytest.raises(DataError, match=rf"{root / 'vocab.json'} has 36 classes but 40 were expected"):
        spec.load_vocabulary()
    # a missing split
    spec = BenchmarkSpec.from_config("toy_seen", {"root": str(root), "split": "test", "prepare": "make toy"})
    with pytest.raises(
        DataError, match=rf"test split not found at {root / 'images' / 'test'} \(prepare it with: make toy\)"
    ):
        SegmentationFolder(spec)
    assert issubclass(DataError, SetupError)
