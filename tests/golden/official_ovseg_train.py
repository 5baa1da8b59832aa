"""Golden TRAINING fixtures from the official OVSeg release (facebookresearch/ov-seg), run on its own code.

Called by ``make_golden.py --method ovseg_train``; never imported by the tests. Builds on :mod:`official_ovseg`
(the official modules, detectron2's own source for what matters). What runs, all from the extracted release or
detectron2's source:

- MaskFormer stage: ``MaskFormer.from_config`` (the criterion, matcher and weight dict it builds from the release's
  config), the training mapper's target building (``MaskFormerSemanticDatasetMapper.__call__`` with no
  augmentation: uint8 padding with 128 / labels with 255, one mask per class present, ignore pixels left out),
  ``SetCriterion`` / ``HungarianMatcher``, ``Trainer.build_optimizer`` (train_net.py: per-parameter groups, the
  backbone multiplier, no weight decay on norms / embeddings / Swin's position bias tables, the frozen CLIP, the
  full-model gradient clipping subclass of AdamW), the DeepLab project's ``build_lr_scheduler`` / ``WarmupPolyLR``
  stepped as detectron2's ``LRScheduler`` hook steps it, and detectron2's ``SimpleTrainer.run_step`` for three
  iterations of ``OVSeg.forward`` in training mode.
- CLIP adaptation: open_clip_training's ``cosine_lr`` (scheduler.py) over the steps ``get_csv_dataset`` gives
  (data.py: ``DistributedSampler`` over 4 GPUs, ``drop_last``) at the scripts' batch and epochs, and
  ``train_one_epoch`` / ``train_one_epoch_w_mask`` (train.py) for three steps of FT and of MPT with the optimizer
  ``main.py`` / ``main_mask_prompt_tuning.py`` build (their statements run as written).

Stub-level adaptations (each changes nothing the fixture measures): the mapper's reader returns the stored arrays
and its augmentation list is empty (the augmentations are another fixture's); ``clip.load`` is answered by the small
CLIP of the release's own ``clip.model.CLIP`` and the release's ``build_clip_model`` freezes it; the dropout layers
and the attention dropout are set to 0 (their random draws cannot be replayed; the decoder otherwise trains as
released); the adaptation runs in fp32 on the CPU (``--precision amp`` is CUDA fp16 autocast with a GradScaler: not reproducible here), on
already normalised masked crops (the crop transform is ``ovseg_adaptation``'s).
"""

from __future__ import annotations

import ast
import copy
import functools
import itertools
import math
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from tests.golden.harness import save_fixture, seeded_input
from tests.golden.official_ovseg import (
    NAMES,
    SMALL_HEAD,
    SMALL_SWIN,
    TINY_CLIP,
    Official,
    deeplab_resnet,
    exec_definitions,
    fixture,
    importlib_module,
    perturb,
)
from tests.golden.official_stubs import detectron2_function

CONFIGS = {"swin": "configs/ovseg_swinB_vitL_bs32_120k.yaml", "r101c": "configs/ovseg_R101c_vitB_bs32_120k.yaml"}
# the adaptation scripts (open_clip_training/src/scripts/): GPUs (torchrun --nproc_per_node), --batch-size per GPU,
# --epoch, --lr, --warmup, and the rows of the CSV (--train-num-samples, = len(CsvDataset) of coco_proposal_1cap.csv)
ADAPT_RUNS = {
    "vitl_ft": dict(script="coco_proposal_1cap_finetune_VitL.sh", gpus=4, batch=32, epochs=5, lr=5e-6, warmup=100),
    "vitl_mpt": dict(
        script="coco_proposal_1cap_mask_prompt_tuning_VitL.sh", gpus=4, batch=32, epochs=5, lr=0.05, warmup=100
    ),
    "vitb_ft": dict(script="coco_proposal_1cap_finetune_VitB.sh", gpus=4, batch=128, epochs=5, lr=5e-6, warmup=100),
}
CSV_ROWS = 442117
CRITERION_CLASSES = 6  # classes of the criterion fixture's vocabulary (+1 no-object)
STEP_NAMES = NAMES[:5]


class Node(dict):
    """A detectron2 CfgNode stand-in: attribute access, children made on first use (the release's config
    functions set nested keys on a fresh node)."""

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        return self.setdefault(key, Node())

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


