"""Nothing a user runs may destroy a record: eval's own folder, the run-folder lock, file modes, resume refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, small_toy_overrides


def _snapshot(folder: Path, skip: str | None = None) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` (``skip``: a sub-folder left out)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not (skip and (rel == skip or rel.startswith(skip + "/"))):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _umask_022() -> None:
    os.umask(0o022)


def test_readme_quickstart_then_readme_eval_leaves_the_training_run_byte_identical(toy_data_dir, tmp_path):
    """The README's two commands as written (the quickstart experiment fixes hydra.run.dir; eval composes the same
    experiment), at tiny size with the default loggers (CSV + W&B offline): eval.py writes
    <run>/eval/<timestamp>/ and every file of the training run is byte-identical afterwards. The fresh run folder's
    files are group-readable (process umask, not mkstemp's 0600)."""
    logs = tmp_path / "outputs"
    common = ["experiment=quickstart", "model=costvolume", f"paths.log_dir={logs}", *small_toy_overrides(toy_data_dir)]
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            *common,
            "trainer.max_steps=6",
            "trainer.val_check_interval=6",
            "callbacks.model_checkpoint.every_n_train_steps=6",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_umask_022,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the console: one line per log message (Lightning's INFO lines were printed twice), benchmark names on the
    # evaluation bars, the global step out of max_steps on the training bar
    console = proc.stdout + proc.stderr
    assert console.count("GPU available") == 1, console[:2000]
    assert "Validation toy_unseen" in console and "step=6/6" in console
    run = logs / "quickstart_costvolume"
    for name in (
        "metrics.json",
        "run_info.json",
        "config_resolved.yaml",
        ".hydra/overrides.yaml",
        "csv/metrics.csv",
        "checkpoints/last.ckpt",
        "wandb/run_id",
    ):
        assert (run / name).is_file(), name
    assert not (run / ".lock").exists(), "the lock is released when the run ends"
    listing = subprocess.run(["ls", "-l", str(run), str(run / "checkpoints")], capture_output=True, text=True).stdout
    print(listing)  # the issue's `ls -l` of a fresh run folder
    for path in [p for p in run.rglob("*") if p.is_file() and "wandb" not in p.parts]:
        assert path.stat().st_mode & stat.S_IRGRP, f"{path} is not group-readable: {oct(path.stat().st_mode)}"
    before = _snapshot(run)

    ckpt = run / "checkpoints" / "last.ckpt"
    proc = subprocess.run(
        [sys.executable, "eval.py", *common, "data/eval=[toy_seen,toy_unseen]", f"ckpt={ckpt}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _snapshot(run, skip="eval") == before
    (eval_dir,) = (run / "eval").iterdir()
    assert set(json.loads((eval_dir / "metrics.json").read_text())) == {"toy_seen", "toy_unseen"}
    assert (eval_dir / ".hydra" / "overrides.yaml").is_file() and (eval_dir / "config_resolved.yaml").is_file()
    assert str(eval_dir / "metrics.json") in proc.stdout


def test_two_runs_on_one_folder_the_second_exits_2_naming_the_first(quickstart_run, toy_data_dir, tmp_path):
    run = tmp_path / "busy"
    cmd = [
        sys.executable,
        "train.py",
        "experiment=quickstart",
        "model=costvolume",
        "logger=csv",
        "trainer.max_steps=100000",
        f"hydra.run.dir={run}",
        *small_toy_overrides(toy_data_dir),
    ]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "config_resolved.yaml").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the first run stopped early"
        overrides_before = (run / ".hydra" / "overrides.yaml").read_bytes()
        second = subprocess.run(
            cmd[: -len(small_toy_overrides(toy_data_dir))]
            + ["trainer.max_steps=7"]
            + small_toy_overrides(toy_data_dir),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"pid {first.pid}" in second.stderr and "in use" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first run goes on"
        # the refused run wrote nothing into the first run's folder
        assert (run / ".hydra" / "overrides.yaml").read_bytes() == overrides_before
        assert not (run / "error.txt").exists()
    finally:
        first.kill()
        first.wait(timeout=30)


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path, capsys):
    import socket

    from ovseg_lab.errors import RunFolderBusy
    from ovseg_lab.run_folder import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    lock = RunLock.acquire(tmp_path)
    assert "taking over the lock" in capsys.readouterr().err
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(), "started": "now"}))
        with pytest.raises(RunFolderBusy, match=f"pid {alive.pid}"):
            RunLock.acquire(tmp_path)
    finally:
        alive.kill()
        alive.wait()


