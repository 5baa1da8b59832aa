"""OVSeg TRAINS as the official release does (facebookresearch/ov-seg): golden training fixtures of
official_ovseg_train.py, and the recipe facts of every OVSeg paper experiment read from the composed config.

Stage 1 (MaskFormer, ``experiment=ovseg``): the criterion and matcher on a fixed batch, the optimizer's parameter
groups, the learning rate of all 120k iterations and three optimizer steps. Stage 2 (CLIP adaptation, the
``clip_adapt`` stage of ``experiment=ovseg_chain``): batch, steps and the learning rate of every step of both
phases, AdamW's settings, the logit scale, no clipping, fp16 AMP.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ovseg_lab.convert.ovseg import convert_ovseg_state_dict
from ovseg_lab.lit.ovseg import CLIPAdaptModule, MaskFormerModule
from ovseg_lab.models.maskformer import semantic_targets
from ovseg_lab.models.ovseg import OVSeg
from ovseg_lab.vocab import Vocabulary
from tests.golden.harness import TOLERANCE, load_fixture, perturbed_state, relative_error
from tests.golden.test_golden_ovseg import our_clip, our_maskformer

SETTINGS = {"swin": "swinb_vitl14", "r101c": "r101c_vitb16"}
# the release's adaptation scripts behind each setting's CLIP (ovseg_train_lr_adaptation's runs)
ADAPT_RUNS = {"swinb_vitl14": {"ft": "vitl_ft", "mpt": "vitl_mpt"}, "r101c_vitb16": {"ft": "vitb_ft", "mpt": "vitb_ft"}}


def paper_cfg(compose, setting: str):
    return compose("train", ["experiment=ovseg", f"ovseg.setting={setting}"])


def adaptation_cfg(compose, setting: str):
    """The config the ``clip_adapt`` stage of ``experiment=ovseg_chain`` runs with (composed as the pipeline
    composes it)."""
    from ovseg_lab.pipeline import stage_overrides

    root = compose("train", ["experiment=ovseg_chain", f"ovseg.setting={setting}"])
    return compose("train", stage_overrides(root, "clip_adapt"))


def our_net(kind: str, cfg: dict, criterion=None, dropout: float = 0.1) -> OVSeg:
    """Our OVSeg at a fixture's size: its CLIP, the Swin or R-101c MaskFormer (test_golden_ovseg's builders)."""
    spec = {"backbone": kind, "head": cfg["head"], "swin": cfg["swin"]}

    def maskformer(embed_dim: int):
        net = our_maskformer({**spec, "embed_dim": embed_dim})
        for module in net.modules():  # nn.Dropout and the attention's own dropout
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
            elif isinstance(module, torch.nn.MultiheadAttention):
                module.dropout = dropout
        return net

    return OVSeg(our_clip(cfg["clip"]), maskformer, criterion, mask_threshold=0.4, templates="vild14")


def official_to_ours(recipe: list, net: torch.nn.Module) -> dict[str, list[str]]:
    """Official parameter name -> our parameter names, traced through our converter: every official tensor is
    filled with its own index, so a rename, split (q/k/v) or reshape keeps it recognisable."""
    state = {key: torch.full(tuple(shape), float(i)) for i, (key, shape, _, _) in enumerate(recipe)}
    converted = convert_ovseg_state_dict(state, prefix="")
    index = {i: key for i, (key, _, _, _) in enumerate(recipe)}
    ours = dict(net.named_parameters())
    mapping: dict[str, list[str]] = {}
    for name, value in converted.items():
        if name in ours:
            (value_id,) = value.unique().tolist()
            mapping.setdefault(index[int(value_id)], []).append(name)
    return mapping


def module_for(cfg, net: OVSeg, **overrides) -> MaskFormerModule:
    model = cfg.model
    kwargs = dict(
        optimizer=instantiate(model.optimizer),
        scheduler=instantiate(model.scheduler),
        backbone_lr_multiplier=model.backbone_lr_multiplier,
        weight_decay_norm=model.weight_decay_norm,
        weight_decay_embed=model.weight_decay_embed,
        no_weight_decay_names=list(model.no_weight_decay_names),
    )
    return MaskFormerModule(net, **{**kwargs, **overrides})


# ---------------------------------------------------------------------------------------------- criterion
def test_golden_train_ovseg_criterion_and_matcher_equal_official(compose_cfg):
    """``SetCriterion`` / ``HungarianMatcher`` as ``MaskFormer.from_config`` builds them (CE with no-object weight
    0.1, focal x20, dice x1, costs 1 / 20 / 1, deep supervision), on the targets the training mapper makes from
    labels with void pixels (padded to 32 with 255): every weighted loss term, the matched queries of every layer,
    the gradient of every output."""
    fixture = load_fixture("ovseg_train_criterion")
    inputs, out = fixture["inputs"], fixture["outputs"]
    cfg = paper_cfg(compose_cfg, "swinb_vitl14")
    criterion = instantiate(cfg.model.net.criterion)
    targets = semantic_targets(inputs["padded_labels"].long(), 255)
    for ours, labels, masks in zip(targets, out["target_labels"], out["target_masks"]):
        assert torch.equal(ours["labels"], labels) and torch.equal(ours["masks"].bool(), masks)
    layers = [
        {"pred_logits": logits.clone().requires_grad_(True), "pred_masks": masks.clone().requires_grad_(True)}
        for logits, masks in zip(inputs["pred_logits"], inputs["pred_masks"])
    ]
    outputs = dict(layers[-1], aux_outputs=layers[:-1])
    matched = []
    match = criterion.match
    criterion.match = lambda *args: matched.append(match(*args)) or matched[-1]
    losses = criterion(outputs, targets)
    assert set(losses) - {"loss"} == set(out["losses"]) == set(out["weight_dict"])
    for key, value in out["losses"].items():
        assert relative_error(losses[key].detach(), value) <= TOLERANCE, key
    assert relative_error(losses["loss"].detach(), sum(out["losses"].values())) <= TOLERANCE
    assert len(matched) == len(out["indices"]) == 3
    for ours, official in zip(matched, out["indices"]):
        for (q, t), (oq, ot) in zip(ours, official):
            order = oq.long().argsort()
            assert torch.equal(q, oq.long()[order]) and torch.equal(t, ot.long()[order])
    losses["loss"].backward()
    for i, layer in enumerate(layers):
        assert relative_error(layer["pred_logits"].grad, out["grad_logits"][i]) <= TOLERANCE, f"logits {i}"
        assert relative_error(layer["pred_masks"].grad, out["grad_masks"][i]) <= TOLERANCE, f"masks {i}"


# ---------------------------------------------------------------------------------------------- optimizer
def flat_hyper(group: dict) -> dict[str, float]:
    """lr (the base lr: a scheduler's ``initial_lr``), weight decay, betas, eps of a parameter group."""
    beta1, beta2 = group["betas"]
    return {
        "lr": group.get("initial_lr", group["lr"]),
        "weight_decay": group["weight_decay"],
        "beta1": beta1,
        "beta2": beta2,
        "eps": group["eps"],
    }


@pytest.mark.parametrize("kind", ["swin", "r101c"])
def test_golden_train_ovseg_parameter_groups_equal_official(compose_cfg, kind):
    """``Trainer.build_optimizer`` (train_net.py) on the release's OVSeg vs ``experiment=ovseg``'s optimizer on
    ours, parameter by parameter through our converter: the same parameters train (the CLIP and FrozenBN stem /
    res2 do not) with the same lr (backbone multiplier 1 / 0.1), weight decay (0 on norms, embeddings and Swin's
    relative position bias tables), betas and eps; AdamW with full-model gradient clipping."""
    fixture = load_fixture(f"ovseg_train_param_groups_{kind}")
    cfg, out = paper_cfg(compose_cfg, SETTINGS[kind]), fixture["outputs"]
    module = module_for(cfg, our_net(kind, fixture["config"]))
    optimizer = module.configure_optimizers()["optimizer"]
    ours = {}
    names = {id(p): n for n, p in module.net.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            ours[names[id(param)]] = flat_hyper(group)
    mapping = official_to_ours(fixture["state"], module.net)
    expected = {}
    for official, hyper in out["groups"].items():
        for name in mapping[official]:
            expected[name] = flat_hyper(hyper)
    assert set(ours) == set(expected)
    wrong = {n: (ours[n], expected[n]) for n in ours if ours[n] != pytest.approx(expected[n], rel=1e-12)}
    assert not wrong, list(wrong.items())[:3]
    assert all(
        n.startswith("clip.") or n.startswith("maskformer.backbone.body") for n in set(names.values()) - set(ours)
    )
    assert out["optimizer"] == "AdamW" and cfg.model.optimizer._target_ == "torch.optim.AdamW"
    solver = fixture["config"]["solver"]
    assert out["clips_full_model"] and solver["CLIP_GRADIENTS"]["CLIP_VALUE"] == cfg.trainer.gradient_clip_val


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("setting", ["swinb_vitl14", "r101c_vitb16"])
def test_golden_train_ovseg_lr_of_every_iteration_equals_official(compose_cfg, setting):
    """detectron2's WarmupPolyLR (the DeepLab project's, linear warm-up from 1e-6 over 1500, power 0.9), stepped
    after each of the 120k iterations, vs ``experiment=ovseg``'s schedule as Lightning steps it (``interval:
    step``)."""
    fixture = load_fixture("ovseg_train_lr_maskformer")
    cfg = paper_cfg(compose_cfg, setting)
    run = fixture["outputs"]["runs"]["swin" if setting == "swinb_vitl14" else "r101c"]
    assert cfg.model.optimizer.lr == run["BASE_LR"] and cfg.trainer.max_steps == run["solver"]["MAX_ITER"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.model.optimizer.lr)
    ours = torch.tensor(stepped_lrs(instantiate(cfg.model.scheduler)(optimizer), cfg.trainer.max_steps))[:, 0]
    official = fixture["outputs"]["factor"].double() * run["BASE_LR"]
    assert ours.shape == official.shape
    assert ((ours - official).abs() / official).max() <= TOLERANCE


def stepped_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> list[list[float]]:
    """The lr of every group at steps 0 .. steps - 1 as Lightning's per-step LambdaLR sets them (LambdaLR.step:
    base lr x lambda(step); evaluated directly, without stepping an optimizer 100k times)."""
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and scheduler.last_epoch == 0
    pairs = list(zip(scheduler.base_lrs, scheduler.lr_lambdas))
    return [[base * factor(step) for base, factor in pairs] for step in range(steps)]


def adapt_module(cfg) -> CLIPAdaptModule:
    """The stage's CLIPAdaptModule with every setting of its composed config, on a tiny CLIP with mask prompts."""
    from tests.test_ovseg import tiny_clip

    model = OmegaConf.to_container(cfg.model, resolve=True)
    keys = ("adapt", "lr", "weight_decay", "warmup_steps", "param_groups", "train_logit_scale")
    keys += ("logit_scale_clamp", "betas", "eps", "schedule", "duplicate_texts")
    net = OVSeg(tiny_clip(mask_prompt_depth=2), None, analysis="gt_masks", templates=["a {}"])
    return CLIPAdaptModule(net, total_steps=cfg.trainer.max_steps, **{k: model[k] for k in keys})


@pytest.mark.parametrize("setting", ["swinb_vitl14", "r101c_vitb16"])
def test_golden_train_ovseg_adaptation_lr_of_every_step_equals_official(compose_cfg, setting):
    """open_clip_training's ``cosine_lr`` (warm-up 100, then the cosine) over the steps of each release script
    (``get_csv_dataset``: 442,117 rows over 4 GPUs, drop_last, 5 epochs), for FT (5e-6) then MPT (0.05), vs the
    ``clip_adapt`` stage of ``experiment=ovseg_chain`` (``adapt: ft_mpt``): its global batch, its steps, and the lr
    of every step of each phase's parameters and of the logit scale, which trains in both phases."""
    fixture = load_fixture("ovseg_train_lr_adaptation")
    cfg = adaptation_cfg(compose_cfg, setting)
    runs = {phase: fixture["outputs"][run] for phase, run in ADAPT_RUNS[setting].items()}
    assert cfg.data.pair_batch_size * cfg.trainer.devices == runs["ft"]["gpus"] * runs["ft"]["batch"]
    assert cfg.trainer.max_steps == runs["ft"]["total_steps"] + runs["mpt"]["total_steps"]
    module = adapt_module(cfg)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    clip = module.net.clip
    kinds = []
    for group in optimizer.param_groups:
        if any(p is clip.model.logit_scale for p in group["params"]):
            kinds.append("scale")
        else:
            kinds.append("mpt" if any(p is clip.mask_prompts for p in group["params"]) else "ft")
    assert [g["lr"] for g in optimizer.param_groups] == [
        b * f(0) for b, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)
    ]
    lrs = torch.tensor(stepped_lrs(scheduler, cfg.trainer.max_steps), dtype=torch.float64)
    ft_steps = runs["ft"]["total_steps"]
    expected = {
        "ft": torch.cat([runs["ft"]["factor"].double() * runs["ft"]["lr"], torch.zeros(runs["mpt"]["total_steps"])]),
        # (no ViT-B MPT script is released: the R-101c setting's MPT follows the ViT-B FT script at lr 0.05)
        "mpt": torch.cat(
            [torch.zeros(ft_steps), runs["mpt"]["factor"].double() * fixture["outputs"]["vitl_mpt"]["lr"]]
        ),
    }
    expected["scale"] = expected["ft"] + expected["mpt"]
    for column, kind in enumerate(kinds):
        ours, official = lrs[:, column], expected[kind]
        scale = official.abs().clamp_min(1e-30)
        assert ((ours - official).abs() / scale).max() <= TOLERANCE, kind


# ---------------------------------------------------------------------------------------------- three steps
def test_golden_train_ovseg_three_maskformer_steps_equal_official(compose_cfg):
    """Three iterations of the release's stage 1 (``SimpleTrainer.run_step``: ``OVSeg.forward`` in training mode,
    the mapper's 128 / 255 padding of 60x60 crops to 64, the criterion, AdamW of ``build_optimizer`` with
    full-model clipping at 0.01, ``WarmupPolyLR`` after each step) vs ``MaskFormerModule.training_step`` with
    ``experiment=ovseg``'s optimizer, clipping and schedule (the fixture's short schedule: 6 iterations, warm-up
    2) in Lightning's order: every loss, lr, and every trained parameter afterwards."""
    fixture = load_fixture("ovseg_train_steps_maskformer")
    config, out = fixture["config"], fixture["outputs"]
    cfg = paper_cfg(compose_cfg, "swinb_vitl14")
    solver = config["solver"]
    net = our_net("swin", config, instantiate(cfg.model.net.criterion), dropout=0.0)
    state = convert_ovseg_state_dict(perturbed_state(fixture["state"], fixture["seed"]), prefix="")
    net.load_state_dict(state, strict=True)
    scheduler = functools.partial(
        instantiate(cfg.model.scheduler).func,
        total_steps=solver["MAX_ITER"],
        kind=cfg.model.scheduler.kind,
        power=cfg.model.scheduler.power,
        warmup_steps=solver["WARMUP_ITERS"],
        warmup_factor=cfg.model.scheduler.warmup_factor,
    )
    vocabulary = Vocabulary("golden", tuple(config["names"]))
    trained = type("Trained", (MaskFormerModule,), {"train_vocabulary": property(lambda self: vocabulary)})
    module = module_for(cfg, net, scheduler=scheduler)
    module.__class__ = trained
    module.train()
    configured = module.configure_optimizers()
    optimizer, lr_scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    mapping = official_to_ours(fixture["state"], net)
    ours_params = dict(net.named_parameters())
    before = {name: ours_params[name].detach().clone() for names in mapping.values() for name in names}
    losses, lrs = [], []
    for i, batch in enumerate(fixture["inputs"]["batches"]):
        lrs.append(optimizer.param_groups[0]["lr"])
        batch = {"image": batch["images"].permute(0, 3, 1, 2), "label": batch["labels"].long()}
        loss = module.training_step(batch, i)
        losses.append(float(loss.detach()))
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)  # Lightning's gradient_clip_val
        optimizer.step()
        optimizer.zero_grad()
        lr_scheduler.step()
    assert relative_error(torch.tensor(losses), out["losses"]) <= TOLERANCE
    assert relative_error(torch.tensor(lrs, dtype=torch.float64), out["lrs"]) <= TOLERANCE
    checked = 0
    for official, record in out["params"].items():
        (name,) = mapping[official]  # the decoder's attention keeps one in_proj tensor on both sides
        param = ours_params[name].detach()
        delta = (param - before[name]).double().flatten()
        gen = torch.Generator().manual_seed(fixture["seed"] + checked)
        directions = torch.randn(8, delta.numel(), generator=gen, dtype=torch.float64)
        # |P (d_ours - d_official)| / sqrt(8) estimates |d_ours - d_official|: bounded relative to the parameter
        difference = (directions @ delta - record["projections"]).norm() / 8**0.5
        assert difference <= TOLERANCE * record["after_norm"], (official, float(difference), record["after_norm"])
        # and the update itself (a parameter whose gradient is 0 in exact arithmetic, e.g. a bias in front of a
        # GroupNorm, moves by float noise on either side: the parameter's tolerance bounds that)
        update_error = abs(float(delta.norm()) - record["update_norm"])
        assert update_error <= 1e-3 * record["update_norm"] + TOLERANCE * record["after_norm"], official
        checked += 1
    assert checked == len(out["params"]) > 100
    frozen = [name for official in set(mapping) - set(out["params"]) for name in mapping[official]]
    assert frozen and all(torch.equal(ours_params[name], before[name]) for name in frozen)  # the CLIP


