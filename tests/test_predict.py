"""scripts/predict.py: overlays with an honest legend, label maps equal to eval.py's predictions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import ROOT, small_toy_overrides


def test_predict_matches_eval_and_legend_lists_present_classes(quickstart_run, toy_data_dir, tmp_path):
    ckpt = quickstart_run / "checkpoints" / "last.ckpt"
    bench = toy_data_dir / "toy" / "toy_seen"
    image = sorted((bench / "images" / "val").iterdir())[3]
    out = tmp_path / "pred"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/predict.py",
            "--checkpoint",
            str(ckpt),
            "--image",
            str(image),
            "--vocab",
            str(bench / "vocab.json"),
            "--output",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = np.array(Image.open(out / f"{image.stem}_labels.png"))
    vocab = json.loads((bench / "vocab.json").read_text())
    present = {vocab[i] for i in np.unique(labels)}
    overlay = Image.open(out / f"{image.stem}_overlay.png")
    assert set(json.loads(overlay.text["legend"])) == present
    assert overlay.size[0] > labels.shape[1]  # image plus legend panel
    areas = json.loads((out / f"{image.stem}_areas.json").read_text())["areas"]
    assert set(areas) == present
    assert sum(a["pixels"] for a in areas.values()) == labels.size

    eval_dir = tmp_path / "ev"
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "experiment=quickstart",
            "model=costvolume",
            "logger=csv",
            "save_predictions=true",
            "data/eval=[toy_seen]",
            "data.eval_batch_size=1",
            f"ckpt={ckpt}",
            f"hydra.run.dir={eval_dir}",
            *small_toy_overrides(toy_data_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_eval = np.array(Image.open(eval_dir / "predictions" / "toy_seen" / f"{image.stem}.png"))
    np.testing.assert_array_equal(labels, from_eval)


def test_predict_refuses_bad_arguments(quickstart_run, tmp_path):
    ckpt = quickstart_run / "checkpoints" / "last.ckpt"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/predict.py",
            "--checkpoint",
            str(ckpt),
            "--image",
            str(tmp_path / "nope.jpg"),
            "--classes",
            "cat,dog",
            "--output",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr
