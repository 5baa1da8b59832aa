"""The CLIP towers every method stands on: dense image features, intermediate layers, text embeddings.

Built over open_clip. Images passed to the ``encode_*`` methods are already normalised with the tower's
mean/std (``normalize`` does it), so callers can pad or fill with 0 = the CLIP mean.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_lab.checkpoints import load_into, load_state_from
from ovseg_lab.clip.attention import SplitQKVAttention
from ovseg_lab.clip.finetune import FinetuneSpec, apply_finetune
from ovseg_lab.clip.loading import build_open_clip
from ovseg_lab.clip.prompts import SYNONYM_MODES, class_synonyms, resolve_templates
from ovseg_lab.errors import SetupError
from ovseg_lab.layers.normalize import OPENAI_MEAN, OPENAI_STD

POSITION_EMBEDDING_MODES = ("load", "forward")


@dataclass
class DenseFeatures:
    """Output of :meth:`CLIPBackbone.encode_dense`.

    dense: (B, C, h, w) per-patch embeddings in the joint image-text space (C = embed_dim), not normalised.
    intermediates: residual-stream outputs (B, W, h, w) of the blocks in ``feature_layers`` (W = width).
    cls: (B, C) the projected CLS token of the dense pass.
    """

    dense: torch.Tensor
    intermediates: list[torch.Tensor]
    cls: torch.Tensor


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in a lower precision (fp16 / bf16), else unchanged: the text embeddings and the
    resized position grid are computed in float32 under mixed precision, and keep float64 in a float64 model
    (a float32 round trip there shifts the features by ~1e-7, which can flip a ReLU of the decoder guidance that
    lies that close to zero, and then the release's gradients, see docs/fidelity.md "CAT-Seg training")."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _to_plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return cfg


class CLIPBackbone(nn.Module):
    """open_clip CLIP with split q/k/v attention, a fine-tuning strategy and a text-embedding cache.

    Args:
        model_name: open_clip architecture ("ViT-B-16", "ViT-L-14-336", ...) or a label for ``model_cfg``.
        pretrained: open_clip tag ("openai"), a local checkpoint path, or None for random init.
        weights: a file of this backbone's own tower weights (keys ``model.*``, q/k/v split; a Lightning checkpoint
            holding ``net.clip.model.*`` works too), loaded over ``pretrained``: e.g. the ``clip_adapted.pt`` that
            the toy CLIP pre-training stage writes.
        image_size: input size of the dense image pass (None: the architecture's own size).
        position_embedding: how position embeddings meet an ``image_size`` other than the weights' own grid.
            ``load``: open_clip resamples them once when the model is built (bicubic with antialias) and the
            tower holds the new grid. ``forward``: the tower keeps the checkpoint's grid and resamples it on
            every forward (bicubic, no antialias), as the official CAT-Seg does (its ViT-B/16 keeps OpenAI's
            224 grid, (197, 768), and runs at 384); only this layout loads CAT-Seg's released checkpoints.
        model_cfg: custom open_clip config (embed_dim / vision_cfg / text_cfg) for tiny test towers.
        quick_gelu: OpenAI weights use QuickGELU.
        feature_layers: 0-based visual blocks whose outputs :meth:`encode_dense` returns.
        templates: prompt template set name or list (see :mod:`ovseg_lab.clip.prompts`).
        synonyms: how to embed "a, b" synonym class names: first | mean | full.
        finetune: strategy (see :mod:`ovseg_lab.clip.finetune`).
        mask_prompt_depth: OVSeg mask prompt tuning depth (0 = off).
        text_batch_size: prompts per text-tower call when embedding large vocabularies.
        cache_text: cache vocabulary embeddings while the text tower does not change.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = "openai",
        weights: str | None = None,
        image_size: int | None = None,
        position_embedding: str = "load",
        model_cfg: Mapping[str, Any] | None = None,
        quick_gelu: bool = False,
        feature_layers: Sequence[int] = (3, 7),
        templates: str | Sequence[str] = "catseg",
        synonyms: str = "first",
        finetune: FinetuneSpec | Mapping[str, Any] | str | None = None,
        mask_prompt_depth: int = 0,
        text_batch_size: int = 1024,
        cache_text: bool = True,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        if position_embedding not in POSITION_EMBEDDING_MODES:
            raise SetupError(
                f"clip.position_embedding must be one of {POSITION_EMBEDDING_MODES}, got '{position_embedding}'."
            )
        self.position_embedding = position_embedding
        build_size = image_size if position_embedding == "load" else None  # "forward": the weights' own grid
        self.model = build_open_clip(model_name, pretrained, build_size, _to_plain(model_cfg), quick_gelu)
        visual = self.model.visual
        self._input_size = int(image_size) if image_size else int(visual.image_size[0])
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise SetupError(f"CLIP '{model_name}' is not a ViT; ovseg-lab's dense features need a ViT image tower.")
        self._split_attention(visual.transformer.resblocks)
        self._split_attention(self.model.transformer.resblocks)
        if weights:
            if not Path(str(weights)).expanduser().is_file():
                raise SetupError(
                    f"CLIP weights file not found: {weights} (clip.weights). Stage outputs such as a clip_pretrain "
                    "stage's clip_adapted.pt are written when train.py runs the config's pipeline; evaluate or "
                    "predict from a checkpoint (ckpt=...) instead, or set clip.weights=null for the pretrained/random towers."
                )
            state = load_state_from(weights, ("net.clip.model.", "clip.model.", "model."))
            load_into(self.model, state, str(weights), "CLIP (clip.weights)")

        self.templates = resolve_templates(_to_plain(templates))
        if synonyms not in SYNONYM_MODES:
            raise SetupError(f"clip.synonyms must be one of {SYNONYM_MODES}, got '{synonyms}'.")
        self.synonyms = synonyms
        num_layers = len(visual.transformer.resblocks)
        self.feature_layers = tuple(int(i) for i in (_to_plain(feature_layers) or ()))
        bad = [i for i in self.feature_layers if not 0 <= i < num_layers - 1]
        if bad:
            raise SetupError(
                f"clip.feature_layers {bad} out of range for a {num_layers}-block tower (0..{num_layers - 2})."
            )

        self.finetune = FinetuneSpec.from_config(_to_plain(finetune))
        width = self.width
        self.visual_prompts: nn.Parameter | None = None
        if self.finetune.uses_prompt:
            depth = self.finetune.prompt_depth or num_layers
            if depth > num_layers:
                raise SetupError(f"finetune.prompt_depth={depth} exceeds the {num_layers} visual blocks.")
            self.visual_prompts = nn.Parameter(torch.empty(depth, self.finetune.prompt_length, width))
            nn.init.xavier_uniform_(self.visual_prompts)
        self.mask_prompts: nn.Parameter | None = None
        if mask_prompt_depth:
            if not 0 < mask_prompt_depth <= num_layers:
                raise SetupError(f"mask_prompt_depth must be in 1..{num_layers}, got {mask_prompt_depth}.")
            gh, gw = visual.grid_size
            self.mask_prompts = nn.Parameter(torch.randn(mask_prompt_depth, gh * gw, width) * 0.02)

        apply_finetune(visual.transformer.resblocks, self.model.transformer.resblocks, self.model, self.finetune)
        if self.visual_prompts is not None:
            self.visual_prompts.requires_grad_(True)

        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.text_batch_size = text_batch_size
        self.cache_text = cache_text
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.text_tower_calls = 0  # number of text-tower forward passes, for tests and benchmarks
        self._tokenizer = self._make_tokenizer(model_cfg is not None)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _split_attention(blocks: nn.ModuleList) -> None:
        for block in blocks:
            if isinstance(block.attn, SplitQKVAttention):
                continue
            if not isinstance(block.attn, nn.MultiheadAttention):
                raise SetupError(f"Unsupported CLIP attention module {type(block.attn).__name__}.")
            block.attn = SplitQKVAttention.from_multihead(block.attn)

    def _make_tokenizer(self, custom: bool):
        import open_clip

        context_length = self.model.context_length
        if custom:
            return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        return open_clip.get_tokenizer(self.model_name, context_length=context_length)

    # ------------------------------------------------------------------ sizes
    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if self.model.text_projection is not None else self.width

    @property
    def width(self) -> int:
        return int(self.model.visual.conv1.out_channels)

    @property
    def patch_size(self) -> int:
        return int(self.model.visual.conv1.kernel_size[0])

    @property
    def image_size(self) -> int:
        """The input size of the dense pass (with ``position_embedding=forward`` not the stored grid's size)."""
        return self._input_size

    @property
    def num_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    def visual_parameters(self):
        yield from self.model.visual.parameters()
        for extra in (self.visual_prompts, self.mask_prompts):
            if extra is not None:
                yield extra

    def text_parameters(self):
        for name, param in self.model.named_parameters():
            if not name.startswith("visual."):
                yield param

    # ------------------------------------------------------------------ image side
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised with the tower's mean/std."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def _positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1 + h*w, W) position embeddings, resized when the grid differs from the stored one: bicubic,
        align_corners=False, no antialias (the official CAT-Seg ``resized_pos_embed``, run on every forward)."""
        pos = self.model.visual.positional_embedding
        stored = tuple(self.model.visual.grid_size)
        if tuple(grid) == stored:
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        patch_pos = patch_pos.reshape(1, stored[0], stored[1], -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(_at_least_fp32(patch_pos), size=grid, mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)[0]], dim=0)

    def _embed(
        self, images: torch.Tensor, patch_keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify, (mask prompt), prepend CLS, add position embeddings, ln_pre: -> (B, 1 + h*w, W)."""
        visual = self.model.visual
        x = visual.conv1(images)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        if patch_keep is not None and self.mask_prompts is not None:
            x = self._apply_mask_prompt(x, patch_keep, 0)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(grid).to(x.dtype)
        x = visual.patch_dropout(x)
        return visual.ln_pre(x), grid

    def _apply_mask_prompt(self, tokens: torch.Tensor, patch_keep: torch.Tensor, depth: int) -> torch.Tensor:
        """Replace fully-masked patch tokens by learnable prompts: x*m + P*(1-m); tokens (B, N, W)."""
        prompt = self.mask_prompts[depth]
        if prompt.shape[0] != tokens.shape[1]:
            raise SetupError(
                f"Mask prompts were built for {prompt.shape[0]} patches but the input has {tokens.shape[1]}; "
                "region crops must be resized to clip.image_size."
            )
        keep = patch_keep.to(tokens.dtype).unsqueeze(-1)
        return tokens * keep + prompt.to(tokens.dtype).unsqueeze(0) * (1 - keep)

    def _run_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One visual block with this layer's deep visual prompt tokens inserted after CLS and removed after."""
        if self.visual_prompts is None or index >= self.visual_prompts.shape[0]:
            return block(x)
        prompts = self.visual_prompts[index].to(x.dtype).expand(x.shape[0], -1, -1)
        x = block(torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1))
        return torch.cat([x[:, :1], x[:, 1 + prompts.shape[1] :]], dim=1)

    @staticmethod
    def _dense_last_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """CAT-Seg / MaskCLIP last block: no attention mixing between tokens.

        Each token becomes out_proj(v_proj(ln_1(x))) plus the CLS token's block input, then the MLP residual.
        """
        attn: SplitQKVAttention = block.attn
        v = attn.out_proj(attn.project(block.ln_1(x), "v"))
        y = block.ls_1(v) + x[:, :1]
        return y + block.ls_2(block.mlp(block.ln_2(y)))

    def encode_dense(self, images: torch.Tensor) -> DenseFeatures:
        """Dense image embeddings the CAT-Seg way.

        images: (B, 3, H, W) normalised; H, W multiples of the patch size.
        Returns :class:`DenseFeatures` with dense (B, C, H/p, W/p) and intermediates (B, W, H/p, W/p).
        """
        visual = self.model.visual
        x, (gh, gw) = self._embed(images)
        intermediates = []
        blocks = visual.transformer.resblocks
        for index, block in enumerate(blocks[:-1]):
            x = self._run_block(index, block, x)
            if index in self.feature_layers:
                intermediates.append(x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw))
        # The dense last block mixes no tokens, so prompt tokens there could not change any output.
        x = self._dense_last_block(blocks[-1], x)
        x = visual.ln_post(x)
        if visual.proj is not None:
            x = x @ visual.proj
        dense = x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        return DenseFeatures(dense=dense, intermediates=intermediates, cls=x[:, 0])

    def encode_image(self, images: torch.Tensor, patch_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Global CLIP image embedding (B, C), optionally with OVSeg mask prompts.

        patch_keep: (B, h*w) with 1 where a patch holds any foreground of the region mask, 0 where it is
        entirely background (those tokens are replaced by mask prompts at the first ``mask_prompt_depth`` depths:
        at the patch embedding and after blocks 1 .. depth-1).
        """
        visual = self.model.visual
        use_mask_prompt = patch_keep is not None and self.mask_prompts is not None
        x, _ = self._embed(images, patch_keep if use_mask_prompt else None)
        for index, block in enumerate(visual.transformer.resblocks):
            x = self._run_block(index, block, x)
            if use_mask_prompt and index + 1 < self.mask_prompts.shape[0]:
                x = torch.cat([x[:, :1], self._apply_mask_prompt(x[:, 1:], patch_keep, index + 1)], dim=1)
        pooled = visual.ln_post(x[:, 0])
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled

    # ------------------------------------------------------------------ text side
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) strings -> (N, C) text embeddings (not normalised), in chunks of ``text_batch_size``."""
        device = self.model.token_embedding.weight.device
        chunks = []
        for start in range(0, len(texts), self.text_batch_size):
            tokens = self.tokenize(texts[start : start + self.text_batch_size]).to(device)
            chunks.append(self.model.encode_text(tokens))
            self.text_tower_calls += 1
        return torch.cat(chunks, dim=0)

    def text_version(self) -> int:
        """Changes whenever any text-tower parameter is modified in place (optimizer steps, loading weights)."""
        return sum(p._version for p in self.text_parameters())

    def _text_trains(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.text_parameters())

    def encode_vocabulary(
        self, class_names: Sequence[str], templates: Sequence[str] | str | None = None
    ) -> torch.Tensor:
        """Class names -> (T, P, C) L2-normalised text embeddings, one per (class, template).

        Synonyms ("a, b") follow ``self.synonyms``; with ``mean`` the normalised synonym embeddings are averaged
        and renormalised. While the text tower receives no gradient the result is cached per
        (vocabulary, templates, text-weight version, device), so at evaluation the tower runs once per
        vocabulary and again only after its weights change.
        """
        templates = self.templates if templates is None else resolve_templates(templates)
        trains = self._text_trains()
        device = self.model.token_embedding.weight.device
        # inference-mode tensors cannot enter autograd later, so they are cached apart from the others
        key = (
            tuple(class_names),
            tuple(templates),
            self.synonyms,
            self.text_version(),
            str(device),
            torch.is_inference_mode_enabled(),
        )
        if self.cache_text and not trains and key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]

        prompts, owners = [], []
        for class_index, name in enumerate(class_names):
            for synonym in class_synonyms(name, self.synonyms):
                prompts.extend(t.format(synonym) for t in templates)
                owners.append(class_index)
        embeddings = F.normalize(_at_least_fp32(self.encode_text(prompts)), dim=-1)
        num_templates = len(templates)
        embeddings = embeddings.reshape(len(owners), num_templates, -1)
        if len(owners) != len(class_names):  # average synonyms per class
            summed = embeddings.new_zeros(len(class_names), num_templates, embeddings.shape[-1])
            summed.index_add_(0, torch.tensor(owners, device=embeddings.device), embeddings)
            embeddings = F.normalize(summed, dim=-1)

        if self.cache_text and not trains:
            self._text_cache[key] = embeddings.detach()
            while len(self._text_cache) > 16:
                self._text_cache.popitem(last=False)
        return embeddings

    def clear_text_cache(self) -> None:
        self._text_cache.clear()
