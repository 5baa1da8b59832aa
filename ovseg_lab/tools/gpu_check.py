"""One GPU check in a few minutes: CAT-Seg training and evaluation cost, OVSeg's region classification; one JSON.

    python scripts/gpu_check.py --output gpu_check.json            # one GPU, under 8 minutes
    python scripts/gpu_check.py --tiny --device cpu --output x.json  # the same sections on tiny models (tests)

Sections (random weights, nothing downloaded; every point through :func:`ovseg_lab.tools.benchmark.measure`):
- ``train``: CAT-Seg ViT-B/16 (384) and ViT-L/14 (336), batch 4, 171 classes (COCO-Stuff), one step = forward,
  BCE, backward, AdamW; bf16 autocast, SDPA attention; fine-tuning ``freeze``, ``prompt``, ``full``, ``qv``: median
  step time and ``torch.cuda.max_memory_allocated`` (CAT-Seg's Table 6 reports 20.9 GiB for ViT-L QV at batch 4).
- ``eval``: the paper's protocol (640x640, 384 windows stride 256 + a global view, batched), one image, bf16:
  images/s at 171 classes, 847 classes, and 847 with the official top-256 truncation.
- ``ovseg_regions``: OVSeg (CLIP ViT-L/14 at 224) classifying 100 masked regions of one 640x640 image
  (``region_probs``: crops, CLIP image tower, softmax over 171 classes), seconds per image.
A time budget (``--budget-s``, default 450 s) skips what would not fit; skipped points are listed in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ovseg_lab.tools.benchmark import TimingSpec, build_module, emit, environment, log, measure

FINETUNES = ("freeze", "prompt", "full", "qv")
FULL = {
    "train": {"clips": {"vitb16": 384, "vitl14": 336}, "batch": 4, "classes": 171, "warmup": 2, "repeats": 5},
    "eval": {"clips": ("vitb16", "vitl14"), "classes": (171, 847), "image": 640, "warmup": 1, "repeats": 3},
    "ovseg": {"clip": "vitl14", "net_size": 224, "regions": 100, "classes": 171, "image": 640, "repeats": 5},
}
TINY = {
    "train": {"clips": {"tiny": 64}, "batch": 2, "classes": 5, "warmup": 0, "repeats": 1},
    "eval": {"clips": ("tiny",), "classes": (5, 12), "image": 80, "warmup": 0, "repeats": 1},
    "ovseg": {"clip": "tiny", "net_size": 64, "regions": 6, "classes": 5, "image": 64, "repeats": 1},
}
TINY_OVERRIDES = ["data=toy"]
TINY_TRUNCATE = 8  # with --tiny the top-k truncation keeps 8 of 12 classes (pad_len), as 256 of 847 at full size


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, name: str, needed: float) -> bool:
        if self.left() < needed:
            self.skipped.append(name)
            log(f"skipping {name}: {self.left():.0f} s left of the budget")
            return False
        return True


def _point(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "latency_s",
        "latencies_s",
        "first_call_s",
        "throughput_img_s",
        "peak_memory_mib",
        "memory_kind",
        "parameters",
        "precision",
        "batch_size",
        "num_classes",
        "image_size",
        "net_input_size",
    )
    return {k: result.get(k) for k in keys}


def train_section(cfg: dict, device: str, precision: str, extra: list[str], budget: Budget) -> list[dict]:
    points = []
    for clip, size in cfg["clips"].items():
        for finetune in FINETUNES:
            name = f"train/{clip}/{finetune}"
            if not budget.allows(name, 20):
                continue
            spec = TimingSpec(
                method="catseg",
                clip=clip,
                num_classes=cfg["classes"],
                image_size=size,
                batch_size=cfg["batch"],
                device=device,
                precision=precision,
                mode="train",
                warmup=cfg["warmup"],
                repeats=cfg["repeats"],
                overrides=[f"finetune={finetune}", "speed.attention=sdpa", *extra],
            )
            try:
                result = measure(spec)
                point = {"name": name, "clip": clip, "finetune": finetune, **_point(result)}
                module_params = result.get("parameters")
                point["parameters"] = module_params
            except torch.cuda.OutOfMemoryError as err:  # pragma: no cover - GPU only
                point = {"name": name, "clip": clip, "finetune": finetune, "error": f"out of memory: {err}"[:300]}
            points.append(point)
            _free(torch.device(device))
    return points


def eval_section(cfg: dict, device: str, precision: str, extra: list[str], budget: Budget, tiny: bool) -> list[dict]:
    from ovseg_lab.speed import apply_speed

    points = []
    for clip in cfg["clips"]:
        if not budget.allows(f"eval/{clip}", 30):
            continue
        log(f"building catseg (clip={clip}) with random weights ...")
        module, model_cfg = build_module("catseg", clip, extra)
        apply_speed(module, model_cfg.get("speed"))
        module.to(torch.device(device))
        net = module.net
        for classes in cfg["classes"]:
            variants = [("all", False)]
            if classes == max(cfg["classes"]):
                variants.append((f"top{TINY_TRUNCATE if tiny else net.pad_len}", True))
            for label, truncate in variants:
                name = f"eval/{clip}/{classes}/{label}"
                if not budget.allows(name, 15):
                    continue
                net.truncate_classes = truncate
                if tiny:
                    net.pad_len = TINY_TRUNCATE
                spec = TimingSpec(
                    method="catseg",
                    clip=clip,
                    num_classes=classes,
                    image_size=cfg["image"],
                    device=device,
                    precision=precision,
                    mode="infer",
                    protocol="eval",
                    warmup=cfg["warmup"],
                    repeats=cfg["repeats"],
                )
                try:
                    result = measure(spec, module, model_cfg)
                    points.append(
                        {
                            "name": name,
                            "clip": clip,
                            "classes": classes,
                            "truncate": truncate,
                            "images_per_s": result["throughput_img_s"],
                            **_point(result),
                        }
                    )
                except torch.cuda.OutOfMemoryError as err:  # pragma: no cover - GPU only
                    points.append({"name": name, "error": f"out of memory: {err}"[:300]})
                _free(torch.device(device))
        del module, net
        _free(torch.device(device))
    return points


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ovseg_section(cfg: dict, device: str, precision: str, extra: list[str], budget: Budget) -> dict[str, Any]:
    """Seconds per image of OVSeg's masked-region classification (``region_probs``) on random masks."""
    from ovseg_lab.tools.benchmark import autocast_context, benchmark_vocabulary

    if not budget.allows("ovseg_regions", 20):
        return {}
    dev = torch.device(device)
    module, _ = build_module("ovseg", cfg["clip"], [], cfg["net_size"])  # pretrained weights switched off
    net = module.net.to(dev).eval()
    gen = torch.Generator().manual_seed(0)
    size = cfg["image"]
    images = torch.rand(1, 3, size, size, generator=gen).to(dev)
    # blobs: random low-resolution fields upsampled and thresholded, so every mask is a few connected regions
    fields = torch.rand(1, cfg["regions"], 8, 8, generator=gen)
    masks = (torch.nn.functional.interpolate(fields, size=(size, size), mode="bilinear")[0] > 0.7).to(dev)
    names = benchmark_vocabulary(cfg["classes"])

    def call(net=net) -> Any:  # bound here: `del net` below then frees it (with the function)
        with torch.no_grad(), autocast_context(dev, precision):
            text = net.region.text_features(names)
            return net.region_probs(images, [masks], text)

    call()  # warm-up (the class-name embeddings are cached after it)
    _sync(dev)
    times = []
    for _ in range(cfg["repeats"]):
        start = time.perf_counter()
        probs, valid = call()[0]
        _sync(dev)
        times.append(time.perf_counter() - start)
    result = {
        "clip": cfg["clip"],
        "net_size": cfg["net_size"],
        "regions": cfg["regions"],
        "valid_regions": int(valid.sum()),
        "classes": cfg["classes"],
        "image_size": size,
        "seconds_per_image": round(statistics.median(times), 4),
        "times_s": [round(t, 4) for t in times],
        "region_batch": getattr(net.region, "batch_size", None),
    }
    del module, net, call
    _free(dev)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = TINY if args.tiny else FULL
    extra = TINY_OVERRIDES if args.tiny else []
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible; run with --tiny --device cpu to check the script")
    torch.backends.cuda.matmul.allow_tf32 = True
    budget = Budget(args.budget_s)
    sections: dict[str, Callable[[], Any]] = {
        "train": lambda: train_section(cfg["train"], device, args.precision, extra, budget),
        "eval": lambda: eval_section(cfg["eval"], device, args.precision, extra, budget, args.tiny),
        "ovseg_regions": lambda: ovseg_section(cfg["ovseg"], device, args.precision, extra, budget),
    }
    result: dict[str, Any] = {
        "tiny": args.tiny,
        "device": device,
        "precision": args.precision,
        "env": environment(torch.device(device)),
        "budget_s": args.budget_s,
    }
    for name in args.sections.split(","):
        start = time.perf_counter()
        log(f"== {name}")
        try:
            result[name] = sections[name]()
        except Exception as err:  # one failing section must not lose the others' figures (a GPU is lent briefly)
            if args.tiny:
                raise
            result[name] = {"error": f"{type(err).__name__}: {err}"[:1000]}
        result.setdefault("section_s", {})[name] = round(time.perf_counter() - start, 1)
    result["skipped"] = budget.skipped
    result["total_s"] = round(time.perf_counter() - budget.start, 1)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU test of the script)")
    parser.add_argument("--sections", default="train,eval,ovseg_regions")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip points that would start after this")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args)
    return emit(result, args.output)
