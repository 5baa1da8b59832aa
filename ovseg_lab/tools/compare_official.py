"""Our CAT-Seg head against the official aggregator (cvlab-kaist/CAT-Seg), side by side on the CPU.

    python scripts/benchmark.py --compare-official /tmp/catseg_official --num-classes 171
    python scripts/benchmark.py --compare-official /tmp/catseg_official --num-classes 847 --truncate
    python scripts/benchmark.py --compare-official /tmp/catseg_official --num-classes 847

DIR is an extracted official release (``git -C <CAT-Seg git dir> archive HEAD cat_seg | tar -x -C DIR``); it is
imported from that path at run time and never enters this repository. The official modules are imported with the
golden tests' helpers (``tests/golden/official_stubs.py``: fake detectron2 / fvcore, no package ``__init__``), so
this mode runs from a source checkout.

What is compared (the released ViT-B/16 or ViT-L/14 aggregator settings, evaluation, class pooling 1):
``upsample1/2`` + ``Aggregator.forward`` (official) and ``CATSegHead.forward`` (ours), with the same random
weights: the official module's own initialisation, perturbed as in the golden tests (constant tensors get noise so
nothing hides behind ones and zeros), converted into our names by OUR checkpoint converter and loaded strictly.
Inputs: seeded random dense features, intermediate layers and text embeddings. The outputs must agree to
``1e-5`` relative (``||ours - official|| / ||official||``) or the command fails.

Latency: one process, ``torch.set_num_threads(1)``, one untimed call of each, then ``--repeats`` rounds that call
both heads back to back, alternating which goes first; per call the thread's CPU time (``time.thread_time``: what
the computation costs, not the time spent waiting for a core on a shared machine) and the wall time. The ratio is
median(ours) / median(official) of the CPU seconds; the per-round ratios are printed too.

Peak memory: each head in a fresh child process (``--memory-child``), one call, peak resident set of the child
(``VmHWM`` = ``ru_maxrss``) read after the call, with the peak reset to the current resident set
(``/proc/self/clear_refs``) just before it, and the resident set before the call (weights, inputs, runtime). Why
not ``tracemalloc`` (sees Python objects, not PyTorch's C++ allocations) or the parent (the other head's
allocations and the allocator's cached pages would leak into the figure): a fresh process sees only its head.
The children run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every tensor above 64 KiB with its own
``mmap`` and returns it to the system on free (by default the threshold grows with freed blocks up to 32 MiB, and
freed heap memory stays resident), so the peak resident set follows the peak of live tensors instead of heap
fragmentation. Reported: the peak (``peak_mib``) and the call's own part (``call_mib`` = peak - before); the
ratios of both.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ovseg_lab.errors import SetupError
from ovseg_lab.tools import single_threaded

TOLERANCE = 1e-5
SETTINGS = {  # the released CLIPs: joint embedding size, visual width (cat_seg_model.py's upsamplers)
    "vitb16": {"embed_dim": 512, "width": 768},
    "vitl14": {"embed_dim": 768, "width": 1024},
}
# configs/vitb_384.yaml and vitl_336.yaml (the Aggregator keyword arguments), evaluation pooling
RELEASED_AGGREGATOR = dict(
    text_guidance_proj_dim=128,
    appearance_guidance_proj_dim=128,
    decoder_dims=(64, 32),
    decoder_guidance_dims=(256, 128),
    decoder_guidance_proj_dims=(32, 16),
    num_layers=2,
    nheads=4,
    hidden_dim=128,
    pooling_size=(1, 1),
    feature_resolution=(24, 24),
    window_size=12,
    attention_type="linear",
    prompt_channel=1,
)
PACKAGES = ("cat_seg", "cat_seg.modeling", "cat_seg.modeling.transformer")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _golden_helpers():
    root = Path(__file__).resolve().parents[2]
    if not (root / "tests" / "golden" / "official_stubs.py").is_file():
        raise SetupError(
            "--compare-official needs a source checkout (tests/golden/official_stubs.py imports the official code)."
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests.golden import harness, official_stubs

    return harness, official_stubs


def official_module(directory: Path):
    """The official ``cat_seg/modeling/transformer/model.py`` from an extracted release at ``directory``."""
    directory = Path(directory)
    if not (directory / "cat_seg" / "modeling" / "transformer" / "model.py").is_file():
        raise SetupError(
            f"{directory} does not hold the official release (cat_seg/modeling/transformer/model.py); "
            "extract it with: git -C <CAT-Seg git dir> archive HEAD cat_seg | tar -x -C DIR"
        )
    _, stubs = _golden_helpers()
    stubs.install_detectron2_stubs()
    return stubs.import_official(directory, "cat_seg.modeling.transformer.model", PACKAGES)


def build_official(
    directory: Path, setting: str, truncate: bool, seed: int = 0, aggregator: dict | None = None, resolution: int = 24
):
    """(official module: upsample1/2 + transformer, its state dict under a released checkpoint's key names)."""
    harness, _ = _golden_helpers()
    model = official_module(directory)
    dims = SETTINGS[setting]
    agg = dict(aggregator or RELEASED_AGGREGATOR, feature_resolution=(resolution, resolution))
    torch.manual_seed(seed)
    official = nn.Module()
    official.upsample1 = nn.ConvTranspose2d(dims["width"], agg["decoder_guidance_dims"][0], kernel_size=2, stride=2)
    official.upsample2 = nn.ConvTranspose2d(dims["width"], agg["decoder_guidance_dims"][1], kernel_size=4, stride=4)
    official.transformer = model.Aggregator(
        text_guidance_dim=dims["embed_dim"], appearance_guidance_dim=dims["embed_dim"], **agg
    )
    rename = lambda k: k if k.startswith("upsample") else "sem_seg_head.predictor." + k  # noqa: E731
    names = {rename(k): k for k in official.state_dict()}
    recipe = harness.state_recipe({rename(k): v for k, v in official.state_dict().items()}, derived=("attn_mask",))
    checkpoint = {k: v for k, v in harness.perturbed_state(recipe, seed).items() if not k.endswith("attn_mask")}
    missing, unexpected = official.load_state_dict({names[k]: v for k, v in checkpoint.items()}, strict=False)
    assert not unexpected and all(k.endswith("attn_mask") for k in missing), (missing, unexpected)
    if not truncate:
        official.transformer.pad_len = 0  # the release's switch for "score every class" (class padding stays)
    return official.eval(), checkpoint


def aggregator_head_kwargs(agg: dict) -> dict:
    """The official Aggregator's arguments (``RELEASED_AGGREGATOR``'s keys) as CATSegHead keyword arguments."""
    return dict(
        hidden_dim=agg["hidden_dim"],
        num_layers=agg["num_layers"],
        num_heads=agg["nheads"],
        window_size=agg["window_size"],
        appearance_guidance_proj_dim=agg["appearance_guidance_proj_dim"],
        text_guidance_proj_dim=agg["text_guidance_proj_dim"],
        decoder_dims=agg["decoder_dims"],
        decoder_guidance_dims=agg["decoder_guidance_dims"],
        decoder_guidance_proj_dims=agg["decoder_guidance_proj_dims"],
        pad_len=256,
    )


def build_ours(checkpoint: dict[str, torch.Tensor], setting: str, aggregator: dict | None = None):
    """Our CATSegHead with the official checkpoint's weights, through our converter, loaded strictly."""
    from ovseg_lab.convert.catseg import convert_catseg_state_dict
    from ovseg_lab.models.catseg import CATSegHead

    agg = dict(aggregator or RELEASED_AGGREGATOR)
    dims = SETTINGS[setting]
    head = CATSegHead(
        dims["embed_dim"], dims["width"], num_templates=agg["prompt_channel"], **aggregator_head_kwargs(agg)
    )
    state = {k.removeprefix("head."): v for k, v in convert_catseg_state_dict(checkpoint, prefix="").items()}
    head.load_state_dict(state, strict=True)
    return head.eval()


def make_inputs(setting: str, num_classes: int, resolution: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    dims = SETTINGS[setting]
    r = resolution
    return {
        "dense": torch.randn(1, dims["embed_dim"], r, r, generator=gen),
        "inter0": torch.randn(1, dims["width"], r, r, generator=gen),
        "inter1": torch.randn(1, dims["width"], r, r, generator=gen),
        "text": torch.randn(1, num_classes, 1, dims["embed_dim"], generator=gen),
    }


def run_official(official: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        res4, res5 = official.upsample1(x["inter0"]), official.upsample2(x["inter1"])
        return official.transformer(x["dense"], x["text"], [x["dense"], res4, res5])


def run_ours(
    head: nn.Module, x: dict[str, torch.Tensor], truncate: bool, class_chunk: int | None = None
) -> torch.Tensor:
    with torch.no_grad():
        return head(
            x["dense"],
            [x["inter0"], x["inter1"]],
            x["text"],
            class_pool=1,
            class_chunk=class_chunk,
            truncate=256 if truncate else None,
        )


def relative_error(ours: torch.Tensor, official: torch.Tensor) -> float:
    ours, official = ours.double().flatten(), official.double().flatten()
    return float((ours - official).norm() / official.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- memory
def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(
    which: str,
    directory: Path,
    setting: str,
    num_classes: int,
    truncate: bool,
    resolution: int,
    class_chunk: int | None,
    aggregator: dict | None = None,
) -> dict[str, Any]:
    """Runs in a fresh process: build one head, one call, its peak resident set (MiB)."""
    torch.set_num_threads(1)
    official, checkpoint = build_official(directory, setting, truncate, aggregator=aggregator, resolution=resolution)
    x = make_inputs(setting, num_classes, resolution)
    if which == "ours":
        model = build_ours(checkpoint, setting, aggregator)
        del official
        call = lambda: run_ours(model, x, truncate, class_chunk)  # noqa: E731
    else:
        call = lambda: run_official(official, x)  # noqa: E731
    del checkpoint
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_mib("VmRSS")
    out = call()
    peak = _status_mib("VmHWM")
    return {
        "head": which,
        "before_mib": round(before, 1),
        "peak_mib": round(peak, 1),
        "call_mib": round(peak - before, 1),
        "output_shape": list(out.shape),
    }


def measure_memory(which: str, args) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "ovseg_lab.tools.compare_official",
        "--memory-child",
        which,
        "--dir",
        str(args.compare_official),
        "--setting",
        args.setting,
        "--num-classes",
        str(args.num_classes),
        "--resolution",
        str(args.resolution),
    ]
    if args.truncate:
        command.append("--truncate")
    if args.class_chunk:
        command += ["--class-chunk", str(args.class_chunk)]
    if args.tiny:
        command.append("--tiny")
    env = {**os.environ, **MALLOC_ENV}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child ({which}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- timing
def _timed(fn) -> tuple[float, float, torch.Tensor]:
    wall, cpu = time.perf_counter(), time.thread_time()
    out = fn()
    return time.thread_time() - cpu, time.perf_counter() - wall, out


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


@single_threaded
def compare(args) -> dict[str, Any]:
    aggregator = TINY_AGGREGATOR if args.tiny else None
    official, checkpoint = build_official(
        args.compare_official, args.setting, args.truncate, aggregator=aggregator, resolution=args.resolution
    )
    ours = build_ours(checkpoint, args.setting, aggregator)
    x = make_inputs(args.setting, args.num_classes, args.resolution)
    # models bound as defaults: `del official, ours, calls` below frees them with the lambdas
    calls = {
        "ours": lambda model=ours: run_ours(model, x, args.truncate, args.class_chunk),
        "official": lambda model=official: run_official(model, x),
    }
    log(
        f"compare T={args.num_classes} truncate={args.truncate} setting={args.setting} "
        f"resolution={args.resolution} chunk={args.class_chunk}: warm-up (load {load_average()})"
    )
    outputs = {name: fn() for name, fn in calls.items()}
    error = relative_error(outputs["ours"], outputs["official"])
    dropped_official = (outputs["official"] == -100).all(dim=-1).all(dim=-1)  # (B, T) classes the truncation drops
    dropped_ours = (outputs["ours"] == -100).all(dim=-1).all(dim=-1)
    scored = ~dropped_official
    scored_error = relative_error(outputs["ours"][scored], outputs["official"][scored]) if scored.any() else 0.0
    log(
        f"  relative error {error:.2e} (tolerance {TOLERANCE:.0e}); on the scored classes {scored_error:.2e}; "
        f"classes scored -100: {int(dropped_official.sum())} (official), {int(dropped_ours.sum())} (ours)"
    )
    if not (error <= TOLERANCE and scored_error <= TOLERANCE and torch.equal(dropped_ours, dropped_official)):
        raise SetupError(
            f"outputs differ: relative error {error:.3e}, on the scored classes {scored_error:.3e} "
            f"(tolerance {TOLERANCE:.0e}), dropped classes equal: {torch.equal(dropped_ours, dropped_official)}"
        )
    del outputs
    cpu: dict[str, list[float]] = {"ours": [], "official": []}
    wall: dict[str, list[float]] = {"ours": [], "official": []}
    loads = [load_average()]
    for round_ in range(args.repeats):
        order = ("ours", "official") if round_ % 2 == 0 else ("official", "ours")
        for name in order:
            c, w, _ = _timed(calls[name])
            cpu[name].append(c)
            wall[name].append(w)
        loads.append(load_average())
        log(
            f"  round {round_ + 1}/{args.repeats}: ours {cpu['ours'][-1]:.2f} s, official {cpu['official'][-1]:.2f} s "
            f"CPU ({cpu['ours'][-1] / cpu['official'][-1]:.3f}); load {loads[-1]}"
        )
    result: dict[str, Any] = {
        "num_classes": args.num_classes,
        "truncate": args.truncate,
        "setting": args.setting,
        "resolution": args.resolution,
        "class_chunk": args.class_chunk,
        "repeats": args.repeats,
        "relative_error": error,
        "relative_error_scored": scored_error,
        "dropped_classes": int(dropped_official.sum()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_s": {k: [round(v, 3) for v in vs] for k, vs in cpu.items()},
        "wall_s": {k: [round(v, 3) for v in vs] for k, vs in wall.items()},
        "round_ratios": [round(a / b, 4) for a, b in zip(cpu["ours"], cpu["official"])],
        "latency_ratio": round(statistics.median(cpu["ours"]) / statistics.median(cpu["official"]), 4),
        "wall_ratio": round(statistics.median(wall["ours"]) / statistics.median(wall["official"]), 4),
        "load_average": loads,
    }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in calls.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            log(
                f"---- profile: {name}\n"
                + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile)
            )
    del official, ours, calls
    if not args.no_memory:
        memory = {name: measure_memory(name, args) for name in ("ours", "official")}
        result["memory"] = memory
        result["memory_ratio"] = round(memory["ours"]["peak_mib"] / memory["official"]["peak_mib"], 4)
        result["memory_call_ratio"] = round(memory["ours"]["call_mib"] / max(memory["official"]["call_mib"], 1e-9), 4)
    result["load_average"].append(load_average())
    log(ratio_lines(result))
    return result


def ratio_lines(result: dict[str, Any]) -> str:
    med = {k: statistics.median(v) for k, v in result["cpu_s"].items()}
    label = f"T={result['num_classes']}" + (" top-256" if result["truncate"] else " untruncated")
    lines = [
        f"latency ratio (ours/official, CPU s, {label}): {result['latency_ratio']:.3f} "
        f"({med['ours']:.2f} s / {med['official']:.2f} s, median of {result['repeats']}; rounds "
        f"{result['round_ratios']}; rel. error {result['relative_error']:.1e}; load {result['load_average'][0]} "
        f"-> {result['load_average'][-1]})"
    ]
    if "memory" in result:
        m = result["memory"]
        lines.append(
            f"peak-memory ratio (ours/official, peak RSS of a fresh process, {label}): "
            f"{result['memory_ratio']:.3f} ({m['ours']['peak_mib']:.0f} / {m['official']['peak_mib']:.0f} MiB); "
            f"the call's part: {result['memory_call_ratio']:.3f} ({m['ours']['call_mib']:.0f} / "
            f"{m['official']['call_mib']:.0f} MiB)"
        )
    return "\n".join(lines)


# tiny settings for the test suite: the released structure at small widths (window 6 on a 12x12 map)
TINY_AGGREGATOR = dict(
    RELEASED_AGGREGATOR,
    hidden_dim=32,
    text_guidance_proj_dim=16,
    appearance_guidance_proj_dim=16,
    decoder_dims=(32, 16),
    decoder_guidance_dims=(32, 16),
    decoder_guidance_proj_dims=(16, 16),
    feature_resolution=(12, 12),
    window_size=6,
)


def add_arguments(parser) -> None:
    group = parser.add_argument_group("official comparison (CAT-Seg)")
    group.add_argument(
        "--compare-official",
        type=Path,
        default=None,
        metavar="DIR",
        help="compare our CAT-Seg head with the official aggregator extracted at DIR (CPU)",
    )
    group.add_argument(
        "--truncate",
        action="store_true",
        help="with --compare-official: the official top-256 class truncation (default: every class)",
    )
    group.add_argument("--setting", default="vitb16", choices=list(SETTINGS))
    group.add_argument("--resolution", type=int, default=None, help="cost-map side (default 24; 12 with --tiny)")
    group.add_argument("--class-chunk", type=int, default=None, help="our head's class_chunk (default: null)")
    group.add_argument("--tiny", action="store_true", help="small widths and a 12x12 map (tests)")
    group.add_argument("--no-memory", action="store_true", help="skip the two memory child processes")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="memory child of --compare-official")
    parser.add_argument("--memory-child", choices=("ours", "official"), required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--setting", default="vitb16")
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--resolution", type=int, default=24)
    parser.add_argument("--truncate", action="store_true")
    parser.add_argument("--class-chunk", type=int, default=None)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    result = memory_child(
        args.memory_child,
        args.dir,
        args.setting,
        args.num_classes,
        args.truncate,
        args.resolution,
        args.class_chunk,
        TINY_AGGREGATOR if args.tiny else None,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
