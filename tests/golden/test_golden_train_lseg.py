"""LSeg TRAINS as the official release does (isl-org/lang-seg's train.sh, PyTorch-Encoding's dataset and loss):
golden fixtures made by ``make_golden.py --method lseg_train`` (what each ran: official_lseg_train.py).

Our side is what ``experiment=lseg_ade20k`` builds: its transform, its optimizer / scheduler / parameter groups
through ``DenseSupervisedModule.configure_optimizers``, its training step. The official weights are converted
with OUR converter (ovseg_lab.convert.lseg) and loaded strictly into OUR net.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hydra.utils import instantiate

from ovseg_lab.convert.lseg import convert_lseg_state_dict
from ovseg_lab.data.transforms import LongSideDraw, build_train_transform
from ovseg_lab.lit import DenseSupervisedModule
from ovseg_lab.vocab import Vocabulary
from tests.golden.harness import TOLERANCE, digest_error, load_fixture
from tests.golden.test_golden_lseg import our_lseg

RECIPE = "experiment=lseg_ade20k"
CLIP_PREFIX = "net.clip_pretrained."
UPDATE_TOLERANCE = 1e-4  # relative error of the three steps' weight change, plus the fp32 rounding of the weights  # the text tower: frozen, no optimizer holds it (on either side)


def ours_from_raw(mask: torch.Tensor) -> torch.Tensor:
    """Our train ids of a raw ADE-style mask: the release's ``mask - 1`` with its ignore value -1 as our 255."""
    labels = mask.long() - 1
    return torch.where(labels < 0, torch.full_like(labels, 255), labels)


def official_names(fixture: dict) -> dict[str, str]:
    """Our parameter / buffer name (``net.`` + key) -> the official one, through our converter (keys it drops
    are absent)."""
    marked = {key: torch.full(shape, float(i)) for i, (key, shape, *_) in enumerate(fixture["state"])}
    converted = convert_lseg_state_dict(marked, prefix="")
    keys = [key for key, *_ in fixture["state"]]
    return {"net." + ours: keys[int(value.flatten()[0])] for ours, value in converted.items() if value.numel()}


def recipe_module(compose_cfg, fixture: dict, overrides: tuple[str, ...] = ()) -> tuple[DenseSupervisedModule, dict]:
    """Our LightningModule as the recipe builds it (optimizer, scheduler, group options), around the fixture's
    small net with the official weights; and ``configure_optimizers``' answer."""
    cfg = compose_cfg("train", [RECIPE, *overrides])
    net = our_lseg(fixture)
    net.decoder.lr_multiplier = float(cfg.model.net.decoder_lr_multiplier)
    module = DenseSupervisedModule(
        net,
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(cfg.model.scheduler),
        backbone_lr_multiplier=cfg.model.backbone_lr_multiplier,
        weight_decay_norm=cfg.model.weight_decay_norm,
        weight_decay_embed=cfg.model.weight_decay_embed,
    )
    return module, module.configure_optimizers()


# ------------------------------------------------------------------------------------------------ transform
def test_golden_train_lseg_transform_replays_the_release(compose_cfg):
    """PyTorch-Encoding's _sync_transform (flip, random long side, PIL bilinear / nearest, black padding of the
    image and ignore padding of the label, random crop; then mask - 1) with the release's draws replayed on the
    recipe's transform (at the fixture's small size): labels exact, images within 1 grey level, padded and
    unpadded crops, flipped and not."""
    fixture = load_fixture("lseg_train_transform")
    config = fixture["config"]
    low, high = config["long_side"]
    cfg = compose_cfg(
        "train", [RECIPE, f"data.transform.crop_size={config['crop_size']}", f"data.transform.long_side=[{low},{high}]"]
    )
    transform = build_train_transform(ignore_index=cfg.data.train.ignore_index, **cfg.data.transform)
    worst = 0
    for case in fixture["outputs"]["cases"]:
        image = fixture["inputs"]["images"][case["image_index"]]
        label = ours_from_raw(fixture["inputs"]["masks"][case["image_index"]])
        crop, crop_label = transform.apply(image, label, LongSideDraw(**case["draw"]))
        official = case["label"].long()
        assert torch.equal(torch.where(crop_label == 255, -1, crop_label), official), case["draw"]
        worst = max(worst, int((crop.int() - case["crop"].int()).abs().max()))
    assert worst <= 1, f"image crops differ by {worst} grey levels"


