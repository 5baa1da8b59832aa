"""Latency, throughput and peak memory of any configured method, built with random weights (nothing is downloaded).

    python scripts/benchmark.py --method catseg --clip vitb16 --num-classes 171 --image-size 384 --device cpu
    python scripts/benchmark.py --method catseg --sweep classes --protocol eval --image-size 640 --device cuda

One measurement = ``--warmup`` untimed calls, then ``--repeats`` timed calls; the median is reported. Memory is the
peak during the timed calls: CUDA ``max_memory_allocated`` on GPU, the process's peak resident set (VmHWM, reset
before the measurement where the kernel allows it) on CPU. Progress goes to stderr; the last stdout line is the
JSON result (``--output FILE`` also writes it atomically).

Protocols (``--mode infer``):
- ``net``: one ``net(images, vocabulary)`` call on a (B, 3, S, S) batch (the net resizes to its own input size).
- ``eval``: the model's evaluation protocol (``model.inference``; CAT-Seg: squash to 640, 384 windows with stride
  256 plus a global view, batched), i.e. what one benchmark image costs.
``--mode train``: forward, loss against random labels, backward and an AdamW step (per-pixel methods).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ovseg_lab.errors import SetupError

METHODS = ("catseg", "costvolume", "lseg", "ovseg", "groupvit", "ovsegmentor")
DENSE_METHODS = ("catseg", "costvolume", "lseg")  # trained with net.loss(logits, labels)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CLASS_SWEEP = (20, 59, 150, 459, 847)  # PAS-20, PC-59, A-150, PC-459, A-847
DEFAULT_SIZE_SWEEP = (192, 384, 576, 768)  # CLIP ViT-B/16 grids 12..48: multiples of CAT-Seg's Swin window 12


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- inputs
def benchmark_vocabulary(num_classes: int) -> list[str]:
    """Real class names (ADE-847 first, so prompts have realistic token lengths), numbered names beyond."""
    from ovseg_lab.vocab import load_vocabulary

    if num_classes < 1:
        raise SetupError(f"--num-classes must be at least 1, got {num_classes}.")
    names = list(load_vocabulary("ade847").classes[:num_classes])
    names += [f"object number {i}" for i in range(len(names), num_classes)]
    return names


def random_images(batch: int, size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator).to(device)


# ---------------------------------------------------------------------------------------------- model
def build_module(method: str, clip: str | None, overrides: list[str] | None = None, net_size: int | None = None):
    """(LightningModule with random weights, composed config) for ``model=method clip=clip`` + overrides."""
    from hydra.utils import instantiate

    from ovseg_lab.build import compose_config, resolved_model_config

    if method not in METHODS:
        raise SetupError(f"--method must be one of {METHODS}, got '{method}'.")
    extra = [f"model={method}"] + ([f"clip={clip}"] if clip else []) + list(overrides or [])
    if net_size is not None:
        extra.append(f"clip.image_size={net_size}")
    cfg = compose_config(extra)
    module = instantiate(resolved_model_config(cfg))
    return module, cfg


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory during a ``with`` block: CUDA max allocated on GPU, peak RSS (VmHWM) on CPU, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "peak_rss"
        self.peak_mb: float | None = None
        self.baseline_mb: float | None = None
        self.reset_ok = True

    @staticmethod
    def _status_mb(field_name: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            try:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.reset_ok = False
            self.baseline_mb = self._status_mb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = self._status_mb("VmHWM")
            if peak is None:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            self.peak_mb = peak


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    first_call_s: float
    latencies_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # process CPU time of each timed call (all threads)

    @property
    def median_s(self) -> float:
        return statistics.median(self.latencies_s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int, label: str = "") -> Timing:
    """Untimed warm-up calls (the first one timed apart: text encoding, allocator, compilation), then timed ones.

    ``warmup=0``: no warm-up, the first timed call is also ``first_call_s`` (for runs too long to repeat).
    """
    from tqdm import tqdm

    timing = Timing(first_call_s=float("nan"))
    if warmup > 0:
        start = time.perf_counter()
        fn()
        _sync(device)
        timing.first_call_s = time.perf_counter() - start
        for _ in range(warmup - 1):
            fn()
        _sync(device)
    for _ in tqdm(range(repeats), desc=label or "timing", file=sys.stderr, leave=False, disable=repeats < 2):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        timing.latencies_s.append(time.perf_counter() - start)
        timing.cpu_s.append(time.process_time() - cpu_start)
    if warmup <= 0:
        timing.first_call_s = timing.latencies_s[0]
    return timing


def autocast_context(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_step(
    module, names: list[str], images: torch.Tensor, mode: str, protocol: str, precision: str
) -> Callable[[], Any]:
    """The call to time: inference (net or eval protocol) or one training step."""
    from ovseg_lab.vocab import Vocabulary

    device = images.device
    vocabulary = Vocabulary(name=f"bench{len(names)}", classes=tuple(names))
    net = module.net
    if mode == "infer":
        module.eval()

        def infer() -> torch.Tensor:
            with torch.no_grad(), autocast_context(device, precision):
                if protocol == "eval":
                    return module.predict_scores(images, vocabulary)
                return net(images, vocabulary)

        return infer

    if not callable(getattr(net, "loss", None)):
        raise SetupError(f"{type(net).__name__} has no per-pixel loss(logits, labels) to time a training step with.")
    module.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    labels = torch.randint(
        0, len(names), (images.shape[0], *images.shape[-2:]), generator=torch.Generator().manual_seed(0)
    ).to(device)

    def train_step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            logits = net(images, vocabulary)
        loss = net.loss(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return train_step


# ---------------------------------------------------------------------------------------------- one point
@dataclass
class TimingSpec:
    """One measured point of scripts/benchmark.py: a method at a vocabulary size, image size, batch and precision
    (not a dataset: that is ovseg_lab.data.benchmark.BenchmarkSpec)."""

    method: str = "catseg"
    clip: str | None = "vitb16"
    num_classes: int = 171
    image_size: int = 384
    net_size: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    mode: str = "infer"
    protocol: str = "net"
    warmup: int = 1
    repeats: int = 3
    profile: int = 0  # > 0: after timing, profile one call and print its top operators (stderr)
    overrides: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.mode not in ("infer", "train"):
            raise SetupError(f"--mode must be infer or train, got '{self.mode}'.")
        if self.protocol not in ("net", "eval"):
            raise SetupError(f"--protocol must be net or eval, got '{self.protocol}'.")
        if self.precision not in PRECISIONS:
            raise SetupError(f"--precision must be one of {list(PRECISIONS)}, got '{self.precision}'.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SetupError(f"--device {self.device} asked for, but no CUDA GPU is visible to PyTorch.")
        if self.mode == "train" and self.method not in DENSE_METHODS:
            raise SetupError(
                f"--mode train times per-pixel training (methods {DENSE_METHODS}); {self.method} trains "
                "through its own recipe (mask proposals / caption pairs)."
            )
        if self.repeats < 1 or self.batch_size < 1 or self.image_size < 1:
            raise SetupError("--repeats, --batch-size and --image-size must be positive.")


def environment(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device_name": "cpu"}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        import platform

        info["device_name"] = platform.processor() or platform.machine()
        info["cpu_count"] = os.cpu_count()
    return info


def measure(spec: TimingSpec, module=None, cfg=None) -> dict[str, Any]:
    """Build (unless given) and time one configuration; returns the JSON-ready result."""
    from omegaconf import OmegaConf

    from ovseg_lab.speed import apply_speed

    spec.check()
    device = torch.device(spec.device)
    if module is None:
        log(f"building {spec.method} (clip={spec.clip}) with random weights ...")
        module, cfg = build_module(spec.method, spec.clip, spec.overrides, spec.net_size)
        apply_speed(module, cfg.get("speed"))
        module.to(device)
    names = benchmark_vocabulary(spec.num_classes)
    images = random_images(spec.batch_size, spec.image_size, device)
    step = make_step(module, names, images, spec.mode, spec.protocol, spec.precision)
    label = f"{spec.method} T={spec.num_classes} S={spec.image_size}"
    log(
        f"timing {label} ({spec.mode}/{spec.protocol}, batch {spec.batch_size}, {spec.precision}, "
        f"{torch.get_num_threads()} threads): warm-up {spec.warmup}, repeats {spec.repeats}"
    )
    with PeakMemory(device) as memory:
        timing = time_calls(step, device, spec.warmup, spec.repeats, label)
    if spec.profile > 0:
        log(profile_table(step, device, spec.profile))
    inference = (
        OmegaConf.to_container(cfg.model.get("inference"), resolve=True)
        if cfg is not None and "inference" in cfg.model
        else None
    )
    result = {
        "method": spec.method,
        "clip": spec.clip,
        "num_classes": spec.num_classes,
        "image_size": spec.image_size,
        "net_input_size": getattr(getattr(module.net, "clip", None), "image_size", None),
        "batch_size": spec.batch_size,
        "device": str(device),
        "precision": spec.precision,
        "mode": spec.mode,
        "protocol": spec.protocol,
        "inference": inference if spec.protocol == "eval" else None,
        "warmup": spec.warmup,
        "repeats": spec.repeats,
        "latency_s": round(timing.median_s, 4),
        "latencies_s": [round(t, 4) for t in timing.latencies_s],
        "first_call_s": round(timing.first_call_s, 4),
        # on a shared CPU the wall time includes waiting for a core; CPU seconds do not (1 thread: the compute time)
        "cpu_s": round(statistics.median(timing.cpu_s), 4),
        "throughput_img_s": round(spec.batch_size / timing.median_s, 4),
        "peak_memory_mib": round(memory.peak_mb, 1) if memory.peak_mb is not None else None,
        "memory_kind": memory.kind,
        "memory_before_mib": round(memory.baseline_mb, 1) if memory.baseline_mb is not None else None,
        "peak_reset": memory.reset_ok,
        "parameters": count_parameters(module),
        "overrides": list(spec.overrides),
        "speed": OmegaConf.to_container(cfg.speed, resolve=True) if cfg is not None and "speed" in cfg else None,
        "env": environment(device),
    }
    log(
        f"  median {result['latency_s']:.3f} s/batch, {result['throughput_img_s']:.3f} img/s, "
        f"peak {result['peak_memory_mib']} MiB ({memory.kind}), first call {result['first_call_s']:.2f} s"
    )
    return result


def profile_table(step: Callable[[], Any], device: torch.device, rows: int) -> str:
    """torch.profiler table of one call, operators sorted by self time (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ---------------------------------------------------------------------------------------------- sweeps
def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def growth_summary(points: list[dict], key: str, low: int, high: int) -> dict[str, Any]:
    """How latency and memory grow from ``key``=low to ``key``=high, against proportional growth.

    ratio_vs_linear = (latency(high) / latency(low)) / (high / low): <= 1 means no worse than linear in ``key``.
    """
    by_key = {p[key]: p for p in points}
    summary: dict[str, Any] = {"from": low, "to": high}
    if low in by_key and high in by_key:
        lo, hi = by_key[low], by_key[high]
        scale = high / low
        summary["latency_ratio"] = round(hi["latency_s"] / lo["latency_s"], 3)
        summary["proportional_ratio"] = round(scale, 3)
        summary["ratio_vs_linear"] = round(hi["latency_s"] / lo["latency_s"] / scale, 3)
        if lo.get("cpu_s") and hi.get("cpu_s"):
            summary["cpu_ratio_vs_linear"] = round(hi["cpu_s"] / lo["cpu_s"] / scale, 3)
        if lo.get("peak_memory_mib") and hi.get("peak_memory_mib"):
            summary["memory_ratio"] = round(hi["peak_memory_mib"] / lo["peak_memory_mib"], 3)
    xs = [float(p[key]) for p in points]
    ys = [p["latency_s"] for p in points]
    if len(points) >= 2:
        intercept, slope = linear_fit(xs, ys)
        summary["fit_latency_s"] = {"intercept": round(intercept, 4), "per_unit": round(slope, 6)}
    return summary


def sweep_classes(spec: TimingSpec, counts: list[int]) -> dict[str, Any]:
    """One model, one timing per vocabulary size."""
    from ovseg_lab.speed import apply_speed

    spec.check()
    log(f"building {spec.method} (clip={spec.clip}) with random weights ...")
    module, cfg = build_module(spec.method, spec.clip, spec.overrides, spec.net_size)
    apply_speed(module, cfg.get("speed"))
    module.to(torch.device(spec.device))
    points = []
    for count in counts:
        point_spec = TimingSpec(**{**spec.__dict__, "num_classes": count})
        points.append(measure(point_spec, module, cfg))
    low, high = (150, 847) if {150, 847} <= set(counts) else (min(counts), max(counts))
    return {"sweep": "classes", "points": points, "growth": growth_summary(points, "num_classes", low, high)}


def sweep_sizes(spec: TimingSpec, sizes: list[int]) -> dict[str, Any]:
    """One timing per image size; with ``--protocol net`` the CLIP input size follows the image size."""
    points = []
    for size in sizes:
        net_size = size if spec.protocol == "net" and spec.clip else spec.net_size
        points.append(measure(TimingSpec(**{**spec.__dict__, "image_size": size, "net_size": net_size})))
    for p in points:
        p["pixels"] = p["image_size"] ** 2
    return {
        "sweep": "size",
        "points": points,
        "growth": growth_summary(points, "pixels", min(p["pixels"] for p in points), max(p["pixels"] for p in points)),
    }


# ---------------------------------------------------------------------------------------------- entry point
def parse_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SetupError(f"Expected comma-separated integers, got '{text}'.") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="catseg", choices=METHODS)
    parser.add_argument(
        "--clip", default="vitb16", help="clip config (vitb16, vitl14, tiny, ...); 'none' keeps the model's"
    )
    parser.add_argument("--num-classes", type=int, default=171)
    parser.add_argument("--image-size", type=int, default=384, help="side of the square input images")
    parser.add_argument(
        "--net-size", type=int, default=None, help="CLIP input size (clip.image_size); default: the config's"
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast dtype (bf16: GPU)")
    parser.add_argument("--mode", default="infer", choices=("infer", "train"))
    parser.add_argument(
        "--protocol",
        default="net",
        choices=("net", "eval"),
        help="infer: one net call (net) or the model's evaluation protocol, e.g. sliding windows (eval)",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="also profile one call and print its top ROWS operators to stderr",
    )
    parser.add_argument("--sweep", default=None, choices=("classes", "size"))
    parser.add_argument("--classes-list", default=",".join(map(str, DEFAULT_CLASS_SWEEP)))
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZE_SWEEP)))
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here (atomically)")
    from ovseg_lab.tools import compare_official, compare_revision, head_memory

    compare_official.add_arguments(parser)
    compare_revision.add_arguments(parser)
    head_memory.add_arguments(parser)
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. model.net.class_chunk=128 speed.channels_last=true"
    )
    return parser


