"""DPT (Ranftl et al., ICCV 2021) reassemble and fusion layers: a 4-level feature pyramid -> one dense map.

Used by LSeg over a ViT or a ResNet. The pieces:

- :class:`Readout` folds the CLS token of a ViT layer into its patch tokens ("ignore", "add" or "project",
  the last = concatenate CLS to every token, Linear(2C -> C) + GELU).
- :class:`Reassemble` turns one ViT layer's token grid (stride = patch size) into a map at a target stride:
  1x1 conv to the level's channels, then a transposed conv (upsampling), nothing, or a strided 3x3 conv.
- :class:`FusionBlock` is DPT's RefineNet-style fusion: residual conv units, x2 bilinear upsampling, 1x1 conv.
- :class:`DPTFusion` projects the four levels to a common width (3x3 convs) and fuses them coarse to fine;
  its output has stride ``finest stride / 2`` (1/2 of the input for the usual 1/4 .. 1/32 pyramid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

READOUTS = ("ignore", "add", "project")


class Readout(nn.Module):
    """Patch tokens (B, C, h, w) and the CLS token (B, C) -> (B, C, h, w) with the CLS information folded in."""

    def __init__(self, width: int, mode: str = "project") -> None:
        super().__init__()
        if mode not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {mode!r}")
        self.mode = mode
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU()) if mode == "project" else None

    def forward(self, tokens: torch.Tensor, cls: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "ignore" or cls is None:
            return tokens
        if self.mode == "add":
            return tokens + cls[:, :, None, None]
        batch, width, height, grid_width = tokens.shape
        flat = tokens.flatten(2).transpose(1, 2)  # (B, h*w, C)
        flat = torch.cat([flat, cls[:, None, :].expand_as(flat)], dim=-1)
        return self.project(flat).transpose(1, 2).reshape(batch, width, height, grid_width)


def resample(channels: int, factor: float) -> nn.Module:
    """Change the stride of a map by ``factor`` (>1: finer, via transposed conv; <1: coarser, via strided 3x3 conv)."""
    if factor == 1:
        return nn.Identity()
    if factor > 1:
        up = int(factor)
        if up != factor:
            raise ValueError(f"upsampling factor {factor} must be an integer")
        return nn.ConvTranspose2d(channels, channels, kernel_size=up, stride=up)
    down = round(1 / factor)
    if not abs(down * factor - 1) < 1e-6:
        raise ValueError(f"downsampling factor {factor} must be 1/integer")
    return nn.Conv2d(channels, channels, kernel_size=3, stride=down, padding=1)


class Reassemble(nn.Module):
    """One ViT layer (tokens at stride ``token_stride``) -> a map of ``channels`` at ``target_stride``.

    forward(tokens (B, C, h, w), cls (B, C) or None) -> (B, channels, h * token_stride / target_stride, ...).
    """

    def __init__(
        self, width: int, channels: int, token_stride: int, target_stride: int, readout: str = "project"
    ) -> None:
        super().__init__()
        self.readout = Readout(width, readout)
        self.project = nn.Conv2d(width, channels, kernel_size=1)
        self.resample = resample(channels, token_stride / target_stride)

    def forward(self, tokens: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        return self.resample(self.project(self.readout(tokens, cls)))


class ResidualConvUnit(nn.Module):
    """x + conv(act(conv(act(x)))), with BatchNorm after each conv when ``use_bn`` (then the convs have no bias)."""

    def __init__(self, features: int, use_bn: bool = True) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        self.bn1 = nn.BatchNorm2d(features) if use_bn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(features) if use_bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(self.act(x)))
        out = self.bn2(self.conv2(self.act(out)))
        return x + out


class FusionBlock(nn.Module):
    """DPT fusion: ``rcu2(x + rcu1(skip))`` upsampled (bilinear, align_corners=True), then a 1x1 conv.

    forward(x (B, F, h, w), skip (B, F, h, w) or None, size=None) -> (B, F, H', W') with (H', W') = ``size``
    or (2h, 2w). The coarsest block takes no skip (``with_skip=False``); the official DPT/LSeg code builds its
    skip unit anyway and never uses it, which only leaves unused parameters (a DDP hazard).
    """

    def __init__(self, features: int, use_bn: bool = True, with_skip: bool = True) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(features, use_bn) if with_skip else None
        self.unit = ResidualConvUnit(features, use_bn)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        if skip is not None:
            if self.skip_unit is None:
                raise ValueError("this fusion block was built without a skip input")
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        size = size or (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTFusion(nn.Module):
    """Four pyramid levels (fine to coarse, each stride twice the previous) -> one map of ``features`` channels.

    in_channels: channels of the four levels. forward(levels) -> (B, features, 2 * h1, 2 * w1), where (h1, w1)
    is the size of the finest level (so 1/2 of the input for a 1/4 .. 1/32 pyramid).
    """

    def __init__(self, in_channels: Sequence[int], features: int = 256, use_bn: bool = True) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"DPT fuses 4 levels, got {len(in_channels)} input widths")
        self.project = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in in_channels)
        self.fuse = nn.ModuleList(FusionBlock(features, use_bn, with_skip=i < 3) for i in range(4))

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        projected = [proj(level) for proj, level in zip(self.project, levels)]
        # coarse to fine; each fusion output is resized to the next finer level (x2 for inputs divisible by 32)
        x = self.fuse[3](projected[3], size=projected[2].shape[-2:])
        x = self.fuse[2](x, projected[2], size=projected[1].shape[-2:])
        x = self.fuse[1](x, projected[1], size=projected[0].shape[-2:])
        return self.fuse[0](x, projected[0])
