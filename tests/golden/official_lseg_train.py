"""The generator's side for LSeg TRAINING (isl-org/lang-seg's train.sh under pytorch-lightning 1.4, with
PyTorch-Encoding's dataset and loss): runs the official training code and saves fixtures (tests/golden/README.md,
"LSeg training fixtures").

    git -C <lang-seg git dir> archive HEAD modules label_files | tar -x -C /tmp/lang-seg
    git -C <openai/CLIP git dir> archive HEAD clip | tar -x -C /tmp/openai-clip
    git -C <PyTorch-Encoding git dir> archive 331ecdd5306104614cb414b16fbcd9d1a8d40e1e \\
        encoding/datasets/base.py encoding/datasets/ade20k.py encoding/nn/loss.py | tar -x -C /tmp/encoding
    python tests/golden/make_golden.py --method lseg_train --official /tmp/lang-seg --clip /tmp/openai-clip \\
        --encoding /tmp/encoding

What runs unchanged: PyTorch-Encoding's ``BaseDataset._sync_transform`` and ``ADE20KSegmentation._mask_transform``
(the commit lang-seg's requirements.txt pins), torchvision's ``ToTensor`` + ``Normalize(0.5, 0.5)`` (LSegModule's
train_transform), ``SegmentationLosses`` (encoding/nn/loss.py), lang-seg's
``LSegmentationModule.configure_optimizers`` (its SGD parameter groups and the per-epoch ``LambdaLR``) and the
official net of official_lseg.py (``LSeg.forward`` in train mode, BatchNorm statistics updated).

Adaptations, all at the stub level:
- ``random`` in encoding/datasets/base.py is wrapped to record its draws (flip, long side, crop x, crop y), which
  our side replays.
- ``configure_optimizers`` runs on its own (official_stubs.detectron2_function) with ``self`` an object holding the
  attributes it reads: ``net`` (the small official LSeg), ``base_lr`` = train.sh's ``--base_lr 0.004`` / 16 x
  ``--batch_size 1`` as ``LSegmentationModule.__init__`` computes it (lsegmentation_module.py:32), ``epochs``
  and ``other_kwargs`` (``midasproto`` False, ``weight_decay`` 1e-4).
- The Lightning 1.4 loop around the training step is spelled out: the loss of each batch divided by
  ``accumulate_grad_batches`` (2, train.sh) before ``backward``, ``optimizer.step`` + ``zero_grad`` every 2 batches,
  the scheduler stepped at each epoch's end (``interval: epoch``, the default of a scheduler returned in a list).
  One process, batch 1: SyncBatchNorm over one GPU is BatchNorm over that GPU's one image.
- ``LSeg.__init__``'s ``logit_scale`` is ``nn.Parameter(log(1 / 0.07)).exp()``, a tensor attribute with a graph
  (neither parameter nor buffer: no optimizer sees it). In the release's GPU run the first forward, Lightning's
  sanity validation under ``no_grad``, replaces it by ``self.logit_scale.to(x.device)``, a constant; on CPU that
  ``.to`` is a no-op and the second backward would fail, so the fixture detaches it as that first forward does.
- ``LSeg.forward``'s fp16 cast is the identity (as official_lseg.py); ``training_step``'s GradScaler is disabled
  in the release (``self.enabled = False``), so the loss is used as is.
"""

from __future__ import annotations

import functools
import random
import types
from pathlib import Path

import numpy as np
import torch

from tests.golden.harness import digest, fixture_record, save_fixture, seeded_image, seeded_labels
from tests.golden.official_lseg import LABELS, REPO, TINY_CLIP, VARIANTS, Official, fp32_half, perturb
from tests.golden.official_stubs import detectron2_function, import_official

