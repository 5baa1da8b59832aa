"""CAT-Seg TRAINS as the official release does (cvlab-kaist/CAT-Seg + detectron2): golden fixtures of
official_catseg_train.py, compared with what OUR paper recipes compose to.

- recipe facts: the release's merged configs (batch, iterations, evaluation / checkpoint period, AMP, clipping,
  optimizer, schedule, mapper settings) against every CAT-Seg paper experiment's composed config;
- the training mapper (CAT-Seg's and ov-seg's MaskFormerSemanticDatasetMapper): the release's random draws replayed
  on our TrainTransform, built from the recipe's data.transform: labels exact, images within one grey level;
- parameter groups: lr, weight decay, betas, eps of every parameter, names through our converter;
- the lr of each of the 80k iterations; three optimizer steps (loss, full-model clipping, AdamW, schedule).
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.convert.catseg import convert_catseg_state_dict
from ovseg_lab.data.transforms import TorchDraws, TrainTransform
from ovseg_lab.layers.normalize import OPENAI_MEAN, OPENAI_STD
from ovseg_lab.lit.optim import build_param_groups
from tests.golden.harness import (
    TOLERANCE,
    digest_error,
    load_fixture,
    perturbed_state,
    relative_error,
    seeded_image,
    seeded_labels,
)
from tests.golden.test_golden_catseg import FINETUNE, our_catseg

# every CAT-Seg paper experiment, with the release config its runs are (the sweeps' CLIPs composed explicitly)
PAPER_EXPERIMENTS = {
    "catseg_vitb16_coco": "vitb",
    "catseg_vitl14_coco": "vitl",
    "catseg_table1": "vitb",
    "catseg_table1 clip=vitl14": "vitl",
    "catseg_table4": "vitl",
    "catseg_table6": "vitl",
    "catseg_mess": "vitb",
    "catseg_mess clip=vitl14": "vitl",
}
RECIPE_OF = {"vitb": "catseg_vitb16_coco", "vitl": "catseg_vitl14_coco"}
MAPPER_FIXTURES = {
    "catseg_train_mapper_catseg_vitb": ["experiment=catseg_vitb16_coco"],
    "catseg_train_mapper_catseg_vitb_constraint": ["experiment=catseg_vitb16_coco"],
    "catseg_train_mapper_ovseg_swinb": ["experiment=ovseg"],
    "catseg_train_mapper_ovseg_r101c": ["experiment=ovseg", "ovseg.setting=r101c_vitb16"],
}


def _overrides(experiment: str) -> list[str]:
    name, *rest = experiment.split()
    return [f"experiment={name}", *rest]


# ---------------------------------------------------------------------------------------------- recipe facts
@pytest.mark.parametrize("experiment", list(PAPER_EXPERIMENTS))
def test_golden_train_catseg_recipe_facts_are_the_release_configs(compose_cfg, experiment):
    """Global batch, iterations, evaluation and checkpoint period, precision, clipping, optimizer, schedule and the
    mapper's settings of each paper experiment = configs/vitb_384.yaml / vitl_336.yaml as train_net.py merges them
    (run with 4 GPUs: README.md:55-58; IMS_PER_BATCH is detectron2's global batch)."""
    official = load_fixture("catseg_train_recipe")["outputs"]["cfg"][PAPER_EXPERIMENTS[experiment]]
    cfg = compose_cfg("train", _overrides(experiment))
    trainer, model, transform = cfg.trainer, cfg.model, cfg.data.transform
    assert cfg.data.batch_size * trainer.devices * trainer.num_nodes == official["SOLVER.IMS_PER_BATCH"] == 4
    assert trainer.max_steps == official["SOLVER.MAX_ITER"] == 80000
    assert trainer.val_check_interval == official["TEST.EVAL_PERIOD"]
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == official["SOLVER.CHECKPOINT_PERIOD"]
    assert official["SOLVER.AMP.ENABLED"] is False and trainer.precision == "32-true"
    assert official["SOLVER.CLIP_GRADIENTS.ENABLED"] and official["SOLVER.CLIP_GRADIENTS.CLIP_TYPE"] == "full_model"
    assert trainer.gradient_clip_val == official["SOLVER.CLIP_GRADIENTS.CLIP_VALUE"]
    assert trainer.gradient_clip_algorithm == "norm" and official["SOLVER.CLIP_GRADIENTS.NORM_TYPE"] == 2.0
    assert official["SOLVER.OPTIMIZER"] == "ADAMW" and model.optimizer._target_ == "torch.optim.AdamW"
    assert model.optimizer.lr == official["SOLVER.BASE_LR"]
    assert model.optimizer.weight_decay == official["SOLVER.WEIGHT_DECAY"]
    assert model.backbone_lr_multiplier == official["SOLVER.CLIP_MULTIPLIER"]
    assert model.weight_decay_norm == official["SOLVER.WEIGHT_DECAY_NORM"]
    assert model.weight_decay_embed == official["SOLVER.WEIGHT_DECAY_EMBED"]
    assert official["SOLVER.LR_SCHEDULER_NAME"] == "WarmupCosineLR" and model.scheduler.kind == "cosine"
    assert model.scheduler.warmup_steps == official["SOLVER.WARMUP_ITERS"] == 0
    assert model.scheduler.get("min_factor", 0.0) == official["SOLVER.BASE_LR_END"] / official["SOLVER.BASE_LR"]
    assert official["MODEL.SEM_SEG_HEAD.CLIP_FINETUNE"] == "attention" and cfg.finetune.strategy == "qv"
    # the mapper (MaskFormerSemanticDatasetMapper.from_config)
    assert list(transform.short_side) == official["INPUT.MIN_SIZE_TRAIN"]
    assert (
        official["INPUT.MIN_SIZE_TRAIN_SAMPLING"] == "choice" and transform.max_size == official["INPUT.MAX_SIZE_TRAIN"]
    )
    assert official["INPUT.CROP.ENABLED"] and official["INPUT.CROP.TYPE"] == "absolute"
    assert [transform.crop_size] * 2 == official["INPUT.CROP.SIZE"]
    assert transform.crop_size == official["INPUT.SIZE_DIVISIBILITY"]  # padding to the crop = to the divisibility
    assert transform.cat_max_ratio == official["INPUT.CROP.SINGLE_CATEGORY_MAX_AREA"]
    assert transform.color_jitter == official["INPUT.COLOR_AUG_SSD"] and transform.flip
    assert transform.pad_value == 128 and transform.arithmetic == "detectron2"
    assert official["MODEL.SEM_SEG_HEAD.IGNORE_VALUE"] == cfg.model.net.ignore_index == 255


# ---------------------------------------------------------------------------------------------- mapper
class ReplayDraws(TorchDraws):
    """The release's recorded draws, handed out in order; each must be the kind of draw our transform asks for."""

    def __init__(self, draws: list) -> None:
        self.draws = list(draws)

    def _next(self, kinds: tuple[str, ...], args: list | None = None):
        assert self.draws, f"our transform draws more than the release ({kinds})"
        kind, official_args, value = self.draws.pop(0)
        assert kind in kinds, f"the release drew {kind}{official_args} where we draw {kinds}"
        if args is not None:
            assert [float(a) for a in official_args] == [float(a) for a in args], (kind, official_args, args)
        return kind, value

    def index(self, n: int) -> int:
        return self._next(("index",), [n])[1]

    def integer(self, low: int, high: int) -> int:
        return self._next(("integer",), [low, high])[1]

    def uniform(self, low: float, high: float) -> float:
        return self._next(("uniform",), [low, high])[1]

    def chance(self) -> bool:
        kind, value = self._next(("randrange2", "uniform01"))
        return value == 1 if kind == "randrange2" else value < 0.5  # random.randrange(2) / RandomFlip(prob=0.5)


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(zlib.decompress(packed.numpy().tobytes()), np.uint8).reshape(shape).copy())


