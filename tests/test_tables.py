"""make_table: rows from sweep jobs, paper numbers beside ours, failed and missing jobs marked."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import ROOT


def _job(root, num, overrides, metrics=None, error=None):
    folder = root / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (folder / "error.txt").write_text(error)


def _toy_metrics(seen, unseen, large):
    return {name: {"mIoU": v} for name, v in (("toy_seen", seen), ("toy_unseen", unseen), ("toy_large", large))}


def test_make_table_lays_out_rows_and_marks_failures(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"overrides": {"task": ["experiment=catseg_table6_toy"]}}})
    )
    _job(sweep, 0, ["finetune=freeze", "experiment=catseg_table6_toy"], _toy_metrics(10.0, 5.0, 2.0))
    _job(sweep, 1, ["finetune=qv", "experiment=catseg_table6_toy"], _toy_metrics(40.0, 20.5, 11.25))
    _job(sweep, 2, ["finetune=full", "experiment=catseg_table6_toy"], error="RuntimeError: out of memory\n")
    proc = subprocess.run(
        [sys.executable, "scripts/make_table.py", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| row"))
    assert "A-847 (toy: toy_large)" in header and header.count("|") == 8  # nine rows x six columns
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| row")]
    assert len(rows) == 9
    qv = next(r for r in rows if r.startswith("| QV (both, ours)"))
    assert "11.2 / 16.0" in qv and "40.0 / 97.0" in qv and "20.5 / 37.9" in qv
    freeze = next(r for r in rows if r.startswith("| Freeze"))
    assert "2.0 / 10.4" in freeze
    assert "[FAILED]" in next(r for r in rows if r.startswith("| Full fine-tuning"))
    assert "missing / 15.7" in next(r for r in rows if r.startswith("| Attention"))
    assert "out of memory" in proc.stdout
    for fmt in ("md", "tex", "csv"):
        assert (sweep / f"table.{fmt}").read_text()


def test_make_table_without_a_known_table_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/make_table.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--table" in proc.stderr and "Traceback" not in proc.stderr


def test_one_sweep_fills_two_fold_tables_one_job_per_cell(tmp_path):
    """LSeg's fold sweep: each job is one (dataset, fold, encoder); a row gathers its four fold jobs."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {"overrides": {"task": ["experiment=lseg_folds"]}},
                "paper_tables": ["lseg_pascal5i", "lseg_coco20i"],
            }
        )
    )
    num = 0
    for data in ("pascal5i", "coco20i"):
        for fold in range(4):
            overrides = [f"data={data}", f"data.fold={fold}", "model.net.encoder.name=resnet101"]
            if (data, fold) == ("coco20i", 3):
                _job(sweep, num, overrides, error="RuntimeError: boom\n")
            else:
                _job(
                    sweep,
                    num,
                    overrides,
                    {f"{data}_fold{fold}": {"mIoU": 10.0 * fold + (1 if data == "coco20i" else 0)}},
                )
            num += 1
    proc = subprocess.run(
        [sys.executable, "scripts/make_table.py", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    pascal = (sweep / "table_lseg_pascal5i.md").read_text()
    coco = (sweep / "table_lseg_coco20i.md").read_text()
    resnet = next(line for line in pascal.splitlines() if line.startswith("| LSeg ResNet-101"))
    assert [c.split(" / ")[0].strip() for c in resnet.split("|")[2:6]] == ["0.0", "10.0", "20.0", "30.0"]
    resnet = next(line for line in coco.splitlines() if line.startswith("| LSeg ResNet-101"))
    assert "[FAILED]" in resnet and [c.split(" / ")[0].strip() for c in resnet.split("|")[2:6]] == [
        "1.0",
        "11.0",
        "21.0",
        "FAILED",
    ]
    assert "boom" in coco and "matches no row" not in pascal + coco