def assert_updates_equal(record: dict, ours_after, before, mapping: dict, seed: int) -> int:
    """Every official parameter's update after the steps (update_record of the generator: 8 seeded projections,
    norms) against ours, gathered through ``mapping`` (our q / k / v concatenated as the release's in_proj)."""

    def gathered(values, names):
        order = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
        names = sorted(names, key=lambda n: next((i for k, i in order.items() if k in n), 0))
        return torch.cat([values[n].detach().double().flatten() for n in names])

    for checked, (official, entry) in enumerate(record.items()):
        delta = gathered(ours_after, mapping[official]) - gathered(before, mapping[official])
        gen = torch.Generator().manual_seed(seed + checked)
        directions = torch.randn(8, delta.numel(), generator=gen, dtype=torch.float64)
        # |P (d_ours - d_official)| / sqrt(8) estimates |d_ours - d_official|: bounded relative to the parameter
        difference = (directions @ delta - entry["projections"]).norm() / 8**0.5
        assert difference <= TOLERANCE * entry["after_norm"], (official, float(difference), entry["after_norm"])
        # and the update itself (a parameter whose gradient is 0 in exact arithmetic, e.g. a bias in front of a
        # GroupNorm, moves by float noise on either side: the parameter's tolerance bounds that)
        update_error = abs(float(delta.norm()) - entry["update_norm"])
        assert update_error <= 1e-3 * entry["update_norm"] + TOLERANCE * entry["after_norm"], official
    return len(record)


