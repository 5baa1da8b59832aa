"""Golden TRAINING fixtures from the official CAT-Seg release, detectron2 and ov-seg (its training mapper only).

Called by ``make_golden.py --method catseg_train``; never imported by the tests. What runs is the release's own
training code, on the configuration its ``train_net.py`` builds (detectron2's ``defaults.py`` + ``add_deeplab_config``
+ ``add_cat_seg_config`` / ``add_ovseg_config`` + the shipped yaml, merged by fvcore's ``CfgNode``):

- the recipe facts of ``configs/vitb_384.yaml`` / ``vitl_336.yaml`` (batch, iterations, evaluation and checkpoint
  period, AMP, clipping, schedule and optimizer settings);
- ``MaskFormerSemanticDatasetMapper.__call__`` (CAT-Seg's, and ov-seg's with both of its configs) with detectron2's
  ``data/transforms`` and PointRend's ``ColorAugSSDTransform`` run from detectron2's source (cv2 for real); every
  random draw (``np.random.choice / randint / uniform``, ``random.randrange / uniform / randint``) is recorded;
- ``Trainer.build_optimizer`` of ``train_net.py`` on the official ``CATSeg`` for each ``CLIP_FINETUNE`` value;
- ``build_lr_scheduler`` (DeepLab's, falling through to detectron2's ``WarmupParamScheduler`` + ``LRMultiplier``)
  over all 80k iterations, stepped after every iteration as detectron2's ``LRScheduler`` hook does;
- three iterations of ``CATSeg.forward`` (training) + ``backward`` + the release's full-model-clipping AdamW +
  its scheduler, as ``SimpleTrainer.run_step`` runs them.

Stubbed (no behaviour of theirs is used): detectron2's file reading (``detection_utils.read_image`` answers the
generated arrays), ``MetadataCatalog`` (``ignore_label`` 255, COCO-Stuff's), ``Instances`` / ``BitMasks`` (plain
holders), ``fixup_module_metadata``. fvcore, yacs and iopath are the released packages (``pip install --target``),
see tests/golden/README.md.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import os
import random
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.golden.harness import digest, fixture_record, save_fixture, seeded_image, seeded_labels
from tests.golden.official_catseg import (
    REPO,
    SMALL_AGGREGATOR,
    TINY_CLIPS,
    Official,
    _plain,
    perturb,
)
from tests.golden.official_stubs import _module, detectron2_function, import_official

OVSEG_REPO = "facebookresearch/ov-seg"
CATSEG_CONFIGS = {"vitb": "configs/vitb_384.yaml", "vitl": "configs/vitl_336.yaml"}
OVSEG_CONFIGS = {"swinb": "configs/ovseg_swinB_vitL_bs32_120k.yaml", "r101c": "configs/ovseg_R101c_vitB_bs32_120k.yaml"}
FINETUNE_OPTIONS = ("none", "prompt", "attention", "full")
# (height, width) of the generated training images: landscape, portrait, square, small (below the crop)
MAPPER_IMAGES = [(240, 320), (330, 190), (256, 256), (150, 210)]
MAPPER_DRAWS = 2  # seeded runs of the mapper per image


# ---------------------------------------------------------------------------------------------- environment
def _real_fvcore() -> None:
    """Let the fvcore stub of official_stubs resolve ``fvcore.common`` / ``fvcore.transforms`` to the released
    package (on sys.path, e.g. PYTHONPATH=/tmp/fvcore_site)."""
    for entry in sys.path:
        candidate = Path(entry or ".") / "fvcore"
        if (candidate / "transforms" / "transform.py").is_file():
            path = sys.modules["fvcore"].__path__
            if str(candidate) not in path:
                path.append(str(candidate))
            return
    raise SystemExit("fvcore (the released package) is not on sys.path: see tests/golden/README.md")


def _load_file(name: str, path: Path, package_dir: Path | None = None) -> types.ModuleType:
    """Import one source file (or a package, ``package_dir``) under ``name``."""
    kwargs = {"submodule_search_locations": [str(package_dir)]} if package_dir else {}
    spec = importlib.util.spec_from_file_location(name, path, **kwargs)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _Holder:
    """Instances / BitMasks stand-in: keeps what it is given."""

    def __init__(self, *args, **kwargs) -> None:
        self.tensor = args[0] if args else None


class OfficialTraining:
    """The official modules of a training run, imported once."""

    def __init__(self, catseg_root: Path, detectron2_root: Path, ovseg_root: Path) -> None:
        self.catseg_root, self.d2, self.ovseg_root = catseg_root, detectron2_root, ovseg_root
        self.off = Official(catseg_root, detectron2_root)  # the detectron2 / fvcore stubs + the CAT-Seg model code
        _real_fvcore()
        from fvcore.common.config import CfgNode

        self.CfgNode = CfgNode
        sys.modules["detectron2.config"].CfgNode = CfgNode
        _module("detectron2.config.config", CfgNode=CfgNode)
        self.defaults = _load_file("detectron2.config.defaults", detectron2_root / "detectron2/config/defaults.py")
        self.deeplab_config = _load_file(
            "_d2_deeplab_config", detectron2_root / "projects/DeepLab/deeplab/config.py"
        ).add_deeplab_config
        self.catseg_config = import_official(catseg_root, "cat_seg.config", ("cat_seg",)).add_cat_seg_config
        self.ovseg_config = import_official(ovseg_root, "open_vocab_seg.config", ("open_vocab_seg",)).add_ovseg_config
        self._install_data_modules()
        self.lr_scheduler = _load_file("_d2_lr_scheduler", detectron2_root / "detectron2/solver/lr_scheduler.py")

    def _install_data_modules(self) -> None:
        d2 = self.d2
        _module("detectron2.utils.env", fixup_module_metadata=lambda *a, **k: None, TORCH_VERSION=(2, 0))
        structures = sys.modules["detectron2.structures"]
        structures.Boxes, structures.pairwise_iou = None, None  # imported by augmentation_impl, unused here
        structures.BitMasks, structures.Instances = _Holder, _Holder
        transforms_dir = d2 / "detectron2/data/transforms"
        transforms = _load_file("detectron2.data.transforms", transforms_dir / "__init__.py", transforms_dir)
        self.arrays: dict[str, np.ndarray] = {}
        utils = _module(
            "detectron2.data.detection_utils",
            read_image=lambda name, format=None: self.arrays[name].copy(),
            check_image_size=lambda *a, **k: None,
        )
        data = sys.modules["detectron2.data"]
        data.transforms, data.detection_utils = transforms, utils
        data.MetadataCatalog = types.SimpleNamespace(get=lambda name: types.SimpleNamespace(ignore_label=255))
        _module("detectron2.projects", __path__=[])
        color = _load_file("_d2_color_augmentation", d2 / "projects/PointRend/point_rend/color_augmentation.py")
        _module("detectron2.projects.point_rend", ColorAugSSDTransform=color.ColorAugSSDTransform)
        mapper_module = "data.dataset_mappers.mask_former_semantic_dataset_mapper"
        self.catseg_mapper = import_official(
            self.catseg_root,
            f"cat_seg.{mapper_module}",
            ("cat_seg", "cat_seg.data", "cat_seg.data.dataset_mappers"),
        ).MaskFormerSemanticDatasetMapper
        self.ovseg_mapper = import_official(
            self.ovseg_root,
            f"open_vocab_seg.{mapper_module}",
            ("open_vocab_seg", "open_vocab_seg.data", "open_vocab_seg.data.dataset_mappers"),
        ).MaskFormerSemanticDatasetMapper

    # ------------------------------------------------------------------ configs
    def config(self, release: str, file: str):
        """The frozen cfg ``train_net.py``'s ``setup`` builds for a shipped config (without command-line opts)."""
        cfg = self.defaults._C.clone()
        self.deeplab_config(cfg)
        if release == "catseg":
            self.catseg_config(cfg)
            root = self.catseg_root
        else:
            self.ovseg_config(cfg)
            root = self.ovseg_root
        cfg.merge_from_file(str(root / file), allow_unsafe=True)  # ov-seg's sizes are a !!python/object/apply
        cfg.freeze()
        return cfg

    # ------------------------------------------------------------------ solver
    def build_optimizer(self, cfg, model: nn.Module) -> torch.optim.Optimizer:
        build = detectron2_function(self.catseg_root, "train_net.py", "Trainer.build_optimizer")
        build.__globals__.update(copy=copy, itertools=itertools, maybe_add_gradient_clipping=None)
        return build(None, cfg, model)

    def build_lr_scheduler(self, cfg, optimizer):
        """DeepLab's ``build_lr_scheduler`` (train_net.py:25), which hands WarmupCosineLR to detectron2's."""
        from fvcore.common import param_scheduler

        d2_build = detectron2_function(self.d2, "detectron2/solver/build.py", "build_lr_scheduler")
        d2_build.__globals__.update(
            {name: getattr(param_scheduler, name) for name in param_scheduler.__all__},
            LRMultiplier=self.lr_scheduler.LRMultiplier,
            WarmupParamScheduler=self.lr_scheduler.WarmupParamScheduler,
        )
        build = detectron2_function(self.d2, "projects/DeepLab/deeplab/build_solver.py", "build_lr_scheduler")
        build.__globals__.update(build_d2_lr_scheduler=d2_build, WarmupPolyLR=None)
        return build(cfg, optimizer)


