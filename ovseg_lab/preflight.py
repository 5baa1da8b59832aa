"""Checks that run before anything heavy: is the data there, can the CLIP weights be had?

All problems are gathered into one paragraph so a user fixes them in one go, instead of meeting them one
traceback at a time after minutes of model building.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from omegaconf import DictConfig

from ovseg_lab.config import CLIP_TARGET, nodes_with_target, resolved_yaml  # noqa: F401  (resolved_yaml re-exported)
from ovseg_lab.errors import SetupError

QUICKSTART_HINT = (
    "To try ovseg-lab offline in a few minutes, run `make quickstart` (= `python train.py experiment=quickstart`)."
)


def network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def missing_weights(cfg: DictConfig) -> list[str]:
    """CLIP weights named by the model config that are neither local files nor cached, when offline."""
    from ovseg_lab.clip.loading import pretrained_cached

    problems, checked = [], set()
    for node in nodes_with_target(cfg.get("model"), CLIP_TARGET):
        name, pretrained = node.get("model_name"), node.get("pretrained")
        if node.get("model_cfg") is not None or not pretrained or (name, pretrained) in checked:
            continue
        checked.add((name, pretrained))
        if str(pretrained).startswith(("/", "~", ".")) and not os.path.isfile(os.path.expanduser(str(pretrained))):
            problems.append(f"the CLIP checkpoint file {pretrained} (clip.pretrained) does not exist")
            continue
        cached = pretrained_cached(name, pretrained)
        if cached is False and not network_reachable():
            problems.append(
                f"the CLIP weights {name} '{pretrained}' are not in the local cache and the network is unreachable "
                "(run once with internet, or set clip.pretrained=/path/to/checkpoint.pt, or clip.pretrained=null for random weights)"
            )
    return problems


BERT_TARGET = "ovseg_lab.models.text_encoders.BertTextEncoder"


def bert_cached(name: str) -> bool | None:
    """Is the Hugging Face model ``name`` (config and tokenizer vocabulary) in the local cache? None: cannot tell."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        return all(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", "vocab.txt"))
    except Exception:  # a name that is not a hub id
        return None


def missing_text_encoders(cfg: DictConfig) -> list[str]:
    """OVSegmentor's BERT: a local folder that does not exist, or a hub name neither cached nor downloadable.

    Found here, before minutes of model building; otherwise transformers fails inside instantiation, and even
    a random-weight BERT needs its tokenizer from the hub.
    """
    problems = []
    for node in nodes_with_target(cfg.get("model"), BERT_TARGET):
        name = node.get("pretrained")
        if not name:
            continue
        name = str(name)
        if name.startswith(("/", "~", ".")):
            if not os.path.isdir(os.path.expanduser(name)):
                problems.append(
                    f"the BERT text encoder folder {name} (model.net.text_encoder.pretrained) does not exist"
                )
            continue
        if bert_cached(name) is False and not network_reachable():
            problems.append(
                f"the BERT text encoder '{name}' (OVSegmentor's text tower and tokenizer, model.net.text_encoder."
                "pretrained) is not in the Hugging Face cache and the network is unreachable (run once with internet, "
                "or point it at a local folder with config.json, the weights and vocab.txt)"
            )
    return problems


def check_run(cfg: DictConfig, datamodule: Any, stage: str = "fit") -> None:
    """Raise one :class:`SetupError` listing everything this run needs that is missing, one bullet each."""
    problems = list(datamodule.missing(stage)) if hasattr(datamodule, "missing") else []
    problems += missing_weights(cfg)
    problems += missing_text_encoders(cfg)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise SetupError(
            f"ovseg-lab cannot start this run ({cfg.get('task_name', 'run')}); missing:\n{listing}\n"
            f"Dataset preparation is described in data/README.md. {QUICKSTART_HINT}"
        )
