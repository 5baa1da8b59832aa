"""Which CLIP parameters train: the fine-tuning strategies of CAT-Seg Table 6.

Every strategy keeps the embeddings (patch, class, positional, token), ln_pre / ln_post / ln_final, the
projections (``visual.proj``, ``text_projection``) and ``logit_scale`` frozen; it only chooses among the
transformer-block parameters of the two towers (and the visual prompt tokens for ``prompt``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ovseg_lab.errors import SetupError

# strategy -> (towers it touches, which block parameters train: a tuple of attention-parameter names, or
# "attn" for every attention parameter, "block" for every parameter of the block)
_STRATEGIES: dict[str, tuple[tuple[str, ...], object]] = {
    "freeze": ((), None),
    "prompt": ((), None),
    "full": (("visual", "text"), "block"),
    "attn": (("visual", "text"), "attn"),
    "qk": (("visual", "text"), ("q_proj_weight", "k_proj_weight")),
    "kv": (("visual", "text"), ("k_proj_weight", "v_proj_weight")),
    "qv": (("visual", "text"), ("q_proj_weight", "v_proj_weight")),
    "qv_img": (("visual",), ("q_proj_weight", "v_proj_weight")),
    "qv_txt": (("text",), ("q_proj_weight", "v_proj_weight")),
}
STRATEGIES = tuple(_STRATEGIES)


@dataclass(frozen=True)
class FinetuneSpec:
    """A fine-tuning strategy; prompt tokens are used by ``prompt`` only.

    ``prompt_length`` tokens are inserted after CLS before each of the first ``prompt_depth`` visual blocks
    (deep visual prompt tuning; a depth of 0 means every block).
    """

    strategy: str = "freeze"
    prompt_length: int = 0
    prompt_depth: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in _STRATEGIES:
            raise SetupError(f"Unknown finetune strategy '{self.strategy}'; choose one of {list(STRATEGIES)}.")
        if self.strategy == "prompt" and self.prompt_length <= 0:
            raise SetupError("finetune=prompt needs prompt_length > 0 (number of visual prompt tokens per layer).")
        if self.prompt_length < 0 or self.prompt_depth < 0:
            raise SetupError("prompt_length and prompt_depth must be >= 0.")

    @classmethod
    def from_config(cls, cfg) -> FinetuneSpec:
        if cfg is None:
            return cls()
        if isinstance(cfg, FinetuneSpec):
            return cfg
        if isinstance(cfg, str):
            return cls(strategy=cfg)
        cfg = dict(cfg)
        cfg.pop("_target_", None)
        unknown = set(cfg) - {"strategy", "prompt_length", "prompt_depth"}
        if unknown:
            raise SetupError(f"Unknown finetune option(s) {sorted(unknown)}.")
        return cls(**cfg)

    @property
    def uses_prompt(self) -> bool:
        return self.strategy == "prompt"


def _block_param_trains(local_name: str, rule) -> bool:
    """``local_name`` is a parameter name relative to one residual block, e.g. 'attn.q_proj_weight'."""
    if rule == "block":
        return True
    if not local_name.startswith("attn."):
        return False
    if rule == "attn":
        return True
    return local_name.split(".", 1)[1] in rule


def apply_finetune(
    visual_blocks: nn.ModuleList, text_blocks: nn.ModuleList, clip_model: nn.Module, spec: FinetuneSpec
) -> None:
    """Set ``requires_grad`` on every CLIP parameter according to ``spec``."""
    clip_model.requires_grad_(False)
    towers, rule = _STRATEGIES[spec.strategy]
    for tower, blocks in (("visual", visual_blocks), ("text", text_blocks)):
        if tower not in towers:
            continue
        for block in blocks:
            for local_name, param in block.named_parameters():
                if _block_param_trains(local_name, rule):
                    param.requires_grad_(True)
