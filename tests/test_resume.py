"""Kill-and-resume: a toy run killed with SIGKILL mid-epoch and resumed with ckpt_path=last ends exactly where an
uninterrupted run with the same seed ends (same weights, same metrics.json; tolerance: exact equality on CPU)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, small_toy_overrides

# 40 training images, batch 8: 5 batches per epoch; checkpoints every 7 steps land mid-epoch (epoch 1 batch 2,
# epoch 2 batch 4, epoch 4 batch 1); 21 steps end on a checkpoint, so both runs' last.ckpt hold the final weights
STEPS, EVERY = 21, 7


def _command(data_dir: Path, run_dir: Path, *extra: str, logger: str = "csv") -> list[str]:
    return [
        sys.executable,
        "train.py",
        "experiment=quickstart",
        "model=costvolume",
        f"logger={logger}",
        f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=1000",
        f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
        "data.batch_size=8",
        "data.num_workers=1",
        "+data.train.max_images=40",
        f"hydra.run.dir={run_dir}",
        *small_toy_overrides(data_dir),
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(toy_data_dir, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    proc = subprocess.run(
        _command(toy_data_dir, reference), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the interrupted run: SIGKILL (no handler, no cleanup) as soon as the first step checkpoint exists
    last = resumed / "checkpoints" / "last.ckpt"
    victim = subprocess.Popen(
        _command(toy_data_dir, resumed, logger="default"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (resumed / "metrics.json").exists(), "the run finished before it could be killed"
    state = torch.load(last, map_location="cpu", weights_only=True)  # complete although the process was killed
    killed_at = state["global_step"]
    assert killed_at < STEPS and killed_at % EVERY == 0
    position = state["ovseg_resume"]
    assert 0 < position["batches_in_epoch"] < 5, position  # mid-epoch
    assert not list(last.parent.glob(".*.tmp")), "a temporary checkpoint file was left behind"

    proc = subprocess.run(
        _command(toy_data_dir, resumed, "ckpt_path=last", logger="default"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming from" in proc.stdout
    assert "taking over the lock" in proc.stderr  # the killed run's lock
    assert "not resumable" not in proc.stderr + proc.stdout  # Lightning's false warning (the position is restored)
    info = json.loads((resumed / "run_info.json").read_text())
    assert info["global_step"] == STEPS and info["resumed_from"].endswith("last.ckpt")

    # exact equality: same weights after the last step, same metrics
    final_ref = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    final_res = torch.load(last, map_location="cpu", weights_only=True)
    assert final_ref["global_step"] == final_res["global_step"] == STEPS
    for key, value in final_ref["state_dict"].items():
        assert torch.equal(value, final_res["state_dict"][key]), key
    expected = json.loads((reference / "metrics.json").read_text())
    got = json.loads((resumed / "metrics.json").read_text())
    assert got == expected

    # the records continue: the CSV holds every logged step exactly once (the rows of the uninterrupted run, the
    # curves before the kill kept), and the resumed run continued the same W&B run
    def rows(run: Path) -> list[tuple[str, ...]]:
        with open(run / "csv" / "metrics.csv", newline="") as handle:
            return sorted(
                tuple(sorted(k for k, v in row.items() if v not in ("", None))) + (row["step"],)
                for row in csv.DictReader(handle)
            )

    assert rows(resumed) == rows(reference)
    assert any(int(r[-1]) < killed_at for r in rows(resumed)), "the curves before the kill are kept"
    run_ids = {p.name.rsplit("-", 1)[-1] for p in (resumed / "wandb").glob("offline-run-*")}
    assert len(list((resumed / "wandb").glob("offline-run-*"))) == 2 and len(run_ids) == 1, run_ids
    assert run_ids == {(resumed / "wandb" / "run_id").read_text().strip()}


@pytest.mark.slow
def test_a_failing_sweep_job_does_not_stop_the_others(toy_data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=quickstart",
        "model=costvolume",
        "logger=none",
        "trainer.max_steps=2",
        "trainer.val_check_interval=1000",
        "data.batch_size=0,8",
        f"hydra.sweep.dir={sweep}",
        *small_toy_overrides(toy_data_dir),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    error = (sweep / "0" / "error.txt").read_text()
    assert "data.batch_size=0 must be >= 1" in error and not (sweep / "0" / "metrics.json").exists()
    assert (sweep / "1" / "metrics.json").is_file(), proc.stderr[-2000:]
    # the next job trained its two steps and scored every split
    assert json.loads((sweep / "1" / "run_info.json").read_text())["global_step"] == 2
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert set(metrics) == {"toy_seen", "toy_unseen", "toy_large"}
    assert all(0 <= m["mIoU"] <= 100 and m["num_pixels"] > 0 for m in metrics.values()), metrics