ENCODING_REPO = "zhanghang1989/PyTorch-Encoding"
ENCODING_COMMIT = "331ecdd5306104614cb414b16fbcd9d1a8d40e1e"  # lang-seg's requirements.txt
# train.sh: --base_lr 0.004 --weight_decay 1e-4 --max_epochs 240 --batch_size 1 --accumulate_grad_batches 2
TRAIN_SH = {"base_lr": 0.004, "weight_decay": 1e-4, "max_epochs": 240, "batch_size": 1, "accumulate_grad_batches": 2}
# the transform at a small size (the release: base_size 520, crop_size 480 -> long side 260-1040)
TRANSFORM = {"base_size": 72, "crop_size": 64}
TRANSFORM_IMAGES = [(75, 100), (100, 60), (30, 40), (150, 120), (97, 131), (64, 64)]
DRAWS_PER_IMAGE = 3
# three optimizer steps: ViT-L/16-like net, 2 batches of one 64x64 image per step, epochs of 2 steps
STEPS_VARIANT = "vitl16"
# base_lr 100x train.sh's: each step then moves the weights by ~1e-3 of their size, far above fp32 rounding, so
# comparing the updates tests them (at 0.004 the encoder moves by ~1e-5, the size of the tolerance)
STEPS = {"size": [64, 64], "steps": 3, "steps_per_epoch": 2, "max_epochs": 3, "base_lr": 0.4}
NET = {"arch_option": 0, "block_depth": 0, "activation": "lrelu"}  # train.sh's defaults (no regularisation blocks)
NUM_RAW_CLASSES = len(LABELS) + 1  # raw ADE-style masks: 0 = "other" (ignored after mask - 1), 1.. = classes

_fixture = functools.partial(fixture_record, "lseg", REPO)


class RecordingRandom:
    """Python's ``random`` module as encoding/datasets/base.py uses it, every draw recorded in order."""

    def __init__(self) -> None:
        self.draws: list[float | int] = []

    def random(self) -> float:
        value = random.random()
        self.draws.append(value)
        return value

    def randint(self, a: int, b: int) -> int:
        value = random.randint(a, b)
        self.draws.append(value)
        return value


def encoding_modules(encoding_root: Path) -> types.SimpleNamespace:
    packages = ("encoding", "encoding.datasets", "encoding.nn")
    return types.SimpleNamespace(
        base=import_official(encoding_root, "encoding.datasets.base", packages),
        ade20k=import_official(encoding_root, "encoding.datasets.ade20k", packages),
        loss=import_official(encoding_root, "encoding.nn.loss", packages),
    )


def official_dataset(enc: types.SimpleNamespace, base_size: int, crop_size: int):
    """An ``ADE20KSegmentation`` in train mode without its folder scan (only the transform's attributes)."""
    dataset = enc.ade20k.ADE20KSegmentation.__new__(enc.ade20k.ADE20KSegmentation)
    dataset.base_size, dataset.crop_size, dataset.mode = base_size, crop_size, "train"
    return dataset


def raw_mask(seed: int, height: int, width: int) -> np.ndarray:
    """A uint8 ADE-style annotation (0 = other, 1..NUM_RAW_CLASSES-1 = classes) in blocks of 7 pixels."""
    return seeded_labels(seed, (1, height, width), NUM_RAW_CLASSES, 7)[0].to(torch.uint8).numpy()


def transform_fixture(enc: types.SimpleNamespace, commit: str, seed: int) -> dict:
    """``_sync_transform`` + ``_mask_transform`` (the release's ADE dataset) on seeded images and masks, several
    draws each; the recorded draws, the uint8 crops and the labels (ignore = -1)."""
    from PIL import Image

    dataset = official_dataset(enc, **TRANSFORM)
    recorder = RecordingRandom()
    original = enc.base.random
    enc.base.random = recorder
    random.seed(seed)
    cases = []
    try:
        for index, (height, width) in enumerate(TRANSFORM_IMAGES):
            image = seeded_image(seed + index, height, width)
            mask = raw_mask(seed + index, height, width)
            for _ in range(DRAWS_PER_IMAGE):
                recorder.draws.clear()
                crop, label = dataset._sync_transform(Image.fromarray(image), Image.fromarray(mask))
                flip, long_side, left, top = recorder.draws
                cases.append(
                    {
                        "image_index": index,
                        "draw": {"flip": bool(flip < 0.5), "long_side": int(long_side), "left": left, "top": top},
                        "crop": torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous(),
                        "label": label.to(torch.int16),
                    }
                )
    finally:
        enc.base.random = original
    crop_size = TRANSFORM["crop_size"]
    padded = [c for c in cases if min(dataset_resized(c, TRANSFORM_IMAGES)) < crop_size]
    assert padded and len(padded) < len(cases), "the draws must cover padded and unpadded crops"
    assert any(c["draw"]["flip"] for c in cases) and not all(c["draw"]["flip"] for c in cases)
    inputs = {
        "images": [
            torch.from_numpy(seeded_image(seed + i, h, w)).permute(2, 0, 1).contiguous()
            for i, (h, w) in enumerate(TRANSFORM_IMAGES)
        ],
        "masks": [torch.from_numpy(raw_mask(seed + i, h, w)) for i, (h, w) in enumerate(TRANSFORM_IMAGES)],
    }
    config = {
        **TRANSFORM,
        "long_side": [int(TRANSFORM["base_size"] * 0.5), int(TRANSFORM["base_size"] * 2.0)],
        "encoding_repo": ENCODING_REPO,
        "encoding_commit": ENCODING_COMMIT,
    }
    return _fixture("lseg_train_transform", commit, seed, config, [], inputs, {"cases": cases})


