"""Count learnable parameters of a configured model, built with random weights (nothing is downloaded).

    python -m ovseg_lab.tools.count_params model=catseg clip=vitl14 finetune=qv

Prints a per-part breakdown, then, as its last line, one JSON object {"clip": N, "head": N, "total": N}:
learnable parameters inside the CLIP towers, in the rest of the network, and their sum.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import ovseg_lab.resolvers  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _random_init(node: Any) -> None:
    """Set pretrained=None on every CLIP node (and backbone_pretrained=False elsewhere): no downloads."""
    if isinstance(node, DictConfig):
        with open_dict(node):
            if node.get("_target_") == "ovseg_lab.clip.CLIPBackbone":
                node.pretrained = None
            for key in ("backbone_pretrained", "pretrained_backbone", "text_pretrained"):
                if key in node:
                    node[key] = False
        for key in node:
            _random_init(node._get_node(key))


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


def build_net(overrides: list[str]):
    from hydra.utils import instantiate

    cfg = compose_config(overrides)
    model_cfg = cfg.model
    OmegaConf.resolve(model_cfg)  # interpolations (${clip}, ${finetune}) resolved before editing
    _random_init(model_cfg)
    net_cfg = model_cfg.net if "net" in model_cfg else model_cfg
    return instantiate(net_cfg)


def main(argv: list[str] | None = None) -> dict[str, int]:
    overrides = list(sys.argv[1:] if argv is None else argv)
    net = build_net(overrides)
    counts = count_learnable(net)
    for name, child in net.named_children():
        learnable = sum(p.numel() for p in child.parameters() if p.requires_grad)
        print(f"{name:<24}{learnable:>16,}")
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
