"""Count learnable parameters of a configured model, built with random weights (nothing is downloaded).

    python -m ovseg_lab.tools.count_params model=catseg clip=vitl14 finetune=qv

Prints a per-part breakdown, then, as its last line, one JSON object {"clip": N, "head": N, "total": N}:
learnable parameters inside the CLIP towers, in the rest of the network, and their sum.
"""

from __future__ import annotations

import json
import sys

from ovseg_lab.build import build_net


def count_learnable(net) -> dict[str, int]:
    """{"clip", "head", "total"}: learnable parameters inside / outside CLIP towers."""
    from ovseg_lab.clip import CLIPBackbone

    clip_ids = {id(p) for m in net.modules() if isinstance(m, CLIPBackbone) for p in m.parameters()}
    seen: set[int] = set()
    clip = head = 0
    for param in net.parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        if id(param) in clip_ids:
            clip += param.numel()
        else:
            head += param.numel()
    return {"clip": clip, "head": head, "total": clip + head}


def main(argv: list[str] | None = None) -> dict[str, int]:
    overrides = list(sys.argv[1:] if argv is None else argv)
    net = build_net(overrides, init_files=False)  # counts need no stage outputs
    counts = count_learnable(net)
    for name, child in net.named_children():
        learnable = sum(p.numel() for p in child.parameters() if p.requires_grad)
        print(f"{name:<24}{learnable:>16,}")
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
