"""Shared fixtures: a small toy benchmark and Hydra composition helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ovseg_lab.resolvers  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SMALL_TOY = {"num_train": 64, "num_val": 16, "seed": 0, "image_size": 64}
# transformers.SamConfig arguments of a tiny random-init Segment Anything (64x64 input): OVSeg's SAM proposals offline
TINY_SAM_CONFIG = {
    "vision_config": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 8,
        "output_channels": 16,
        "window_size": 4,
        "global_attn_indexes": [1],
        "mlp_dim": 64,
        "num_pos_feats": 8,
    },
    "prompt_encoder_config": {"hidden_size": 16, "image_size": 64, "patch_size": 8, "mask_input_channels": 4},
    "mask_decoder_config": {
        "hidden_size": 16,
        "mlp_dim": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "iou_head_hidden_dim": 16,
    },
}


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    """A data_dir holding a small toy benchmark at data_dir/toy (64 train, 16 val images per split)."""
    from ovseg_lab.data.toy import ToyConfig, generate_toy

    data_dir = tmp_path_factory.mktemp("data")
    generate_toy(data_dir / "toy", ToyConfig(**SMALL_TOY), progress=False)
    return data_dir


def small_toy_overrides(data_dir: Path) -> list[str]:
    return [f"paths.data_dir={data_dir}"] + [f"data.generate_toy.{k}={v}" for k, v in SMALL_TOY.items()]


def compose(config_name: str = "train", overrides: list[str] | None = None, run_dir: Path | None = None):
    """Compose a config as the entry points do, with ${hydra:...} resolvable."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.run.dir = str(run_dir)
    else:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = "outputs/test"
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def compose_cfg():
    return compose


@pytest.fixture(scope="session")
def quickstart_run(toy_data_dir, tmp_path_factory) -> Path:
    """A quickstart run of the cost-volume baseline (a few steps on the small toy set; cheaper than the default CAT-Seg
    chain): its run directory, with metrics.json and checkpoints/last.ckpt."""
    import subprocess
    import sys

    run_dir = tmp_path_factory.mktemp("quickstart_run")
    cmd = [
        sys.executable,
        "train.py",
        "experiment=quickstart",
        "model=costvolume",
        "logger=csv",
        "trainer.max_steps=12",
        "trainer.val_check_interval=12",
        f"hydra.run.dir={run_dir}",
        *small_toy_overrides(toy_data_dir),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
