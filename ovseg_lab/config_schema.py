"""What a run hands to Lightning, as a schema per config group: each key's type, range and allowed values.

Hydra checks that a key exists, not its value; Lightning checks values only inside ``instantiate``, after the run
folder, the loggers and a W&B run were created, and then as Hydra's "Error in call to target" (rc 1):
``trainer.val_check_interval=abc``, ``callbacks.model_checkpoint.every_n_train_steps=-5``. Each schema below names
the accepted values of its group's keys as Lightning 2.x documents them; :func:`schema_problems` turns every value
outside them into one line of ``config_checks``' ``Invalid configuration`` paragraph, before anything is built.
A key a schema does not list is left to Lightning; ``null`` passes wherever the rule says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf


class Rule(NamedTuple):
    accepts: Callable[[Any], bool]
    text: str  # what the value must be, for the message: "<key>=<value> must be <text>"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(minimum: int, null: bool = False, also: tuple = ()) -> Rule:
    extra = "".join(f" or {v!r}" for v in also) + (" or null" if null else "")
    return Rule(
        lambda v: (null and v is None) or v in also or (_is_int(v) and v >= minimum),
        f"an integer >= {minimum}{extra}",
    )


def number(minimum: float, null: bool = False) -> Rule:
    return Rule(
        lambda v: (null and v is None) or (_is_number(v) and v >= minimum),
        f"a number >= {minimum}" + (" or null" if null else ""),
    )


def _shown(value: Any) -> str:
    """A value as it is written on the command line (null, true, 'norm')."""
    return OmegaConf.to_yaml({"v": value}).strip()[3:] if value is None or isinstance(value, bool) else repr(value)


def choice(*values: Any) -> Rule:
    return Rule(
        lambda v: any(v == c and type(v) is type(c) for c in values), "one of " + ", ".join(map(_shown, values))
    )


def boolean(null: bool = False, also: tuple = ()) -> Rule:
    return choice(True, False, *also, *((None,) if null else ()))


def string(null: bool = False) -> Rule:
    return Rule(lambda v: (null and v is None) or isinstance(v, str), "a string" + (" or null" if null else ""))


def steps_or_fraction(null: bool = True, also: tuple = ()) -> Rule:
    """Lightning's ``int | float`` arguments: a count of batches (int >= 0) or a fraction of the epoch in [0, 1]."""
    return Rule(
        lambda v: (
            (null and v is None) or v in also or (_is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1)
        ),
        "a number of batches (integer >= 0) or a fraction of the epoch in [0.0, 1.0]"
        + "".join(f" or {v!r}" for v in also)
        + (" or null" if null else ""),
    )


# conf/trainer/*.yaml -> lightning.pytorch.Trainer (max_steps, devices, precision: config_checks, which knows more)
TRAINER = {
    "accelerator": choice("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu"),
    "num_nodes": integer(1),
    "max_epochs": integer(-1, null=True),
    "min_epochs": integer(0, null=True),
    "min_steps": integer(-1, null=True),
    # steps between evaluations (a fraction: of an epoch); `never`: the final evaluation only (ovseg_lab.runner)
    "val_check_interval": Rule(
        lambda v: v is None or v == "never" or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
        "a number of training steps (integer >= 1), a fraction of an epoch in (0.0, 1.0], 'never' or null",
    ),
    "check_val_every_n_epoch": integer(1, null=True),
    "num_sanity_val_steps": integer(-1, null=True),
    "log_every_n_steps": integer(1, null=True),
    "accumulate_grad_batches": integer(1),
    "gradient_clip_val": number(0, null=True),
    "gradient_clip_algorithm": choice("norm", "value", None),
    "limit_train_batches": steps_or_fraction(),
    "limit_val_batches": steps_or_fraction(),
    "limit_test_batches": steps_or_fraction(),
    "overfit_batches": steps_or_fraction(null=False),
    "deterministic": boolean(null=True, also=("warn",)),
    "benchmark": boolean(null=True),
    "use_distributed_sampler": boolean(),
    "enable_model_summary": boolean(null=True),
    "enable_progress_bar": boolean(null=True),
    "enable_checkpointing": boolean(null=True),
    "inference_mode": boolean(),
    "detect_anomaly": boolean(),
    "barebones": boolean(),
    "sync_batchnorm": boolean(),
    "reload_dataloaders_every_n_epochs": integer(0),
    "default_root_dir": string(null=True),
}

# conf/callbacks/*.yaml model_checkpoint -> lightning.pytorch.callbacks.ModelCheckpoint (FinalStepCheckpoint)
MODEL_CHECKPOINT = {
    "dirpath": string(null=True),
    "filename": string(null=True),
    "monitor": string(null=True),
    "mode": choice("min", "max"),
    "save_last": boolean(null=True, also=("link",)),
    "save_top_k": integer(-1),
    "save_weights_only": boolean(),
    "auto_insert_metric_name": boolean(),
    "every_n_train_steps": integer(0, null=True),  # 0 / null: no step checkpoints
    "every_n_epochs": integer(0, null=True),
    "save_on_train_epoch_end": boolean(null=True),
    "enable_version_counter": boolean(),
    "verbose": boolean(),
}

SCHEMAS: dict[str, dict[str, Rule]] = {
    "trainer": TRAINER,
    "callbacks.model_checkpoint": MODEL_CHECKPOINT,
    "callbacks.lr_monitor": {"logging_interval": choice("step", "epoch", None), "log_momentum": boolean()},
    "callbacks.progress_bar": {"refresh_rate": integer(0), "leave": boolean()},
}


def schema_problems(cfg: DictConfig) -> list[str]:
    """One line per value of ``cfg`` outside its group's schema (:data:`SCHEMAS`)."""
    problems = []
    for group, schema in SCHEMAS.items():
        node = OmegaConf.select(cfg, group, default=None, throw_on_resolution_failure=False)
        if not isinstance(node, DictConfig):
            continue
        for key, rule in schema.items():
            if key not in node:
                continue
            try:
                value = node[key]
            except Exception:  # an interpolation that only resolves inside a run (${hydra:...})
                continue
            if isinstance(value, DictConfig):  # an instantiated object (a timedelta, a strategy): Lightning's to check
                continue
            if not rule.accepts(value):
                problems.append(f"{group}.{key}={value!r} must be {rule.text}")
    return problems