def release_cfg(root: Path, d2: Path, which: str) -> Node:
    """The release's training config: detectron2's defaults the fixtures read, ``add_deeplab_config`` and
    ``add_mask_former_default_config`` run from source, then the release's YAML merged on top."""
    cfg = Node()
    # detectron2/config/defaults.py: the SOLVER defaults the configs leave as they are
    cfg.SOLVER.WARMUP_METHOD = "linear"
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.AMP = Node(ENABLED=False)
    cfg.SOLVER.CHECKPOINT_PERIOD = 5000
    deeplab = detectron2_function(d2, "projects/DeepLab/deeplab/config.py", "add_deeplab_config")
    deeplab.__globals__["CN"] = Node
    deeplab(cfg)
    mask_former = detectron2_function(root, "open_vocab_seg/config.py", "add_mask_former_default_config")
    mask_former.__globals__["CN"] = Node
    mask_former(cfg)

    class Loader(yaml.SafeLoader):
        pass

    # MIN_SIZE_TRAIN of the Swin config is a python expression (the mapper's, not read here)
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    values = yaml.load((root / CONFIGS[which]).read_text(), Loader=Loader)

    def merge(node: Node, data: dict) -> None:
        for key, value in data.items():
            if isinstance(value, dict):
                merge(getattr(node, key), value)
            else:
                node[key] = decoded(value)

    def decoded(value: Any) -> Any:  # yacs' _decode_cfg_value: strings are python literals where they parse
        if isinstance(value, str):
            try:
                return ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return value
        return value

    merge(cfg, values)
    return cfg


def solver_record(cfg: Node) -> dict:
    solver = cfg.SOLVER
    keys = ("IMS_PER_BATCH", "BASE_LR", "MAX_ITER", "WARMUP_FACTOR", "WARMUP_ITERS", "WARMUP_METHOD", "WEIGHT_DECAY")
    keys += ("WEIGHT_DECAY_NORM", "WEIGHT_DECAY_EMBED", "BACKBONE_MULTIPLIER", "OPTIMIZER", "POLY_LR_POWER")
    keys += ("POLY_LR_CONSTANT_ENDING", "CHECKPOINT_PERIOD")
    record = {k: solver[k] for k in keys}
    record["CLIP_GRADIENTS"] = dict(solver.CLIP_GRADIENTS)
    record["AMP_ENABLED"] = solver.AMP.ENABLED
    record["EVAL_PERIOD"] = cfg.TEST.EVAL_PERIOD
    return record