fixture = lambda *args: fixture_record("catseg", REPO, *args)  # noqa: E731


# ---------------------------------------------------------------------------------------------- recipe
RECIPE_KEYS = [
    "SOLVER.IMS_PER_BATCH",
    "SOLVER.MAX_ITER",
    "SOLVER.BASE_LR",
    "SOLVER.BASE_LR_END",
    "SOLVER.WEIGHT_DECAY",
    "SOLVER.WEIGHT_DECAY_NORM",
    "SOLVER.WEIGHT_DECAY_EMBED",
    "SOLVER.OPTIMIZER",
    "SOLVER.BACKBONE_MULTIPLIER",
    "SOLVER.CLIP_MULTIPLIER",
    "SOLVER.LR_SCHEDULER_NAME",
    "SOLVER.WARMUP_ITERS",
    "SOLVER.WARMUP_FACTOR",
    "SOLVER.WARMUP_METHOD",
    "SOLVER.CLIP_GRADIENTS.ENABLED",
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE",
    "SOLVER.AMP.ENABLED",
    "SOLVER.CHECKPOINT_PERIOD",
    "SOLVER.REFERENCE_WORLD_SIZE",
    "TEST.EVAL_PERIOD",
    "MODEL.SEM_SEG_HEAD.CLIP_FINETUNE",
    "MODEL.SEM_SEG_HEAD.CLIP_PRETRAINED",
    "INPUT.MIN_SIZE_TRAIN",
    "INPUT.MAX_SIZE_TRAIN",
    "INPUT.MIN_SIZE_TRAIN_SAMPLING",
    "INPUT.CROP.ENABLED",
    "INPUT.CROP.TYPE",
    "INPUT.CROP.SIZE",
    "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA",
    "INPUT.COLOR_AUG_SSD",
    "INPUT.SIZE_DIVISIBILITY",
    "INPUT.FORMAT",
    "INPUT.DATASET_MAPPER_NAME",
    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",
]


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return list(cfg) if isinstance(cfg, (tuple, list)) else cfg


