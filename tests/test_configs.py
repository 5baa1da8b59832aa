"""Every option of every config group composes and the composed nodes have what instantiation needs."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose

GROUPS = ["model", "clip", "finetune", "aggregation", "data", "trainer", "logger", "callbacks", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose("train", [f"{group}={option}"])
    # every interpolation resolves
    container = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in cfg
        if k != "hydra"
    }
    assert container["model"]["_target_"]
    assert container["data"]["_target_"]


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "data" / "eval").glob("*.yaml")))
def test_every_eval_benchmark_composes(option):
    from ovseg_lab.data.mess import load_catalog

    cfg = compose("train", [f"data/eval=[{option}]"])
    if option == "mess":  # the collection: every MESS benchmark, in MESS's order
        assert list(cfg.data.eval) == [f"mess_{key}" for key in load_catalog()]
        return
    assert list(cfg.data.eval) == [option]
    entry = cfg.data.eval[option]
    assert entry.get("root") or entry.mess in load_catalog()  # a MESS entry finds its folders under data.root


def test_eval_config_composes():
    cfg = compose("eval", ["experiment=quickstart", "ckpt=x.ckpt"])
    assert cfg.ckpt == "x.ckpt" and cfg.task_name == "quickstart"


def test_paper_defaults():
    cfg = compose("train")
    assert cfg.clip.model_name == "ViT-B-16" and cfg.clip.pretrained == "openai" and cfg.clip.image_size == 384
    assert cfg.finetune.strategy == "qv"
    assert cfg.data.train.name == "coco_stuff"
    assert list(cfg.data.eval) == ["ade847", "pc459", "ade150", "pc59", "voc20", "voc20b"]


def test_unknown_key_fails_at_compose_time():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("train", ["model.no_such_key=1"])


def test_slurm_launcher_starts_one_task_per_device():
    """hydra/launcher=slurm: SLURM (not Lightning) starts the DDP ranks, one task per device on each node."""
    cfg = compose(
        "train",
        [
            "experiment=catseg_table6",
            "trainer=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra/launcher=slurm",
            "hydra.sweep.dir=/sweep",
        ],
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.nodes) == (4, 4, 2)
    assert cfg.hydra.launcher.submitit_folder == "/sweep/.submitit/%j"
