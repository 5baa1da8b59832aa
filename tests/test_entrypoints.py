"""User-facing failures: paper defaults offline, bad checkpoints, missing data."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import ROOT


def _env(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OVSEG_DATA_DIR=str(tmp_path / "nodata"))
    return env


def test_paper_defaults_stop_fast_with_one_paragraph(tmp_path):
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path),
    )
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert elapsed < 60
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = err.removeprefix("ERROR: ").strip().splitlines()
    bullets = [line for line in lines if line.startswith("  - ")]
    assert len(bullets) >= 2 and len(lines) == len(bullets) + 2, "a heading, one bullet per missing thing, the hint"
    assert "coco_stuff" in err and "prepare_datasets.py coco_stuff" in err
    assert "experiment=quickstart" in err
    assert "ViT-B-16" in err  # the missing weights are named too


def test_eval_without_checkpoint_and_with_a_foreign_one(toy_data_dir, tmp_path):
    import torch

    from tests.conftest import small_toy_overrides

    common = [
        sys.executable,
        "eval.py",
        "experiment=quickstart",
        "logger=csv",
        *small_toy_overrides(toy_data_dir),
        f"hydra.run.dir={tmp_path / 'ev'}",
    ]
    proc = subprocess.run(common, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ckpt=" in proc.stderr and "Traceback" not in proc.stderr
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"net.something.weight": torch.zeros(3)}}, foreign)
    proc = subprocess.run(common + [f"ckpt={foreign}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not fit the configured model" in proc.stderr
    assert "Traceback" not in proc.stderr