def recipe_fixture(tr: OfficialTraining, commit: str, seed: int) -> dict:
    """The merged configs of the two paper runs (``sh run.sh configs/vit*.yaml 4 output/``, README.md:55-58): 4
    GPUs, ``IMS_PER_BATCH`` the global batch; ``model_final.pth`` is what eval.sh evaluates."""
    values = {s: {k: _get(tr.config("catseg", f), k) for k in RECIPE_KEYS} for s, f in CATSEG_CONFIGS.items()}
    config = {"configs": CATSEG_CONFIGS, "num_gpus": 4, "evaluated": "model_final.pth"}
    return fixture("catseg_train_recipe", commit, seed, config, [], {}, {"cfg": values})


# ---------------------------------------------------------------------------------------------- mapper
@contextlib.contextmanager
def recorded_draws(log: list):
    """Every random draw of detectron2's augmentations and ColorAugSSDTransform, appended to ``log`` as
    (kind, arguments, value): numpy's global RNG (np.random.choice / randint / uniform, also reached as
    ``from numpy import random``) and Python's ``random`` module functions."""
    saved = {
        (np.random, "choice"): np.random.choice,
        (np.random, "randint"): np.random.randint,
        (np.random, "uniform"): np.random.uniform,
        (random, "randrange"): random.randrange,
        (random, "uniform"): random.uniform,
        (random, "randint"): random.randint,
    }

    def choice(a, *args, **kwargs):
        value = saved[np.random, "choice"](a, *args, **kwargs)
        log.append(("index", [len(a)], list(a).index(value)))
        return value

    def randint(low, high=None, *args, **kwargs):
        value = saved[np.random, "randint"](low, high, *args, **kwargs)
        log.append(("integer", [0, int(low)] if high is None else [int(low), int(high)], int(value)))
        return value

    def uniform(low=0.0, high=1.0, *args, **kwargs):
        value = saved[np.random, "uniform"](low, high, *args, **kwargs)
        log.append(("uniform01" if (low, high) == (0, 1) else "uniform", [float(low), float(high)], float(value)))
        return value

    def randrange(*args):
        value = saved[random, "randrange"](*args)
        assert args == (2,), args
        log.append(("randrange2", [2], int(value)))
        return value

    def py_uniform(a, b):
        value = saved[random, "uniform"](a, b)
        log.append(("uniform", [float(a), float(b)], float(value)))
        return value

    def py_randint(a, b):
        value = saved[random, "randint"](a, b)
        log.append(("integer", [int(a), int(b) + 1], int(value)))
        return value

    patches = {
        (np.random, "choice"): choice,
        (np.random, "randint"): randint,
        (np.random, "uniform"): uniform,
        (random, "randrange"): randrange,
        (random, "uniform"): py_uniform,
        (random, "randint"): py_randint,
    }
    for (owner, name), fn in patches.items():
        setattr(owner, name, fn)
    try:
        yield log
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)