def test_golden_train_ovseg_three_adaptation_steps_per_phase_equal_official(compose_cfg):
    """Three FT steps, then three MPT steps on their result, as the release's scripts run them (train.py's
    ``train_one_epoch`` / ``train_one_epoch_w_mask``: ClipLoss with a repeated noun, AdamW (0.9, 0.98) / 1e-6 with
    main.py's no-decay groups, ``cosine_lr`` with its warm-up, the logit scale trained in both phases, read
    unclamped and clamped to ln 100 after each step; FT without mask prompts) vs ``CLIPAdaptModule`` with the paper
    adaptation's settings (``adapt: ft_mpt``, the fixture's 3 + 3 steps and warm-up 2), in Lightning's order:
    every trained parameter and the logit scale after each phase."""
    from ovseg_lab.clip import CLIPBackbone
    from ovseg_lab.convert.ovseg import convert_ovseg_clip_state_dict

    fixture = load_fixture("ovseg_train_steps_adaptation")
    config, out, inputs = fixture["config"], fixture["outputs"], fixture["inputs"]
    model_cfg = adaptation_cfg(compose_cfg, "swinb_vitl14").model
    assert dict(model_cfg.lr) == {**model_cfg.lr, **config["lr"]} and model_cfg.weight_decay.ft == config["wd"]
    assert model_cfg.train_template == config["template"] and model_cfg.duplicate_texts == "keep"
    cfg = config["clip"]
    vision = cfg["vision_cfg"]
    clip = CLIPBackbone(
        model_name="golden",
        pretrained=None,
        model_cfg={
            "embed_dim": cfg["embed_dim"],
            "vision_cfg": {k: vision[k] for k in ("layers", "width", "head_width", "patch_size", "image_size")},
            "text_cfg": cfg["text_cfg"],
        },
        quick_gelu=True,
        feature_layers=(),
        mask_prompt_depth=vision["mask_emb_depth"],
    )
    official = perturbed_state(fixture["state"], fixture["seed"])
    official["logit_scale"] = inputs["logit_scale"]
    state = {k.removeprefix("clip."): v for k, v in convert_ovseg_clip_state_dict(official, prefix="").items()}
    clip.load_state_dict(state, strict=True)
    net = OVSeg(clip, None, analysis="gt_masks", templates=[config["template"]])
    settings = OmegaConf.to_container(model_cfg, resolve=True)
    keys = ("param_groups", "train_logit_scale", "logit_scale_clamp", "betas", "eps", "schedule", "ft_mask_prompts")
    steps = config["steps"]

    class Stepped(CLIPAdaptModule):  # the trainer's global step, without a trainer
        step_now = 0
        global_step = property(lambda self: self.step_now)

    module = Stepped(
        net,
        adapt="ft_mpt",
        total_steps=2 * steps,
        phase_steps=[steps, steps],
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        warmup_steps=config["warmup"],
        train_template=settings["train_template"],
        duplicate_texts=settings["duplicate_texts"],
        **{k: settings[k] for k in keys},
    )
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    module.optimizers = lambda use_pl_optimizer=True: optimizer
    # official name -> our names (the index-fill trick of official_to_ours, through the CLIP converter)
    filled = {k: torch.full(tuple(shape), float(i)) for i, (k, shape, _, _) in enumerate(fixture["state"])}
    names = [k for k, _, _, _ in fixture["state"]]
    mapping: dict[str, list[str]] = {}
    for key, value in convert_ovseg_clip_state_dict(filled, prefix="").items():
        mapping.setdefault(names[int(value.unique().item())], []).append(key.removeprefix("clip."))
    ours = dict(clip.named_parameters())
    for phase_index, phase in enumerate(("ft", "mpt")):
        before = {n: p.detach().clone() for n, p in ours.items()}
        for i, batch in enumerate(inputs["batches"]):
            module.step_now = phase_index * steps + i
            module.on_train_batch_start(batch, i)
            loss = module.training_step(batch, i)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            module.on_train_batch_end(None, batch, i)
        record = out[phase]
        assert relative_error(clip.model.logit_scale.detach(), record["logit_scale"]) <= TOLERANCE, phase
        trained = {n for n, p in ours.items() if not torch.equal(p, before[n])}
        expected = {n for official in record["params"] for n in mapping[official]}
        assert trained <= expected, (phase, sorted(trained - expected)[:3])
        assert assert_updates_equal(record["params"], ours, before, mapping, fixture["seed"]) == len(record["params"])


