"""The golden-test harness: seeded perturbed weights, fixture files, digests of large outputs, relative errors.

A fixture is what ``make_golden.py`` saved after running an OFFICIAL release on weights it drew from a seed:

    {"method", "name", "official_repo", "official_commit", "seed", "config": {...},
     "state": [(key, shape, mean, std), ...],   # the official state dict, as a recipe (no values stored)
     "inputs": {...}, "outputs": {...}}

Both sides rebuild the same weights from the recipe (:func:`perturbed_state`): every tensor is
``mean + std * N(0, 1)`` drawn from a generator seeded by (seed, key). ``mean``/``std`` come from the official
module's own initialisation, and constant tensors (norm weights, zero-initialised prompts, biases) get a
noise of ``CONSTANT_NOISE``, so a wrong mapping cannot hide behind ones and zeros. Keys listed with ``std < 0``
are derived buffers (e.g. a Swin shift mask) that the official module recomputes: they are kept as the
official module made them on the generator side and filled with zeros here (our converter must drop them).

Large tensors are stored as a :func:`digest`: a seeded sample of their elements plus random projections of
the whole tensor; small ones whole. Fixtures load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures"
CONSTANT_NOISE = 0.1  # std of the noise put on tensors the official code initialises to a constant
DERIVED = -1.0  # std marker: a buffer the module derives itself (not perturbed, not compared)
TOLERANCE = 1e-5  # relative error allowed between our outputs and the official ones (fp32)
DIGEST_SAMPLE = 4096  # elements sampled from a tensor larger than DIGEST_WHOLE
DIGEST_WHOLE = 8192  # tensors up to this many elements are stored whole
DIGEST_PROJECTIONS = 4


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def state_recipe(module_state: Mapping[str, torch.Tensor], derived: tuple[str, ...] = ()) -> list[tuple]:
    """(key, shape, mean, std) for every tensor of an official state dict, from its initial values.

    ``derived``: key suffixes of buffers the module computes itself (kept, never perturbed).
    """
    recipe = []
    for key, value in module_state.items():
        shape = tuple(int(s) for s in value.shape)
        if key.endswith(derived):
            recipe.append((key, shape, 0.0, DERIVED))
            continue
        value = value.detach().float()
        if value.numel() > 1 and value.std() > 0:
            recipe.append((key, shape, 0.0, float(value.std())))
        else:  # constant init (ones, zeros, a scalar): perturb around it
            recipe.append((key, shape, float(value.flatten()[0]) if value.numel() else 0.0, CONSTANT_NOISE))
    return recipe


def perturbed_state(recipe: list[tuple], seed: int) -> dict[str, torch.Tensor]:
    """The state dict a recipe describes (derived buffers as zeros)."""
    state = {}
    for key, shape, mean, std in recipe:
        if std == DERIVED:
            state[key] = torch.zeros(shape, dtype=torch.float32)
        else:
            state[key] = mean + std * torch.randn(shape, generator=_generator(seed, key), dtype=torch.float32)
    return state  # float32 draws whatever the default dtype: both sides must see the same numbers


def seeded_input(shape: tuple[int, ...], seed: int, name: str, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """A reproducible input tensor (regenerated on both sides instead of stored)."""
    return offset + scale * torch.randn(shape, generator=_generator(seed, "input:" + name), dtype=torch.float32)


def seeded_image(seed: int, height: int, width: int):
    """A reproducible uint8 RGB picture (H, W, 3) numpy array: smooth regions plus noise, any aspect ratio."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, max(1, height // 10), max(1, width // 10)), generator=gen, dtype=torch.float32)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    noisy = smooth + 0.08 * torch.randn((1, 3, height, width), generator=gen, dtype=torch.float32)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def seeded_labels(seed: int, shape: tuple[int, int, int], num_classes: int, block: int, void=(), ignore: int = 255):
    """(B, H, W) int64 labels: random classes in ``block`` x ``block`` squares, ``void`` boxes (b, y0, y1, x0, x1)
    set to ``ignore``."""
    b, h, w = shape
    gen = torch.Generator().manual_seed(seed * 7 + 1)
    labels = torch.randint(0, num_classes, (b, -(-h // block), -(-w // block)), generator=gen)
    labels = labels.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :h, :w].contiguous()
    for index, y0, y1, x0, x1 in void:
        labels[index, y0:y1, x0:x1] = ignore
    return labels


def digest(
    tensor: torch.Tensor, seed: int = 0, whole: int = DIGEST_WHOLE, sample: int = DIGEST_SAMPLE
) -> dict[str, Any]:
    """A small, comparable summary of a tensor: whole up to ``whole`` elements, else ``sample`` seeded elements
    plus random projections of the whole tensor."""
    flat = tensor.detach().float().flatten()
    out: dict[str, Any] = {"shape": tuple(tensor.shape)}
    if flat.numel() <= whole:
        out["whole"] = flat.clone()
        return out
    gen = _generator(seed, f"digest:{flat.numel()}")
    out["index"] = torch.randint(0, flat.numel(), (sample,), generator=gen).to(torch.int32)
    out["sample"] = flat[out["index"]].clone()
    out["projections"] = _projections(flat, gen)
    return out


def _projections(flat: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.stack(
        [
            (flat * torch.randn(flat.numel(), generator=gen, dtype=torch.float32)).sum()
            for _ in range(DIGEST_PROJECTIONS)
        ]
    )


def relative_error(ours: torch.Tensor, official: torch.Tensor, floor: float = 1e-30) -> float:
    """||ours - official|| / max(||official||, floor) (fp64). ``floor``: the scale below which a tensor counts as
    zero (e.g. the gradient of a Swin key bias, which softmax makes exactly zero up to rounding)."""
    ours, official = ours.double().flatten(), official.double().flatten()
    return float((ours - official).norm() / official.norm().clamp_min(floor))


def groups_by_parameter(module: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_key: str = "lr") -> dict:
    """Parameter name -> its optimizer group's lr (``lr_key``: ``initial_lr`` once a schedule has scaled ``lr``),
    weight decay, betas and eps, as plain floats (the form a fixture stores and a test compares)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return {
        names[id(p)]: {
            "lr": float(g[lr_key]),
            "weight_decay": float(g["weight_decay"]),
            "betas": [float(b) for b in g["betas"]],
            "eps": float(g["eps"]),
        }
        for g in optimizer.param_groups
        for p in g["params"]
    }


def undecided_pixels(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Pixels whose top-2 class scores are closer than the comparison's tolerance (``TOLERANCE`` x the scores' RMS).

    ``scores``: (B, C, H, W) with ``dim=1`` -> (B, H, W) bool. There the arg-max is decided by fp32 rounding, not by
    the computation (deep regularisation stacks saturate into exact ties): a label check that requires them to agree
    fails on a new torch build with logits still within 2e-7. Every other pixel must keep its label.
    """
    top2 = scores.float().topk(2, dim=dim).values
    margin = top2.select(dim, 0) - top2.select(dim, 1)
    return margin <= TOLERANCE * scores.float().pow(2).mean().sqrt()


def digest_error(tensor: torch.Tensor, expected: Mapping[str, Any], seed: int = 0, floor: float = 1e-30) -> float:
    """The relative error of ``tensor`` against a stored :func:`digest` (the worse of sample and projections)."""
    assert tuple(tensor.shape) == tuple(expected["shape"]), f"shape {tuple(tensor.shape)} vs {tuple(expected['shape'])}"
    flat = tensor.detach().float().flatten()
    if "whole" in expected:
        return relative_error(flat, expected["whole"], floor)
    gen = _generator(seed, f"digest:{flat.numel()}")
    torch.randint(0, flat.numel(), (len(expected["index"]),), generator=gen)  # advance it as digest() did
    return max(
        relative_error(flat[expected["index"].long()], expected["sample"], floor),
        relative_error(_projections(flat, gen), expected["projections"], floor),
    )


def state_change(model: torch.nn.Module, before: Mapping[str, torch.Tensor], seed: int) -> dict[str, Any]:
    """Digests of every parameter and buffer of ``model`` (``after``) and of their change since ``before`` (``delta``):
    what a training-steps fixture stores."""
    return {
        key: {
            "after": digest(value, seed, whole=256, sample=128),
            "delta": digest(value.double() - before[key].double(), seed, whole=256, sample=128),
        }
        for key, value in model.state_dict().items()
    }


def stored_norm(expected: Mapping[str, Any]) -> float:
    """The norm of a :func:`digest`-ed tensor (whole, or estimated from its seeded sample)."""
    if "whole" in expected:
        return expected["whole"].double().norm().item()
    numel = math.prod(expected["shape"])
    return expected["sample"].double().norm().item() * math.sqrt(numel / len(expected["sample"]))


def assert_steps_equal_release(module, fixture: dict, batches: list, clip: float, our_key, loss_key: str) -> None:
    """Our optimizer steps on ``batches`` as Lightning runs them (``configure_optimizers``' optimizer and per-step
    schedule, ``training_losses``, backward, ``clip_grad_norm_`` over the optimizer's parameters as
    ``gradient_clip_algorithm=norm`` does, step, schedule step, ``on_train_batch_end``) against a training-steps
    fixture: each step's loss (``loss_key`` of the release's), gradient norm before clipping and lr, then every
    parameter and buffer (:func:`state_change`), official keys mapped by ``our_key(key, shape)`` (None: dropped by
    our converter as never read, so the release must not have moved it either)."""
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    outputs = fixture["outputs"]
    for step, batch in enumerate(batches):
        optimizer.zero_grad()
        loss = module.net.training_losses(batch)["loss"]
        loss.backward()
        official = outputs["losses"][step][loss_key]
        assert abs(loss.item() - official) <= TOLERANCE * abs(official), (
            f"loss of step {step}: {loss.item()} vs {official}"
        )
        norm = torch.nn.utils.clip_grad_norm_(trained, clip).item()
        assert abs(norm - outputs["grad_norms"][step]) <= TOLERANCE * outputs["grad_norms"][step], f"step {step}"
        assert abs(optimizer.param_groups[0]["lr"] - outputs["lr"][step]) <= 1e-12 * outputs["lr"][step]
        optimizer.step()
        scheduler.step()
        module.on_train_batch_end(None, batch, step)  # OVSegmentor: the momentum encoder's EMA
    after = module.state_dict()
    real_update = outputs["lr"][0] * len(batches)  # AdamW moves every element by ~lr per step
    compared = set()
    for key, expected in outputs["state"].items():
        name = our_key(key, expected["after"]["shape"])
        if name is None:
            stored = [expected["delta"][k] for k in ("whole", "sample", "projections") if k in expected["delta"]]
            assert all(bool((t == 0).all()) for t in stored), f"{key}: dropped by our converter, moved by the release"
            continue
        if name not in after:
            continue  # buffers the release keeps and we derive (none trained)
        compared.add(name)
        shape = expected["after"]["shape"]
        ours = after[name].double().reshape(shape)
        change = ours - before[name].double().reshape(shape)
        assert digest_error(ours, expected["after"], fixture["seed"]) <= TOLERANCE, f"{key} after the steps"
        # a parameter whose gradient is zero in exact arithmetic (attention key biases: softmax ignores a shift;
        # biases right before a BatchNorm or LayerNorm: the norm removes them) moves by AdamW's normalised rounding
        # noise only (1e-16-1e-10 against ~lr per element): there both sides must stay below 1e-3 of a real update
        bound = 1e-3 * real_update * math.sqrt(max(1, change.numel()))
        if stored_norm(expected["delta"]) < bound:
            assert change.norm().item() < bound, f"{key} moves here, not in the release"
            continue
        error = digest_error(change, expected["delta"], fixture["seed"])
        assert error <= TOLERANCE, f"{key}: the steps changed it {error:.2e} (relative) unlike the release"
    missing = {n for n, _ in module.named_parameters()} - compared
    assert not missing, f"parameters not compared with the release: {sorted(missing)[:6]}"


def openai_clip_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI-layout CLIP's sizes (the argument names of OpenAI's ``CLIP`` constructor, as the official releases
    build it) -> the open_clip ``model_cfg`` of our :class:`~ovseg_lab.clip.CLIPBackbone`."""
    return {
        "embed_dim": cfg["embed_dim"],
        "vision_cfg": {
            "image_size": cfg["image_resolution"],
            "layers": cfg["vision_layers"],
            "width": cfg["vision_width"],
            "patch_size": cfg["vision_patch_size"],
            "head_width": 64,
        },
        "text_cfg": {
            "context_length": cfg["context_length"],
            "vocab_size": cfg["vocab_size"],
            "width": cfg["transformer_width"],
            "heads": cfg["transformer_heads"],
            "layers": cfg["transformer_layers"],
        },
    }


def convert_and_evaluate(
    fmt: str,
    checkpoint: dict[str, Any],
    tmp_path: Path,
    data_dir: Path,
    expect: list[str],
    eval_overrides: tuple[str, ...] = (),
    convert_overrides: tuple[str, ...] = (),
) -> Path:
    """An official checkpoint (``checkpoint``, written to a file as released) -> ``scripts/convert_checkpoint.py
    --format fmt`` with the format's own defaults -> the ``eval.py`` line it prints (which must hold ``expect``), on
    one toy image under ``data_dir``. ``convert_overrides`` go after ``--`` (files the model needs, e.g. a tokenizer
    folder). Returns the eval run folder, whose metrics.json is checked."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    official = tmp_path / f"official_{fmt}.pth"
    torch.save(checkpoint, official)
    converted = tmp_path / f"converted_{fmt}.ckpt"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/convert_checkpoint.py",
            "--format",
            fmt,
            "--input",
            str(official),
            "--output",
            str(converted),
            *(["--", *convert_overrides] if convert_overrides else []),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    official.unlink()
    hint = next(line for line in proc.stdout.splitlines() if line.startswith("use it with: "))
    command = hint.removeprefix("use it with: ").split()
    assert command[:3] == ["python", "eval.py", f"ckpt={converted}"], command
    assert all(item in command for item in expect), (expect, command)
    run_dir = tmp_path / "eval"
    overrides = [
        f"paths.data_dir={data_dir}",
        "data/eval=[toy_seen]",
        "+data.eval.toy_seen.max_images=1",
        "data.num_workers=0",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        *eval_overrides,
    ]
    proc = subprocess.run(
        [sys.executable, *command[1:], *overrides], cwd=root, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "metrics.json").is_file()
    return run_dir


def fixture_record(
    method: str, repo: str, name: str, commit: str, seed: int, config: dict, recipe, inputs: dict, outputs: dict
) -> dict[str, Any]:
    """One fixture as every generator writes it: which official code made it (repository @ commit), the seed and
    config it ran with, the state recipe, the inputs and the official outputs."""
    return {
        "method": method,
        "name": name,
        "official_repo": repo,
        "official_commit": commit,
        "seed": seed,
        "config": config,
        "state": recipe,
        "inputs": inputs,
        "outputs": outputs,
    }


def save_fixture(fixture: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(fixture, tmp)
    tmp.replace(path)
    return path


def load_fixture(name: str) -> dict[str, Any]:
    """A fixture by file name (without .pt) from tests/golden/fixtures/."""
    return torch.load(FIXTURE_DIR / f"{name}.pt", map_location="cpu", weights_only=True)
