"""Run folders as records: where a run of each kind writes, and one writer per folder at a time.

- Evaluation and prediction never write into the training run they read: they get their own folder,
  ``<training run>/eval/<timestamp>/`` (``predict/`` for predictions) when the checkpoint lies in a run's
  ``checkpoints/`` folder, ``<log_dir>/eval/<checkpoint stem>/<timestamp>/`` otherwise (:func:`record_dir`).
- A run folder holds ``.lock`` (owner pid, host, start time, command) while a run writes into it
  (:class:`RunLock`). A second run on the same folder stops with exit status 2 naming the owner; the lock of a
  process that no longer exists (killed with SIGKILL, a crashed node on this host) is taken over with a notice,
  which is what a resume after a kill does.
- Hydra's own record (``.hydra/``) is written by us once the lock is held (``hydra.output_subdir: null`` in
  ``conf/hydra/default.yaml``), so a refused second run cannot overwrite the first one's.
- The record policy (:func:`check_not_another_runs`): a folder holding a run's records is never written by another
  command. Only the training that continues the folder's own checkpoint (``ckpt_path=last``) writes there again; a
  fresh training into a folder with weights or results is refused (it saved ``last-v1.ckpt`` beside the old run's
  ``last.ckpt``, under the new run's metrics.json), as is an eval, mining or predict run into any run's folder.
  A folder left by a training killed before its first checkpoint holds nothing to continue or to score: a fresh
  run may start there (its curves are moved aside, ``ovseg_lab.csv_logger``).
- Every output location is checked before work starts (:class:`CheckOutputLocation`, a Hydra callback:
  an existing file, read-only, a full disk), before Hydra creates the folder and opens its log file in it.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ovseg_lab.errors import FolderOfAnotherRun, RunFolderBusy, SetupError, report
from ovseg_lab.utils.io import check_writable, remove_temporaries, write_text

LOCK_NAME = ".lock"


def run_of_checkpoint(ckpt: str | os.PathLike) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>``), else None."""
    path = Path(str(ckpt)).expanduser()
    return path.parent.parent if path.parent.name == "checkpoints" else None