class Release:
    """The release's training functions, each run from its source file."""

    def __init__(self, off: Official, root: Path, d2: Path) -> None:
        self.off, self.root, self.d2 = off, root, d2
        self.criterion = importlib_module("open_vocab_seg.modeling.criterion")
        self.matcher = importlib_module("open_vocab_seg.modeling.matcher")
        self.build_optimizer = detectron2_function(root, "train_net.py", "Trainer.build_optimizer")
        self.build_optimizer.__globals__.update(
            copy=copy, itertools=itertools, List=list, Dict=dict, Any=Any, Set=set, maybe_add_gradient_clipping=None
        )
        self.from_config = detectron2_function(root, "open_vocab_seg/mask_former_model.py", "MaskFormer.from_config")
        self.from_config.__globals__.update(
            HungarianMatcher=self.matcher.HungarianMatcher,
            SetCriterion=self.criterion.SetCriterion,
            MetadataCatalog=types.SimpleNamespace(get=lambda name: None),
        )
        self.build_lr_scheduler = exec_definitions(
            d2,
            [
                ("detectron2/solver/lr_scheduler.py", ["_get_warmup_factor_at_iter"]),
                ("projects/DeepLab/deeplab/lr_scheduler.py", ["WarmupPolyLR"]),
                ("projects/DeepLab/deeplab/build_solver.py", ["build_lr_scheduler"]),
            ],
            {
                "torch": torch,
                "math": math,
                "List": list,
                "CfgNode": Node,
                "LRScheduler": torch.optim.lr_scheduler.LRScheduler,
            },
        )["build_lr_scheduler"]
        self.run_step = detectron2_function(d2, "detectron2/engine/train_loop.py", "SimpleTrainer.run_step")
        self.run_step.__globals__["time"] = time
        self.mapper_call = detectron2_function(
            root,
            "open_vocab_seg/data/dataset_mappers/mask_former_semantic_dataset_mapper.py",
            "MaskFormerSemanticDatasetMapper.__call__",
        )
        self.build_clip_model = importlib_module("open_vocab_seg.modeling.clip_adapter.utils").build_clip_model

    def criterion_from_config(self, cfg: Node, num_classes: int) -> nn.Module:
        """``MaskFormer.from_config``'s criterion; the backbone and head it also builds are answered by stubs."""
        head = types.SimpleNamespace(num_classes=num_classes)
        self.from_config.__globals__.update(
            build_backbone=lambda c: types.SimpleNamespace(output_shape=lambda: None),
            build_sem_seg_head=lambda c, shape: head,
        )
        return self.from_config(None, cfg)["criterion"]

    def mapped(self, image: np.ndarray, label: np.ndarray, size_divisibility: int) -> dict:
        """The training mapper on one (image, label) pair without augmentation: padded tensors + instances."""
        arrays = {"image": image, "label": label.astype(np.float64)}

        class AugInput:
            def __init__(self, image, sem_seg=None):
                self.image, self.sem_seg = image, sem_seg

        class Instances:
            def __init__(self, image_size):
                self.image_size = image_size

            def to(self, device):
                return self

        self.mapper_call.__globals__.update(
            copy=copy,
            np=np,
            utils=types.SimpleNamespace(
                read_image=lambda name, format=None: arrays[name], check_image_size=lambda d, i: None
            ),
            T=types.SimpleNamespace(AugInput=AugInput, apply_transform_gens=lambda gens, aug: (aug, [])),
            Instances=Instances,
            BitMasks=lambda t: types.SimpleNamespace(tensor=t),
        )
        mapper = types.SimpleNamespace(
            tfm_gens=[], img_format="RGB", ignore_label=255, size_divisibility=size_divisibility
        )
        return self.mapper_call(mapper, {"file_name": "image", "sem_seg_file_name": "label", "height": 0, "width": 0})


def release_paths(root: Path, d2: Path) -> tuple[Official, Release]:
    off = Official(root, d2)
    return off, Release(off, root, d2)


# ---------------------------------------------------------------------------------------------- criterion
def criterion_fixture(rel: Release, commit: str, seed: int) -> dict:
    """``SetCriterion`` as ``MaskFormer.from_config`` builds it from the Swin config (weights 1 / 20 / 1, eos 0.1,
    costs 1 / 20 / 1, deep supervision), on targets made by the training mapper and ``prepare_targets`` from two
    semantic labels with ignore pixels (one all but one class ignored), and seeded outputs (logits over 6 + 1,
    masks at a quarter of the label size) for the last and 2 auxiliary layers: every loss term, the matched
    indices of every layer, the gradient of every output."""
    cfg = release_cfg(rel.root, rel.d2, "swin")
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 3
    criterion = rel.criterion_from_config(cfg, CRITERION_CLASSES)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CRITERION_CLASSES, (2, 6, 8), generator=gen).repeat_interleave(4, 1)
    labels = labels.repeat_interleave(4, 2)  # (2, 24, 32) in 4x4 blocks
    labels[0, :5, :7] = 255
    labels[1] = torch.where(labels[1] == 2, 2, 255)  # one class and void
    labels = labels.to(torch.uint8)
    images = [
        seeded_input((24, 32, 3), seed, f"criterion_image{i}").mul(40).add(128).clamp(0, 255).byte() for i in range(2)
    ]
    mapped = [rel.mapped(images[i].numpy(), labels[i].numpy(), 32) for i in range(2)]
    batch = rel.off.meta.ImageList.from_tensors([m["image"].float() for m in mapped], 32)
    targets = rel.off.meta.OVSeg.prepare_targets(None, [m["instances"] for m in mapped], batch)
    q, k = 10, CRITERION_CLASSES + 1
    layers = [
        {
            "pred_logits": (torch.randn(2, q, k, generator=gen) * 3).requires_grad_(True),
            "pred_masks": (torch.randn(2, q, 8, 8, generator=gen) * 2).requires_grad_(True),
        }
        for _ in range(3)
    ]
    outputs = dict(layers[-1], aux_outputs=layers[:-1])
    indices = []  # every matcher call: the last layer first, then the auxiliary layers in order
    criterion.matcher.register_forward_hook(lambda module, args, out: indices.append(out))
    losses = criterion(outputs, targets)
    for key in list(losses):  # OVSeg.forward (ovseg_model.py:182-188)
        losses[key] = losses[key] * criterion.weight_dict[key]
    sum(losses.values()).backward()
    record = {
        "losses": {key: value.detach() for key, value in losses.items()},
        "weight_dict": dict(criterion.weight_dict),
        "indices": [[(i.to(torch.int16), j.to(torch.int16)) for i, j in call] for call in indices],
        "target_labels": [t["labels"] for t in targets],
        "target_masks": [t["masks"].bool() for t in targets],
        "grad_logits": [layer["pred_logits"].grad for layer in layers],
        "grad_masks": [layer["pred_masks"].grad for layer in layers],
    }
    inputs = {
        "labels": labels,
        "padded_labels": torch.stack([m["sem_seg"] for m in mapped]).to(torch.int16),
        "pred_logits": [layer["pred_logits"].detach() for layer in layers],
        "pred_masks": [layer["pred_masks"].detach() for layer in layers],
    }
    config = {
        "mask_former": {
            k: cfg.MODEL.MASK_FORMER[k] for k in ("NO_OBJECT_WEIGHT", "MASK_WEIGHT", "DICE_WEIGHT", "DEEP_SUPERVISION")
        }
    }
    config["num_classes"] = CRITERION_CLASSES
    return fixture("ovseg_train_criterion", commit, seed, config, [], inputs, record)


