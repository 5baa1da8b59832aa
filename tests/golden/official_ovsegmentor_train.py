"""The generator's side for OVSegmentor's TRAINING: the release's transforms, optimizer builder, scheduler and
training loop, run from an extracted Jazzcharles/OVSegmentor tree (see README.md, "OVSegmentor training
fixtures"). The model, its stubs and its small size are those of official_ovsegmentor.py.

What runs unchanged: ``datasets/builder.build_img_transform`` (under timm 0.6.12, official_timm.py),
``utils/optimizer.build_optimizer`` / ``set_weight_decay``, ``utils/lr_scheduler.build_scheduler`` (timm's
``CosineLRScheduler`` of the installed timm; the stage-2 curve is official_ovsegmentor.make_schedule_fixture's),
``utils/misc.momentum_update``
and ``main_pretrain.py``'s learning-rate scaling (batch / 4096, lines 590-592) and step order (lines 341-359:
``zero_grad``, ``backward``, ``clip_grad_norm_(model.parameters(), clip_grad)``, ``step``, ``step_update``,
``momentum_update(img_encoder, img_encoder_momentum, 0.99)``). The loop's body is written out here because
``train_one_epoch`` also needs the data loader, apex and the distributed wrapper; the three optimizer steps run in
float64 with the encoders without Gumbel noise, as the one-step fixture (official_ovsegmentor.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.golden.harness import groups_by_parameter, save_fixture, state_change
from tests.golden.official_ovsegmentor import (
    CONFIG,
    LOSS_CAPTIONS,
    PAIR_ENTITIES,
    REPO,
    _clip_dataset,
    _normalise,
    _tokenizer,
    build_official,
    loss_inputs,
    make_schedule_fixture,
    official_questions,
)
from tests.golden.official_stubs import detectron2_function, source_module
from tests.golden.official_timm import transform_fixture

# the paper runs (scripts/run.sh, run_stage2.sh): stage 1 on 16 GPUs x 256, stage 2 on 8 GPUs x 128
STAGES = {
    "stage1": {"gpus": 16, "per_gpu": 256, "steps_per_epoch": 977},
    "stage2": {"gpus": 8, "per_gpu": 128, "steps_per_epoch": 3906},
}
STEPS = 3  # optimizer steps of the training fixture
STEP_SEED_OFFSET = 100  # batch k of the step fixture: loss_inputs(seed + 100 k)


def stage_config(root: Path, stage: str):
    """configs/default.yml merged with the stage's file, learning rates scaled as main_pretrain.py:590-592."""
    from omegaconf import OmegaConf

    default = OmegaConf.load(root / "configs" / "default.yml")
    own = OmegaConf.load(root / "configs" / "ovsegmentor" / f"ovsegmentor_pretrain_vit_bert_{stage}.yml")
    cfg = OmegaConf.merge(default, own)
    run = STAGES[stage]
    scale = run["per_gpu"] * run["gpus"] / 4096.0
    train = cfg.train
    train.base_lr, train.warmup_lr, train.min_lr = train.base_lr * scale, train.warmup_lr * scale, train.min_lr * scale
    return cfg


def _record(stage: str, commit: str, seed: int, name: str, config: dict, inputs: dict, outputs: dict, state=None):
    return {
        "method": "ovsegmentor",
        "name": name,
        "official_repo": REPO,
        "official_commit": commit,
        "seed": seed,
        "stage": stage,
        "config": config,
        "state": state or [],
        "inputs": inputs,
        "outputs": outputs,
    }


