"""Runs that need other runs first: a chain of stages, each an ordinary composed config run in its own folder.

A config with a ``pipeline`` node lists its stages in order::

    pipeline:
      dir: ${paths.output_dir}/stages     # where stage folders go (a shared folder lets sweep jobs share them)
      reuse: true                         # a finished stage folder (stage_done.json) is not run again
      inherit: [paths.data_dir, seed]     # parent values passed to every stage as overrides
      stages:
        clip_pretrain: {run: ovseg_lab.runner.train, config: train, overrides: [model=ovseg_clip_adapt, ...]}
        maskformer: {run: ..., config: train, overrides: ["model.net.clip_weights=${stage:clip_pretrain}/clip_adapted.pt"]}

``${stage:NAME}`` is the folder of stage NAME: ``<dir>/<NAME>-<hash>`` where the hash covers the stage's fully
composed, resolved config (which contains the folders of the stages it reads), so a folder is a content address:
same config, same folder; a changed config file or input upstream changes every folder downstream. (Code edits
are not part of the hash: ``pipeline.reuse=false`` reruns everything.) Stages run in process
before the parent run, which then reads their outputs through the same ``${stage:...}`` paths.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ovseg_lab.errors import SetupError
from ovseg_lab.run_folder import RunLock
from ovseg_lab.utils.io import write_json

_SAFE = re.compile(r"[\w./:+\-~@]*")


def _format_value(value: Any) -> str:
    """A plain value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    text = str(value)
    if _SAFE.fullmatch(text) and text not in ("null", "true", "false", ""):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _leaf_overrides(cfg: DictConfig, key: str) -> list[str]:
    node = OmegaConf.select(cfg, key, throw_on_missing=False)
    if isinstance(node, DictConfig):
        out = []
        for child in node:
            out += _leaf_overrides(cfg, f"{key}.{child}")
        return out
    value = OmegaConf.to_container(node, resolve=True) if isinstance(node, ListConfig) else node
    return [f"++{key}={_format_value(value)}"]  # ++: also into stage configs without that key


def stage_overrides(root: DictConfig, name: str) -> list[str]:
    """The overrides stage ``name`` is composed with: its own (resolved) plus the inherited parent values."""
    pipeline = root.get("pipeline")
    if pipeline is None or name not in pipeline.get("stages", {}):
        known = list(pipeline.get("stages", {})) if pipeline is not None else []
        raise SetupError(f"${{stage:{name}}} names no stage of this config's pipeline (stages: {known}).")
    spec = pipeline.stages[name]
    own = [str(o) for o in OmegaConf.to_container(spec.get("overrides", []), resolve=True)]
    inherited = [o for key in pipeline.get("inherit", []) for o in _leaf_overrides(root, str(key))]
    own_keys = {o.split("=", 1)[0].lstrip("+~") for o in own}
    return [o for o in inherited if o.split("=", 1)[0].lstrip("+") not in own_keys] + own


_FINGERPRINTS: dict[tuple, str] = {}


def _fingerprint(config_name: str, run: str | None, overrides: list[str]) -> str:
    """Hash of the stage's fully composed and resolved config (so an edit of a config file counts, not only the
    overrides); its own output folder is left out (it is what the hash names)."""
    key = (config_name, run, tuple(overrides))
    if key not in _FINGERPRINTS:
        cfg = _compose(config_name, overrides + ["paths.output_dir=STAGE_OUTPUT"], None)
        with open_dict(cfg):
            cfg.pop("hydra", None)
        text = OmegaConf.to_yaml(cfg, resolve=True)
        _FINGERPRINTS[key] = hashlib.sha1(json.dumps([run, text]).encode()).hexdigest()[:10]
    return _FINGERPRINTS[key]