# ---------------------------------------------------------------------------------------------- parameter groups
def official_model(off: Official, rel: Release, kind: str, names: list[str], seed: int) -> tuple[nn.Module, list]:
    """The release's OVSeg at the small fixture size (Swin or deeplab R-101c), its CLIP frozen by the release's
    ``build_clip_model`` (``clip.load`` answered by the small CLIP), seeded perturbed weights."""
    torch.manual_seed(seed)
    if kind == "swin":
        backbone, channels = off.build_swin(SMALL_SWIN), [SMALL_SWIN["embed_dim"] * 2**i for i in range(4)]
    else:
        backbone, channels = deeplab_resnet(off.d2), [256, 512, 1024, 2048]
    model = off.build_ovseg(backbone, channels, SMALL_HEAD, TINY_CLIP, 0.4, 0.7, names)
    small_clip = model.clip_adapter.clip_model
    utils = sys.modules[rel.build_clip_model.__module__]
    utils.clip = types.SimpleNamespace(load=lambda name, mask_prompt_depth, device: (small_clip, None))
    model.clip_adapter.clip_model = rel.build_clip_model("small", TINY_CLIP["mask_prompt_depth"])

    def damp(entry):  # FrozenBN's running_var around 1 (official_ovseg.maskformer_fixture)
        return (entry[0], entry[1], 1.0, 0.1) if entry[0].endswith("running_var") else entry

    return model, perturb(model, seed, damp)


def param_groups_fixture(off: Official, rel: Release, commit: str, seed: int, kind: str) -> dict:
    """``Trainer.build_optimizer`` (train_net.py:154-237) with the release's config on its OVSeg: per trained
    parameter its lr, weight decay, betas, eps; the optimizer class (AdamW with full-model gradient clipping)."""
    cfg = release_cfg(rel.root, rel.d2, kind)
    model, recipe = official_model(off, rel, kind, NAMES, seed)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = rel.build_optimizer(None, cfg, model)
    groups = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            groups[names[id(param)]] = {
                "lr": group["lr"],
                "weight_decay": group["weight_decay"],
                "betas": list(group["betas"]),
                "eps": group["eps"],
            }
    outputs = {
        "groups": groups,
        "frozen": sorted(n for n, p in model.named_parameters() if not p.requires_grad),
        "optimizer": [c.__name__ for c in type(optimizer).__mro__ if c.__module__.startswith("torch.optim")][0],
        "clips_full_model": type(optimizer).__name__ == "FullModelGradientClippingOptimizer",
    }
    config = {"backbone": kind, "solver": solver_record(cfg), "swin": SMALL_SWIN, "head": SMALL_HEAD, "clip": TINY_CLIP}
    return fixture(f"ovseg_train_param_groups_{kind}", commit, seed, config, recipe, {}, outputs)