def record_dir(ckpt: str | None, kind: str, log_dir: str, stamp: str) -> str:
    """Resolver ``${record_dir:${ckpt},eval,${paths.log_dir},${now:...}}``: the folder of an eval / predict run.

    A folder of that name that exists already (two evaluations within one second) gets a ``_2``, ``_3`` ... suffix.
    """
    if ckpt in (None, "", "None", "null"):
        parent = Path(log_dir) / kind
    else:
        run = run_of_checkpoint(ckpt)
        parent = run / kind if run is not None else Path(log_dir) / kind / Path(str(ckpt)).stem
    folder, index = parent / stamp, 1
    while folder.exists():
        index += 1
        folder = parent / f"{stamp}_{index}"
    return str(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive claim on a run folder (``<folder>/.lock``), released at exit.

    Re-entrant within one process (a pipeline's stages and its parent hold different folders; a test that runs
    twice in one process reclaims its own lock).
    """

    _held: dict[Path, RunLock] = {}

    def __init__(self, folder: str | os.PathLike, elsewhere: str = "choose another folder (hydra.run.dir=...)") -> None:
        self.folder = Path(folder).resolve()
        self.path = self.folder / LOCK_NAME
        self.elsewhere = elsewhere

    @classmethod
    def acquire(
        cls, folder: str | os.PathLike, elsewhere: str = "choose another folder (hydra.run.dir=...)"
    ) -> RunLock:
        """Claim ``folder`` (created if missing); :class:`RunFolderBusy` names the live owner and ends with
        ``elsewhere``, what this kind of run does to write somewhere else (train/eval: hydra.run.dir, predict: --output)."""
        lock = cls(folder, elsewhere)
        if lock.folder in cls._held:
            return cls._held[lock.folder]
        lock._claim()
        cls._held[lock.folder] = lock
        atexit.register(lock.release)
        return lock

    def _owner_text(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }

    def _claim(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the stale-lock takeover races only with another takeover; a few tries settle it
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = self._read_owner()
                if owner is None:  # being written by its owner this instant, or unreadable: look again
                    time.sleep(0.2)
                    owner = self._read_owner() or {}
                pid, host = owner.get("pid"), owner.get("host")
                if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
                    print(
                        f"NOTE: taking over the lock of {self.folder}: its owner (pid {pid}, started "
                        f"{owner.get('started', '?')}) no longer runs (killed or crashed).",
                        file=sys.stderr,
                    )
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    remove_temporaries(self.folder)  # what the dead owner was writing when it was killed
                    continue
                if pid == os.getpid() and host == socket.gethostname():
                    return  # ours (a lock file left by an earlier run of this same process)
                where = f"pid {pid} on host {host}" if pid else "another process"
                raise RunFolderBusy(
                    f"Run folder {self.folder} is in use by {where} (started {owner.get('started', '?')}: "
                    f"{owner.get('command', '?')}). Two runs writing one folder would mix their records; wait for it "
                    f"to finish, or {self.elsewhere}. If that process is gone (e.g. another "
                    f"host crashed), delete {self.path}."
                )
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(self._owner_text()) + "\n")
            return
        raise SetupError(f"Could not lock run folder {self.folder} ({self.path} keeps reappearing).")

    def _read_owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        owner = self._read_owner() or {}
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        RunLock._held.pop(self.folder, None)


def write_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """``.hydra/{config,hydra,overrides}.yaml`` as Hydra writes them, once the folder is ours.

    A resumed run (``ckpt_path`` set) keeps the record of the command that started the folder (its own overrides
    go to run_info.json); a fresh run in an existing folder writes its own.
    """
    from hydra.core.hydra_config import HydraConfig

    folder = run_dir / ".hydra"
    resuming = bool(OmegaConf.select(cfg, "ckpt_path", default=None))
    if not HydraConfig.initialized() or (resuming and (folder / "config.yaml").is_file()):
        return
    hydra_cfg = HydraConfig.get()
    write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


def _secondary_rank() -> bool:
    """A DDP process other than the launching one: Lightning starts ranks > 0 by re-running the command line, on the
    same folder; they write nothing of the record there, and must not find the folder "in use" by rank 0."""
    return any(os.environ.get(var, "0") not in ("", "0") for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


# What a run leaves: its results, its weights, its composed config (eval / mining runs write the same names)
RESULT_FILES = ("metrics.json", "run_info.json")
CONFIG_RECORD = "config_resolved.yaml"


def run_records(folder: str | os.PathLike) -> list[str]:
    """The records of a run that ``folder`` holds (relative names): results, checkpoints, the composed config."""
    folder = Path(folder)
    names = [name for name in (*RESULT_FILES, CONFIG_RECORD) if (folder / name).is_file()]
    names += [f"checkpoints/{p.name}" for p in sorted((folder / "checkpoints").glob("*.ckpt"))]
    return names


def run_holding(path: str | os.PathLike) -> tuple[Path, list[str]] | None:
    """(run folder, its records) when ``path`` lies in a run's ``checkpoints/`` folder and that run has results or a
    config of its own (a plain ``checkpoints/`` folder of converted files is no run), else None."""
    run = run_of_checkpoint(path)
    if run is None:
        return None
    records = [r for r in run_records(run) if not r.startswith("checkpoints/")]
    return (run, run_records(run)) if records else None


def continues_folder(ckpt_path: Any, folder: Path) -> bool:
    """Does ``ckpt_path`` (``last`` or a file) resume the run of ``folder`` (a checkpoint in its checkpoints/)?"""
    if ckpt_path in (None, "", "None", "null"):
        return False
    if str(ckpt_path) == "last":
        return True
    return Path(str(ckpt_path)).expanduser().resolve().parent == (folder / "checkpoints").resolve()


def _steps_of(folder: Path) -> str:
    try:
        step = json.loads((folder / "run_info.json").read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        step = None
    if step is not None and (folder / "metrics.json").is_file():
        return f"a training finished at step {step}"
    return "the weights of an unfinished training (no metrics.json)"


def check_not_another_runs(folder: str | os.PathLike, cfg: DictConfig | None, training: bool, key: str) -> None:
    """The record policy (module docstring): :class:`FolderOfAnotherRun` unless this command may write ``folder``.

    ``training``: a train.py run (it may continue the folder's own checkpoint); ``key``: how the user named the
    folder (``hydra.run.dir``, ``--output``)."""
    folder = Path(folder)
    records = run_records(folder)
    if not records:
        return
    listing = ", ".join(records[:6]) + (", ..." if len(records) > 6 else "")
    if training:
        if continues_folder(OmegaConf.select(cfg, "ckpt_path", default=None), folder):
            return
        held = [r for r in records if r != CONFIG_RECORD]
        if not held:  # killed before its first checkpoint: nothing to continue, nothing scored
            return
        raise FolderOfAnotherRun(
            f"Run folder {folder} already holds {_steps_of(folder)} ({listing}); a fresh run there would mix two runs' "
            f"records (its checkpoint beside the old last.ckpt, its metrics.json over the old one). Nothing was "
            f"written. Either train into another folder ({key}=<new folder>), or continue this run with "
            f"ckpt_path=last (the same overrides; a larger trainer.max_steps trains on)."
        )
    raise FolderOfAnotherRun(
        f"{key}={folder} holds the records of another run ({listing}); this command never writes into another run's "
        f"folder, and nothing was written. Give a new folder ({key}=<new folder>), or leave {key} out: evaluations "
        f"and predictions of a training run get their own <run>/eval/<timestamp>/ (predict/) folder."
    )


def claim_run_dir(cfg: DictConfig, run_dir: Path, training: bool = False) -> RunLock | None:
    """Lock ``run_dir`` for this run (SetupError if another live run holds it), apply the record policy (refused if
    the folder holds another run's records), then write Hydra's record."""
    if _secondary_rank():
        return None
    lock = RunLock.acquire(run_dir)
    try:
        check_not_another_runs(run_dir, cfg, training, "hydra.run.dir")
    except FolderOfAnotherRun:
        lock.release()
        raise
    write_hydra_record(run_dir, cfg)
    return lock


class CheckOutputLocation(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): the run / sweep folder is checked before Hydra creates it and
    opens its log file there. :func:`check_writable` (a ``hydra.run.dir`` naming an existing file, a read-only
    location, a full disk failed with Hydra's traceback, rc 1) and, for a single run, the record policy (an eval
    into a training run's folder left an empty ``eval.log`` there even though it was refused); main_guard applies
    the policy again once the folder is locked. One paragraph, exit 2."""

    @staticmethod
    def _check(config: DictConfig, key: str, training: bool | None = None) -> None:
        if _secondary_rank():
            return
        try:
            folder = OmegaConf.select(config, key)
            if folder is None:
                return
            check_writable(str(folder), key)
            if training is not None:
                check_not_another_runs(str(folder), config, training, key)
        except SetupError as err:
            report(err)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir", training=config_name == "train")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
