"""Our CAT-Seg head against the same head at another git revision, side by side on the CPU (the toy's guard).

    python scripts/benchmark.py --compare-revision HEAD~1                       # toy sizes, training steps
    python scripts/benchmark.py --compare-revision main --revision-mode infer  # toy sizes, evaluation forwards

A faster head at the paper's sizes must not make the toy slower (the quickstart trains the toy CAT-Seg for 500
steps on the CPU). This mode builds the working tree's ``CATSegHead`` and the one of REV (``ovseg_lab/layers/swin.py``,
``ovseg_lab/layers/linear_attention.py`` and ``ovseg_lab/models/catseg.py`` read with ``git show REV:path`` and
executed as a private copy; nothing is checked out), loads the same random weights into both (the state-dict keys
are the same across revisions) and checks that their outputs agree to 1e-5 relative, then times them on seeded
random inputs in one process: one untimed call of each, then ``--repeats`` rounds calling both back to back,
alternating which goes first, ``torch.set_num_threads(1)``, per call the thread's CPU seconds
(``time.thread_time``). ratio = median(working tree) / median(REV).

Sizes (``--revision-size``): ``toy`` = conf/data_model/toy_catseg.yaml on the tiny CLIP (hidden 32, 2 heads, window
4, 8x8 cost map, 36 classes, batch 8, pad_len 0, class pooling 2 in training); ``vitb`` = the released ViT-B/16 head
(24x24, batch 1). ``--revision-mode train``: forward with class pooling 2, a BCE-style loss, backward (what a
training step spends in the head); ``infer``: forward without autograd, class pooling 1.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ovseg_lab.errors import SetupError
from ovseg_lab.tools import single_threaded

HEAD_FILES = (  # imported in this order: each one's imports of the earlier ones resolve to REV's copies
    ("ovseg_lab.layers.swin", "ovseg_lab/layers/swin.py"),
    ("ovseg_lab.layers.linear_attention", "ovseg_lab/layers/linear_attention.py"),
    ("ovseg_lab.models.catseg", "ovseg_lab/models/catseg.py"),
)
SIZES = {
    # conf/data_model/toy_catseg.yaml on conf/clip/tiny.yaml (embed 64, width 128, 64x64 images / patch 8)
    "toy": dict(
        embed_dim=64,
        width=128,
        resolution=8,
        num_classes=36,
        batch=8,
        head=dict(
            hidden_dim=32,
            num_heads=2,
            window_size=4,
            appearance_guidance_proj_dim=32,
            text_guidance_proj_dim=32,
            decoder_dims=(16, 8),
            decoder_guidance_dims=(16, 8),
            decoder_guidance_proj_dims=(8, 4),
            pad_len=0,
        ),
    ),
    # the released ViT-B/16 aggregator (conf/model/catseg.yaml), 384x384 -> 24x24
    "vitb": dict(
        embed_dim=512,
        width=768,
        resolution=24,
        num_classes=171,
        batch=1,
        head=dict(
            hidden_dim=128,
            num_heads=4,
            window_size=12,
            appearance_guidance_proj_dim=128,
            text_guidance_proj_dim=128,
            decoder_dims=(64, 32),
            decoder_guidance_dims=(256, 128),
            decoder_guidance_proj_dims=(32, 16),
            pad_len=256,
        ),
    ),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def revision_module(revision: str) -> types.ModuleType:
    """REV's ``ovseg_lab.models.catseg`` as a private module (its swin / linear-attention copies alongside)."""
    root = Path(__file__).resolve().parents[2]
    saved = {name: sys.modules.get(name) for name, _ in HEAD_FILES}
    module = None
    try:
        for name, path in HEAD_FILES:
            proc = subprocess.run(
                ["git", "-C", str(root), "show", f"{revision}:{path}"], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise SetupError(f"--compare-revision: cannot read {path} at '{revision}': {proc.stderr.strip()}")
            module = types.ModuleType(name)
            module.__file__ = f"{revision}:{path}"
            sys.modules[name] = module  # the next file's ``from name import ...`` gets this copy
            exec(compile(proc.stdout, module.__file__, "exec"), module.__dict__)
    finally:
        for name, original in saved.items():
            if original is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = original
    return module


def build_heads(revision: str, size: str, seed: int = 0):
    """(working tree's head, REV's head) with the same perturbed random weights."""
    from ovseg_lab.models.catseg import CATSegHead

    spec = SIZES[size]
    torch.manual_seed(seed)
    ours = CATSegHead(spec["embed_dim"], spec["width"], **spec["head"])
    for p in ours.parameters():  # no constant tensors: norms, biases and padding tokens matter too
        p.data.add_(0.05 * torch.randn_like(p))
    theirs = revision_module(revision).CATSegHead(spec["embed_dim"], spec["width"], **spec["head"])
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def make_inputs(size: str, seed: int = 0) -> dict[str, torch.Tensor]:
    spec = SIZES[size]
    gen = torch.Generator().manual_seed(seed + 1)
    b, r = spec["batch"], spec["resolution"]
    return {
        "dense": torch.randn(b, spec["embed_dim"], r, r, generator=gen),
        "inter": [torch.randn(b, spec["width"], r, r, generator=gen) for _ in range(2)],
        "text": torch.randn(b, spec["num_classes"], 1, spec["embed_dim"], generator=gen),
        "target": torch.rand(b, spec["num_classes"], 4 * r, 4 * r, generator=gen).lt(1 / spec["num_classes"]).float(),
    }


def make_call(head: torch.nn.Module, x: dict[str, torch.Tensor], mode: str) -> Callable[[], torch.Tensor]:
    if mode == "infer":

        def infer() -> torch.Tensor:
            with torch.no_grad():
                return head(x["dense"], x["inter"], x["text"], class_pool=1)

        return infer

    def train() -> torch.Tensor:
        head.zero_grad(set_to_none=True)
        logits = head(x["dense"], x["inter"], x["text"], class_pool=2)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, x["target"]).backward()
        return logits.detach()

    return train


