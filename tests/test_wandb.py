"""W&B offline: a run's metrics, per-class IoU table, mask overlays and resolved config land in the run files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, small_toy_overrides
from tests.wandb_records import config, history, records


def test_wandb_offline_run_holds_metrics_table_masks_and_config(toy_data_dir, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    cmd = [
        sys.executable,
        "train.py",
        "experiment=quickstart",
        "model=costvolume",
        "logger=default",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        f"hydra.run.dir={tmp_path}",
        *small_toy_overrides(toy_data_dir),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb sync" in proc.stdout + proc.stderr  # tells the user how to upload the offline run
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    metrics = json.loads((tmp_path / "metrics.json").read_text())

    rows = history(run_file)
    logged = {k: v for row in rows for k, v in row.items()}
    for bench, scores in metrics.items():
        assert logged[f"val/{bench}/mIoU"] == pytest.approx(scores["mIoU"], abs=1e-4)
        table = logged[f"val/{bench}/per_class_iou/path"]
        data = json.loads((run_dir / "files" / table).read_text())
        assert data["columns"] == ["class", "IoU"]
        per_class = {name: iou for name, iou in data["data"]}
        assert list(per_class) == list(scores["per_class_iou"])
        for name, iou in scores["per_class_iou"].items():
            assert per_class[name] == (None if iou != iou else pytest.approx(iou, abs=1e-4))
        masks = logged[f"val/{bench}/masks/all_masks"]
        assert len(masks) == logged[f"val/{bench}/masks/count"] > 0
        for image, mask in zip(logged[f"val/{bench}/masks/filenames"], masks):
            assert Image.open(run_dir / "files" / image).size == (64, 64)
            truth = np.array(Image.open(run_dir / "files" / mask["ground_truth"]["path"]))
            pred = np.array(Image.open(run_dir / "files" / mask["predictions"]["path"]))
            assert truth.shape == pred.shape == (64, 64)
            assert pred.max() < scores["num_classes"] and len(np.unique(truth)) > 1

    logged_config = config(run_file)
    assert logged_config["model"]["net"]["_target_"].endswith("CostVolumeBaseline")
    assert logged_config["tags"] == ["quickstart", "toy"]
    assert any(r.WhichOneof("record_type") == "exit" for r in records(run_file))  # wandb.finish() ran
