"""trainer=ddp on 2 CPU processes (gloo) trains and evaluates like one process on the same data.

Two ranks of batch 4 see, step by step, the same 8 images as one process of batch 8 (the DataModule shards one
seeded permutation), DDP averages their gradients, and evaluation sums the ranks' confusion matrices over
disjoint image shards; with augmentation that draws no random numbers (64-pixel toy images = the crop, no flip),
the metrics must agree up to float summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, small_toy_overrides

COMMON = [
    "experiment=quickstart",
    "model=costvolume",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.max_steps=6",
    "trainer.val_check_interval=6",
    "data.transform.flip=false",
]


def _train(run_dir, toy_data_dir, *extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", *COMMON, *extra, f"hydra.run.dir={run_dir}", *small_toy_overrides(toy_data_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(toy_data_dir, tmp_path):
    single = _train(tmp_path / "single", toy_data_dir, "data.batch_size=8")
    ddp = _train(tmp_path / "ddp", toy_data_dir, "trainer=ddp", "trainer.devices=2", "data.batch_size=4")
    assert (tmp_path / "ddp" / "train_ddp_process_1.log").exists()  # a second rank really ran
    assert set(ddp) == set(single) == {"toy_seen", "toy_unseen", "toy_large"}
    for bench in single:
        assert ddp[bench]["num_pixels"] == single[bench]["num_pixels"]  # every image once, none padded
        assert ddp[bench]["mIoU"] == pytest.approx(single[bench]["mIoU"], abs=0.05)
        for name, iou in single[bench]["per_class_iou"].items():
            other = ddp[bench]["per_class_iou"][name]
            assert (iou != iou and other != other) or other == pytest.approx(iou, abs=0.5), (bench, name)


def test_ddp_refuses_a_local_multirun(toy_data_dir, tmp_path):
    """Lightning starts DDP ranks by re-running sys.argv: under a local -m sweep every rank would run the sweep."""
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        *COMMON,
        "trainer=ddp",
        f"hydra.sweep.dir={tmp_path}",
        *small_toy_overrides(toy_data_dir),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "hydra/launcher=slurm" in proc.stderr
    assert not list(tmp_path.glob("*/metrics.json")) and not list(tmp_path.glob("*/checkpoints"))  # nothing trained
