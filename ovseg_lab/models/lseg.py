"""LSeg (Li et al., ICLR 2022): dense DPT pixel embeddings correlated with frozen CLIP text embeddings.

    image -> timm ViT (hooked blocks, reassembled to 1/4 .. 1/32) or ResNet (layer1..4)
          -> DPT fusion (width 256) at 1/2 -> 1x1 conv to the CLIP embedding size (512)
          -> cosine with the frozen CLIP text embedding of every label, / temperature (0.07)
          -> optional spatial regularisation blocks on the label maps -> bilinear x2 -> logits (B, T, H, W)

Trained with per-pixel cross-entropy. The text tower is frozen whatever the ``finetune`` config says (LSeg
trains only the image side); labels are embedded raw, without a prompt template.

Image encoders are named variants (timm style, see :data:`ENCODERS`); each real variant has a tiny
counterpart of the same family for tests and the toy benchmark (``tiny=True``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.errors import SetupError
from ovseg_lab.layers.dpt import DPTFusion, Reassemble
from ovseg_lab.layers.losses import per_pixel_cross_entropy
from ovseg_lab.layers.normalize import IMAGENET_MEAN, IMAGENET_STD
from ovseg_lab.vocab import Vocabulary

log = logging.getLogger(__name__)

HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderSpec:
    """An LSeg image encoder: a timm model and how its features become the 1/4 .. 1/32 pyramid.

    kind: "vit" (hooked blocks reassembled to ``channels``) or "resnet" (timm ``features_only`` stages 1-4).
    hooks: 0-based ViT blocks whose outputs feed the four levels.
    tiny: the name of the small random-init counterpart used for tests and the toy benchmark.
    """

    kind: str
    timm_name: str
    hooks: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    mean: tuple[float, ...] = HALF
    std: tuple[float, ...] = HALF
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    tiny: str | None = None


ENCODERS: dict[str, EncoderSpec] = {
    # LSeg's main model: ViT-L/16 at 384 (ImageNet-21k, fine-tuned on 1k), blocks 5/11/17/23.
    "vit_large_16_384": EncoderSpec(
        "vit", "vit_large_patch16_384", hooks=(5, 11, 17, 23), channels=(256, 512, 1024, 1024), tiny="vit_tiny"
    ),
    # The ViT-B/32 variant of the release (clip_vitb32_384), blocks 2/5/8/11.
    "vit_base_32_384": EncoderSpec(
        "vit", "vit_base_patch32_384", hooks=(2, 5, 8, 11), channels=(96, 192, 384, 768), tiny="vit_tiny"
    ),
    # The ResNet-101 of the zero-shot (few-shot split) tables: torchvision ImageNet weights, ImageNet mean/std.
    "resnet101": EncoderSpec("resnet", "resnet101.tv_in1k", mean=IMAGENET_MEAN, std=IMAGENET_STD, tiny="resnet_tiny"),
    # Tiny random-init variants (64x64 toy images): a 4-block ViT with 8x8 patches and a 1-block-per-stage ResNet.
    "vit_tiny": EncoderSpec(
        "vit",
        "vit_tiny_patch16_224",
        hooks=(0, 1, 2, 3),
        channels=(24, 48, 96, 96),
        timm_kwargs={"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
    ),
    "resnet_tiny": EncoderSpec(
        "resnet",
        "resnet18",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        timm_kwargs={"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "stem_width": 16},
    ),
}

TIMM_OFFLINE_HINT = (
    "Run once with internet so timm caches the weights, point model.net.encoder.checkpoint at a local weight "
    "file, or train the image encoder from random weights with model.net.encoder.pretrained=false (paper "
    "numbers need the pretrained weights). To try LSeg offline: `python train.py experiment=quickstart model=lseg`."
)


def _timm_weights_cached(timm_name: str) -> bool | None:
    """Whether timm's pretrained weights for ``timm_name`` are in the local Hugging Face cache (None: unknown)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except Exception:  # unknown tag: let create_model report it
        return None
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(repo, name), str) for name in ("model.safetensors", "pytorch_model.bin")
    )


