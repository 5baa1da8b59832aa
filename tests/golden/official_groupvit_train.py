"""The generator's side for GroupViT's TRAINING: the release's transform, optimizer builder and scheduler, run
from an extracted NVlabs/GroupViT tree (see README.md, "GroupViT training fixtures"); the small model and the
stubs are those of official_groupvit.py (no mmcv / mmseg sources needed here).

What runs unchanged: ``datasets/builder.build_img_transform`` (under timm 0.4.12, official_timm.py),
``utils/optimizer.build_optimizer`` / ``set_weight_decay`` on ``MultiLabelContrastive``,
``utils/lr_scheduler.build_scheduler`` (timm 0.4.12's ``CosineLRScheduler``) stepped as
``main_group_vit.py:263-264`` does (``step_update(epoch * num_steps + idx)`` after each optimizer step), with the
learning rates scaled by the global batch / 4096 as ``main_group_vit.py:420-423``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tests.golden.harness import groups_by_parameter, save_fixture, seeded_input, state_change
from tests.golden.official_groupvit import CAPTIONS, ENCODERS, NOUN_LEXICON, PROJECTION, REPO, TEXT, Official, perturb
from tests.golden.official_stubs import source_module
from tests.golden.official_timm import release_timm, transform_fixture

# the GroupViT rows of experiment=ovsegmentor_main: 16 GPUs x 256 = 4096 on CC4M, 977 steps per epoch
RUN = {"gpus": 16, "per_gpu": 256, "steps_per_epoch": 977}


def release_config(root: Path):
    """configs/default.yml merged with group_vit_gcc_yfcc_30e.yml, lrs scaled as main_group_vit.py:420-423."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(
        OmegaConf.load(root / "configs" / "default.yml"),
        OmegaConf.load(root / "configs" / "group_vit_gcc_yfcc_30e.yml"),
    )
    scale = RUN["per_gpu"] * RUN["gpus"] / 4096.0
    train = cfg.train
    train.base_lr, train.warmup_lr, train.min_lr = train.base_lr * scale, train.warmup_lr * scale, train.min_lr * scale
    return cfg


def _record(name: str, commit: str, seed: int, config: dict, inputs: dict, outputs: dict, state=None) -> dict:
    return {
        "method": "groupvit",
        "name": name,
        "official_repo": REPO,
        "official_commit": commit,
        "seed": seed,
        "config": config,
        "state": state or [],
        "inputs": inputs,
        "outputs": outputs,
    }


def make_transform_fixture(root: Path, timm_dir: Path, commit: str, seed: int) -> dict[str, Any]:
    from omegaconf import OmegaConf

    img_aug = OmegaConf.to_container(release_config(root).data.img_aug)
    config, inputs, outputs = transform_fixture(root, img_aug, timm_dir, seed)
    return _record("groupvit_train_transform", commit, seed, config, inputs, outputs)


def make_schedule_fixture(root: Path, timm_dir: Path, commit: str) -> dict[str, Any]:
    """The learning rate of every step of the 30-epoch run (2 warm-up epochs), timm 0.4.12's scheduler (later
    timm renamed its ``t_mul`` argument, which utils/lr_scheduler.py passes)."""
    cfg = release_config(root)
    with release_timm(timm_dir):
        scheduler_module = source_module(root, "utils/lr_scheduler.py", "gvit_lr_scheduler")
        steps_per_epoch = RUN["steps_per_epoch"]
        optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.train.base_lr)
        scheduler = scheduler_module.build_scheduler(cfg.train, optimizer, steps_per_epoch)
        curve = []
        for epoch in range(int(cfg.train.epochs)):
            for idx in range(steps_per_epoch):
                curve.append(optimizer.param_groups[0]["lr"])  # the lr this step's optimizer.step() uses
                scheduler.step_update(epoch * steps_per_epoch + idx)  # main_group_vit.py:264, after the step
    config = {
        **RUN,
        "global_batch": RUN["gpus"] * RUN["per_gpu"],
        **{k: float(cfg.train[k]) for k in ("base_lr", "warmup_lr", "min_lr", "clip_grad")},
        "warmup_epochs": int(cfg.train.warmup_epochs),
        "epochs": int(cfg.train.epochs),
        "amp_opt_level": str(cfg.train.amp_opt_level),
    }
    return _record("groupvit_train_lr", commit, 0, config, {}, {"lr": torch.tensor(curve, dtype=torch.float64)})