# ---------------------------------------------------------------------------------------------- schedules
def schedule_fixture(rel: Release, commit: str, seed: int) -> dict:
    """The learning rate of every iteration of both 120k runs: the DeepLab project's ``build_lr_scheduler``
    (WarmupPolyLR, linear warm-up from 1e-6 over 1500, power 0.9) read before each iteration, stepped after it as
    detectron2's ``LRScheduler`` hook does (hooks.py:356-359); stored as the factor of BASE_LR (both configs share
    the schedule; asserted)."""
    curves, base = {}, {}
    for kind in CONFIGS:
        cfg = release_cfg(rel.root, rel.d2, kind)
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
        scheduler = rel.build_lr_scheduler(cfg, optimizer)
        lrs = []
        for _ in range(cfg.SOLVER.MAX_ITER):
            lrs.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
        curves[kind] = torch.tensor(lrs, dtype=torch.float64) / cfg.SOLVER.BASE_LR
        base[kind] = {"BASE_LR": cfg.SOLVER.BASE_LR, "solver": solver_record(cfg)}
    assert torch.allclose(curves["swin"], curves["r101c"], rtol=1e-12, atol=0)
    outputs = {"factor": curves["swin"].float(), "runs": base}
    return fixture("ovseg_train_lr_maskformer", commit, seed, {"configs": CONFIGS}, [], {}, outputs)


def adaptation_schedule_fixture(root: Path, commit: str, seed: int) -> dict:
    """Per adaptation script: the steps of its run (``get_csv_dataset``'s ``len(dataloader)`` with a
    ``DistributedSampler`` over its GPUs, ``drop_last``, x epochs, main.py:229) and the lr of every step from
    ``cosine_lr`` (scheduler.py), called before each step as train.py:71 / 189 do."""
    src = root / "open_clip_training" / "src"
    cosine_lr = detectron2_function(src, "training/scheduler.py", "cosine_lr")
    for name in ("assign_learning_rate", "_warmup_lr"):
        cosine_lr.__globals__[name] = detectron2_function(src, "training/scheduler.py", name)
    get_csv_dataset = detectron2_function(src, "training/data.py", "get_csv_dataset")

    class CsvDataset(torch.utils.data.Dataset):  # the CSV's rows (the crops themselves are not read here)
        def __init__(self, *args, **kwargs):
            pass

        def __len__(self):
            return CSV_ROWS

    outputs = {}
    for run, spec in ADAPT_RUNS.items():
        sampler = functools.partial(torch.utils.data.DistributedSampler, num_replicas=spec["gpus"], rank=0)
        get_csv_dataset.__globals__.update(
            CsvDataset=CsvDataset,
            DistributedSampler=sampler,
            DataLoader=torch.utils.data.DataLoader,
            DataInfo=lambda dataloader, sampler: types.SimpleNamespace(dataloader=dataloader),
        )
        args = types.SimpleNamespace(
            train_data="coco_proposal_1cap.csv",
            csv_img_key="filepath",
            csv_caption_key="title",
            csv_separator="\t",
            distributed=True,
            batch_size=spec["batch"],
            workers=0,
        )
        num_batches = get_csv_dataset(args, None, is_train=True).dataloader.num_batches
        total_steps = num_batches * spec["epochs"]
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=spec["lr"])
        scheduler = cosine_lr(optimizer, spec["lr"], spec["warmup"], total_steps)
        lrs = [scheduler(step) for step in range(total_steps)]
        outputs[run] = {
            **spec,
            "num_batches": num_batches,
            "total_steps": total_steps,
            "factor": torch.tensor(lrs, dtype=torch.float64).div(spec["lr"]).float(),
        }
    return fixture("ovseg_train_lr_adaptation", commit, seed, {"csv_rows": CSV_ROWS}, [], {}, outputs)


# ---------------------------------------------------------------------------------------------- three steps
def update_record(before: dict, after: dict, seed: int) -> dict:
    """Per parameter: the norm of its value after the steps and of its update, and 8 seeded projections of the
    update (the test bounds the difference of the updates by them)."""
    record = {}
    for name, value in after.items():
        delta = (value - before[name]).double().flatten()
        gen = torch.Generator().manual_seed(seed + len(record))
        directions = torch.randn(8, delta.numel(), generator=gen, dtype=torch.float64)
        record[name] = {
            "after_norm": float(value.double().norm()),
            "update_norm": float(delta.norm()),
            "projections": directions @ delta,
        }
    return record


