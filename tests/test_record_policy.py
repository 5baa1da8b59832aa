"""Issue 37: no command overwrites another run's records, and an unusable output location, a data error in a
DataLoader worker, an undecodable vocabulary or Ctrl-C is one paragraph (exit 2 / 130), never a traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, small_toy_overrides
from tests.test_records import _snapshot

sys.path.insert(0, str(ROOT / "scripts"))

QUICKSTART = ["experiment=quickstart", "model=costvolume", "logger=csv"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture
def finished_run(quickstart_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(quickstart_run, run)
    return run


# --- records overwritten by ordinary commands ------------------------------------------------------------------


def test_a_fresh_training_into_a_finished_run_folder_is_refused_naming_its_steps(finished_run, toy_data_dir):
    """`make quickstart` twice (or the same line with other steps) saved last-v1.ckpt beside the old run's last.ckpt
    under the new run's metrics.json. Now: one paragraph naming the folder, its steps and the two ways on; the
    folder is byte-identical (no .hydra, error.txt or lock of the refused run)."""
    before = _snapshot(finished_run)
    proc = _run(
        [
            "train.py",
            *QUICKSTART,
            "trainer.max_steps=6",
            f"hydra.run.dir={finished_run}",
            *small_toy_overrides(toy_data_dir),
        ]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    message = proc.stderr
    assert f"Run folder {finished_run} already holds a training finished at step 12" in message, message
    assert "hydra.run.dir=<new folder>" in message and "ckpt_path=last" in message
    assert _snapshot(finished_run) == before
    assert not (finished_run / "checkpoints" / "last-v1.ckpt").exists()


def test_the_record_policy_lets_only_the_folders_own_continuation_write(tmp_path):
    from omegaconf import OmegaConf

    from ovseg_lab.errors import FolderOfAnotherRun
    from ovseg_lab.run_folder import check_not_another_runs

    fresh, resume = OmegaConf.create({"ckpt_path": None}), OmegaConf.create({"ckpt_path": "last"})
    check_not_another_runs(tmp_path / "new", fresh, True, "hydra.run.dir")  # nothing there yet
    (tmp_path / "config_resolved.yaml").write_text("a: 1\n")  # killed before its first checkpoint: may start again
    check_not_another_runs(tmp_path, fresh, True, "hydra.run.dir")
    with pytest.raises(FolderOfAnotherRun, match="holds the records of another run"):
        check_not_another_runs(tmp_path, None, False, "hydra.run.dir")  # but no eval writes over its config
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(FolderOfAnotherRun, match="the weights of an unfinished training"):
        check_not_another_runs(tmp_path, fresh, True, "hydra.run.dir")
    check_not_another_runs(tmp_path, resume, True, "hydra.run.dir")
    own = OmegaConf.create({"ckpt_path": str(tmp_path / "checkpoints" / "last.ckpt")})
    check_not_another_runs(tmp_path, own, True, "hydra.run.dir")
    other = OmegaConf.create({"ckpt_path": str(tmp_path / "elsewhere.ckpt")})  # fine-tuning another run's weights
    with pytest.raises(FolderOfAnotherRun):
        check_not_another_runs(tmp_path, other, True, "hydra.run.dir")


def test_eval_into_a_training_run_folder_is_refused_and_writes_nothing(finished_run, toy_data_dir):
    """eval.py hydra.run.dir=<a training run> replaced its metrics.json, run_info.json, .hydra/ and config and moved
    its CSV aside, exit 0."""
    before = _snapshot(finished_run)
    proc = _run(
        [
            "eval.py",
            *QUICKSTART,
            f"ckpt={finished_run / 'checkpoints' / 'last.ckpt'}",
            f"hydra.run.dir={finished_run}",
            *small_toy_overrides(toy_data_dir),
        ]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "holds the records of another run" in proc.stderr, proc.stderr
    assert _snapshot(finished_run) == before


def _convert_args(tmp_path: Path, output: Path, *extra: str) -> list[str]:
    return ["--format", "lseg", "--input", str(tmp_path / "official.pth"), "--output", str(output), *extra]


@pytest.fixture
def no_conversion(monkeypatch):
    """Fails the test if a conversion starts: every refusal below must come before the minutes of converting."""
    import ovseg_lab.cli.convert as convert

    def started(*args, **kwargs):
        raise AssertionError("the conversion ran before the output was checked")

    monkeypatch.setattr(convert, "load_official", started)
    return convert


def test_convert_refuses_an_existing_output_and_a_run_folder_before_converting(
    finished_run, tmp_path, capsys, no_conversion
):
    last = finished_run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    for extra in ((), ("--overwrite",)):  # a training run's checkpoint is never replaced, --overwrite or not
        assert no_conversion.main(_convert_args(tmp_path, last, *extra)) == 2
        err = capsys.readouterr().err
        assert f"lies in the training run {finished_run}" in err, err
    assert last.read_bytes() == before
    existing = tmp_path / "converted.ckpt"
    existing.write_bytes(b"earlier")
    assert no_conversion.main(_convert_args(tmp_path, existing)) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"earlier"


def test_convert_checks_a_read_only_destination_and_a_full_disk_before_converting(
    tmp_path, capsys, monkeypatch, no_conversion
):
    target = tmp_path / "ro" / "out.ckpt"
    with _read_only(monkeypatch, tmp_path):
        assert no_conversion.main(_convert_args(tmp_path, target)) == 2
    assert "cannot be written" in capsys.readouterr().err
    with _disk_full(monkeypatch):
        assert no_conversion.main(_convert_args(tmp_path, target)) == 2
    assert "The disk is full" in capsys.readouterr().err
    assert not target.exists()


def test_a_second_predict_with_another_class_list_is_refused(quickstart_run, tmp_path, capsys):
    """A second predict into an existing --output with another class list silently replaced the earlier files;
    the same class list may write again (a rerun after Ctrl-C)."""
    import predict as script
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "photo.png")
    out = tmp_path / "pred"
    args = ["--checkpoint", str(quickstart_run / "checkpoints" / "last.ckpt"), "--image", str(tmp_path / "photo.png")]
    assert script.main([*args, "--classes", "red circle,sky", "--output", str(out)]) == 0
    before = _snapshot(out)
    assert script.main([*args, "--classes", "red circle,grass", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds predictions for another class list" in err and "Traceback" not in err, err
    assert _snapshot(out) == before
    assert script.main([*args, "--classes", "red circle,sky", "--output", str(out)]) == 0
    # and predict never writes into a training run's folder
    assert script.main([*args, "--classes", "a,b", "--output", str(quickstart_run)]) == 2
    assert "holds the records of another run" in capsys.readouterr().err


# --- tracebacks -> one paragraph ---------------------------------------------------------------------------------


class _BadLabels(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        from ovseg_lab.errors import DataError

        raise DataError("Label /data/x.png holds ids [200] outside the 36-class vocabulary of toy_seen.")


def test_a_data_error_in_a_dataloader_worker_is_the_same_paragraph_also_in_error_txt(compose_cfg, tmp_path, capsys):
    """torch re-raises a worker's DataError as "Caught DataError in DataLoader worker process 0. Original
    Traceback ..." (15 lines, on the console and in error.txt); the tests only covered num_workers=0."""
    from ovseg_lab.errors import DataError, user_error
    from ovseg_lab.runner import main_guard

    loader = torch.utils.data.DataLoader(_BadLabels(), num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert "DataLoader worker" in str(caught.value)  # what torch hands over
    message = "Label /data/x.png holds ids [200] outside the 36-class vocabulary of toy_seen."
    assert str(user_error(caught.value)) == message

    cfg = compose_cfg("train", ["experiment=quickstart"], run_dir=tmp_path / "run")

    def fit(cfg):
        raise caught.value

    with pytest.raises(SystemExit) as stop:
        main_guard(fit, cfg, training=True)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "worker" not in err and "Traceback" not in err, err
    assert (tmp_path / "run" / "error.txt").read_text() == message + "\n"


@contextmanager
def _read_only(monkeypatch, folder: Path):
    """os.access says ``folder`` and everything below it is not writable (what chmod -w does for a non-root user;
    the tests may run as root, whom permissions do not stop)."""
    real = os.access
    with monkeypatch.context() as patch:
        patch.setattr(
            os, "access", lambda p, mode, **kw: False if str(p).startswith(str(folder)) else real(p, mode, **kw)
        )
        yield


@contextmanager
def _disk_full(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
        yield


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_a_run_dir_naming_an_existing_file_is_one_paragraph(script, tmp_path):
    """Hydra created the folder (and opened its log file there) before our code ran: its traceback, rc 1."""
    afile = tmp_path / "a_file"
    afile.write_text("mine\n")
    for run_dir in (afile, afile / "sub"):
        proc = _run([script, "experiment=quickstart", f"hydra.run.dir={run_dir}"])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"hydra.run.dir={run_dir}" in proc.stderr and "is a file" in proc.stderr
    assert afile.read_text() == "mine\n"


def test_a_read_only_or_full_output_location_is_one_paragraph_before_hydra_creates_it(
    compose_cfg, tmp_path, monkeypatch, capsys
):
    from ovseg_lab.run_folder import CheckOutputLocation

    cfg = compose_cfg("train", ["experiment=quickstart", f"hydra.run.dir={tmp_path / 'ro' / 'run'}"])
    for fault, words in ((_read_only(monkeypatch, tmp_path), "read-only"), (_disk_full(monkeypatch), "disk is full")):
        with fault, pytest.raises(SystemExit) as stop:
            CheckOutputLocation().on_run_start(config=cfg)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert words in err and f"hydra.run.dir={tmp_path / 'ro' / 'run'}" in err, err
    assert not (tmp_path / "ro").exists()


def test_a_read_only_predict_output_is_one_paragraph_before_loading(tmp_path, monkeypatch, capsys):
    import predict as script

    args = ["--checkpoint", str(tmp_path / "none.ckpt"), "--image", str(tmp_path), "--classes", "a,b"]
    with _read_only(monkeypatch, tmp_path):
        assert script.main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "cannot be written" in err and "Traceback" not in err, err


def test_the_error_path_never_raises_when_error_txt_cannot_be_written(compose_cfg, tmp_path, monkeypatch, capsys):
    """A disk already full when a run starts: the paragraph printed, then writing error.txt failed (68 lines, rc 1)."""
    import ovseg_lab.runner as runner
    from ovseg_lab.errors import SetupError

    cfg = compose_cfg("train", ["experiment=quickstart"], run_dir=tmp_path / "run")

    def fit(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "config_resolved.yaml"))

    def full(path, text):
        raise SetupError(f"The disk is full: could not write {path}")

    monkeypatch.setattr(runner, "write_text", full)
    monkeypatch.setattr("ovseg_lab.run_folder.write_text", lambda *a: None)  # the .hydra record
    with pytest.raises(SystemExit) as stop:
        runner.main_guard(fit, cfg, training=True)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "The disk is full: could not write" in err and "config_resolved.yaml" in err
    assert "error.txt could not be written" in err and "Traceback" not in err, err


def test_a_permission_error_while_writing_is_one_paragraph(tmp_path):
    from ovseg_lab.errors import as_user_error

    err = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "metrics.json"))
    assert "metrics.json: Permission denied" in str(as_user_error(err))
    assert as_user_error(ValueError("a bug")) is None


