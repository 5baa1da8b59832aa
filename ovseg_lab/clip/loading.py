"""Building open_clip models: named architectures with pretrained tags, local checkpoints, tiny test configs.

Offline failures become :class:`SetupError` messages that say what to do instead of a download traceback.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ovseg_lab.errors import SetupError

OFFLINE_HINT = (
    "Either run once with internet so open_clip caches the weights, point clip.pretrained at a local "
    "checkpoint file (clip.pretrained=/path/to/ViT-B-16.pt), or use random weights with clip.pretrained=null "
    "(numbers will be meaningless). To try ovseg-lab offline, run `python train.py experiment=quickstart`."
)


def pretrained_is_file(pretrained: str | None) -> bool:
    return bool(pretrained) and Path(os.path.expanduser(str(pretrained))).is_file()


def pretrained_cached(model_name: str, pretrained: str | None) -> bool | None:
    """Whether a pretrained tag's weights are already on disk (None: not a tag, nothing to download)."""
    import open_clip

    if not pretrained or pretrained_is_file(pretrained):
        return None
    cfg = open_clip.pretrained.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        return None
    if cfg.get("url"):
        if (Path.home() / ".cache" / "clip" / os.path.basename(cfg["url"])).is_file():
            return True
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip's dependencies
            return False
        # open_clip's convention: "org/repo/" (default file names) or "org/repo/file.bin"
        repo_id, filename = os.path.split(cfg["hf_hub"])
        for name in (filename, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if name and isinstance(try_to_load_from_cache(repo_id, name), str):
                return True
    return False


def _load_local_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A local CLIP file: our state dicts, Lightning checkpoints, or OpenAI's TorchScript ``.pt`` archives."""
    from ovseg_lab.checkpoints import read_weights

    state = read_weights(path, ("",), "CLIP checkpoint", "clip.pretrained", torchscript_ok=True)
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_open_clip(
    model_name: str,
    pretrained: str | None,
    image_size: int | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    quick_gelu: bool = False,
) -> torch.nn.Module:
    """Create an open_clip CLIP model.

    - ``model_cfg`` given: a custom architecture (e.g. the tiny test CLIP), random init unless ``pretrained``
      is a local state-dict file.
    - otherwise ``model_name`` is an open_clip architecture and ``pretrained`` a tag ("openai"), a local
      file, or None for random init.
    ``image_size`` overrides the input size; open_clip resizes position embeddings of loaded weights.
    """
    import open_clip

    if model_cfg is not None:
        cfg = copy.deepcopy(dict(model_cfg))
        cfg["vision_cfg"] = dict(cfg["vision_cfg"])
        cfg["text_cfg"] = dict(cfg["text_cfg"])
        if image_size is not None:
            cfg["vision_cfg"]["image_size"] = image_size
        model = open_clip.model.CLIP(**cfg, quick_gelu=quick_gelu)
        if pretrained:
            path = Path(os.path.expanduser(str(pretrained)))
            if not path.is_file():
                raise SetupError(f"CLIP checkpoint not found: {path} (clip.pretrained). {OFFLINE_HINT}")
            state = _load_local_state_dict(path)
            open_clip.factory.resize_pos_embed(state, model)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise SetupError(
                    f"CLIP checkpoint {path} does not match the '{model_name}' architecture: "
                    f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})."
                )
        return model

    if model_name not in open_clip.list_models():
        raise SetupError(f"Unknown open_clip architecture '{model_name}' (clip.model_name).")
    if pretrained and not pretrained_is_file(pretrained):
        if not open_clip.pretrained.is_pretrained_cfg(model_name, pretrained):
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise SetupError(
                f"clip.pretrained='{pretrained}' is neither a file nor a pretrained tag of {model_name} (tags: {tags})."
            )
    elif pretrained:
        pretrained = os.path.expanduser(str(pretrained))
    try:
        return open_clip.create_model(
            model_name, pretrained=pretrained or None, force_image_size=image_size, force_quick_gelu=quick_gelu
        )
    except SetupError:
        raise
    except Exception as err:  # network errors come in many types (URLError, HfHubHTTPError, OSError...)
        if pretrained and not pretrained_is_file(pretrained):
            raise SetupError(
                f"Could not load the CLIP weights {model_name} '{pretrained}': {type(err).__name__}: "
                f"{str(err).splitlines()[0][:200] if str(err) else ''}. {OFFLINE_HINT}"
            ) from None
        raise SetupError(f"Could not build CLIP {model_name} from {pretrained!r}: {err}") from None