def step_batches(seed: int, steps: int) -> list[dict]:
    """``steps`` batches of 2 (60x60 uint8 images, labels over 5 classes in 4x4 blocks with void), seeded."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        images = torch.randint(0, 256, (2, 60, 60, 3), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, len(STEP_NAMES), (2, 15, 15), generator=gen).repeat_interleave(4, 1)
        labels = labels.repeat_interleave(4, 2)
        labels[:, :8, :12] = 255
        batches.append({"images": images, "labels": labels.to(torch.uint8)})
    return batches


def maskformer_steps_fixture(off: Official, rel: Release, commit: str, seed: int) -> dict:
    """Three iterations of the release's MaskFormer stage on its Swin OVSeg (small): detectron2's
    ``SimpleTrainer.run_step`` around ``OVSeg.forward`` in training mode (criterion from ``MaskFormer.from_config``,
    targets from the training mapper, 60x60 crops padded to 64 with 128), the optimizer of ``build_optimizer``
    (AdamW, full-model clipping at 0.01) and ``WarmupPolyLR`` stepped after each iteration; the fixture's schedule
    is short (MAX_ITER 6, WARMUP_ITERS 2) so that the three lrs differ."""
    cfg = release_cfg(rel.root, rel.d2, "swin")
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS = 6, 2
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = SMALL_HEAD["dec_layers"]
    model, recipe = official_model(off, rel, "swin", STEP_NAMES, seed)
    model.criterion = rel.criterion_from_config(cfg, len(STEP_NAMES))  # NUM_CLASSES = the training vocabulary
    for module in model.modules():  # no dropout (nn.Dropout and the attention's own)
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = rel.build_optimizer(None, cfg, model)
    scheduler = rel.build_lr_scheduler(cfg, optimizer)
    batches = step_batches(seed, 3)

    def inputs_of(batch):
        out = []
        for image, label in zip(batch["images"], batch["labels"]):
            mapped = rel.mapped(image.numpy(), label.numpy(), 64)
            out.append({"image": mapped["image"], "instances": mapped["instances"], "meta": {"dataset_name": "golden"}})
        return out

    losses, lrs = [], []
    trainer = types.SimpleNamespace(
        model=model,
        optimizer=optimizer,
        _data_loader_iter=iter(inputs_of(b) for b in batches),
        zero_grad_before_forward=False,
        after_backward=lambda: None,
        async_write_metrics=False,
        _write_metrics=lambda loss_dict, data_time: losses.append(float(sum(loss_dict.values()))),
    )
    for _ in batches:
        lrs.append([g["lr"] for g in optimizer.param_groups[:1]][0])
        rel.run_step(trainer)
        scheduler.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    outputs = {
        "losses": torch.tensor(losses),
        "lrs": torch.tensor(lrs, dtype=torch.float64),
        "params": update_record(before, after, seed),
    }
    config = {
        "solver": solver_record(cfg),
        "swin": SMALL_SWIN,
        "head": SMALL_HEAD,
        "clip": TINY_CLIP,
        "names": STEP_NAMES,
    }
    inputs = {"batches": batches}
    return fixture("ovseg_train_steps_maskformer", commit, seed, config, recipe, inputs, outputs)


# the adaptation steps: a small open_clip CLIP with mask embedding of depth 3 (MPT; FT's CLIP has none), 64 px
# inputs (4x4 patches) to keep the stored crops small
STEP_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(layers=3, width=64, head_width=64, patch_size=16, image_size=64, mask_emb_depth=3),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
)
ADAPT_STEPS = dict(steps=3, warmup=2, batch=4, lr={"ft": 5e-6, "mpt": 0.05}, wd=0.2, mask_wd=0.0)
ADAPT_NOUNS = ["dog", "grass", "dog", "sky"]  # a repeated noun: a false negative, as the release trains
ADAPT_TEMPLATE = "a photo of a {}."  # the CSV's titles are not published; the test uses the same template


def open_clip_training(root: Path) -> types.SimpleNamespace:
    """The release's open_clip (model, loss, tokenizer) and the training functions of its scripts, each from its
    source file: main.py / main_mask_prompt_tuning.py's optimizer statements, scheduler.py's ``cosine_lr``,
    train.py's ``train_one_epoch`` / ``train_one_epoch_w_mask``."""
    src = root / "open_clip_training" / "src"
    if "ovseg_open_clip" not in sys.modules:
        package = types.ModuleType("ovseg_open_clip")
        package.__path__ = [str(src / "open_clip")]
        sys.modules["ovseg_open_clip"] = package
    loss = importlib_module("ovseg_open_clip.loss")
    train = {}
    for name in ("train_one_epoch", "train_one_epoch_w_mask"):
        fn = detectron2_function(src, "training/train.py", name)
        fn.__globals__.update(
            math=math,
            time=time,
            suppress=__import__("contextlib").suppress,
            ClipLoss=loss.ClipLoss,
            AverageMeter=detectron2_function(src, "training/train.py", "AverageMeter"),
            unwrap_model=detectron2_function(src, "training/train.py", "unwrap_model"),
            is_master=lambda args, local=False: False,  # rank-0 logging only
        )
        train[name] = fn
    cosine_lr = detectron2_function(src, "training/scheduler.py", "cosine_lr")
    for name in ("assign_learning_rate", "_warmup_lr"):
        cosine_lr.__globals__[name] = detectron2_function(src, "training/scheduler.py", name)
    return types.SimpleNamespace(
        src=src,
        model=importlib_module("ovseg_open_clip.model"),
        tokenize=importlib_module("ovseg_open_clip.tokenizer").tokenize,
        train=train,
        cosine_lr=cosine_lr,
    )


