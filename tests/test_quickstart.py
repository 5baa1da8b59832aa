"""The quickstart experiment end to end at reduced size: train, evaluate, metrics.json, resolved config."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from ovseg_lab.metrics import SegmentationMetric
from tests.conftest import ROOT, small_toy_overrides


def test_quickstart_reduced_runs_the_catseg_chain(toy_data_dir, tmp_path):
    """The default quickstart (CAT-Seg) at reduced size: the CLIP pre-training stage runs first, the CAT-Seg run
    starts from its weights, writes the run files, and eval.py scores its checkpoint without the stage folder
    (the checkpoint carries every weight)."""
    run_dir = tmp_path / "qs"
    cmd = [
        sys.executable,
        "train.py",
        "experiment=quickstart",
        "logger=csv",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "pipeline.params.pretrain_steps=4",
        f"hydra.run.dir={run_dir}",
        *small_toy_overrides(toy_data_dir),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"toy_seen", "toy_unseen", "toy_large"}
    for scores in metrics.values():
        assert 0.0 <= scores["mIoU"] <= 100.0
        assert len(scores["per_class_iou"]) == scores["num_classes"]
        assert scores["convention"] == "detectron2"
    assert metrics["toy_large"]["num_classes"] == 72
    resolved = (run_dir / "config_resolved.yaml").read_text()
    assert "${" not in resolved and "toy_seen" in resolved and "ovseg_lab.models.catseg.CATSeg" in resolved
    assert "toy_unseen" in proc.stdout and "mIoU" in proc.stdout  # the printed table
    # the chance figures are computed from the split's own labels, with the run's metric (maths: test_metrics.py)
    assert "random" in proc.stdout and "present" in proc.stdout
    for split in ("toy_seen", "toy_large"):
        folder = toy_data_dir / "toy" / split / "labels" / "val"
        labels = torch.from_numpy(np.stack([np.array(Image.open(f)) for f in sorted(folder.glob("*.png"))]))
        reference = SegmentationMetric(metrics[split]["num_classes"])
        reference.update(labels, labels)
        for key in ("chance_uniform_mIoU", "chance_present_classes_mIoU"):
            assert math.isclose(metrics[split][key], reference.compute()[key], rel_tol=1e-9), (split, key)
    assert metrics["toy_seen"]["chance_present_classes_mIoU"] > 3 * metrics["toy_seen"]["chance_uniform_mIoU"]
    assert (run_dir / "csv" / "metrics.csv").is_file()

    (stage,) = (run_dir / "stages").glob("clip_pretrain-*")
    assert json.loads((stage / "stage_done.json").read_text())["stage"] == "clip_pretrain"
    assert f"weights: {stage / 'clip_adapted.pt'}" in resolved
    # the fine-tuning started from the pre-trained towers: its text embedding table (frozen under
    # finetune=full) is the pre-trained one, not a fresh random draw
    pretrained = torch.load(stage / "clip_adapted.pt", weights_only=True)["model.token_embedding.weight"]
    tuned = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(tuned["net.clip.model.token_embedding.weight"], pretrained, rtol=0, atol=0)

    eval_dir = tmp_path / "ev"
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "experiment=quickstart",
            "logger=csv",
            *small_toy_overrides(toy_data_dir),
            "data/eval=[toy_seen]",
            f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"hydra.run.dir={eval_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((eval_dir / "metrics.json").read_text())["toy_seen"]
    assert math.isclose(evaluated["mIoU"], metrics["toy_seen"]["mIoU"], abs_tol=1e-6)


def test_eval_reproduces_training_metrics_from_checkpoint(quickstart_run, toy_data_dir, tmp_path):
    eval_dir = tmp_path / "ev"
    evaluate = [
        sys.executable,
        "eval.py",
        "experiment=quickstart",
        "model=costvolume",
        "logger=csv",
        *small_toy_overrides(toy_data_dir),
        "data/eval=[toy_seen,toy_unseen]",
        f"ckpt={quickstart_run / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={eval_dir}",
    ]
    proc = subprocess.run(evaluate, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((quickstart_run / "metrics.json").read_text())
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    assert set(evaluated) == {"toy_seen", "toy_unseen"}
    for name in evaluated:
        assert math.isclose(evaluated[name]["mIoU"], trained[name]["mIoU"], abs_tol=1e-6)
        assert evaluated[name].keys() == trained[name].keys()