@single_threaded
def compare(args) -> dict[str, Any]:
    ours, theirs = build_heads(args.compare_revision, args.revision_size)
    x = make_inputs(args.revision_size)
    calls = {"ours": make_call(ours, x, args.revision_mode), "revision": make_call(theirs, x, args.revision_mode)}
    log(f"compare-revision {args.compare_revision} size={args.revision_size} mode={args.revision_mode}: warm-up")
    out_ours, out_theirs = calls["ours"](), calls["revision"]()
    error = float((out_ours.double() - out_theirs.double()).norm() / out_theirs.double().norm().clamp_min(1e-30))
    grad_error = 0.0
    if args.revision_mode == "train":  # all gradients as one vector (a key bias's gradient is 0 up to rounding)
        theirs_grads = dict(theirs.named_parameters())
        pairs = [
            (p.grad.flatten(), theirs_grads[n].grad.flatten()) for n, p in ours.named_parameters() if p.grad is not None
        ]
        a, b = torch.cat([p for p, _ in pairs]).double(), torch.cat([q for _, q in pairs]).double()
        grad_error = float((a - b).norm() / b.norm().clamp_min(1e-30))
    log(f"  relative error {error:.2e}, gradients {grad_error:.2e}")
    if error > 1e-5 or grad_error > 1e-4:
        raise SetupError(
            f"the heads differ: relative error {error:.3e} (tolerance 1e-5), gradients {grad_error:.3e} (1e-4)"
        )
    cpu: dict[str, list[float]] = {"ours": [], "revision": []}
    for round_ in range(args.repeats):
        order = ("ours", "revision") if round_ % 2 == 0 else ("revision", "ours")
        for name in order:
            start = time.thread_time()
            for _ in range(args.revision_calls):
                calls[name]()
            cpu[name].append((time.thread_time() - start) / args.revision_calls)
    ratios = [a / b for a, b in zip(cpu["ours"], cpu["revision"])]
    result = {
        "revision": args.compare_revision,
        "size": args.revision_size,
        "mode": args.revision_mode,
        "repeats": args.repeats,
        "calls_per_round": args.revision_calls,
        "relative_error": error,
        "gradient_error": grad_error,
        "threads": torch.get_num_threads(),
        "cpu_s": {k: [round(v, 5) for v in vs] for k, vs in cpu.items()},
        "round_ratios": [round(r, 4) for r in ratios],
        "ratio": round(statistics.median(cpu["ours"]) / statistics.median(cpu["revision"]), 4),
        "median_round_ratio": round(statistics.median(ratios), 4),
    }
    log(
        f"head ratio (working tree / {args.compare_revision}, CPU s per call, {args.revision_size} {args.revision_mode}): "
        f"{result['ratio']:.3f} ({statistics.median(cpu['ours']):.4f} s / {statistics.median(cpu['revision']):.4f} s; "
        f"median of the per-round ratios {result['median_round_ratio']:.3f} over {args.repeats} rounds)"
    )
    return result


def add_arguments(parser) -> None:
    group = parser.add_argument_group("revision comparison (CAT-Seg head)")
    group.add_argument(
        "--compare-revision",
        default=None,
        metavar="REV",
        help="compare our CAT-Seg head with the one at git revision REV (CPU)",
    )
    group.add_argument("--revision-size", default="toy", choices=list(SIZES))
    group.add_argument("--revision-mode", default="train", choices=("train", "infer"))
    group.add_argument("--revision-calls", type=int, default=5, help="calls per head per round")
