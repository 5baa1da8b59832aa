"""Swin Transformer blocks with an optional guidance input (CAT-Seg's spatial aggregation).

Guidance features are concatenated to the (normalised) tokens for the query and key projections only; values
come from the tokens alone. The blocks run on many slices that share one guidance map (CAT-Seg: the T class
slices of an image share its appearance guidance), so the guidance half of the q/k projections is computed
once per image and broadcast (:func:`split_linear`) instead of concatenating T copies. Window attention runs
through :func:`ovseg_lab.layers.attention.attention` (SDPA); the shifted-window mask uses -100 like the reference Swin
implementation. There is no relative position bias.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import torch
from timm.layers import Mlp
from torch import nn

from ovseg_lab.layers.attention import attention
from ovseg_lab.layers.broadcast import split_linear


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C), windows image-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """(B * H/w * W/w, w*w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


@lru_cache(maxsize=32)
def _shift_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(num_windows, w*w, w*w) additive mask: -100 between tokens from different regions of a shifted window."""
    region = torch.zeros(1, height, width, 1)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[:, hs, ws, :] = count
            count += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, w*w)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return diff.ne(0).float() * -100.0


class GuidedWindowAttention(nn.Module):
    """Multi-head window self-attention; q, k from [x; guidance], v from x.

    forward(x, guidance, mask): x (B*K*nW, N, dim) windows of B images with K slices each; guidance
    (B, nW, N, G) shared by the K slices of an image, or None; mask (nW, N, N) additive or None.
    Returns (B*K*nW, N, dim).
    """

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.q = nn.Linear(dim + guidance_dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim + guidance_dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = True  # SDPA kernels; False = the reference computation (speed.attention=math)

    def forward(
        self, x: torch.Tensor, guidance: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        bw, n, _ = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(bw, n, heads, -1).transpose(1, 2)

        q = split(split_linear(self.q, x, guidance))
        k = split(split_linear(self.k, x, guidance))
        v = split(self.v(x))
        if mask is not None:
            num_windows = mask.shape[0]
            # (nW, N, N) -> one mask per window of every slice: (B*K*nW, 1, N, N) as a broadcast view
            mask = mask.to(q.dtype).unsqueeze(0).expand(bw // num_windows, -1, -1, -1).reshape(bw, 1, n, n)
        out = attention(q, k, v, mask, fused=self.fused_attn)
        return self.proj(out.transpose(1, 2).reshape(bw, n, self.dim))


class GuidedSwinBlock(nn.Module):
    """Pre-LN Swin block (W-MSA when shift=0, SW-MSA otherwise) with an optional guidance input.

    forward(x, guidance, height, width): x (B*K, H*W, dim) = K slices per image, image-major;
    guidance (B, H*W, guidance_dim) shared by the K slices of an image, or None.
    When the map is not larger than the window, the window covers it and the shift is dropped (as in Swin).
    """

    def __init__(
        self,
        dim: int,
        guidance_dim: int = 0,
        num_heads: int = 4,
        window_size: int = 12,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.guidance_dim = guidance_dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GuidedWindowAttention(dim, guidance_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def _geometry(self, height: int, width: int) -> tuple[int, int]:
        window, shift = self.window_size, self.shift_size
        if min(height, width) <= window:
            window, shift = min(height, width), 0
        if height % window or width % window:
            raise ValueError(f"feature map {height}x{width} is not divisible by the Swin window {window}")
        return window, shift

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None, height: int, width: int) -> torch.Tensor:
        b, length, c = x.shape
        window, shift = self._geometry(height, width)
        h = self.norm1(x).view(b, height, width, c)
        g = guidance.view(guidance.shape[0], height, width, -1) if guidance is not None and self.guidance_dim else None
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
            g = torch.roll(g, shifts=(-shift, -shift), dims=(1, 2)) if g is not None else None
        g_windows = None
        if g is not None:
            g_windows = window_partition(g, window)
            g_windows = g_windows.view(g.shape[0], -1, *g_windows.shape[1:])  # (B, nW, N, G)
        mask = _shift_mask(height, width, window, shift).to(x.device) if shift else None
        attended = self.attn(window_partition(h, window), g_windows, mask)
        attended = window_reverse(attended, window, height, width)
        if shift:
            attended = torch.roll(attended, shifts=(shift, shift), dims=(1, 2))
        x = x + attended.reshape(b, length, c)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------- Swin backbone
# MaskFormer's / OVSeg's Swin (the Swin-Transformer-Semantic-Segmentation variant detectron2 projects call
# D2SwinTransformer): relative position bias, feature maps padded to whole windows (the padding tokens are zeros
# after norm1 and take part in unshifted windows), odd maps padded before patch merging, the shift kept even
# when a map is smaller than the window, and a LayerNorm on each returned stage (norm0..norm3). Parameter names
# follow that layout, so a released checkpoint loads after a prefix rename.
def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into the (2w-1)^2 relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


class SwinWindowAttention(nn.Module):
    """Window self-attention with a relative position bias: (nW*B, N, C), additive mask (nW, N, N) or None."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = True

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        bias = bias.unsqueeze(0).to(q.dtype)  # (1, heads, N, N)
        if mask is not None:
            windows = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.to(q.dtype)[None, :, None]).expand(bw // windows, -1, -1, -1, -1)
            bias = bias.reshape(bw, self.num_heads, n, n)
        out = attention(q, k, v, bias, fused=self.fused_attn)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-LN Swin block on a (B, H*W, C) map; pads to whole windows, shifts when ``shift`` > 0."""

    def __init__(
        self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float = 4.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        from timm.layers import DropPath

        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SwinWindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, height: int, width: int, mask: torch.Tensor) -> torch.Tensor:
        b, length, c = x.shape
        window = self.window
        h = self.norm1(x).view(b, height, width, c)
        pad_b, pad_r = (-height) % window, (-width) % window
        h = torch.nn.functional.pad(h, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h.shape[1:3]
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        attended = self.attn(window_partition(h, window), mask if self.shift else None)
        h = window_reverse(attended, window, hp, wp)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        h = h[:, :height, :width].reshape(b, length, c)
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinPatchMerging(nn.Module):
    """2x2 neighbours concatenated (odd maps zero-padded), LayerNorm, linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, height, width, c)
        x = torch.nn.functional.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(
        self, dim: int, depth: int, num_heads: int, window: int, drop_path: list[float], downsample: bool
    ) -> None:
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, drop_path=drop_path[i])
            for i in range(depth)
        )
        self.downsample = SwinPatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, height: int, width: int):
        window = self.window
        mask = _shift_mask(-(-height // window) * window, -(-width // window) * window, window, window // 2).to(
            x.device
        )
        for block in self.blocks:
            x = block(x, height, width, mask)
        if self.downsample is None:
            return x, x
        return x, self.downsample(x, height, width)


class SwinBackbone(nn.Module):
    """images (B, 3, H, W) -> {res2..res5} (NCHW, strides 4..32), each stage's output through its own LayerNorm.

    Args:
        embed_dim, depths, num_heads, window_size, mlp_ratio, drop_path_rate: Swin's sizes (Swin-B at 384:
            128, [2, 2, 18, 2], [4, 8, 16, 32], 12).
        pretrained: ImageNet weights in the original Swin release's layout (``swin_base_patch4_window12_384_22k.pth``,
            the file OVSeg's release converts), whose classifier (``head``, ``norm``) and derived buffers are left
            out and whose missing output norms norm0..norm3 keep their initialisation, as in the release; None: random.
    """

    is_backbone = True  # parameters get the backbone learning-rate multiplier

    def __init__(
        self,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int = 12,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.3,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.channels = [int(embed_dim * 2**i) for i in range(len(depths))]
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.layers.append(
                SwinStage(
                    self.channels[i],
                    depth,
                    heads,
                    window_size,
                    rates[start : start + depth],
                    downsample=i < len(depths) - 1,
                )
            )
        for i, channels in enumerate(self.channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        if pretrained:
            self.load_imagenet(pretrained)

    def load_imagenet(self, path: str) -> None:
        from pathlib import Path

        from ovseg_lab.checkpoints import load_into
        from ovseg_lab.errors import SetupError

        if not Path(path).is_file():
            raise SetupError(
                f"Swin ImageNet weights not found: {path}. Download swin_base_patch4_window12_384_22k.pth "
                "from the Swin Transformer release there, or set model.net.maskformer.backbone.pretrained=null "
                "(random init)."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        state = {
            k: v
            for k, v in state.items()
            if not k.startswith(("head.", "norm.")) and not k.endswith(("relative_position_index", "attn_mask"))
        }
        own = self.state_dict()
        state |= {k: v for k, v in own.items() if re.match(r"norm\d\.", k) and k not in state}
        load_into(self, state, path, "Swin ImageNet")

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.patch_size
        x = torch.nn.functional.pad(images, (0, (-images.shape[-1]) % p, 0, (-images.shape[-2]) % p))
        x = self.patch_embed.proj(x)
        height, width = x.shape[-2:]
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        features = {}
        for i, stage in enumerate(self.layers):
            out, x = stage(x, height, width)
            out = getattr(self, f"norm{i}")(out)
            features[f"res{i + 2}"] = out.view(-1, height, width, self.channels[i]).permute(0, 3, 1, 2).contiguous()
            height, width = (height + 1) // 2, (width + 1) // 2
        return features