@pytest.mark.parametrize("name", list(MAPPER_FIXTURES))
def test_golden_train_catseg_mapper_replays_the_release(compose_cfg, name):
    """The release's MaskFormerSemanticDatasetMapper (ResizeShortestEdge, RandomCrop_CategoryAreaConstraint with
    its retries, ColorAugSSDTransform with cv2, RandomFlip, padding) vs our TrainTransform with the recipe's
    data.transform, on the release's draws: every draw consumed, labels exact, image within one grey level."""
    fixture = load_fixture(name)
    cfg = compose_cfg("train", MAPPER_FIXTURES[name])
    settings = dict(cfg.data.transform)
    if fixture["config"]["max_area"] is not None:  # the constraint fixture: the release's retries at 0.6
        settings["cat_max_ratio"] = fixture["config"]["max_area"]
    official = fixture["config"]["cfg"]
    assert list(settings["short_side"]) == official["INPUT.MIN_SIZE_TRAIN"]
    assert settings["max_size"] == official["INPUT.MAX_SIZE_TRAIN"]
    assert settings["crop_size"] == official["INPUT.SIZE_DIVISIBILITY"] == official["INPUT.CROP.SIZE"][0]
    sizes = fixture["config"]["images"]
    worst = 0
    for run in fixture["outputs"]["runs"]:
        index = run["image_index"]
        height, width = sizes[index]
        image = torch.from_numpy(seeded_image(fixture["inputs"]["image_seeds"][index], height, width).copy())
        labels = _unpack(fixture["inputs"]["labels"][index], (height, width)).long()
        draws = ReplayDraws(run["draws"])
        transform = TrainTransform(ignore_index=official["MODEL.SEM_SEG_HEAD.IGNORE_VALUE"], draws=draws, **settings)
        out_image, out_label = transform(image.permute(2, 0, 1).contiguous(), labels)
        assert not draws.draws, f"the release drew {len(draws.draws)} more times than we do"
        assert tuple(out_image.shape) == tuple(run["shape"])
        assert torch.equal(out_label.to(torch.uint8), _unpack(run["label"], tuple(run["shape"][1:])))
        error = _sample_error(out_image, run["image"])
        worst = max(worst, error)
        assert error <= 1, f"image {index}: {error} grey levels from the release"
        per_pixel = (out_image.double().sum(dim=(1, 2)) - run["channel_sums"]).abs().max() / out_image[0].numel()
        assert per_pixel <= 1.0


