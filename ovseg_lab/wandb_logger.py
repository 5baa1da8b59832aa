"""W&B through Lightning's WandbLogger, offline when no credentials are configured."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info


def wandb_credentials_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc"))).authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None


def _sweep_job_name(name: str | None) -> str | None:
    """In a -m sweep, ``<name>:<the job's overrides>``: every job of a sweep had the same W&B run name."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return name
    job = HydraConfig.get().job
    return f"{name}:{job.override_dirname or job.num}"


def _run_id(save_dir: str, resume_step: int | None) -> str:
    """The W&B run id of this run folder (``wandb/run_id``): kept by a resume, so its curves continue the same run
    instead of starting a second one; a fresh run in the folder gets a new id."""
    import secrets
    import string

    path = Path(save_dir) / "wandb" / "run_id"
    if resume_step is not None and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    from ovseg_lab.utils.io import write_text

    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id format
    write_text(path, run_id + "\n")
    return run_id


def wandb_logger(save_dir: str, offline: bool | None = None, resume_step: int | None = None, **kwargs: Any):
    """A WandbLogger that logs offline (and says how to upload) unless credentials exist or WANDB_MODE is set.

    offline: force offline (True) or online (False); None decides from the environment.
    resume_step: the checkpoint's global step when the run resumes (the same W&B run id is resumed).
    """
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        mode = os.environ.get("WANDB_MODE")
        offline = mode in ("offline", "dryrun") if mode else not wandb_credentials_available()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    if offline:
        rank_zero_info(
            f"W&B: no credentials found, logging offline under {save_dir}/wandb. "
            f"Upload later with: wandb sync {save_dir}/wandb/offline-run-*"
        )
    kwargs["name"] = _sweep_job_name(kwargs.get("name"))
    if "id" not in kwargs:
        kwargs["id"] = _run_id(save_dir, resume_step)
        kwargs.setdefault("resume", "allow")
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)
