"""prepare_datasets.py interrupted: a clear message, no temporaries, the split marked incomplete until a rerun
finishes it, and evaluation refusing the incomplete split with the command that finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT


def _ade150_raw(raw: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for kind in ("images", "annotations"):
        (raw / "ADEChallengeData2016" / kind / "validation").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        stem = f"ADE_val_{i + 1:08d}"
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(
            raw / "ADEChallengeData2016" / "images" / "validation" / f"{stem}.jpg"
        )
        Image.fromarray(rng.integers(0, 151, (96, 128), dtype=np.uint8)).save(
            raw / "ADEChallengeData2016" / "annotations" / "validation" / f"{stem}.png"
        )


def _spec(out: Path):
    from ovseg_lab.data.benchmark import BenchmarkSpec

    return BenchmarkSpec(
        name="ade150", root=str(out / "ade150"), split="val", prepare="python scripts/prepare_datasets.py ade150 ..."
    )


def test_an_interrupted_split_is_marked_incomplete_and_refused_until_finished(tmp_path, monkeypatch):
    import ovseg_lab.data.prepare.core as core
    from ovseg_lab.data.prepare import prepare_benchmark

    _ade150_raw(tmp_path / "raw", 6)
    out = tmp_path / "out"
    real, calls = core.process_sample, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the split
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "process_sample", flaky)
    with pytest.raises(core.PrepareInterrupted, match="rerun the same command to resume"):
        prepare_benchmark(
            "ade150", tmp_path / "raw", out, progress=False, command="python scripts/prepare_datasets.py ade150 --raw R"
        )
    summary = json.loads((out / "ade150" / "prepare_summary.json").read_text())
    assert summary["splits"]["val"] == {
        "complete": False,
        "command": "python scripts/prepare_datasets.py ade150 --raw R",
    }
    problem = _spec(out).missing()
    assert "incomplete" in problem and "finish it with: python scripts/prepare_datasets.py ade150 --raw R" in problem

    monkeypatch.setattr(core, "process_sample", real)
    prepare_benchmark("ade150", tmp_path / "raw", out, progress=False)  # the rerun
    assert json.loads((out / "ade150" / "prepare_summary.json").read_text())["splits"]["val"]["complete"] is True
    assert _spec(out).missing() is None
    assert len(list((out / "ade150" / "labels" / "val").glob("*.png"))) == 6


def test_ctrl_c_with_two_workers_leaves_no_temporaries_and_says_how_to_resume(tmp_path):
    _ade150_raw(tmp_path / "raw", 400)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "scripts/prepare_datasets.py",
        "ade150",
        "--raw",
        str(tmp_path / "raw"),
        "--out",
        str(out),
        "--workers",
        "2",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    labels = out / "ade150" / "labels" / "val"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (labels.is_dir() and any(labels.glob("*.png"))):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "rerun the same command to resume" in stderr and "ade150 val is marked incomplete" in stderr
    assert "Traceback" not in stderr
    assert not [p.name for p in out.rglob(".*tmp*")], "temporaries left behind"
    for label in labels.glob("*.png"):  # every file there decodes
        Image.open(label).load()
    assert json.loads((out / "ade150" / "prepare_summary.json").read_text())["splits"]["val"]["complete"] is False