# ---------------------------------------------------------------------------------------------- recipe facts
@pytest.mark.parametrize(
    "experiment",
    ["ovseg", "ovseg_chain", "ovseg_table1", "ovseg_table2", "ovseg_table3", "ovseg_table4", "ovseg_table6"],
)
@pytest.mark.parametrize("setting", ["swinb_vitl14", "r101c_vitb16"])
def test_golden_train_ovseg_recipe_facts_equal_the_release(compose_cfg, experiment, setting):
    """Every OVSeg paper experiment, from its composed config: the MaskFormer stage's global batch 32
    (IMS_PER_BATCH), 120k iterations, evaluation every 5000 (TEST.EVAL_PERIOD), fp32 (SOLVER.AMP off), full-model
    norm clipping at 0.01; the adaptation stage's batch, steps of both phases, AdamW (0.9, 0.98) / 1e-6, fp16 AMP,
    no clipping (values of ovseg_train_param_groups_* and ovseg_train_lr_adaptation)."""
    cfg = compose_cfg("train", [f"experiment={experiment}", f"ovseg.setting={setting}"])
    solver = load_fixture(f"ovseg_train_param_groups_{'swin' if setting == 'swinb_vitl14' else 'r101c'}")
    solver = solver["config"]["solver"]
    stage1 = paper_cfg(compose_cfg, setting) if experiment != "ovseg" else cfg
    assert stage1.data.batch_size * stage1.trainer.devices * stage1.trainer.num_nodes == solver["IMS_PER_BATCH"]
    assert stage1.trainer.max_steps == solver["MAX_ITER"] and stage1.trainer.val_check_interval == solver["EVAL_PERIOD"]
    assert stage1.trainer.precision == "32-true" and not solver["AMP_ENABLED"]
    assert stage1.trainer.gradient_clip_val == solver["CLIP_GRADIENTS"]["CLIP_VALUE"]
    assert stage1.trainer.gradient_clip_algorithm == "norm" and solver["CLIP_GRADIENTS"]["NORM_TYPE"] == 2.0
    if "pipeline" not in cfg or "clip_adapt" not in cfg.pipeline.stages:
        return
    adapt = compose_cfg("train", __import__("ovseg_lab.pipeline", fromlist=["x"]).stage_overrides(cfg, "clip_adapt"))
    runs = load_fixture("ovseg_train_lr_adaptation")["outputs"]
    ft = runs[ADAPT_RUNS[setting]["ft"]]
    assert adapt.data.pair_batch_size * adapt.trainer.devices == ft["gpus"] * ft["batch"]
    phases = [p for p in str(adapt.model.adapt).split("_") if p != "none"]
    assert adapt.trainer.max_steps == max(1, ft["total_steps"] * len(phases))
    assert tuple(adapt.model.betas) == (0.9, 0.98) and adapt.model.eps == 1e-6  # params.py:4-10 (ViT)
    assert adapt.model.lr.ft == ft["lr"] and adapt.model.lr.mpt == runs["vitl_mpt"]["lr"]
    assert adapt.model.warmup_steps == ft["warmup"] and adapt.model.schedule == "release"
    assert adapt.model.train_logit_scale and adapt.model.logit_scale_clamp == "parameter"
    assert adapt.model.param_groups == "release"
    assert adapt.trainer.precision == "16-mixed" and adapt.trainer.gradient_clip_val is None


def test_golden_train_ovseg_toy_chain_keeps_its_settings(compose_cfg):
    """The toy OVSeg chain's stages keep the project's values (quickstart figures do not move)."""
    from ovseg_lab.pipeline import stage_overrides

    root = compose_cfg("train", ["experiment=quickstart", "model=ovseg"])
    maskformer = compose_cfg("train", stage_overrides(root, "maskformer"))
    from ovseg_lab.resolvers import auto_precision

    assert list(maskformer.model.no_weight_decay_names) == [] and maskformer.trainer.precision == auto_precision()
    adapt = compose_cfg("train", stage_overrides(root, "clip_adapt"))
    model = adapt.model
    assert (model.schedule, model.logit_scale_clamp, model.param_groups) == ("ours", "forward", "ours")
    assert tuple(model.betas) == (0.9, 0.999) and model.eps == 1e-8 and not model.train_logit_scale
    assert model.lr.mpt == 2e-2 and adapt.data.pair_batch_size == 32 and adapt.trainer.precision == auto_precision()