def _packed(array: np.ndarray) -> torch.Tensor:
    """uint8 bytes, zlib-compressed (labels are blocky: a 640x640 map packs to a few KB)."""
    return torch.frombuffer(bytearray(zlib.compress(np.ascontiguousarray(array).tobytes(), 9)), dtype=torch.uint8)


def mapper_labels(seed: int, height: int, width: int, dominant: bool) -> np.ndarray:
    """(H, W) uint8 classes in 12-pixel blocks with two void boxes; ``dominant``: class 0 over most of the image
    (so the category-area constraint rejects crops and retries)."""
    void = [(0, 0, height // 5, 0, width // 3), (0, height // 2, height // 2 + 15, width // 2, width)]
    labels = seeded_labels(seed, (1, height, width), num_classes=7, block=12, void=void)[0].numpy().astype(np.uint8)
    if dominant:
        labels[: height // 2] = np.where(labels[: height // 2] == 255, 255, 0)
    return labels


def mapper_fixture(tr: OfficialTraining, commit: str, seed: int, release: str, setting: str, max_area=None) -> dict:
    """The release's training mapper on generated images: the draws it made, its padded image and label."""
    file = (CATSEG_CONFIGS if release == "catseg" else OVSEG_CONFIGS)[setting]
    cfg = tr.config(release, file)
    if max_area is not None:
        cfg.defrost()
        cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = max_area
        cfg.freeze()
    mapper_class = tr.catseg_mapper if release == "catseg" else tr.ovseg_mapper
    mapper = mapper_class(**mapper_class.from_config(cfg, True))  # @configurable's from_config path
    runs, inputs = [], {"image_seeds": [], "labels": []}
    for index, (height, width) in enumerate(MAPPER_IMAGES):
        image = seeded_image(seed + index, height, width)
        labels = mapper_labels(seed + index, height, width, dominant=max_area is not None)
        inputs["image_seeds"].append(seed + index)
        inputs["labels"].append(_packed(labels))
        tr.arrays.update({"image.jpg": image, "label.png": labels})
        for run in range(MAPPER_DRAWS):
            np.random.seed(1000 * index + run)
            random.seed(1000 * index + run)
            with recorded_draws([]) as draws:
                out = mapper({"file_name": "image.jpg", "sem_seg_file_name": "label.png", "height": height})
            assert out["image"].dtype == torch.uint8 and out["sem_seg"].dtype == torch.int64
            runs.append(
                {
                    "image_index": index,
                    "draws": draws,
                    "shape": tuple(out["image"].shape),
                    "image": digest(out["image"].to(torch.int16), seed=run),
                    "channel_sums": out["image"].double().sum(dim=(1, 2)),
                    "label": _packed(out["sem_seg"].numpy().astype(np.uint8)),
                }
            )
    values = {k: _get(cfg, k) for k in RECIPE_KEYS if k.startswith("INPUT.") or k.endswith("IGNORE_VALUE")}
    config = {"release": release, "config_file": file, "cfg": values, "images": MAPPER_IMAGES, "max_area": max_area}
    suffix = "" if max_area is None else "_constraint"
    repo = REPO if release == "catseg" else OVSEG_REPO
    name = f"catseg_train_mapper_{release}_{setting}{suffix}"
    return fixture_record("catseg", repo, name, commit, seed, config, [], inputs, {"runs": runs})


# ---------------------------------------------------------------------------------------------- solver
def official_model(tr: OfficialTraining, setting: str, finetune: str) -> nn.Module:
    clip = TINY_CLIPS[setting]
    prompt = (clip["vision_layers"], 4) if finetune == "prompt" else (0, 0)
    names = ["wall", "floor", "tree", "person", "car", "sky"]
    return tr.off.build_model(clip, SMALL_AGGREGATOR, names, names, finetune, prompt[0], prompt[1])


def param_groups_fixture(tr: OfficialTraining, commit: str, seed: int) -> dict:
    """``Trainer.build_optimizer`` on the official CATSeg: lr, weight decay, betas, eps of every parameter, per
    paper config and CLIP_FINETUNE value."""
    groups = {}
    for setting, file in CATSEG_CONFIGS.items():
        cfg = tr.config("catseg", file)
        for option in FINETUNE_OPTIONS:
            model = official_model(tr, setting, option)
            optimizer = tr.build_optimizer(cfg, model)
            assert type(optimizer).__name__ == "FullModelGradientClippingOptimizer"
            names = {id(p): n for n, p in model.named_parameters()}
            rows = [
                (names[id(p)], [g["lr"], g["weight_decay"], *g["betas"], g["eps"], float(g["amsgrad"])])
                for g in optimizer.param_groups
                for p in g["params"]
            ]
            groups[f"{setting}/{option}"] = {
                "names": [n for n, _ in rows],
                "hyper": torch.tensor([h for _, h in rows], dtype=torch.float64),  # lr, wd, beta1, beta2, eps, amsgrad
            }
    config = {
        "configs": CATSEG_CONFIGS,
        "options": FINETUNE_OPTIONS,
        "clips": TINY_CLIPS,
        "aggregator": _plain(SMALL_AGGREGATOR),
        "prompt_length": 4,
    }
    return fixture("catseg_train_param_groups", commit, seed, config, [], {}, {"groups": groups})


def lr_fixture(tr: OfficialTraining, commit: str, seed: int) -> dict:
    """The lr of every one of the 80k iterations: the scheduler stepped after each optimizer step (detectron2's
    hooks.LRScheduler.after_step), read before it (the lr the step used)."""
    out = {}
    for setting, file in CATSEG_CONFIGS.items():
        cfg = tr.config("catseg", file)
        param = nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([{"params": [param], "lr": cfg.SOLVER.BASE_LR}], cfg.SOLVER.BASE_LR)
        scheduler = tr.build_lr_scheduler(cfg, optimizer)
        lrs = []
        for _ in range(cfg.SOLVER.MAX_ITER):
            lrs.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
        curve = torch.tensor(lrs, dtype=torch.float64).float()
        same = [name for name, other in out.items() if torch.equal(other.get("lr", curve[:0]), curve)]
        # one curve stored once (the file stays small): ViT-L's solver settings are ViT-B's
        out[setting] = {"same_as": same[0]} if same else {"lr": curve}
        out[setting]["base_lr"] = cfg.SOLVER.BASE_LR
        out[setting]["checks"] = {i: lrs[i] for i in (0, 1, 2, 100, 40000, 79998, 79999)}  # fp64
    return fixture("catseg_train_lr", commit, seed, {"configs": CATSEG_CONFIGS}, [], {}, out)


def steps_fixture(tr: OfficialTraining, commit: str, seed: int, setting: str = "vitb", steps: int = 3) -> dict:
    """Three iterations as ``SimpleTrainer.run_step`` runs them (forward in training mode, loss, backward,
    ``optimizer.step()`` = full-model clip_grad_norm_ 0.01 then AdamW, ``scheduler.step()``) from the recipe's
    weights on three batches of two images; CLIP_FINETUNE attention (QV). In float64 on both sides, as the
    ``catseg_loss`` fixture (the official float32 casts made float64 for that, nothing else)."""
    layer_norm = tr.off.model_vpt.LayerNorm.forward
    to_float = torch.Tensor.float
    tr.off.model_vpt.LayerNorm.forward = nn.LayerNorm.forward
    torch.set_default_dtype(torch.float64)
    torch.Tensor.float = lambda self, *args, **kwargs: self.to(torch.float64)
    names = ["wall", "floor", "tree", "person", "car", "sky"]
    label_spec = {"num_classes": len(names), "block": 32, "void": [(0, 0, 100, 0, 150), (1, 300, 384, 0, 384)]}
    try:
        cfg = tr.config("catseg", CATSEG_CONFIGS[setting])
        model = official_model(tr, setting, "attention").double()
        recipe = perturb(model, seed)
        model.train()
        optimizer = tr.build_optimizer(cfg, model)
        scheduler = tr.build_lr_scheduler(cfg, optimizer)
        losses, norms = [], []
        for step in range(steps):
            images = [
                torch.from_numpy(seeded_image(seed + 10 * step + i, 384, 384).transpose(2, 0, 1).copy())
                for i in range(2)
            ]
            labels = seeded_labels(seed + step, (2, 384, 384), **label_spec)
            loss = model([{"image": im, "sem_seg": lab} for im, lab in zip(images, labels)])["loss_sem_seg"]
            optimizer.zero_grad()
            loss.backward()
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norms.append(torch.stack([p.grad.norm() for p in params if p.grad is not None]).norm().item())
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    finally:
        torch.Tensor.float = to_float
        torch.set_default_dtype(torch.float32)
        tr.off.model_vpt.LayerNorm.forward = layer_norm
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    after = {n: digest(p.detach(), whole=256, sample=256) for n, p in model.named_parameters() if id(p) in trained}
    moments = {
        n: digest(optimizer.state[p]["exp_avg_sq"], whole=64, sample=64)
        for n, p in model.named_parameters()
        if id(p) in trained
    }
    config = {
        "setting": setting,
        "config_file": CATSEG_CONFIGS[setting],
        "clip": TINY_CLIPS[setting],
        "aggregator": _plain(SMALL_AGGREGATOR),
        "names": names,
        "finetune": "attention",
        "dtype": "float64",
        "steps": steps,
    }
    inputs = {
        "size": 384,
        "labels": label_spec,
        "image_seeds": [[seed + 10 * s + i for i in range(2)] for s in range(steps)],
    }
    outputs = {"losses": losses, "grad_norms": norms, "params": after, "exp_avg_sq": moments}
    return fixture("catseg_train_steps", commit, seed, config, recipe, inputs, outputs)


def make(official_root: Path, extra: dict, out_dir: Path, commit: str, seed: int = 0) -> list[Path]:
    detectron2_root, ovseg_root = extra["detectron2"], extra["ovseg"]
    ovseg_commit = os.environ.get("OVSEG_COMMIT") or _git_commit(ovseg_root)
    torch.manual_seed(seed)
    tr = OfficialTraining(official_root, detectron2_root, ovseg_root)
    fixtures = [recipe_fixture(tr, commit, seed), lr_fixture(tr, commit, seed), param_groups_fixture(tr, commit, seed)]
    fixtures.append(mapper_fixture(tr, commit, seed, "catseg", "vitb"))
    fixtures.append(mapper_fixture(tr, commit, seed, "catseg", "vitb", max_area=0.6))
    for setting in OVSEG_CONFIGS:
        fixtures.append(mapper_fixture(tr, ovseg_commit, seed, "ovseg", setting))
    fixtures.append(steps_fixture(tr, commit, seed))
    return [save_fixture(f, out_dir / f"{f['name']}.pt") for f in fixtures]


def _git_commit(root: Path) -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"{root} is not a git checkout: set OVSEG_COMMIT=<the ov-seg commit>") from None