def _sample_error(image: torch.Tensor, expected: dict) -> float:
    """The largest grey-level difference over the fixture's seeded sample of the image."""
    flat = image.to(torch.int16).flatten()
    return float((flat[expected["index"].long()].float() - expected["sample"]).abs().max())


# ---------------------------------------------------------------------------------------------- optimizer
def _our_optimizer(cfg, net: torch.nn.Module) -> torch.optim.Optimizer:
    """configure_optimizers' path (lit/base.py) from the composed recipe: our groups + the recipe's optimizer."""
    model = cfg.model
    groups = build_param_groups(
        net,
        model.optimizer.lr,
        model.optimizer.weight_decay,
        model.backbone_lr_multiplier,
        model.weight_decay_norm,
        model.weight_decay_embed,
    )
    return instantiate(model.optimizer)(groups)


@pytest.mark.parametrize("setting", ["vitb", "vitl"])
@pytest.mark.parametrize("option", list(FINETUNE))
def test_golden_train_catseg_parameter_groups_equal_the_release(compose_cfg, setting, option):
    """train_net.py's build_optimizer on the official CATSeg (CLIP x CLIP_MULTIPLIER, no decay on norms and
    embeddings, AdamW defaults) = our groups, parameter by parameter, for each CLIP_FINETUNE value."""
    fixture = load_fixture("catseg_train_param_groups")
    official = fixture["outputs"]["groups"][f"{setting}/{option}"]
    finetune = dict(FINETUNE[option])
    if option == "prompt":
        finetune["prompt_depth"] = fixture["config"]["clips"][setting]["vision_layers"]
    config = {"clip": fixture["config"]["clips"][setting], "aggregator": fixture["config"]["aggregator"]}
    net = our_catseg({"config": config}, finetune=finetune)
    cfg = compose_cfg("train", [f"experiment={RECIPE_OF[setting]}"])
    optimizer = _our_optimizer(cfg, net)
    names = {id(p): n for n, p in net.named_parameters()}
    ours = {
        names[id(p)]: [g["lr"], g["weight_decay"], *g["betas"], g["eps"], float(g["amsgrad"])]
        for g in optimizer.param_groups
        for p in g["params"]
    }
    mapped = convert_catseg_state_dict({n: torch.zeros(0) for n in official["names"]}, prefix="")
    assert sorted(ours) == sorted(mapped)
    for our_name, hyper in zip(mapped, official["hyper"]):
        assert torch.allclose(torch.tensor(ours[our_name], dtype=torch.float64), hyper, rtol=1e-12, atol=0), our_name