def test_golden_train_lseg_transform_draws_in_the_release_ranges():
    """Our draws cover the release's ranges: long side in [base/2, 2 base] inclusive, crop offsets in the padded
    image, flips about half the time (torch's generator instead of Python's random: the streams differ)."""
    transform = build_train_transform(style="encoding", crop_size=480, long_side=[260, 1040])
    torch.manual_seed(0)
    draws = [transform.draw(375, 500) for _ in range(3000)]
    sides = [d.long_side for d in draws]
    assert min(sides) == 260 and max(sides) == 1040
    assert 0.45 < sum(d.flip for d in draws) / len(draws) < 0.55
    for d in draws:
        h, w = transform.resized_size(375, 500, d.long_side)
        assert 0 <= d.left <= max(w, 480) - 480 and 0 <= d.top <= max(h, 480) - 480
    with pytest.raises(ValueError, match="color_jitter"):
        build_train_transform(style="encoding", color_jitter=True)


# ------------------------------------------------------------------------------------------- optimizer
def test_golden_train_lseg_param_groups_equal_the_release(compose_cfg):
    """configure_optimizers: SGD, the ViT and its reassembly (``pretrained``) at the base lr, the DPT / head
    (``scratch``) at 10x, momentum 0.9, weight decay 1e-4 on every parameter, nothing of the text tower; per
    parameter through our converter, at the recipe's lr (0.004 / 16 x batch 1)."""
    fixture = load_fixture("lseg_train_optimizer")
    module, configured = recipe_module(compose_cfg, fixture)
    optimizer = configured["optimizer"]
    assert type(optimizer).__name__ == fixture["outputs"]["optimizer"]
    names = official_names(fixture)
    ours = {}
    param_names = {id(p): name for name, p in module.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            ours[names[param_names[id(param)]]] = {
                key: group[key] for key in ("lr", "weight_decay", "momentum", "dampening", "nesterov")
            }
    official = fixture["outputs"]["params"]
    kept = {key for key in official if key in names.values()}
    assert set(ours) == kept, sorted(set(ours) ^ kept)
    for key in kept:
        assert ours[key] == pytest.approx(official[key], rel=1e-12), key
    # what our converter drops gets no gradient in the release (unused ViT norm / head, refinenet4.resConfUnit1)
    dropped = sorted(set(official) - kept)
    assert all(".norm." in k or ".head." in k or "resConfUnit1" in k for k in dropped), dropped
    assert all(k.startswith(CLIP_PREFIX) for k in fixture["outputs"]["not_optimized"])


def test_golden_train_lseg_lr_of_every_step_of_the_ade_run(compose_cfg):
    """The release's LambdaLR(pow(1 - epoch / 240, 0.9)) stepped per epoch, at 0.004 / 16 x batch 1: our per-step
    scheduler gives each of the recipe's 404,400 optimizer steps (240 epochs of ceil(ceil(20210 / 6) / 2) = 1685
    steps) the lr of its epoch, for both groups."""
    fixture = load_fixture("lseg_train_optimizer")
    cfg = compose_cfg("train", [RECIPE])
    epoch_steps, epochs = cfg.lseg_release.epoch_steps, cfg.lseg_release.max_epochs
    assert (epoch_steps, epochs, cfg.trainer.max_steps) == (1685, 240, 240 * 1685)
    epoch_lrs = fixture["outputs"]["epoch_lrs"]  # (240, groups): pretrained, scratch
    assert epoch_lrs.shape[0] == epochs
    _, configured = recipe_module(compose_cfg, fixture)
    scheduler = configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "step"
    factor = scheduler.lr_lambdas[0]
    factors = torch.tensor([factor(step) for step in range(cfg.trainer.max_steps)], dtype=torch.float64)
    base = torch.tensor(scheduler.base_lrs, dtype=torch.float64)
    ours = factors[:, None] * base[None]
    expected = epoch_lrs.repeat_interleave(epoch_steps, 0)
    assert sorted(base.tolist()) == sorted(epoch_lrs[0].tolist())
    order = [base.tolist().index(v) for v in epoch_lrs[0].tolist()]
    error = ((ours[:, order] - expected).abs() / expected).max().item()
    assert error <= 1e-12, f"lr relative error {error:.1e}"
    # the scheduler object itself, stepped as Lightning steps it, across the first epoch boundary
    optimizer = scheduler.optimizer
    for step in range(epoch_steps + 2):
        lrs = [group["lr"] for group in optimizer.param_groups]
        assert lrs == pytest.approx(ours[step].tolist(), rel=1e-12), step
        optimizer.step()
        scheduler.step()


# ------------------------------------------------------------------------------------------- three steps
def test_golden_train_lseg_three_steps_equal_the_release(compose_cfg):
    """Three optimizer steps of 2 accumulated batches of one image from the same weights: SegmentationLosses
    (cross-entropy, ignore -1 = our 255), SGD with the release's groups, the per-epoch schedule (epochs of 2 steps:
    the recipe with 4 training images on 1 device), BatchNorm in train mode over one image: every loss, lr,
    parameter and buffer afterwards within 1e-5 relative."""
    fixture = load_fixture("lseg_train_steps")
    config = fixture["config"]
    overrides = (
        "lseg_release.train_images=4",
        "trainer.devices=1",
        f"lseg_release.max_epochs={config['max_epochs']}",
        f"lseg_release.lr_per_image={config['base_lr'] / 16}",  # the fixture's 100x lr (official_lseg_train.py)
    )
    cfg = compose_cfg("train", [RECIPE, *overrides])
    assert cfg.lseg_release.epoch_steps == config["steps_per_epoch"]
    assert cfg.trainer.accumulate_grad_batches == config["accumulate_grad_batches"]
    assert cfg.data.batch_size == config["batch_size"]
    module, configured = recipe_module(compose_cfg, fixture, overrides)
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    module.train()
    start = {key: value.clone() for key, value in module.state_dict().items()}
    vocabulary = Vocabulary("golden", tuple(config["labels"]))
    accumulate = cfg.trainer.accumulate_grad_batches
    batches = fixture["inputs"]["batches"]
    losses, lrs = [], []
    with mock.patch.object(DenseSupervisedModule, "train_vocabulary", new=property(lambda self: vocabulary)):
        for step in range(config["steps"]):
            lrs.append(sorted(group["lr"] for group in optimizer.param_groups))
            for index in range(step * accumulate, (step + 1) * accumulate):
                batch = {"image": batches[index]["image"][None], "label": ours_from_raw(batches[index]["mask"])[None]}
                loss = module.training_step(batch, index)
                losses.append(float(loss.detach()))
                (loss / accumulate).backward()  # Lightning's accumulation
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()  # interval: step
    official_losses = fixture["outputs"]["losses"]
    assert torch.allclose(torch.tensor(losses), official_losses, rtol=TOLERANCE, atol=0), (losses, official_losses)
    assert torch.allclose(
        torch.tensor(lrs, dtype=torch.float64), fixture["outputs"]["lrs"].sort(-1).values, rtol=1e-12, atol=0
    )
    names = official_names(fixture)
    state = module.state_dict()
    compared = 0
    for ours_key, official_key in names.items():
        if official_key.startswith(CLIP_PREFIX):
            continue
        after = fixture["outputs"]["state"][official_key]
        error = digest_error(state[ours_key], after, floor=1e-12)
        assert error <= TOLERANCE, f"{ours_key} ({official_key}): relative error {error:.2e} after 3 steps"
        # the update itself (~1e-3 of the weights): known to the precision fp32 weights hold it with
        update = state[ours_key].double() - start[ours_key].double()
        error = digest_error(update, fixture["outputs"]["updates"][official_key], floor=1e-12)
        rounding = 4 * 2**-24 * float(state[ours_key].double().norm() / update.norm().clamp_min(1e-30))
        allowed = UPDATE_TOLERANCE + rounding
        assert error <= allowed, f"{ours_key} ({official_key}): update relative error {error:.2e} > {allowed:.1e}"
        compared += 1
    assert compared == sum(not k.startswith(CLIP_PREFIX) for k in names.values())
    # the weights did move (a test of nothing would pass too), BatchNorm statistics included
    moved = {k for k, d in fixture["outputs"]["updates"].items() if digest_error(torch.zeros(d["shape"]), d) > 0}
    assert any("running_mean" in k for k in moved) and any("scratch.head1" in k for k in moved)
    assert any("pretrained.model.blocks" in k for k in moved)


# ------------------------------------------------------------------------------------------- recipe facts
# lang-seg's train.sh / utils.py / lsegmentation_module.py values, as each LSeg paper recipe composes them
RELEASE_TRAINING = {
    "devices": 6,  # the paper's GPU count (a choice: the release trains on every visible GPU)
    "batch_size": 1,  # per process: train.sh --batch_size 1
    "accumulate_grad_batches": 2,
    "sync_batchnorm": True,  # utils.py: hparams.sync_batchnorm = True
    "precision": "32-true",  # Lightning 1.4's default, amp disabled in the module
    "gradient_clip_val": None,
    "lr": 0.004 / 16 * 1,  # base_lr / 16 x the per-process batch
}


@pytest.mark.parametrize("experiment", ["lseg_ade20k", "lseg_ovs"])
def test_golden_train_lseg_recipes_take_the_release_training(compose_cfg, experiment):
    """Batch per process and global, accumulation, SyncBN, precision, clipping, lr formula, optimizer, decoder
    multiplier, transform of the supervised LSeg recipes; the ADE run's length, schedule, evaluation period and
    checkpoint selection (lseg_ovs's length is ours: LSeg never trained on COCO-Stuff)."""
    cfg = compose_cfg("train", [f"experiment={experiment}"])
    trainer = cfg.trainer
    assert trainer.devices == RELEASE_TRAINING["devices"] and cfg.data.batch_size == RELEASE_TRAINING["batch_size"]
    assert trainer.accumulate_grad_batches == RELEASE_TRAINING["accumulate_grad_batches"]
    assert trainer.devices * cfg.data.batch_size * trainer.accumulate_grad_batches == 12  # images per step
    assert trainer.sync_batchnorm is RELEASE_TRAINING["sync_batchnorm"]
    assert trainer.strategy._target_.endswith("DDPStrategy")
    assert trainer.precision == RELEASE_TRAINING["precision"]
    assert trainer.gradient_clip_val is RELEASE_TRAINING["gradient_clip_val"]
    optimizer = cfg.model.optimizer
    assert optimizer._target_ == "torch.optim.SGD" and optimizer.lr == RELEASE_TRAINING["lr"]
    assert (optimizer.momentum, optimizer.weight_decay) == (0.9, 1e-4)
    assert cfg.model.net.decoder_lr_multiplier == 10 and cfg.model.backbone_lr_multiplier == 1
    assert cfg.model.weight_decay_norm is None and cfg.model.weight_decay_embed is None
    assert (cfg.model.scheduler.kind, cfg.model.scheduler.power) == ("poly", 0.9)
    transform = cfg.data.transform
    assert transform.style == "encoding" and transform.crop_size == 480 and list(transform.long_side) == [260, 1040]
    assert transform.pad_value == 0 and transform.flip is True
    if experiment == "lseg_ade20k":
        release = cfg.lseg_release
        assert (release.train_images, release.max_epochs) == (20210, 240)
        assert release.epoch_batches == -(-20210 // 6) == 3369 and release.epoch_steps == 1685
        assert trainer.max_steps == 240 * 1685 and cfg.model.scheduler.steps_per_epoch == 1685
        assert trainer.val_check_interval == 3369  # every epoch (Lightning counts batches)
        best = cfg.callbacks.best_checkpoint
        assert (best.monitor, best.mode, best.save_top_k) == ("val/ade150/pixel_accuracy", "max", 3)
        assert cfg.callbacks.model_checkpoint.save_last is True
        from lightning.pytorch.callbacks import ModelCheckpoint

        from ovseg_lab.runner import run_callbacks

        checkpoints = [c for c in run_callbacks(cfg, has_logger=False) if isinstance(c, ModelCheckpoint)]
        assert [(c.monitor, c.save_top_k, c.save_last) for c in checkpoints] == [
            (None, 0, True),  # last.ckpt (FinalStepCheckpoint)
            ("val/ade150/pixel_accuracy", 3, False),
        ]
    else:
        assert trainer.max_steps == 80000 and trainer.val_check_interval == 10000
        assert cfg.model.scheduler.get("steps_per_epoch") is None


@pytest.mark.parametrize(("experiment", "steps"), [("lseg_fss1000", 5000), ("lseg_folds", 1700)])
def test_golden_train_lseg_zero_shot_recipes_keep_the_release_precision_and_lr(compose_cfg, experiment, steps):
    """The zero-shot recipes (no training script in the release: length, batch and episodes are ours) train fp32
    as lsegmentation_module_zs.py does, unclipped, at its lr formula 0.004 / 16 x batch."""
    cfg = compose_cfg("train", [f"experiment={experiment}"])
    assert cfg.trainer.precision == "32-true" and cfg.trainer.gradient_clip_val is None
    assert cfg.model.optimizer.lr == pytest.approx(0.004 / 16 * cfg.data.batch_size)
    assert cfg.trainer.max_steps == steps