def dataset_resized(case: dict, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) the release resized a case's image to (before padding)."""
    height, width = sizes[case["image_index"]]
    long_side = case["draw"]["long_side"]
    if height > width:
        return long_side, int(1.0 * width * long_side / height + 0.5)
    return int(1.0 * height * long_side / width + 0.5), long_side


def official_optimizers(root: Path, net: torch.nn.Module, max_epochs: int, base_lr: float = TRAIN_SH["base_lr"]):
    """lang-seg's ``configure_optimizers`` on the official net, at train.sh's lr formula and weight decay."""
    configure = detectron2_function(root, "modules/lsegmentation_module.py", "LSegmentationModule.configure_optimizers")
    module = types.SimpleNamespace(
        net=net,
        base_lr=base_lr / 16 * TRAIN_SH["batch_size"],  # LSegmentationModule.__init__, line 32
        epochs=max_epochs,
        other_kwargs={"midasproto": False, "weight_decay": TRAIN_SH["weight_decay"]},
    )
    (optimizer,), (scheduler,) = configure(module)
    return optimizer, scheduler


def param_group_records(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Per official parameter name (``net.`` + key, the LSegModule checkpoint key): its group's lr, weight decay,
    momentum, dampening, nesterov; and the parameters no group holds (the CLIP text tower)."""
    names = {id(p): "net." + name for name, p in net.named_parameters()}
    records = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            records[names[id(param)]] = {
                "lr": float(group["lr"]),
                "weight_decay": float(group["weight_decay"]),
                "momentum": float(group["momentum"]),
                "dampening": float(group["dampening"]),
                "nesterov": bool(group["nesterov"]),
            }
    unoptimized = sorted(set(names.values()) - set(records))
    return {"optimizer": type(optimizer).__name__, "params": records, "not_optimized": unoptimized}


def optimizer_fixture(off: Official, root: Path, commit: str, seed: int) -> dict:
    """The parameter groups of ``configure_optimizers`` on the small ViT-L/16-like official net, and the lr of each
    group over the 240 epochs of train.sh (``LambdaLR`` stepped once per epoch, as Lightning does by default)."""
    torch.manual_seed(seed)
    net = off.build_lseg(VARIANTS["vitl16"])
    recipe = perturb(net, seed)
    optimizer, scheduler = official_optimizers(root, net, TRAIN_SH["max_epochs"])
    groups = param_group_records(net, optimizer)
    epoch_lrs = []
    for _ in range(TRAIN_SH["max_epochs"]):
        epoch_lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()  # no gradients: nothing moves; keeps the scheduler's order check quiet
        scheduler.step()
    config = {"variant": dict(VARIANTS["vitl16"]), "clip": dict(TINY_CLIP), "labels": list(LABELS), **NET, **TRAIN_SH}
    outputs = {**groups, "epoch_lrs": torch.tensor(epoch_lrs, dtype=torch.float64)}
    return _fixture("lseg_train_optimizer", commit, seed, config, recipe, {}, outputs)


def step_batches(seed: int, count: int, height: int, width: int) -> list[dict]:
    """``count`` batches of one uint8 image and its raw mask (0 = other), with an extra box of "other"."""
    batches = []
    for index in range(count):
        image = seeded_image(seed * 100 + index, height, width)
        mask = raw_mask(seed * 100 + index, height, width)
        mask[5:20, 30:50] = 0
        batches.append({"image": torch.from_numpy(image).permute(2, 0, 1).contiguous(), "mask": torch.from_numpy(mask)})
    return batches


def state_digest(state: dict[str, torch.Tensor], skip: tuple[str, ...] = ("net.clip_pretrained.",)) -> dict:
    """Digests (whole up to 512 elements, else 256 samples + projections) of every tensor of a net's state, keyed
    ``net.`` + key; the frozen text tower left out."""
    return {
        "net." + key: digest(value.float(), whole=512, sample=256)
        for key, value in state.items()
        if not ("net." + key).startswith(skip)
    }


def steps_fixture(off: Official, enc: types.SimpleNamespace, root: Path, commit: str, seed: int) -> dict:
    """Three optimizer steps of train.sh's loop on the small official net: per step 2 batches of one image
    (accumulation 2), ``SegmentationLosses`` (train.sh: no aux, no se loss; ignore_index -1) on the release's
    ToTensor + Normalize(0.5, 0.5) images and mask - 1 targets, SGD of ``configure_optimizers``, the per-epoch
    ``LambdaLR`` (epochs of 2 steps here), BatchNorm in train mode. Every parameter and buffer afterwards."""
    import torchvision.transforms as transforms

    torch.manual_seed(seed)
    net = off.build_lseg(VARIANTS[STEPS_VARIANT])
    recipe = perturb(net, seed)
    net.text = off.clip.tokenize(LABELS)  # LSegNet.__init__'s tokenised label set (forward's labelset='')
    net.logit_scale = net.logit_scale.detach()  # what the release's GPU run makes of it (module docstring)
    net.train()
    criterion = enc.loss.SegmentationLosses(se_loss=False, aux=False, nclass=len(LABELS), ignore_index=-1)
    optimizer, scheduler = official_optimizers(root, net, STEPS["max_epochs"], STEPS["base_lr"])
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    accumulate = TRAIN_SH["accumulate_grad_batches"]
    batches = step_batches(seed, STEPS["steps"] * accumulate, *STEPS["size"])
    losses, lrs = [], []
    with fp32_half():
        for step in range(STEPS["steps"]):
            lrs.append([group["lr"] for group in optimizer.param_groups])
            for batch in batches[step * accumulate : (step + 1) * accumulate]:
                image = to_input(batch["image"].permute(1, 2, 0).numpy())[None]
                target = enc.ade20k.ADE20KSegmentation._mask_transform(None, batch["mask"].numpy())[None]
                out = net(image)
                assert out.shape[-2:] == target.shape[-2:]
                loss = criterion(out, target)
                losses.append(float(loss.detach()))
                (loss / accumulate).backward()  # Lightning 1.4: closure loss / accumulate_grad_batches
            optimizer.step()
            optimizer.zero_grad()
            if (step + 1) % STEPS["steps_per_epoch"] == 0:
                scheduler.step()
    config = {
        "variant": dict(VARIANTS[STEPS_VARIANT]),
        "clip": dict(TINY_CLIP),
        "labels": list(LABELS),
        **NET,
        **TRAIN_SH,
        **STEPS,  # max_epochs: the short run's
        "encoding_repo": ENCODING_REPO,
        "encoding_commit": ENCODING_COMMIT,
    }
    inputs = {"batches": batches}
    after = net.state_dict()
    updates = {k: after[k].double() - before[k].double() for k in after}
    outputs = {
        "losses": torch.tensor(losses),
        "lrs": torch.tensor(lrs, dtype=torch.float64),
        "state": state_digest(after),
        "updates": state_digest(updates),  # after - before, in float64 before the digest
    }
    return _fixture("lseg_train_steps", commit, seed, config, recipe, inputs, outputs)


def make(official_root: Path, extra: dict, out_dir: Path, commit: str, seed: int = 0) -> list[Path]:
    if not extra.get("clip") or not extra.get("encoding"):
        raise SystemExit("--clip <extracted openai/CLIP> and --encoding <extracted PyTorch-Encoding> are needed")
    off = Official(official_root, extra["clip"])
    enc = encoding_modules(extra["encoding"])
    paths = []
    for fixture in (
        transform_fixture(enc, commit, seed),
        optimizer_fixture(off, official_root, commit, seed),
        steps_fixture(off, enc, official_root, commit, seed),
    ):
        paths.append(save_fixture(fixture, out_dir / f"{fixture['name']}.pt"))
    return paths
