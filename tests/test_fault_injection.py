"""Issue 37's fault-injection suite (``make test-slow``): SIGKILL and SIGINT at seeded random moments, then the
rerun / resume a user would type, compared with an uninterrupted run: weights, metrics.json, CSV rows, output
files, no temporary files or locks left, no traceback.

Each moment is drawn from ``random.Random(SEED)``: which checkpoint (training) or how far into the run (eval,
predict, convert) the signal waits for, plus a delay, so a kill lands in a checkpoint save, between saves, in an
evaluation during training or in the final evaluation, and a failure replays with the same seed. Tiny toy configs
(the small toy set, the cost-volume quickstart, 12 steps): the suite stays a few minutes on two cores.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, small_toy_overrides
from tests.test_records import _snapshot

pytestmark = pytest.mark.slow

SEED = 37
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
KILLS = []  # (entry point, signal, moment): printed at the end of each test, the suite's count of kills


def _train(run: Path, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "experiment=quickstart",
        "model=costvolume",
        "logger=csv",
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        f"hydra.run.dir={run}",
        *small_toy_overrides(data),
        *extra,
    ]


def _finish(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # not there yet, or being replaced this instant
        return None


def _interrupt(cmd: list[str], sig: int, delay: float, what: str, ready=None) -> str:
    """Start ``cmd``, wait until ``ready()`` (if given; or the process ends), sleep ``delay`` s, send ``sig``; its
    stderr."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while ready is not None and proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.05)
    end = time.time() + delay
    while proc.poll() is None and time.time() < end:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    KILLS.append((what, signal.Signals(sig).name, f"{delay:.2f} s after the moment", proc.returncode))
    assert "Traceback" not in err, err[-3000:]
    return err


def _no_leftovers(folder: Path) -> None:
    """No temporary file, no lock: checked once the rerun / resume is done (a SIGKILLed process leaves its lock, and
    a temporary when the kill lands in a write; the next run on the folder takes the lock over and removes them)."""
    left = [p for p in folder.rglob("*") if ".tmp" in p.name or p.name == ".lock"]
    assert not left, f"temporary files or locks left: {left}"


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_training_killed_three_times_then_resumed_matches_the_uninterrupted_run(toy_data_dir, tmp_path):
    """SIGKILL after the first checkpoint, SIGINT after the second, SIGKILL in the final evaluation (after the step-12
    checkpoint), each followed by ``ckpt_path=last``: the records equal an uninterrupted run's (tolerance 0)."""
    rng = random.Random(SEED)
    reference, run = tmp_path / "reference", tmp_path / "run"
    _finish(_train(reference, toy_data_dir))
    last = run / "checkpoints" / "last.ckpt"
    plan = [(signal.SIGKILL, 4, rng.uniform(0, 1.0)), (signal.SIGINT, 8, rng.uniform(0, 1.0))]
    plan.append((signal.SIGKILL, 12, rng.uniform(0, 0.5)))  # the final evaluation runs after the step-12 save
    resume: list[str] = []
    for sig, step, delay in plan:
        _interrupt(
            _train(run, toy_data_dir, *resume),
            sig,
            delay,
            f"train (checkpoint >= step {step})",
            ready=lambda step=step: (_checkpoint_step(last) or 0) >= step,
        )
        if last.is_file():
            resume = ["ckpt_path=last"]
    _finish(_train(run, toy_data_dir, *resume))

    ours, theirs = _weights(last), _weights(reference / "checkpoints" / "last.ckpt")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    assert (run / "csv" / "metrics.csv").read_text() == (reference / "csv" / "metrics.csv").read_text()
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))
    _no_leftovers(run)
    print("kills:", len(KILLS), KILLS)