def make_transform_fixture(root: Path, timm_dir: Path, commit: str, seed: int, stage: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    img_aug = OmegaConf.to_container(stage_config(root, stage).data.img_aug)
    config, inputs, outputs = transform_fixture(root, img_aug, timm_dir, seed)
    return _record(stage, commit, seed, f"ovsegmentor_train_transform_{stage}", config, inputs, outputs)


def official_model(root: Path, stage: str, seed: int) -> tuple[nn.Module, list[tuple]]:
    """The small MultiLabelContrastive of official_ovsegmentor.py (stage 2: mask loss, momentum encoder); stage 2
    freezes the text tower as ``text_encoder.fixed: true`` does (models/transformer.py:128-130)."""
    model, recipe = build_official(root, 0.5, seed)
    if stage == "stage2":
        for param in model.text_encoder.parameters():
            param.requires_grad = False
    return model, recipe


def make_groups_fixture(root: Path, commit: str, seed: int, stage: str) -> dict[str, Any]:
    """lr, weight decay, betas and eps of every parameter the release's ``build_optimizer`` trains."""
    cfg = stage_config(root, stage)
    model, recipe = official_model(root, stage, seed)
    optimizer_module = source_module(root, "utils/optimizer.py", "ovsm_optimizer")
    optimizer = optimizer_module.build_optimizer(cfg.train, model)
    groups = groups_by_parameter(model, optimizer)
    config = {**CONFIG, "group_ratio": 0.5, "base_lr": float(cfg.train.base_lr)}
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    return _record(
        stage,
        commit,
        seed,
        f"ovsegmentor_train_groups_{stage}",
        config,
        {},
        {"groups": groups, "frozen": frozen},
        recipe,
    )


def make_steps_fixture(root: Path, commit: str, seed: int) -> dict[str, Any]:
    """Three stage-2 optimizer steps of the release on three batches of images sharing an entity with their
    partners: every parameter and buffer afterwards (and what changed), the losses, gradient norms and lrs."""
    cfg = stage_config(root, "stage2")
    model, recipe = official_model(root, "stage2", seed)
    model.double()
    optimizer = source_module(root, "utils/optimizer.py", "ovsm_optimizer").build_optimizer(cfg.train, model)
    scheduler = source_module(root, "utils/lr_scheduler.py", "ovsm_lr_scheduler").build_scheduler(
        cfg.train, optimizer, STAGES["stage2"]["steps_per_epoch"]
    )
    misc = detectron2_function(root, "utils/misc.py", "momentum_update")
    module = _clip_dataset(root)
    template_index = module.full_imagenet_templates.index(CONFIG["template"])
    qa = official_questions(root, LOSS_CAPTIONS, template_index)
    process_text = detectron2_function(root, "main_pretrain.py", "process_text")
    process_text.__globals__["tokenizer"] = _tokenizer()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses, norms, lrs = [], [], []
    model.train()
    model.img_encoder.eval()
    model.img_encoder_momentum.eval()
    for idx in range(STEPS):
        inputs = loss_inputs(seed + STEP_SEED_OFFSET * idx)
        optimizer.zero_grad()
        out = model.forward_train(
            image=_normalise(inputs["image"]).double(),
            text=process_text(LOSS_CAPTIONS),
            cross_image=_normalise(inputs["pair_image"]).double(),
            cross_entity=process_text(["A photo of " + e for e in PAIR_ENTITIES]),
            question=process_text([q for q, _ in qa]),
            answer=process_text([a for _, a in qa]),
            entity_masks=None,
            question_masks=None,
        )
        out["loss"].backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)))
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step_update(idx)
        misc(model.img_encoder, model.img_encoder_momentum, 0.99)
        losses.append({k: float(v) for k, v in out.items()})
    config = {**CONFIG, "group_ratio": 0.5, "clip_grad": float(cfg.train.clip_grad), "steps": STEPS}
    outputs = {"losses": losses, "grad_norms": norms, "lr": lrs, "state": state_change(model, before, seed)}
    inputs = {
        "captions": LOSS_CAPTIONS,
        "pair_entities": PAIR_ENTITIES,
        "batch_seeds": [seed + STEP_SEED_OFFSET * k for k in range(STEPS)],
    }
    return _record("stage2", commit, seed, "ovsegmentor_train_steps_stage2", config, inputs, outputs, recipe)


def make(official: Path, extra: dict, out: Path, commit: str, seed: int) -> list[Path]:
    official = Path(official).resolve()
    if not extra.get("timm"):
        raise SystemExit("--timm <timm 0.6.12 extracted from pytorch-image-models> is needed for ovsegmentor_train")
    fixtures = [make_transform_fixture(official, Path(extra["timm"]), commit, seed, s) for s in STAGES]
    stage2 = STAGES["stage2"]
    fixtures.append(
        make_schedule_fixture(official, commit, "stage2", stage2["gpus"], stage2["per_gpu"], stage2["steps_per_epoch"])
    )
    fixtures += [make_groups_fixture(official, commit, seed, s) for s in STAGES]
    fixtures.append(make_steps_fixture(official, commit, seed))
    return [save_fixture(f, out / f"{f['name']}.pt") for f in fixtures]