# ---------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("setting", ["vitb", "vitl"])
def test_golden_train_catseg_lr_of_every_iteration_equals_the_release(compose_cfg, setting):
    """WarmupCosineLR (detectron2's WarmupParamScheduler + LRMultiplier, no warm-up, stepped after every iteration)
    vs our schedule from the recipe, stepped by Lightning after every optimizer step: all 80k iterations."""
    fixture = load_fixture("catseg_train_lr")["outputs"]
    official = fixture[setting]
    curve = fixture[official.get("same_as", setting)]["lr"]
    cfg = compose_cfg("train", [f"experiment={RECIPE_OF[setting]}"])
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = instantiate(cfg.model.optimizer)([{"params": [param], "lr": cfg.model.optimizer.lr}])
    scheduler = instantiate(cfg.model.scheduler)(optimizer)
    lrs = []
    with warnings.catch_warnings():  # Lightning steps the optimizer first; the schedule's values do not depend on it
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)`")
        for _ in range(cfg.trainer.max_steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
    ours = torch.tensor(lrs, dtype=torch.float64)
    assert len(ours) == len(curve) == 80000
    assert torch.allclose(ours.float(), curve, rtol=1e-6, atol=0)
    for step, value in official["checks"].items():
        assert ours[step].item() == pytest.approx(value, rel=1e-9, abs=1e-20), step


# ---------------------------------------------------------------------------------------------- three steps
def exact_clip_constants(net: torch.nn.Module) -> None:
    """Our CLIP mean / std buffers in float64 from their decimal values (float32 tensors made .double() keep a
    1e-8 rounding the release's float64 constants do not have; Adam turns that into 1e-5 within three steps)."""
    for module in net.modules():
        if isinstance(module, CLIPBackbone):
            module.mean = torch.tensor(OPENAI_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
            module.std = torch.tensor(OPENAI_STD, dtype=torch.float64).view(1, 3, 1, 1)


def test_golden_train_catseg_three_optimizer_steps_equal_the_release(compose_cfg):
    """Three iterations from the same weights and batches: forward, the official loss, backward, full-model gradient
    clipping at 0.01 (Lightning's clip_gradients, as the recipe's trainer runs it), AdamW with our groups, the
    schedule; every trained parameter and AdamW's second moments afterwards, within 1e-5 (float64 both sides: a float32
    round trip anywhere shifts the features by ~1e-7, enough to flip a ReLU of the decoder guidance that lies that
    close to zero after the first step, and the gradients of the res5 guidance path then differ by ~2e-4)."""
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.utilities.enums import GradClipAlgorithmType

    fixture = load_fixture("catseg_train_steps")
    cfg = compose_cfg("train", ["experiment=catseg_vitb16_coco"])
    net = our_catseg(fixture, finetune={"strategy": "qv"}, ignore_pixels=cfg.model.net.ignore_pixels).double()
    net.load_state_dict(convert_catseg_state_dict(perturbed_state(fixture["state"], fixture["seed"]), prefix=""))
    exact_clip_constants(net)
    net.train()
    optimizer = _our_optimizer(cfg, net)
    scheduler = instantiate(cfg.model.scheduler)(optimizer)
    clip_algorithm = GradClipAlgorithmType(cfg.trainer.gradient_clip_algorithm)
    inputs, losses, norms = fixture["inputs"], [], []
    for step, seeds in enumerate(inputs["image_seeds"]):
        images = torch.stack(
            [torch.from_numpy(seeded_image(s, inputs["size"], inputs["size"]).transpose(2, 0, 1).copy()) for s in seeds]
        )
        labels = seeded_labels(fixture["seed"] + step, (len(seeds), inputs["size"], inputs["size"]), **inputs["labels"])
        optimizer.zero_grad()
        loss = net.loss(net(images.double() / 255, fixture["config"]["names"]), labels)
        loss.backward()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        clipped_from = torch.stack([g.norm() for g in grads]).norm().item()
        Precision().clip_gradients(optimizer, cfg.trainer.gradient_clip_val, clip_algorithm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        norms.append(clipped_from)
    for step in range(len(losses)):
        assert relative_error(torch.tensor(losses[step]), torch.tensor(fixture["outputs"]["losses"][step])) <= TOLERANCE
        assert (
            relative_error(torch.tensor(norms[step]), torch.tensor(fixture["outputs"]["grad_norms"][step])) <= TOLERANCE
        )
    official = fixture["outputs"]["params"]
    mapped = convert_catseg_state_dict({n: torch.zeros(0) for n in official}, prefix="")
    ours = dict(net.named_parameters())
    errors = {m: digest_error(ours[m].detach(), official[o]) for o, m in zip(official, mapped)}
    assert max(errors.values()) <= TOLERANCE, max(errors.items(), key=lambda item: item[1])
    moments = {}
    for official_name, our_name in zip(fixture["outputs"]["exp_avg_sq"], mapped):
        state = optimizer.state.get(ours[our_name])
        if state:  # the dense last block's q (never computed here): no gradient, no AdamW state
            moments[our_name] = digest_error(state["exp_avg_sq"], fixture["outputs"]["exp_avg_sq"][official_name])
    assert len(moments) == len(mapped) - 1
    assert max(moments.values()) <= TOLERANCE, max(moments.items(), key=lambda item: item[1])
