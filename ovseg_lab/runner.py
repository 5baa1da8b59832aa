"""What ``train.py`` and ``eval.py`` do: compose -> check -> instantiate -> fit / validate -> metrics.json.

Every run directory receives ``config_resolved.yaml`` (the composed config with interpolations resolved) at
the start and ``metrics.json`` (per benchmark: mIoU, pixel accuracy, fwIoU, per-class IoU, all in percent)
at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ovseg_lab.checkpoints import check_fits, load_weights, read_checkpoint  # noqa: F401  (re-exported)
from ovseg_lab.config import (
    drop_unused_groups,
    resolved_model_config,
    resolved_yaml,
    without_init_files,
    without_pretrained_weights,
)
from ovseg_lab.config_checks import check_config
from ovseg_lab.errors import FolderOfAnotherRun, SetupError, as_user_error
from ovseg_lab.preflight import check_run
from ovseg_lab.speed import apply_speed
from ovseg_lab.utils.io import write_json, write_text


def run_dir_of(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(OmegaConf.select(cfg, "paths.output_dir", default="outputs/run"))


def instantiate_list(cfg: DictConfig | None, **ours: Any) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a name -> config mapping (loggers, callbacks).

    ``ours``: keyword arguments for the entries implemented in ovseg_lab (e.g. a logger's ``resume_step``); a
    third-party target would not accept them."""
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [
        instantiate(node, **(ours if str(node._target_).startswith("ovseg_lab.") else {}))
        for node in cfg.values()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def run_callbacks(cfg: DictConfig, has_logger: bool) -> list[Any]:
    """The ``callbacks`` group's callbacks, plus the bad-sample report every run has (it enforces data.max_bad_*);
    without a logger an LR monitor has nowhere to write and is left out."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from ovseg_lab.lit.bad_sample_report import BadSampleReport

    callbacks = instantiate_list(cfg.get("callbacks"))
    if not has_logger:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not any(isinstance(c, BadSampleReport) for c in callbacks):
        callbacks.append(BadSampleReport())
    return callbacks


# trainer.val_check_interval=never: no evaluation during fit; train() still evaluates the final weights once
NEVER_VALIDATE = "never"


def trainer_options(cfg: DictConfig) -> dict[str, Any]:
    """Trainer arguments our config spells differently from Lightning (``val_check_interval: never``)."""
    if OmegaConf.select(cfg, "trainer.val_check_interval") == NEVER_VALIDATE:
        return {"val_check_interval": sys.maxsize}  # with check_val_every_n_epoch=null: a step count never reached
    return {}


def format_table(results: dict[str, dict], title: str) -> str:
    """A plain-text table of the per-benchmark scores (also readable in CI logs), with the split's chance mIoU
    (``random``: uniform random labels; ``present``: guessing among each image's true classes; docs/toy.md)."""
    chance = any("chance_uniform_mIoU" in scores for scores in results.values())
    header = f"{'benchmark':<14}{'classes':>8}{'mIoU':>8}{'pAcc':>8}{'fwIoU':>8}" + (
        f"{'random':>8}{'present':>9}" if chance else ""
    )
    lines = [title, header, "-" * len(header)]
    for name, scores in results.items():
        line = f"{name:<14}{scores['num_classes']:>8}{scores['mIoU']:>8.2f}{scores['pixel_accuracy']:>8.2f}{scores['fwIoU']:>8.2f}"
        if chance:
            line += f"{scores.get('chance_uniform_mIoU', float('nan')):>8.2f}{scores.get('chance_present_classes_mIoU', float('nan')):>9.2f}"
        lines.append(line)
    return "\n".join(lines)


def _finish_loggers(loggers: list[Any]) -> None:
    for logger in loggers:
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            offline_dir = getattr(experiment, "dir", None) if getattr(logger, "_offline", False) else None
            experiment.finish()  # wandb.finish(): required between multirun jobs
            if offline_dir:
                print(f"W&B run stored offline; upload it with: wandb sync {Path(offline_dir).parent}")


def _write_results(
    cfg: DictConfig, run_dir: Path, results: dict[str, dict], extra: dict[str, Any], datamodule: Any = None
) -> None:
    if not results:
        raise SetupError("Evaluation produced no metrics: no evaluation benchmark is configured (data.eval).")
    bad = datamodule.bad_samples.summary() if hasattr(datamodule, "bad_samples") else None
    # metrics.json stays benchmark -> scores unless samples were skipped: then the numbers carry the warning
    write_json(run_dir / "metrics.json", {**results, "bad_samples": bad} if bad and bad["count"] else results)
    info = {"task_name": cfg.get("task_name"), "overrides": _overrides(), **extra}
    if bad is not None:
        info["bad_samples"] = bad
    write_json(run_dir / "run_info.json", info)
    if bad and bad["count"]:
        print(f"WARNING: {bad['count']} unreadable sample(s) were skipped (listed in metrics.json, bad_samples).")
    print(
        format_table(
            results,
            f"{cfg.get('task_name', 'run')}: mIoU per split (%, {next(iter(results.values()))['convention']} convention)",
        )
    )
    print(f"metrics written to {run_dir / 'metrics.json'}")


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


def _build(cfg: DictConfig, stage: str, resume_step: int | None = None):
    """Config -> (datamodule, lightning module, loggers, trainer), after the data/weights preflight (the config
    itself is checked by the entry functions, before anything else runs). ``resume_step``: the global step of the
    checkpoint a resumed run continues from (our loggers then continue the folder's records)."""
    import lightning as L
    from hydra.utils import instantiate

    from ovseg_lab.console import one_line_per_message

    one_line_per_message()
    L.seed_everything(cfg.get("seed", 0), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    check_run(cfg, datamodule, stage)
    model = instantiate(cfg.model)
    apply_speed(model, cfg.get("speed"))
    model.run_config_yaml = resolved_yaml(cfg)
    loggers = instantiate_list(cfg.get("logger"), resume_step=resume_step)
    callbacks = run_callbacks(cfg, has_logger=bool(loggers))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **trainer_options(cfg))
    container = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(container)
    return datamodule, model, loggers, trainer


def train(cfg: DictConfig) -> dict[str, dict]:
    """Fit, then evaluate every benchmark once more with the final weights and write metrics.json."""
    if not needs_checkpoint(cfg):  # a training-free model: the run is its evaluation (train.py -m on a table works)
        print(f"{OmegaConf.select(cfg, 'model.net._target_')} trains nothing: evaluating it instead.", file=sys.stderr)
        with open_dict(cfg):
            cfg.allow_untrained = True
        return evaluate(cfg)
    check_config(cfg, "fit")  # values, combinations, launch mode: before pipeline stages, data or weights
    drop_unused_groups(cfg)  # config_resolved.yaml records only what this run builds (no CLIP for OVSegmentor)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    from ovseg_lab.lit.resume import check_resume_config, resolve_ckpt_path

    # the checkpoint, and whether this config may continue it, before any pipeline stage spends minutes
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    checkpoint = read_checkpoint(ckpt_path, key="ckpt_path") if ckpt_path else None
    if checkpoint is not None:
        check_resume_config(checkpoint, cfg, ckpt_path, bool(cfg.get("resume_force", False)))
    if cfg.get("pipeline"):  # runs this one reads from (e.g. OVSeg's toy chain), each in its own folder
        from ovseg_lab.pipeline import run_stages

        run_stages(cfg)
    write_text(run_dir / "config_resolved.yaml", resolved_yaml(cfg))
    resume_step = int(checkpoint.get("global_step", 0)) if checkpoint is not None else None
    datamodule, model, loggers, trainer = _build(cfg, "fit", resume_step)
    if (
        checkpoint is not None
    ):  # a checkpoint of another model / vocabulary: one clear paragraph, not a load_state_dict dump
        check_fits(model, checkpoint, f"Checkpoint {ckpt_path} (ckpt_path)")
        del checkpoint  # Lightning reads it again, with the optimizer and loop states
        print(f"Resuming from {ckpt_path}")
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        if trainer.interrupted:
            raise SetupError("Training was interrupted; no final evaluation was run. Resume with ckpt_path=last.")
        if not model.eval_results or model.eval_results_step != trainer.global_step:
            trainer.validate(model, datamodule=datamodule, verbose=False)  # the final weights, once
        if trainer.is_global_zero:
            _write_results(
                cfg,
                run_dir,
                model.eval_results,
                {
                    "global_step": trainer.global_step,
                    "train_seconds": round(time.time() - start, 1),
                    "resumed_from": ckpt_path,
                },
                datamodule,
            )
    finally:
        _finish_loggers(loggers)
    return model.eval_results


def _model_fitting_checkpoint(cfg: DictConfig, model: Any, checkpoint: dict[str, Any]) -> tuple[Any, DictConfig]:
    """(model, cfg): the composed model if the checkpoint fits it; else the model of the checkpoint's own stored
    config (``ovseg_config``), with this run's evaluation protocol (``model.inference``), data and trainer.

    So ``eval.py experiment=catseg_mess ckpt=<a toy CAT-Seg>`` scores the toy net with the MESS recipe's protocol on
    the MESS data, instead of refusing because the recipe's paper-size CAT-Seg has other shapes. A notice says so.
    A checkpoint without a stored config (or one that fits neither) gets check_fits' error for the composed model.
    """
    from hydra.utils import instantiate

    where = f"Checkpoint {cfg.ckpt}"
    try:
        check_fits(model, checkpoint, where)
        return model, cfg
    except SetupError:
        if not checkpoint.get("ovseg_config"):
            raise
    import ovseg_lab.resolvers  # noqa: F401  (resolvers the stored config may use)

    stored = OmegaConf.create(checkpoint["ovseg_config"])
    stored_model = resolved_model_config(stored)
    without_init_files(stored_model)
    composed_inference = OmegaConf.select(cfg, "model.inference")
    same_module = OmegaConf.select(cfg, "model._target_") == stored_model.get("_target_")
    if composed_inference is not None and "inference" in stored_model and same_module:
        stored_model.inference = OmegaConf.create(OmegaConf.to_container(composed_inference, resolve=True))
    composed_net = type(getattr(model, "net", model)).__name__
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cfg):
        cfg.model = stored_model
        if "net" in stored_model and stored_model.net.get("clip") is not None:
            cfg.clip = stored_model.net.clip  # the record shows the CLIP that was evaluated
    rebuilt = instantiate(cfg.model)
    apply_speed(rebuilt, cfg.get("speed"))
    rebuilt.run_config_yaml = resolved_yaml(cfg)
    check_fits(rebuilt, checkpoint, where)
    net = getattr(rebuilt, "net", rebuilt)
    protocol = " and evaluation protocol (model.inference)" if same_module and composed_inference is not None else ""
    print(
        f"NOTE: {where} does not fit this config's model (the experiment's {composed_net}); evaluating the model "
        f"stored in the checkpoint ({type(net).__module__}.{type(net).__qualname__}, its own model and clip "
        f"config) with this run's data{protocol}.",
        file=sys.stderr,
    )
    return rebuilt, cfg


def needs_checkpoint(cfg: DictConfig) -> bool:
    """Whether the configured net has weights of its own to load: a net class says otherwise with
    ``needs_checkpoint = False`` (the training-free methods, whose only weights are CLIP's)."""
    from hydra.utils import get_class

    target = OmegaConf.select(cfg, "model.net._target_")
    try:
        return bool(getattr(get_class(target), "needs_checkpoint", True)) if target else True
    except Exception:  # an unimportable target fails later with its own message
        return True


def evaluate(cfg: DictConfig) -> dict[str, dict]:
    """Evaluate a checkpoint (``ckpt=...``) on every configured benchmark and write metrics.json."""
    check_config(cfg, "validate")
    drop_unused_groups(cfg)
    if not cfg.get("ckpt") and not cfg.get("allow_untrained", False) and needs_checkpoint(cfg):
        raise SetupError("eval.py needs a checkpoint: pass ckpt=/path/to/last.ckpt (or allow_untrained=true).")
    # read before anything is built: an unreadable file is one paragraph, not minutes later
    checkpoint = read_checkpoint(cfg.ckpt, key="ckpt") if cfg.get("ckpt") else None
    if checkpoint is not None:
        # The checkpoint carries every weight (load_weights refuses one that lacks a key): neither earlier stages'
        # files nor pretrained downloads (OpenAI's CLIP for a converted CAT-Seg) are needed, offline included.
        for key in ("model", "clip"):
            without_init_files(cfg.get(key))
            without_pretrained_weights(cfg.get(key))
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config_resolved.yaml", resolved_yaml(cfg))
    datamodule, model, loggers, trainer = _build(cfg, "validate")
    if checkpoint is not None:
        composed = model
        model, cfg = _model_fitting_checkpoint(cfg, model, checkpoint)
        if model is not composed:  # the record names the model that was evaluated
            del composed
            write_text(run_dir / "config_resolved.yaml", resolved_yaml(cfg))
            for logger in loggers:
                logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        load_weights(model, checkpoint, f"Checkpoint {cfg.ckpt} (ckpt)")
        del checkpoint
    if cfg.get("save_predictions", False):
        model.save_predictions_dir = str(run_dir / "predictions")
    try:
        trainer.validate(model, datamodule=datamodule, verbose=False)
        if trainer.is_global_zero:
            _write_results(cfg, run_dir, model.eval_results, {"ckpt": cfg.get("ckpt")}, datamodule)
    finally:
        _finish_loggers(loggers)
    return model.eval_results


class JobFailed(RuntimeError):
    """A sweep job stopped on a user-facing error; the sweep goes on with the other jobs."""


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(cfg: DictConfig, text: str) -> str | None:
    """error.txt in the run directory: make_table.py marks the job as failed and quotes the first line.

    Never raises (the error path runs when the disk is full or the folder unwritable): returns why error.txt could
    not be written, for the paragraph, or None."""
    path = run_dir_of(cfg) / "error.txt"
    try:
        write_text(path, text.rstrip() + "\n")
    except Exception as err:  # noqa: BLE001  (OSError, or our SetupError for a full disk)
        return f"(error.txt could not be written to {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def main_guard(fn, cfg: DictConfig, training: bool = False) -> Any:
    """Claim the run folder, run ``fn(cfg)``; a :class:`SetupError` becomes a one-paragraph message and exit status 2.

    The folder is locked before anything is written into it (a second run on it stops here, naming the first), and
    the record policy applies (``ovseg_lab.run_folder``: ``training`` runs may continue the folder's own checkpoint;
    nothing else writes into another run's folder). A SetupError wrapped by Hydra's instantiate or re-raised from a
    DataLoader worker, a full disk and an unwritable output count as SetupErrors (:func:`as_user_error`).
    In a multirun sweep a failing job records error.txt and raises an ordinary exception, which Hydra stores
    as that job's result: the remaining jobs still run (Hydra reports the failure when the sweep ends).
    """
    from ovseg_lab.run_folder import claim_run_dir

    lock = None
    try:
        lock = claim_run_dir(cfg, run_dir_of(cfg), training)
        return fn(cfg)
    except Exception as err:
        setup = as_user_error(err, run_dir_of(cfg))
        if setup is None:
            import traceback

            _record_failure(cfg, f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
            raise
        # the folder of another run (or a live one's): leave no trace in it
        unrecorded = None if isinstance(setup, FolderOfAnotherRun) else _record_failure(cfg, str(setup))
        print(f"\nERROR: {setup}" + (f"\n{unrecorded}" if unrecorded else "") + "\n", file=sys.stderr)
        if _in_multirun():
            raise JobFailed(str(setup)) from None
        sys.exit(2)
    finally:
        if lock is not None:  # the folder is free again (a sweep's next job, a rerun); atexit covers a crash
            lock.release()
