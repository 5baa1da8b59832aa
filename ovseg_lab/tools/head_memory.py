"""What a CAT-Seg head training step keeps for the backward pass, with and without ``train_class_chunk``.

    python scripts/benchmark.py --head-train-memory none,32 --revision-size vitb --num-classes 171   # released ViT-B
    python scripts/benchmark.py --head-train-memory none,4 --num-classes 36                          # the toy head

Builds ``CATSegHead`` at the sizes of :data:`ovseg_lab.tools.compare_revision.SIZES` (random weights, one seeded
input batch with ``--num-classes`` classes), and for each chunk runs one training forward (class pooling 2; a
chunk = checkpointed steps of that many classes, ``none`` = every class in one step, the default) under
``torch.autograd.graph.saved_tensors_hooks`` that add up the bytes of every tensor autograd keeps for the backward
pass (a checkpointed step keeps its own to itself and recomputes them), then the backward pass. Reported per chunk:
the bytes kept (MiB) and the thread CPU seconds of the forward and of forward + backward. Deterministic in the
bytes (unlike a peak resident set on a shared machine); the CPU seconds are single runs.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from ovseg_lab.errors import SetupError
from ovseg_lab.tools import single_threaded


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_chunks(text: str) -> list[int | None]:
    chunks: list[int | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("none", "null", ""):
            chunks.append(None)
        elif item.isdigit() and int(item) > 0:
            chunks.append(int(item))
        else:
            raise SetupError(f"--head-train-memory takes chunk sizes or 'none', comma-separated; got '{item}'.")
    return chunks


@single_threaded
def measure(args) -> dict[str, Any]:
    from ovseg_lab.models.catseg import CATSegHead
    from ovseg_lab.tools.compare_revision import SIZES, make_inputs

    spec = SIZES[args.revision_size]
    x = make_inputs(args.revision_size)
    gen = torch.Generator().manual_seed(2)
    text = torch.randn(spec["batch"], args.num_classes, 1, spec["embed_dim"], generator=gen)
    torch.manual_seed(0)
    head = CATSegHead(spec["embed_dim"], spec["width"], **spec["head"])
    points = []
    for chunk in parse_chunks(args.head_train_memory):
        kept = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal kept
            kept += tensor.numel() * tensor.element_size()
            return tensor

        head.zero_grad(set_to_none=True)
        start = time.thread_time()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logits = head(x["dense"], x["inter"], text, class_pool=2, class_chunk=chunk, checkpoint=chunk is not None)
        forward_s = time.thread_time() - start
        logits.float().mean().backward()
        point = {
            "train_class_chunk": chunk,
            "kept_mib": round(kept / 2**20, 1),
            "forward_cpu_s": round(forward_s, 3),
            "train_cpu_s": round(time.thread_time() - start, 3),
        }
        log(
            f"train_class_chunk={chunk}: kept for the backward pass {point['kept_mib']:.0f} MiB, forward "
            f"{point['forward_cpu_s']:.1f} s, forward + backward {point['train_cpu_s']:.1f} s CPU "
            f"({args.revision_size} head, {args.num_classes} classes, batch {spec['batch']})"
        )
        points.append(point)
        del logits
    return {
        "size": args.revision_size,
        "num_classes": args.num_classes,
        "batch": spec["batch"],
        "points": points,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def add_arguments(parser) -> None:
    parser.add_argument(
        "--head-train-memory",
        default=None,
        metavar="CHUNKS",
        help="CAT-Seg head training step: bytes kept for backward per train_class_chunk, e.g. none,32 "
        "(sizes: --revision-size, classes: --num-classes)",
    )
