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


def wandb_logger(save_dir: str, offline: bool | None = None, **kwargs: Any):
    """A WandbLogger that logs offline (and says how to upload) unless credentials exist or WANDB_MODE is set.

    offline: force offline (True) or online (False); None decides from the environment.
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
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)