def stage_dir(name: str, *, _root_: DictConfig) -> str:
    """Resolver ``${stage:NAME}``: the content-addressed folder of a stage."""
    overrides = stage_overrides(_root_, name)
    spec = _root_.pipeline.stages[name]
    digest = _fingerprint(str(spec.get("config", "train")), spec.get("run"), overrides)
    return str(Path(str(_root_.pipeline.dir)) / f"{name}-{digest}")


def _compose(config_name: str, overrides: list[str], out_dir: Path | None) -> DictConfig:
    from ovseg_lab.config import compose_config

    cfg = compose_config(overrides, config_name, with_hydra=True, reuse_hydra=True)
    with open_dict(cfg):
        if out_dir is not None:
            cfg.hydra.runtime.output_dir = str(out_dir)
            cfg.hydra.run.dir = str(out_dir)
        cfg.pop("pipeline", None)  # a stage never starts a pipeline of its own
    return cfg


def run_stages(cfg: DictConfig) -> list[Path]:
    """Run every stage of ``cfg.pipeline`` that has no finished folder yet; returns the stage folders.

    A stage folder is locked while its stage runs (:class:`~ovseg_lab.run_folder.RunLock`): a second run that needs
    the same unfinished stage at that moment stops with exit status 2 naming the first's pid."""
    from hydra.core.hydra_config import HydraConfig

    pipeline = cfg.get("pipeline")
    if pipeline is None or not pipeline.get("stages"):
        return []
    parent_hydra = HydraConfig.instance().cfg if HydraConfig.initialized() else None
    folders = []
    for name, spec in pipeline.stages.items():
        out = Path(stage_dir(name, _root_=cfg))
        folders.append(out)
        done = out / "stage_done.json"
        if pipeline.get("reuse", True) and done.is_file():
            print(f"[pipeline] stage {name}: reusing {out}")
            continue
        # one writer per stage folder: two sweep jobs (a parallel launcher) that share pipeline.dir must not train
        # the same stage into one folder at once; a stage left by a killed run is taken over with a notice
        lock = RunLock.acquire(out, elsewhere="run the sweep's jobs one after another (the next reuses the stage)")
        try:
            if pipeline.get("reuse", True) and done.is_file():  # finished by the owner we just followed
                print(f"[pipeline] stage {name}: reusing {out}")
                continue
            _run_stage(cfg, name, spec, out, parent_hydra)
        finally:
            lock.release()
    return folders


def _run_stage(cfg: DictConfig, name: str, spec: DictConfig, out: Path, parent_hydra: Any) -> None:
    """Compose stage ``name``'s config, run it in process with HydraConfig pointing at ``out``, mark it done."""
    from hydra.core.hydra_config import HydraConfig

    overrides = stage_overrides(cfg, name)
    print(f"[pipeline] stage {name} -> {out}\n[pipeline]   {spec.get('config', 'train')} {' '.join(overrides)}")
    module_name, _, function = str(spec.get("run", "ovseg_lab.runner.train")).rpartition(".")
    run = getattr(importlib.import_module(module_name), function)
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    sub = _compose(str(spec.get("config", "train")), overrides, out)
    if "ckpt_path" in sub and not sub.get("ckpt_path") and (out / "checkpoints" / "last.ckpt").is_file():
        # a stage killed after a checkpoint continues it (the record policy refuses a fresh run over its weights)
        print(f"[pipeline] stage {name}: resuming its unfinished run from {out / 'checkpoints' / 'last.ckpt'}")
        with open_dict(sub):
            sub.ckpt_path = "last"
    try:
        HydraConfig.instance().set_config(sub)
        with open_dict(sub):
            del sub["hydra"]  # as in a @hydra.main task: the hydra node lives in HydraConfig only
        run(sub)
    finally:
        if parent_hydra is not None:
            HydraConfig.instance().cfg = parent_hydra
    write_json(
        out / "stage_done.json",
        {
            "stage": name,
            "config": spec.get("config", "train"),
            "overrides": overrides,
            "seconds": round(time.time() - start, 1),
        },
    )