def test_eval_and_predict_interrupted_then_rerun_match_an_uninterrupted_run(quickstart_run, toy_data_dir, tmp_path):
    """eval.py and predict.py SIGKILLed / SIGINTed at seeded moments, then rerun as the user would (eval: the same
    command, which writes a new folder of its own; predict: the same --output, same classes): metrics.json and
    every output file equal an uninterrupted run's."""
    from PIL import Image

    rng = random.Random(SEED + 1)
    ckpt = quickstart_run / "checkpoints" / "last.ckpt"

    def evaluate_into(folder: Path) -> list[str]:
        return [
            sys.executable,
            "eval.py",
            "experiment=quickstart",
            "model=costvolume",
            "logger=csv",
            f"ckpt={ckpt}",
            f"hydra.run.dir={folder}",
            *small_toy_overrides(toy_data_dir),
        ]

    _finish(evaluate_into(tmp_path / "eval_reference"))
    reference_metrics = json.loads((tmp_path / "eval_reference" / "metrics.json").read_text())
    for index, sig in enumerate((signal.SIGKILL, signal.SIGINT)):
        killed = tmp_path / f"eval_killed_{index}"
        moment = rng.uniform(2.0, 12.0)
        _interrupt(evaluate_into(killed), sig, moment, "eval")
        if sig == signal.SIGINT:  # a killed eval's folder is never reused (the rerun writes its own)
            _no_leftovers(killed)
        again = tmp_path / f"eval_again_{index}"
        _finish(evaluate_into(again))
        assert json.loads((again / "metrics.json").read_text()) == reference_metrics

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (48, 40), (60 * i, 200 - 40 * i, 90)).save(images / f"img_{i}.png")
    predict = [sys.executable, "scripts/predict.py", "--checkpoint", str(ckpt), "--image", str(images)]
    predict += ["--classes", "red circle,sky,grass"]
    _finish([*predict, "--output", str(tmp_path / "pred_reference")])
    reference_files = _snapshot(tmp_path / "pred_reference")
    for index, sig in enumerate((signal.SIGKILL, signal.SIGINT)):
        out = tmp_path / f"pred_{index}"
        moment = rng.uniform(1.0, 8.0)
        _interrupt([*predict, "--output", str(out)], sig, moment, "predict")
        _finish([*predict, "--output", str(out)])
        _no_leftovers(out)
        assert _snapshot(out) == reference_files
    print("kills:", len(KILLS), KILLS)


def _assert_same(got, expected, where: str = "checkpoint") -> None:
    """Equal to the bit: tensors with torch.equal, containers key by key, anything else with ==."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            _assert_same(got[key], expected[key], f"{where}[{key!r}]")
    else:
        assert got == expected, where


def test_convert_killed_then_rerun_writes_the_same_checkpoint(tmp_path):
    """convert_checkpoint.py SIGKILLed at a seeded moment: no temporary file is left once it is rerun
    (``--overwrite``, in case the kill came after the write), and the rerun writes the uninterrupted tensors."""
    rng = random.Random(SEED + 2)
    from tests.test_convert import openai_layout_clip

    source = tmp_path / "ovseg_clip.pth"
    reference = openai_layout_clip(mask_prompt_depth=3, context_length=32)
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, source)
    convert = [sys.executable, "scripts/convert_checkpoint.py", "--format", "ovseg_clip", "--input", str(source)]
    model = ["--", "experiment=quickstart", "model=ovseg", "model.net.maskformer_weights=null"]
    model.append("model.net.clip_weights=null")
    _finish([*convert, "--output", str(tmp_path / "conv_reference" / "clip.pt"), *model])
    expected = torch.load(tmp_path / "conv_reference" / "clip.pt", weights_only=True)
    out = tmp_path / "conv" / "clip.pt"
    moment = rng.uniform(1.0, 6.0)
    _interrupt([*convert, "--output", str(out), *model], signal.SIGKILL, moment, "convert")
    _finish([*convert, "--output", str(out), "--overwrite", *model])
    _no_leftovers(out.parent)
    _assert_same(torch.load(out, weights_only=True), expected)
    print("kills:", len(KILLS), KILLS)