def _lock_holder(folder: Path) -> subprocess.Popen:
    """Another process that holds the run-folder lock of ``folder`` until killed."""
    code = (
        "import sys; from ovseg_lab.run_folder import RunLock; RunLock.acquire(sys.argv[1]); "
        "print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_predict_into_a_busy_output_folder_exits_2_naming_the_first(tmp_path, capsys):
    """The lock is taken before the checkpoint is read (a refusal costs no loading); once its owner is killed,
    the next predict takes the stale lock over with a notice (and here stops at the empty image folder)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import predict as script

    out = tmp_path / "pred"
    args = [
        "--checkpoint",
        str(tmp_path / "none.ckpt"),
        "--image",
        str(tmp_path),
        "--classes",
        "a,b",
        "--output",
        str(out),
    ]
    holder = _lock_holder(out)
    try:
        assert script.main(args) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use" in err and "--output" in err, err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the refused run
    finally:
        holder.kill()
        holder.wait()
    assert script.main(args) == 2
    err = capsys.readouterr().err
    assert "taking over the lock" in err and f"pid {holder.pid}" in err and "in use" not in err, err
    assert "No images" in err  # past the lock, on to the next check
    assert not (out / ".lock").exists()  # released at the end (atexit covers a crash)


def test_a_pipeline_stage_folder_is_locked_while_its_stage_runs(tmp_path, capsys):
    from omegaconf import OmegaConf

    import ovseg_lab.resolvers  # noqa: F401
    from ovseg_lab.errors import RunFolderBusy
    from ovseg_lab.pipeline import run_stages, stage_dir

    cfg = OmegaConf.create(
        {
            "seed": 1,
            "pipeline": {
                "dir": str(tmp_path),
                "inherit": ["seed"],
                "stages": {
                    "a": {
                        "run": "tests.test_ovseg_pairs.fake_stage",
                        "config": "mine",
                        "overrides": ["proposals_ckpt=none"],
                    }
                },
            },
        }
    )
    folder = Path(stage_dir("a", _root_=cfg))
    holder = _lock_holder(folder)  # another job of a parallel sweep training the same stage
    try:
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid}.*one after another"):
            run_stages(cfg)
        assert not (tmp_path / "calls.txt").exists() and not (folder / "stage_done.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # the other job dies mid-stage
        holder.wait()
    assert run_stages(cfg) == [folder]
    assert "taking over the lock" in capsys.readouterr().err
    assert (tmp_path / "calls.txt").read_text().splitlines() == ["none"] and (folder / "stage_done.json").is_file()
    assert not (folder / ".lock").exists()


def test_atomic_writes_follow_the_process_umask(tmp_path):
    from ovseg_lab.lit.checkpoint_io import atomic_torch_save
    from ovseg_lab.utils.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        atomic_torch_save({"x": 1}, tmp_path / "b.ckpt")
        os.umask(0o077)
        write_json(tmp_path / "c.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.ckpt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "c.json").stat().st_mode) == 0o600


def test_a_full_disk_is_named_with_the_path(tmp_path, monkeypatch):
    import errno

    import torch

    from ovseg_lab.errors import SetupError
    from ovseg_lab.lit.checkpoint_io import atomic_torch_save
    from ovseg_lab.utils.io import write_json

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SetupError, match=r"disk is full: could not write .*last\.ckpt"):
        atomic_torch_save({"x": 1}, tmp_path / "last.ckpt")
    monkeypatch.setattr(json, "dumps", full)
    with pytest.raises(SetupError, match=r"disk is full: could not write .*metrics\.json"):
        write_json(tmp_path / "metrics.json", {})
    assert not list(tmp_path.iterdir()), "no temporary file is left"


@pytest.mark.slow  # ~20-30 s: the default suite stays under 10 minutes; CI runs the slow suite too
def test_a_resume_with_another_learning_rate_is_refused_with_a_diff(quickstart_run, toy_data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quickstart_run, run)
    base = [
        sys.executable,
        "train.py",
        "experiment=quickstart",
        "model=costvolume",
        "logger=csv",
        "trainer.val_check_interval=12",
        f"hydra.run.dir={run}",
        *small_toy_overrides(toy_data_dir),
        "ckpt_path=last",
    ]
    before = _snapshot(run)
    proc = subprocess.run(
        base + ["trainer.max_steps=12", "model.optimizer.lr=0.5"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Resume refused" in proc.stderr and "model.optimizer.lr: 0.001 -> 0.5" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(run, skip="error.txt") == before
    # max_steps (and what derives from it, the schedule length) may change on a resume
    proc = subprocess.run(base + ["trainer.max_steps=14"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "run_info.json").read_text())["global_step"] == 14


def test_resume_config_differences_ignore_length_and_logging():
    from omegaconf import OmegaConf

    from ovseg_lab.lit.resume import config_differences

    stored = OmegaConf.create(
        {
            "seed": 1,
            "trainer": {"max_steps": 10},
            "sched": {"total": "${trainer.max_steps}"},
            "logger": {"csv": {"name": "a"}},
            "ckpt_path": None,
        }
    )
    stored_yaml = OmegaConf.to_yaml(stored, resolve=True)
    same = OmegaConf.merge(
        stored,
        {
            "trainer": {"max_steps": 20},
            "logger": {"csv": {"name": "b"}},
            "ckpt_path": "last",
            "data": {"num_workers": 4},
        },
    )
    assert config_differences(stored_yaml, same) == []
    other = OmegaConf.merge(stored, {"seed": 2})
    assert config_differences(stored_yaml, other) == ["seed: 1 -> 2"]


def test_wandb_run_names_are_unique_per_sweep_job(compose_cfg):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    from ovseg_lab.wandb_logger import _sweep_job_name

    cfg = compose_cfg("train", ["experiment=quickstart"])
    assert _sweep_job_name("quickstart") == "quickstart"  # a single run keeps its name
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.override_dirname = "finetune=qv,model=catseg"
    HydraConfig.instance().set_config(cfg)
    try:
        assert _sweep_job_name("quickstart") == "quickstart:finetune=qv,model=catseg"
    finally:
        compose_cfg("train", ["experiment=quickstart"])  # a single-run HydraConfig for the tests after this one
