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

from omegaconf import DictConfig, OmegaConf

from ovseg_lab.errors import RunFolderBusy, SetupError
from ovseg_lab.utils.io import write_text

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


def claim_run_dir(cfg: DictConfig, run_dir: Path) -> RunLock | None:
    """Lock ``run_dir`` for this run (SetupError if another live run holds it), then write Hydra's record."""
    if _secondary_rank():
        return None
    lock = RunLock.acquire(run_dir)
    write_hydra_record(run_dir, cfg)
    return lock