def test_a_non_utf8_vocabulary_file_is_one_paragraph_naming_it(tmp_path, capsys):
    import predict as script

    from ovseg_lab.errors import DataError
    from ovseg_lab.vocab import load_vocabulary

    vocab = tmp_path / "classes.txt"
    vocab.write_bytes("caf\xe9\nsofa\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"Vocabulary file {vocab} is not UTF-8 text"):
        load_vocabulary(str(vocab))
    (tmp_path / "v.json").write_bytes(json.dumps(["caf\xe9"], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8"):
        load_vocabulary(str(tmp_path / "v.json"))
    args = ["--checkpoint", str(tmp_path / "x.ckpt"), "--image", str(tmp_path), "--vocab", str(vocab)]
    assert script.main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8" in err and "Traceback" not in err


def test_ctrl_c_in_predict_exits_130_with_one_paragraph(tmp_path, monkeypatch, capsys):
    import predict as script

    import ovseg_lab.checkpoints
    import ovseg_lab.predict

    class Module:
        inference_cfg = None

        def to(self, device):
            return self

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ovseg_lab.checkpoints, "model_from_checkpoint", lambda path: (Module(), None))
    monkeypatch.setattr(ovseg_lab.predict, "predict_paths", interrupted)
    (tmp_path / "img.png").write_bytes(b"")
    out = tmp_path / "out"
    args = ["--checkpoint", "x.ckpt", "--image", str(tmp_path / "img.png"), "--classes", "a,b", "--output", str(out)]
    assert script.main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun the same command" in err
    assert not (out / ".lock").exists()


# --- config values that reached Lightning unchecked --------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.val_check_interval=abc", "trainer.val_check_interval='abc' must be a number of training steps"),
        ("callbacks.model_checkpoint.every_n_train_steps=-5", "every_n_train_steps=-5 must be an integer >= 0"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 must be an integer >= 1"),
        ("trainer.gradient_clip_algorithm=nrm", "must be one of 'norm', 'value', null"),
        ("+trainer.limit_val_batches=1.5", "limit_val_batches=1.5 must be a number of batches"),
        ("trainer.accelerator=gpus", "trainer.accelerator='gpus' must be one of 'auto', 'cpu'"),
        ("callbacks.model_checkpoint.save_last=maybe", "save_last='maybe' must be one of true, false, 'link', null"),
        ("callbacks.lr_monitor.logging_interval=batch", "logging_interval='batch' must be one of 'step', 'epoch'"),
    ],
)
def test_values_handed_to_lightning_are_checked_by_their_groups_schema(compose_cfg, override, message):
    from ovseg_lab.config_checks import config_problems

    problems = config_problems(compose_cfg("train", ["experiment=quickstart", override]))
    assert any(message in p for p in problems), problems


def test_lightning_values_are_refused_before_the_run_builds_anything(tmp_path):
    """They ended in Hydra's "Error in call to target" (rc 1) after the run folder and a W&B run were created."""
    run = tmp_path / "run"
    proc = _run(
        [
            "train.py",
            "experiment=quickstart",
            "trainer.val_check_interval=abc",
            "callbacks.model_checkpoint.every_n_train_steps=-5",
            f"hydra.run.dir={run}",
        ]
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Invalid configuration" in proc.stderr and "Error in call to target" not in proc.stderr
    assert "trainer.val_check_interval='abc'" in proc.stderr and "every_n_train_steps=-5" in proc.stderr
    assert not (run / "wandb").exists() and not (run / "config_resolved.yaml").exists()


def test_taking_over_a_dead_owners_lock_removes_its_cut_short_temporaries(tmp_path):
    """A SIGKILL during an atomic write leaves ``.<name>.<random>.tmp`` beside the target (never renamed)."""
    import socket

    from ovseg_lab.run_folder import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half")
    (tmp_path / "metrics.json").write_text("{}")
    lock = RunLock.acquire(tmp_path)
    lock.release()
    assert not stale.exists() and (tmp_path / "metrics.json").is_file()


def test_ctrl_c_outside_lightning_is_one_line_and_exit_130(capsys):
    from ovseg_lab.cli import interruptible

    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        interruptible(main, "rerun with ckpt_path=last")()
    assert stop.value.code == 130
    assert "interrupted (Ctrl-C): rerun with ckpt_path=last" in capsys.readouterr().err


def test_a_killed_pipeline_stage_continues_its_own_checkpoint(tmp_path):
    """The record policy refuses a fresh run over a stage's weights: a stage killed after a checkpoint resumes it."""
    from omegaconf import OmegaConf

    import ovseg_lab.pipeline as pipeline

    cfg = OmegaConf.create(
        {
            "seed": 1,
            "pipeline": {
                "dir": str(tmp_path),
                "stages": {
                    "a": {
                        "run": "tests.test_record_policy.record_ckpt_path",
                        "config": "train",
                        "overrides": ["experiment=quickstart", "model=costvolume"],
                    }
                },
            },
        }
    )
    folder = Path(pipeline.stage_dir("a", _root_=cfg))
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    pipeline.run_stages(cfg)
    assert (tmp_path / "ckpt_path.txt").read_text() == "last"


def record_ckpt_path(cfg) -> None:
    """A stand-in stage run: records the ckpt_path it was given (next to the stage folders)."""
    from hydra.core.hydra_config import HydraConfig

    Path(HydraConfig.get().runtime.output_dir).parent.joinpath("ckpt_path.txt").write_text(str(cfg.ckpt_path))


def _loops(epochs: dict[str, int], batches_completed: int, batches_processed: int) -> dict:
    return {
        "loops": {
            "fit_loop": {
                "epoch_progress": {"total": dict(epochs), "current": dict(epochs)},
                "epoch_loop.batch_progress": {
                    "total": {"ready": 8, "started": 8, "completed": batches_completed, "processed": batches_processed}
                },
            }
        }
    }


def test_a_resumed_runs_epoch_counter_is_repaired_in_its_mid_epoch_checkpoints():
    """The loop state of the step-8 checkpoint of a run resumed from the step-4 one (4 batches per epoch: both at an
    epoch's last batch), as Lightning 2.x saved it: epoch 1 in progress but not counted as started. Resumed from it,
    the run logged epoch 1 for epoch 2's rows (the fault-injection suite's CSV diff, weights exact)."""
    from ovseg_lab.lit.resume import count_the_epoch_in_progress

    lagging = _loops({"ready": 1, "started": 1, "processed": 1, "completed": 1}, 7, 8)
    count_the_epoch_in_progress(lagging, epoch=1)
    uninterrupted = {"ready": 2, "started": 2, "processed": 1, "completed": 1}  # the same step, never resumed
    assert lagging["loops"]["fit_loop"]["epoch_progress"] == {"total": uninterrupted, "current": uninterrupted}
    for untouched, epoch in (
        (_loops(uninterrupted, 7, 8), 1),  # already right
        (_loops({"ready": 2, "started": 2, "processed": 2, "completed": 2}, 8, 8), 2),  # saved at the end of training
    ):
        before = json.dumps(untouched)
        count_the_epoch_in_progress(untouched, epoch=epoch)
        assert json.dumps(untouched) == before