def release_optimizer(src: Path, script: str, model: nn.Module, args: types.SimpleNamespace):
    """The optimizer statements of ``main()`` (the ``if args.train_data:`` block up to ``optim.AdamW(...)``) run as
    written on ``model``."""
    tree = ast.parse((src / "training" / script).read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    block = next(n for n in ast.walk(main) if isinstance(n, ast.If) and ast.unparse(n.test) == "args.train_data")
    body = []
    for statement in block.body:
        if isinstance(statement, ast.Assert):
            continue
        body.append(statement)
        if isinstance(statement, ast.Assign) and getattr(statement.targets[0], "id", None) == "optimizer":
            break
    namespace = {"model": model, "args": args, "optim": torch.optim}
    exec(compile(ast.Module(body=body, type_ignores=[]), script, "exec"), namespace)
    return namespace["optimizer"]


def adaptation_batches(seed: int, image_size: int) -> list[dict]:
    """Per step: uint8 crops with block masks (a patch wholly background in places), nouns."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(ADAPT_STEPS["steps"]):
        n = ADAPT_STEPS["batch"]
        images = torch.randint(0, 256, (n, 3, image_size, image_size), generator=gen, dtype=torch.uint8)
        blocks = torch.rand(n, 7, 7, generator=gen) > 0.4
        masks = blocks.repeat_interleave(image_size // 7 + 1, 1).repeat_interleave(image_size // 7 + 1, 2)
        batches.append({"image": images, "mask": masks[:, :image_size, :image_size], "text": list(ADAPT_NOUNS)})
    return batches


def adaptation_steps_fixture(root: Path, commit: str, seed: int) -> dict:
    """Three steps of FT, then three of MPT on its result, each as its script runs them: ``lock_text`` (FT, a
    CLIP without mask embedding) / ``lock_image_tower(0)`` + ``lock_text`` (MPT, the mask embedding of depth 3),
    the optimizer of main.py / main_mask_prompt_tuning.py (no decay on gains, biases and the logit scale; the MPT
    group at ``--mask_wd``), ``cosine_lr`` over the phase (short here: warm-up 2, 3 steps), ``train_one_epoch`` /
    ``train_one_epoch_w_mask`` (ClipLoss, AdamW, the logit scale clamped to [0, ln 100] after each step). Inputs:
    masked crops normalised as our module normalises them (the release's transform is ``ovseg_adaptation``'s)."""
    oc = open_clip_training(root)
    torch.manual_seed(seed)
    full = oc.model.CLIP(**STEP_CLIP, quick_gelu=True)  # depth 3 (MPT's layout)
    recipe = perturb(full, seed)
    with torch.no_grad():  # above ln 100: the first forward reads it unclamped, the step's clamp then acts
        full.logit_scale.fill_(math.log(100) + 0.1)
    start = {k: v.clone() for k, v in full.state_dict().items()}
    size = STEP_CLIP["vision_cfg"]["image_size"]
    batches = adaptation_batches(seed, size)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)

    def loader(with_mask: bool):
        items = []
        for batch in batches:
            images = (batch["image"].float() / 255 - mean) / std * batch["mask"][:, None]
            texts = oc.tokenize([ADAPT_TEMPLATE.format(t) for t in batch["text"]])
            items.append(((images, batch["mask"].float()), texts) if with_mask else (images, texts))
        data = types.SimpleNamespace(num_batches=len(items), num_samples=len(items) * ADAPT_STEPS["batch"])
        return {"train": types.SimpleNamespace(set_epoch=lambda e: None, dataloader=Loader(items, data))}

    phases, record = {}, {}
    for phase in ("ft", "mpt"):
        cfg = copy.deepcopy(STEP_CLIP)
        if phase == "ft":
            cfg["vision_cfg"]["mask_emb_depth"] = 0
        model = oc.model.CLIP(**cfg, quick_gelu=True)
        state = start if phase == "ft" else {**start, **phases["ft"]}
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in state.items() if k in model.state_dict()}, strict=False
        )
        assert not missing and not unexpected
        if phase == "mpt":
            model.lock_image_tower(unlocked_groups=0)
        model.loc_text_tower()
        args = types.SimpleNamespace(
            train_data="csv",
            trace=False,
            horovod=False,
            lr=ADAPT_STEPS["lr"][phase],
            wd=ADAPT_STEPS["wd"],
            mask_wd=ADAPT_STEPS["mask_wd"],
            mask_lr_multiplier=1.0,
            beta1=0.9,
            beta2=0.98,
            eps=1e-6,  # params.py get_default_params for ViTs
            precision="fp32",
            ema=False,
            device="cpu",
            local_loss=False,
            gather_with_grad=False,
            rank=0,
            world_size=1,
            batch_size=ADAPT_STEPS["batch"],
            wandb=False,
        )
        script = "main.py" if phase == "ft" else "main_mask_prompt_tuning.py"
        optimizer = release_optimizer(oc.src, script, model, args)
        scheduler = oc.cosine_lr(optimizer, args.lr, ADAPT_STEPS["warmup"], ADAPT_STEPS["steps"])
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        train = oc.train["train_one_epoch" if phase == "ft" else "train_one_epoch_w_mask"]
        train(model, loader(phase == "mpt"), 0, optimizer, None, scheduler, None, args)
        after = {n: p.detach().clone() for n, p in model.named_parameters() if n in trained}
        phases[phase] = {k: v.clone() for k, v in model.state_dict().items()}
        record[phase] = {
            "params": update_record(trained, after, seed),
            "logit_scale": model.logit_scale.detach().clone(),
            "groups": [
                {"size": len(g["params"]), "weight_decay": float(g["weight_decay"]), "lr": float(g["lr"])}
                for g in optimizer.param_groups
            ],
        }
    config = {"clip": STEP_CLIP, "template": ADAPT_TEMPLATE, **ADAPT_STEPS}
    inputs = {"batches": batches, "logit_scale": start["logit_scale"]}
    return fixture("ovseg_train_steps_adaptation", commit, seed, config, recipe, inputs, record)


class Loader(list):
    """The dataloader ``train_one_epoch`` iterates, with the attributes it reads (num_batches, num_samples)."""

    def __init__(self, items: list, info: types.SimpleNamespace) -> None:
        super().__init__(items)
        self.num_batches, self.num_samples = info.num_batches, info.num_samples


def make(root: Path, detectron2_root: Path, out_dir: Path, commit: str, seed: int) -> list[Path]:
    if detectron2_root is None:
        raise SystemExit("--method ovseg_train needs --detectron2 (an extracted detectron2)")
    off, rel = release_paths(root, detectron2_root)
    fixtures = [
        criterion_fixture(rel, commit, seed),
        param_groups_fixture(off, rel, commit, seed, "swin"),
        param_groups_fixture(off, rel, commit, seed, "r101c"),
        schedule_fixture(rel, commit, seed),
        adaptation_schedule_fixture(root, commit, seed),
        maskformer_steps_fixture(off, rel, commit, seed),
        adaptation_steps_fixture(root, commit, seed),
    ]
    return [save_fixture(f, out_dir / f"{f['name']}.pt") for f in fixtures]
