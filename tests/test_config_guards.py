"""Config checks of issue 24: learning rates, crop sizes, run length, groups the chosen model does not read;
Hydra-wrapped errors unwrapped; ckpt_path checked before any pipeline stage."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ovseg_lab.config_checks import config_problems
from tests.conftest import ROOT, compose, small_toy_overrides


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.optimizer.lr=-0.001"], "model.optimizer.lr=-0.001 must be > 0"),
        (["model.optimizer.lr=0"], "model.optimizer.lr=0 must be > 0"),
        (["model.backbone_lr_multiplier=-1"], "model.backbone_lr_multiplier=-1 must be >= 0"),
        (["data.transform.crop_size=7"], "crop_size=7 is below the 8 px patch of the model's CLIP image tower"),
        (["data.transform.crop_size=0"], "crop_size=0 must be a positive integer"),
        (["trainer.max_steps=0"], "trainer.max_steps=0 trains nothing"),
        (["trainer.max_steps=-5"], "trainer.max_steps=-5 must be >= -1"),
        (["trainer.max_steps=-1"], "trainer.max_steps=-1 (train by epochs) needs trainer.max_epochs > 0"),
        (["model=lseg", "finetune=qv"], "finetune=qv: model=lseg does not read the finetune group"),
        (
            ["model=ovseg", "aggregation=feature"],
            "aggregation=feature: model=ovseg does not read the aggregation group",
        ),
        (["model=costvolume", "aggregation.input=feature"], "model=costvolume does not read the aggregation group"),
        (["model=ovsegmentor", "clip=vitl14"], "clip=vitl14: model=ovsegmentor does not read the clip group"),
    ],
)
def test_new_config_checks_name_the_key(overrides, message):
    cfg = compose("train", ["experiment=quickstart", *overrides])
    assert any(message in p for p in config_problems(cfg)), config_problems(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model=catseg", "finetune=qv", "aggregation=feature"],  # the groups CAT-Seg reads
        ["model=costvolume", "finetune=attn"],
        ["model=ovseg"],  # max_steps: 0 in a pipeline's assembling run (its stages train)
        ["model=lseg"],  # the experiment's own finetune choice is not the user's
        ["trainer.max_steps=-1", "trainer.max_epochs=2"],
        ["model.backbone_lr_multiplier=0"],
    ],
)
def test_valid_settings_pass(overrides):
    assert config_problems(compose("train", ["experiment=quickstart", *overrides])) == []


@pytest.mark.parametrize(
    "overrides, minimum, what",
    [
        (["experiment=catseg_vitb16_coco"], 16, "patch of the model's CLIP image tower"),
        (["experiment=quickstart", "model=costvolume"], 8, "patch of the model's CLIP image tower"),
        (["experiment=lseg_ade20k"], 32, "1/32 level of LSeg's DPT pyramid"),  # ViT-L/16: the pyramid, not the patch
        (["experiment=ovseg"], 32, "MaskFormer's size divisibility"),
        (
            ["experiment=quickstart", "model=ovsegmentor", "model.net.image_encoder.patch_size=16"],
            16,
            "patch of the group ViT image encoder",
        ),
        (["experiment=quickstart", "model=groupvit"], 8, "patch of the group ViT image encoder"),
    ],
)
def test_the_crop_check_asks_the_chosen_model_for_its_minimum(overrides, minimum, what):
    """Each family's own minimum (one cell of its coarsest map), from its config: below it refused, at it accepted."""
    from omegaconf import open_dict

    cfg = compose("train", overrides)
    with open_dict(cfg):
        cfg.data.transform.crop_size = minimum - 1
    below = config_problems(cfg)
    assert any(f"crop_size={minimum - 1} is below the {minimum} px" in p and what in p for p in below), below
    with open_dict(cfg):
        cfg.data.transform.crop_size = minimum
    assert not any("crop_size" in p for p in config_problems(cfg))


def test_the_minimum_crops_are_the_models_real_limits():
    """The rules match the nets: LSeg trains at its 32 px minimum (one cell at 1/32; BatchNorm needs a batch of 2
    there) and OVSeg's strict tiny Swin accepts only crops that pad to its 64 px (the check refuses 96 up front)."""
    import torch
    from hydra.utils import instantiate

    from ovseg_lab.build import resolved_model_config, without_init_files

    def net(overrides):
        model_cfg = resolved_model_config(compose("train", overrides))
        without_init_files(model_cfg)
        return instantiate(model_cfg.net)

    lseg = net(["experiment=quickstart", "model=lseg"]).train()
    from ovseg_lab.vocab import vocabulary_from_names

    assert lseg(torch.rand(2, 3, 32, 32), vocabulary_from_names("a,b")).shape == (2, 2, 32, 32)

    ovseg = ["experiment=quickstart", "model=ovseg"]
    assert not any("crop_size" in p for p in config_problems(compose("train", [*ovseg, "data.transform.crop_size=64"])))
    (problem,) = [p for p in config_problems(compose("train", [*ovseg, "data.transform.crop_size=96"])) if "crop" in p]
    assert "built for 64 px" in problem and "strict_img_size=false" in problem
    backbone = net(ovseg).maskformer.backbone
    backbone(torch.rand(1, 3, 64, 64))
    with pytest.raises(AssertionError, match="doesn't match model"):
        backbone(torch.rand(1, 3, 96, 96))


def test_a_setup_error_inside_instantiation_reaches_the_user_unwrapped(toy_data_dir, tmp_path):
    """A missing clip.weights file raises our SetupError inside Hydra's instantiate; the user (and error.txt, which
    make_table quotes) gets our paragraph, not 'InstantiationException: Error in call to target'."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "experiment=quickstart",
            "model=costvolume",
            "logger=csv",
            f"clip.weights={tmp_path / 'missing.pt'}",
            f"hydra.run.dir={run}",
            *small_toy_overrides(toy_data_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "missing.pt" in proc.stderr
    assert "InstantiationException" not in proc.stderr + proc.stdout and "Error in call to target" not in proc.stderr
    assert "Traceback" not in proc.stderr
    error = (run / "error.txt").read_text()
    assert "missing.pt" in error and "Error in call to target" not in error


def test_a_bad_ckpt_path_stops_before_any_pipeline_stage(toy_data_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "experiment=quickstart",
            "logger=csv",  # CAT-Seg: a 2-stage chain
            f"ckpt_path={tmp_path / 'nope.ckpt'}",
            f"hydra.run.dir={run}",
            *small_toy_overrides(toy_data_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "no such checkpoint file" in proc.stderr, proc.stderr[-3000:]
    assert "[pipeline]" not in proc.stdout and not (run / "stages").exists()


def test_the_preflight_names_an_unavailable_bert_for_ovsegmentor(monkeypatch, tmp_path):
    import ovseg_lab.preflight as preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # network_reachable() -> False without trying
    monkeypatch.setattr(preflight, "bert_cached", lambda name: False)
    cfg = compose("train", ["experiment=ovsegmentor_stage1"])
    (problem,) = preflight.missing_text_encoders(cfg)
    assert "BERT text encoder 'bert-base-uncased'" in problem and "not in the Hugging Face cache" in problem
    cfg = compose("train", ["experiment=ovsegmentor_stage1", f"model.net.text_encoder.pretrained={tmp_path / 'bert'}"])
    assert preflight.missing_text_encoders(cfg) == [
        f"the BERT text encoder folder {tmp_path / 'bert'} (model.net.text_encoder.pretrained) does not exist"
    ]
    assert preflight.missing_text_encoders(compose("train", ["experiment=quickstart"])) == []