def make_groups_fixture(root: Path, commit: str, seed: int) -> dict[str, Any]:
    """lr, weight decay, betas and eps of every parameter of the small GroupViT (multi-label 3) as the release's
    ``build_optimizer`` sets them."""
    cfg = release_config(root)
    off = Official(root, None, None)
    torch.manual_seed(seed)
    model = off.build("groupvit")
    recipe = perturb(model, seed)
    optimizer = source_module(root, "utils/optimizer.py", "gvit_optimizer").build_optimizer(cfg.train, model)
    groups = groups_by_parameter(model, optimizer)
    config = {
        "encoder": ENCODERS["groupvit"],
        "text": TEXT,
        "projection": PROJECTION,
        "base_lr": float(cfg.train.base_lr),
    }
    return _record("groupvit_train_groups", commit, seed, config, {}, {"groups": groups}, recipe)


STEPS = 3  # optimizer steps of the training fixture
STEP_CAPTIONS = CAPTIONS[:4]  # 3, 3, 1 and 4 nouns: one caption padded with itself, one with a noun left out
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def step_images(seed: int, step: int) -> torch.Tensor:
    """[0, 1] images (4, 3, 224, 224) of training step ``step`` (regenerated on both sides)."""
    return seeded_input((len(STEP_CAPTIONS), 3, 224, 224), seed, f"train_step_{step}").sigmoid()


def make_steps_fixture(root: Path, timm_dir: Path, commit: str, seed: int) -> dict[str, Any]:
    """Three optimizer steps as main_group_vit.py:221-264 runs them (``forward_train`` on images and the
    ``WordAugTokenizeWrapper`` texts, ``parse_losses``, backward, ``clip_grad_norm_(model.parameters(), 5)``, AdamW
    of ``build_optimizer``, ``step_update``), in float64 and with the image encoder in eval mode (no Gumbel noise)
    instead of apex O1: every parameter and buffer after them (and their change), losses, gradient norms, lrs."""
    cfg = release_config(root)
    off = Official(root, None, None)
    torch.manual_seed(seed)
    model = off.build("groupvit")
    recipe = perturb(model, seed)
    model.double()
    optimizer = source_module(root, "utils/optimizer.py", "gvit_optimizer").build_optimizer(cfg.train, model)
    with release_timm(timm_dir):
        scheduler_module = source_module(root, "utils/lr_scheduler.py", "gvit_lr_scheduler")
        scheduler = scheduler_module.build_scheduler(cfg.train, optimizer, RUN["steps_per_epoch"])
    wrapper = off.datasets.WordAugTokenizeWrapper(off.tokenize, max_word=3)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    model.img_encoder.eval()
    np.random.seed(seed)  # the prompts' noun and template draws (builder.py:330-332)
    losses, norms, lrs = [], [], []
    for idx in range(STEPS):
        text = torch.stack([wrapper(caption) for caption in STEP_CAPTIONS])  # (B, 1 + 3, 77)
        optimizer.zero_grad()
        out = model.forward_train(((step_images(seed, idx) - mean) / std).double(), text)
        loss = sum(value for key, value in out.items() if "loss" in key)  # utils/misc.py parse_losses
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)))
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step_update(idx)
        losses.append({"total": float(loss), **{k: float(v) for k, v in out.items()}})
    config = {
        "encoder": ENCODERS["groupvit"],
        "text": TEXT,
        "projection": PROJECTION,
        "clip_grad": float(cfg.train.clip_grad),
        "steps": STEPS,
    }
    inputs = {"captions": STEP_CAPTIONS, "nouns": [[w for w in c.split() if w in NOUN_LEXICON] for c in STEP_CAPTIONS]}
    outputs = {"losses": losses, "grad_norms": norms, "lr": lrs, "state": state_change(model, before, seed)}
    return _record("groupvit_train_steps", commit, seed, config, inputs, outputs, recipe)


def make(official: Path, extra: dict, out: Path, commit: str, seed: int) -> list[Path]:
    official = Path(official).resolve()
    if not extra.get("timm"):
        raise SystemExit("--timm <timm 0.4.12 extracted from pytorch-image-models> is needed for groupvit_train")
    fixtures = [make_transform_fixture(official, Path(extra["timm"]), commit, seed)]  # before timm's models load
    fixtures.append(make_schedule_fixture(official, Path(extra["timm"]), commit))
    fixtures.append(make_groups_fixture(official, commit, seed))
    fixtures.append(make_steps_fixture(official, Path(extra["timm"]), commit, seed))
    return [save_fixture(f, out / f"{f['name']}.pt") for f in fixtures]