def create_timm_model(timm_name: str, pretrained: bool, checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` whose offline failures say what to do instead of raising a download traceback."""
    import timm

    if checkpoint:
        path = os.path.expanduser(str(checkpoint))
        if not os.path.isfile(path):
            raise SetupError(f"Image encoder checkpoint not found: {path} (model.net.encoder.checkpoint).")
        kwargs["pretrained_cfg_overlay"] = {"file": path}
        pretrained = True
    elif pretrained and _timm_weights_cached(timm_name) is False:
        from ovseg_lab.preflight import network_reachable

        if not network_reachable():
            raise SetupError(
                f"The timm weights of {timm_name} (LSeg image encoder) are not in the local cache and the network "
                f"is unreachable. {TIMM_OFFLINE_HINT}"
            )
    try:
        return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except SetupError:
        raise
    except Exception as err:  # download errors come in many types (HTTP, OSError, HF hub errors)
        if pretrained:
            first_line = str(err).splitlines()[0][:200] if str(err) else ""
            raise SetupError(
                f"Could not load the timm weights of {timm_name}: {type(err).__name__}: {first_line}. "
                f"{TIMM_OFFLINE_HINT}"
            ) from None
        raise SetupError(f"Could not build the timm model {timm_name}: {err}") from None


class Pyramid(nn.Module):
    """Base of the image encoders: normalised images (B, 3, H, W) -> four maps at strides 4, 8, 16, 32."""

    out_channels: tuple[int, ...]

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised with the encoder's mean/std."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


POSITION_EMBEDDINGS = ("forward", "timm")


def _forward_pos_embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """lang-seg's ``forward_flex`` position embedding (modules/models/lseg_vit.py:149-163, 166-194): the
    checkpoint's grid is resized to the input's grid on every forward, bilinear, ``align_corners=False``, no
    antialias; the CLS entry is kept. ``x``: patch tokens (B, h, w, C) from timm's dynamic-size patch embedding."""
    batch, height, width, channels = x.shape
    prefix = vit.num_prefix_tokens
    pos = vit.pos_embed
    grid_h, grid_w = vit.patch_embed.grid_size
    grid = pos[:, prefix:].reshape(1, grid_h, grid_w, -1).permute(0, 3, 1, 2)
    if (grid_h, grid_w) != (height, width):
        grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    pos = torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, height * width, -1)], dim=1)
    tokens = [vit.cls_token.expand(batch, -1, -1)] if vit.cls_token is not None else []
    if getattr(vit, "reg_token", None) is not None:
        tokens.append(vit.reg_token.expand(batch, -1, -1))
    x = torch.cat(tokens + [x.reshape(batch, height * width, channels)], dim=1)
    return vit.pos_drop(x + pos)


class ViTPyramid(Pyramid):
    """A timm ViT whose hooked blocks are reassembled (DPT) into a 1/4 .. 1/32 pyramid.

    Blocks after the last hook, the final norm and the classifier are pruned: they would receive no gradient.
    Position embeddings follow any input size that is a multiple of the patch size:
    ``position_embedding="forward"`` (lang-seg): the grid the ViT was built with (384: 24x24 for /16) is kept and
    resized bilinearly (no antialias) on every forward; ``"timm"``: timm's bicubic + antialias resampling (ours;
    with ``img_size`` it also trains a grid of that size).
    """

    def __init__(
        self,
        vit: nn.Module,
        hooks: Sequence[int],
        channels: Sequence[int],
        readout: str = "project",
        mean: Sequence[float] = HALF,
        std: Sequence[float] = HALF,
        position_embedding: str = "forward",
    ) -> None:
        super().__init__(mean, std)
        if position_embedding not in POSITION_EMBEDDINGS:
            raise SetupError(
                f"model.net.encoder.position_embedding must be one of {POSITION_EMBEDDINGS}, "
                f"got '{position_embedding}'."
            )
        self.position_embedding = position_embedding
        if position_embedding == "forward":
            if getattr(vit, "no_embed_class", False):
                raise SetupError(
                    "position_embedding=forward needs a ViT whose position embedding covers the CLS token."
                )
            vit._pos_embed = functools.partial(_forward_pos_embed, vit)
        depth = len(vit.blocks)
        if len(hooks) != 4 or not all(0 <= h < depth for h in hooks) or list(hooks) != sorted(hooks):
            raise SetupError(f"ViT hooks must be 4 increasing block indices in 0..{depth - 1}, got {list(hooks)}.")
        if len(channels) != 4:
            raise SetupError(f"ViT reassemble needs 4 channel widths, got {list(channels)}.")
        vit.prune_intermediate_layers(list(hooks), prune_norm=True, prune_head=True)
        self.vit = vit
        self.hooks = tuple(int(h) for h in hooks)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        width = int(vit.embed_dim)
        self.reassemble = nn.ModuleList(
            Reassemble(width, c, self.patch_size, stride, readout) for c, stride in zip(channels, (4, 8, 16, 32))
        )
        self.out_channels = tuple(int(c) for c in channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"ViT input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        layers = self.vit.forward_intermediates(
            images,
            indices=list(self.hooks),
            return_prefix_tokens=True,
            norm=False,
            output_fmt="NCHW",
            intermediates_only=True,
        )
        return [reassemble(tokens, prefix[:, 0]) for reassemble, (tokens, prefix) in zip(self.reassemble, layers)]


class ResNetPyramid(Pyramid):
    """A timm ResNet's stages 1-4 (strides 4, 8, 16, 32) as the pyramid (LSeg's ResNet-101 variant)."""

    def __init__(
        self, resnet: nn.Module, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__(mean, std)
        self.resnet = resnet
        self.out_channels = tuple(int(c) for c in resnet.feature_info.channels())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.resnet(images))


def build_encoder(
    name: str = "vit_large_16_384",
    pretrained: bool = True,
    checkpoint: str | None = None,
    tiny: bool = False,
    img_size: int | None = None,
    readout: str = "project",
    position_embedding: str = "forward",
) -> Pyramid:
    """An LSeg image encoder by variant name (:data:`ENCODERS`).

    pretrained: load timm's ImageNet weights (offline without a cached copy: a SetupError saying what to do).
    checkpoint: a local weight file for timm instead of the download.
    tiny: build the variant's tiny counterpart instead (random init; for tests and the toy benchmark).
    img_size: ViT input size the position embeddings are built for (timm resamples pretrained ones; None: 384).
    position_embedding: forward (lang-seg: keep the built grid, bilinear resize per forward) | timm (bicubic +
        antialias, :class:`ViTPyramid`).
    """
    if name not in ENCODERS:
        raise SetupError(f"Unknown LSeg encoder '{name}' (model.net.encoder.name); choose one of {sorted(ENCODERS)}.")
    spec = ENCODERS[name]
    if tiny and spec.tiny is not None:
        name, spec = spec.tiny, ENCODERS[spec.tiny]
    kwargs = dict(spec.timm_kwargs)
    if spec.timm_kwargs:  # the tiny variants are architecture overrides: no weights exist for them
        pretrained, checkpoint = False, None
        log.info("LSeg image encoder: the tiny random-init variant '%s' (tests and toy runs only).", name)
    elif not pretrained and not checkpoint:
        log.warning(
            "LSeg image encoder '%s' starts from random weights (model.net.encoder.pretrained=false): "
            "the paper's numbers need timm's pretrained weights.",
            name,
        )
    if spec.kind == "vit":
        if img_size is not None and not spec.timm_kwargs:
            kwargs["img_size"] = img_size
        vit = create_timm_model(spec.timm_name, pretrained, checkpoint, num_classes=0, dynamic_img_size=True, **kwargs)
        return ViTPyramid(vit, spec.hooks, spec.channels, readout, spec.mean, spec.std, position_embedding)
    resnet = create_timm_model(
        spec.timm_name, pretrained, checkpoint, features_only=True, out_indices=(1, 2, 3, 4), **kwargs
    )
    return ResNetPyramid(resnet, spec.mean, spec.std)


ACTIVATIONS = {"relu": nn.ReLU, "lrelu": nn.LeakyReLU, "tanh": nn.Tanh}
REGULARIZATIONS = ("none", "depthwise", "bottleneck")


class LabelConv(nn.Module):
    """One 3x3 conv (1 -> 1 channel) applied to every label map alike: (B, T, H, W) -> (B, T, H, W).

    Sharing the kernel across labels keeps the block label-equivariant and independent of T.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, labels, height, width = x.shape
        return self.conv(x.reshape(batch * labels, 1, height, width)).reshape(batch, labels, height, width)


class RegularizationBlock(nn.Module):
    """LSeg's spatial regularisation block on the label maps (B, T, H, W).

    depthwise: LabelConv(x). bottleneck: LabelConv(x) + max over labels of x (a label-invariant context term
    added to every label map). Permuting the labels of the input permutes the output the same way.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in ("depthwise", "bottleneck"):
            raise ValueError(kind)
        self.kind = kind
        self.label_conv = LabelConv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.label_conv(x)
        if self.kind == "bottleneck":
            out = out + x.max(dim=1, keepdim=True).values
        return out


class SpatialRegularization(nn.Module):
    """``depth`` regularisation blocks with an activation between them (none after the last).

    kind: none | depthwise | bottleneck. share_weights: the release applies one block ``depth`` times (True);
    False gives each repetition its own kernel. The release trains with ``kind=none``. ``depth=0`` applies one
    block without activation, as lang-seg's ``block_depth 0`` does for arch options 1/2
    (modules/models/lseg_net.py:198-201: ``range(block_depth - 1)`` is empty, then one block).
    activation: lang-seg's default is lrelu (modules/lseg_module.py:177-181).
    """

    def __init__(
        self, kind: str = "none", depth: int = 2, activation: str = "lrelu", share_weights: bool = True
    ) -> None:
        super().__init__()
        if kind not in REGULARIZATIONS:
            raise SetupError(f"model.net.regularization.kind must be one of {REGULARIZATIONS}, got '{kind}'.")
        if activation not in ACTIVATIONS:
            raise SetupError(
                f"model.net.regularization.activation must be one of {sorted(ACTIVATIONS)}, got '{activation}'."
            )
        if kind != "none" and depth < 0:
            raise SetupError(f"model.net.regularization.depth must be >= 0 for '{kind}' blocks, got {depth}.")
        self.kind = kind
        depth = max(depth, 1)  # lang-seg: block_depth 0 still applies one block
        self.depth = depth if kind != "none" else 0
        count = 0 if kind == "none" else (1 if share_weights else depth)
        self.blocks = nn.ModuleList(RegularizationBlock(kind) for _ in range(count))
        self.activation = ACTIVATIONS[activation]()

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        for index in range(self.depth):
            logits = self.blocks[min(index, len(self.blocks) - 1)](logits)
            if index < self.depth - 1:
                logits = self.activation(logits)
        return logits


class LSegDecoder(nn.Module):
    """DPT fusion + 1x1 conv to the text embedding size + regularisation: the "scratch" part of LSeg that the
    release trains with 10x the base learning rate (``lr_multiplier``, read by the optimizer's param groups)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        features: int,
        embed_dim: int,
        regularization: nn.Module,
        use_bn: bool = True,
        lr_multiplier: float = 10.0,
    ) -> None:
        super().__init__()
        self.fusion = DPTFusion(in_channels, features, use_bn)
        self.head = nn.Conv2d(features, embed_dim, kernel_size=1)
        self.regularization = regularization
        self.lr_multiplier = float(lr_multiplier)


class LSegNet(nn.Module):
    """Args:
    clip: the CLIP tower; only its text side is used, frozen.
    encoder: an image :class:`Pyramid` (see :func:`build_encoder`).
    features: DPT fusion width (256).
    temperature: logits = cos / temperature (0.07, fixed in the release; ``learn_temperature`` makes it a parameter).
    regularization: a :class:`SpatialRegularization` (default: none, as the release trains).
    templates: prompt templates for the labels ("raw": the label name alone).
    image_size: resize inputs to this square size first (None: keep the size, rounded to multiples of 32).
    decoder_lr_multiplier: learning-rate factor of the decoder (10 in the release).
    label_strings: class name -> the string sent to the text tower instead (the ADE recipe's official label
        strings, which lang-seg cuts at the first ';'); None: the names as they are.
    """

    per_image_vocabulary = True  # forward accepts one vocabulary per image (few-shot episodes)

    def __init__(
        self,
        clip: CLIPBackbone,
        encoder: Pyramid,
        features: int = 256,
        use_bn: bool = True,
        temperature: float = 0.07,
        learn_temperature: bool = False,
        regularization: nn.Module | None = None,
        templates: str | Sequence[str] = "raw",
        image_size: int | None = None,
        decoder_lr_multiplier: float = 10.0,
        ignore_index: int = 255,
        label_strings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.label_strings = {str(k).strip(): str(v) for k, v in dict(label_strings or {}).items()}
        self.clip = clip
        self.clip.requires_grad_(False)  # LSeg keeps the text encoder frozen
        self.templates = templates if isinstance(templates, str) else tuple(templates)
        self.encoder = encoder
        regularization = regularization if regularization is not None else SpatialRegularization("none")
        self.decoder = LSegDecoder(
            encoder.out_channels, features, clip.embed_dim, regularization, use_bn, decoder_lr_multiplier
        )
        log_scale = torch.tensor(1.0 / temperature).log()
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.image_size = image_size
        self.ignore_index = ignore_index

    # ------------------------------------------------------------------ text side
    def text_embeddings(self, vocabulary: Vocabulary | Sequence[Vocabulary]) -> torch.Tensor:
        """(T, C) for one vocabulary, (B, T, C) for one vocabulary per image; L2-normalised."""
        if isinstance(vocabulary, Vocabulary):
            return self._embed_names(vocabulary.classes)
        sizes = {len(v) for v in vocabulary}
        if len(sizes) != 1:
            raise ValueError(f"per-image vocabularies must have the same size, got sizes {sorted(sizes)}")
        names = list(dict.fromkeys(name for v in vocabulary for name in v.classes))
        table = self._embed_names(names)
        index = {name: i for i, name in enumerate(names)}
        rows = torch.tensor([[index[n] for n in v.classes] for v in vocabulary], device=table.device)
        return table[rows]

    def _embed_names(self, names: Sequence[str]) -> torch.Tensor:
        names = [self.label_strings.get(name.strip(), name) for name in names]
        with torch.no_grad():
            text = self.clip.encode_vocabulary(tuple(names), templates=self.templates)  # (T, P, C)
        return F.normalize(text.mean(dim=1), dim=-1)

    # ------------------------------------------------------------------ image side
    def pixel_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], H and W multiples of 32 -> L2-normalised (B, C, H/2, W/2)."""
        levels = self.encoder(self.encoder.normalize(images))
        return F.normalize(self.decoder.head(self.decoder.fusion(levels)), dim=1)

    def forward(self, images: torch.Tensor, vocabulary: Vocabulary | Sequence[Vocabulary]) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> logits (B, T, H', W') at the input resolution (after the resize to
        ``image_size``, or to the nearest multiples of 32).

        ``vocabulary`` is one :class:`Vocabulary` for the batch or a sequence of B same-sized ones.
        """
        size = (
            (self.image_size, self.image_size)
            if self.image_size
            else tuple(max(32, round(s / 32) * 32) for s in images.shape[-2:])
        )
        if tuple(images.shape[-2:]) != size:  # the 1/32 level of the pyramid needs sides divisible by 32
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        height, width = size
        pixels = self.pixel_embeddings(images)
        text = self.text_embeddings(vocabulary).to(pixels.dtype)
        equation = "bchw,tc->bthw" if text.dim() == 2 else "bchw,btc->bthw"
        logits = self.log_scale.exp() * torch.einsum(equation, pixels, text)
        logits = self.decoder.regularization(logits)
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=True)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_pixel_cross_entropy(logits, labels, self.ignore_index)
