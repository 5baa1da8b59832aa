"""OmegaConf resolvers used by the configs; registered on import (train.py / eval.py / tests import this)."""

from __future__ import annotations

import math

from omegaconf import OmegaConf


def auto_precision() -> str:
    """bf16 autocast where a CUDA GPU with bf16 support is present, fp32 elsewhere."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def run_suffix(choice: str, default: str) -> str:
    """ "" for the default choice, "_<choice>" otherwise: outputs/quickstart vs outputs/quickstart_lseg."""
    return "" if str(choice) == str(default) else f"_{choice}"


def ddp_epoch_batches(images: int, devices: int, batch_size: int) -> int:
    """Batches per rank in one epoch of a Lightning 1.x DDP run: the DistributedSampler pads every rank to
    ceil(images / devices) samples, the last batch may be short."""
    return math.ceil(math.ceil(int(images) / int(devices)) / int(batch_size))


def ddp_epoch_steps(images: int, devices: int, batch_size: int, accumulate: int) -> int:
    """Optimizer steps in one such epoch: a step every ``accumulate`` batches and at the epoch's last batch
    (lang-seg's train.sh under pytorch-lightning 1.4)."""
    return math.ceil(ddp_epoch_batches(images, devices, batch_size) / int(accumulate))


def multiply(a: float, b: float) -> float:
    """a x b, e.g. a learning rate per image of the per-process batch times that batch (lang-seg's lr formula)."""
    return a * b


def register() -> None:
    from ovseg_lab.pipeline import stage_dir  # ${stage:NAME}: a pipeline stage's folder
    from ovseg_lab.run_folder import record_dir  # ${record_dir:...}: an eval / predict run's own folder

    for name, fn in (
        ("auto_precision", auto_precision),
        ("run_suffix", run_suffix),
        ("stage", stage_dir),
        ("ddp_epoch_batches", ddp_epoch_batches),
        ("ddp_epoch_steps", ddp_epoch_steps),
        ("multiply", multiply),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("record_dir"):
        # cached: the folder is picked once per config (a second resolution must not pick the next free name)
        OmegaConf.register_new_resolver("record_dir", record_dir, use_cache=True)


register()