def emit(result: dict[str, Any], output: Path | None) -> dict[str, Any]:
    """The JSON result: written to ``output`` (atomically) when given, and printed as the last line (scripts and
    tests parse it)."""
    from ovseg_lab.utils.io import write_json

    if output is not None:
        write_json(output, result)
        log(f"written to {output}")
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_official is not None:
        from ovseg_lab.tools.compare_official import compare

        if args.resolution is None:
            args.resolution = 12 if args.tiny else 24
        result = compare(args)
        return emit(result, args.output)
    if args.compare_revision is not None:
        from ovseg_lab.tools.compare_revision import compare as compare_heads

        return emit(compare_heads(args), args.output)
    if args.head_train_memory is not None:
        from ovseg_lab.tools.head_memory import measure as head_train_memory

        return emit(head_train_memory(args), args.output)
    spec = TimingSpec(
        method=args.method,
        clip=None if args.clip in ("none", "") else args.clip,
        num_classes=args.num_classes,
        image_size=args.image_size,
        net_size=args.net_size,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        mode=args.mode,
        protocol=args.protocol,
        warmup=args.warmup,
        repeats=args.repeats,
        profile=args.profile,
        overrides=list(args.overrides),
    )
    if args.sweep == "classes":
        result = sweep_classes(spec, parse_ints(args.classes_list))
    elif args.sweep == "size":
        result = sweep_sizes(spec, parse_ints(args.sizes))
    else:
        result = measure(spec)
    return emit(result, args.output)
