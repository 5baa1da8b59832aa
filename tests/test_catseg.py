"""CAT-Seg: parameter counts, class equivariance, aggregation layers, protocols, checkpoint import."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_lab.clip import CLIPBackbone
from ovseg_lab.errors import SetupError
from ovseg_lab.eval.inference import InferenceConfig, segment
from ovseg_lab.layers.linear_attention import ClassAggregationLayer, linear_attention
from ovseg_lab.layers.swin import GuidedSwinBlock, _shift_mask, window_partition
from ovseg_lab.models.catseg import CATSeg, CATSegHead
from tests.conftest import ROOT

TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=3, width=48, patch_size=4, head_width=24),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
)
TINY_HEAD = dict(
    hidden_dim=16,
    num_layers=2,
    num_heads=2,
    window_size=4,
    appearance_guidance_proj_dim=8,
    text_guidance_proj_dim=8,
    decoder_dims=(16, 8),
    decoder_guidance_dims=(8, 8),
    decoder_guidance_proj_dims=(4, 4),
    pad_len=0,
)
NAMES = ["red circle", "blue square", "striped grass", "plain sky", "pink ring"]


def tiny_catseg(aggregation=None, seed: int = 0, **head) -> CATSeg:
    torch.manual_seed(seed)
    clip = CLIPBackbone("tiny", None, model_cfg=TINY_CLIP, feature_layers=(0, 1), finetune="qv")
    return CATSeg(clip, head={**TINY_HEAD, **head}, aggregation=aggregation).eval()


@pytest.mark.parametrize("embed_dim,width,expected", [(512, 768, 4_668_641), (768, 1024, 5_782_753)])
def test_head_parameter_counts_match_the_paper(embed_dim, width, expected):
    head = CATSegHead(embed_dim, width)
    assert sum(p.numel() for p in head.parameters()) == expected


def test_prior_probability_starts_every_class_at_the_prior():
    """The untrained head's BCE starts at the prior's entropy instead of ~log 2; only the output bias differs."""
    images, labels = torch.rand(2, 3, 32, 32), torch.randint(0, len(NAMES), (2, 32, 32))
    p = 1 / len(NAMES)
    default, prior = tiny_catseg(seed=3), tiny_catseg(seed=3, prior_probability=p)
    with torch.no_grad():
        default_loss = default.loss(default(images, NAMES), labels).item()
        prior_logits = prior(images, NAMES)
        prior_loss = prior.loss(prior_logits, labels).item()
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert default_loss > 0.6  # sigmoid(~0) for every class
    assert abs(prior_loss - entropy) < 0.1 * entropy
    assert abs(torch.sigmoid(prior_logits).mean().item() - p) < 0.05
    changed = [k for k, v in prior.state_dict().items() if not torch.equal(v, default.state_dict()[k])]
    assert changed == ["head.head.bias"]
    with pytest.raises(SetupError, match="prior_probability"):
        tiny_catseg(prior_probability=1.0)


@pytest.mark.parametrize(
    "aggregation",
    [
        None,  # full, with embedding guidance
        {
            "name": "cost_both",
            "input": "cost",
            "spatial_aggregation": True,
            "class_aggregation": True,
            "embedding_guidance": False,
        },
        {
            "name": "feature",
            "input": "feature",
            "spatial_aggregation": True,
            "class_aggregation": True,
            "embedding_guidance": False,
        },
    ],
)
@pytest.mark.parametrize("pad_len", [0, 8])
def test_permuting_classes_permutes_logits(aggregation, pad_len):
    model = tiny_catseg(aggregation, pad_len=pad_len)
    images = torch.rand(2, 3, 32, 32)
    perm = [3, 0, 4, 2, 1]
    with torch.no_grad():
        logits = model(images, NAMES)
        permuted = model(images, [NAMES[i] for i in perm])
    assert logits.shape == (2, 5, 32, 32)
    torch.testing.assert_close(permuted, logits[:, perm], atol=1e-5, rtol=1e-4)


def test_training_pooling_and_class_chunks():
    model = tiny_catseg()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        whole = model(images, NAMES)
        model.class_chunk = 2
        chunked = model(images, NAMES)
        model.train()
        pooled = model(images, NAMES)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(pooled, whole)  # 2x2 class pooling in training changes the map


def test_truncation_keeps_top_classes_only_when_asked():
    model = tiny_catseg(pad_len=3)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        full = model(images, NAMES)
        model.truncate_classes = True
        cut = model(images, NAMES)
    assert (full > -100).all()  # default: every class scored
    dropped = (cut == -100).all(dim=-1).all(dim=-1)[0]
    assert int(dropped.sum()) == len(NAMES) - 3


def test_sliding_window_equals_single_pass_on_one_window():
    model = tiny_catseg()
    images = torch.rand(1, 3, 32, 32)

    def forward(x):
        return model(x, NAMES)

    with torch.no_grad():
        whole = segment(forward, images, InferenceConfig(mode="whole"))
        slide = segment(forward, images, InferenceConfig(mode="slide", slide_size=32, crop=32, stride=16))
    torch.testing.assert_close(slide, whole, atol=1e-6, rtol=1e-5)


def test_sliding_window_covers_and_averages():
    """A constant-per-window forward reveals the averaging: windows overlap, global view blends 50/50."""
    images = torch.zeros(1, 3, 40, 40)
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 1, 4, 4)

    scores = segment(forward, images, InferenceConfig(mode="slide", score="sigmoid", slide_size=64, crop=32, stride=16))
    assert scores.shape == (1, 1, 40, 40)
    assert calls == [3 * 3 + 1]  # 3x3 windows over 64 px with stride 16, plus the global view, in one batch
    torch.testing.assert_close(scores, torch.full_like(scores, 0.5))


def test_shortest_edge_resize_follows_detectron2():
    """Hand-computed ResizeShortestEdge(640, max 2560) sizes (round half up), the long-side cap included; uint8
    images go through PIL's bilinear filter, and scores come back at the size of the image passed in."""
    from PIL import Image

    from ovseg_lab.eval.inference import resize_shortest_edge, shortest_edge_size

    assert shortest_edge_size(480, 640, 640, 2560) == (640, 853)  # 640 * 640 / 480 = 853.3
    assert shortest_edge_size(641, 427, 640, 2560) == (961, 640)  # 641 * 640 / 427 = 960.75
    assert shortest_edge_size(100, 3000, 640, 2560) == (85, 2560)  # 640 x 19200 capped: x 2560 / 19200
    image = (torch.rand(1, 3, 30, 40) * 255).to(torch.uint8)
    resized = resize_shortest_edge(image, 64, None)
    pil = Image.fromarray(image[0].permute(1, 2, 0).numpy()).resize((85, 64), Image.BILINEAR)
    assert torch.equal(resized[0].permute(1, 2, 0), torch.from_numpy(np.asarray(pil)))
    seen = []

    def forward(x):
        seen.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], 2, 8, 8)

    scores = segment(forward, image, InferenceConfig(mode="whole", resize_short=64))
    assert seen == [(64, 85)] and scores.shape == (1, 2, 30, 40)


def _reference_window_attention(block: GuidedSwinBlock, x, guidance, h, w):
    """Explicit softmax attention per window on the concatenated [x; guidance], shift and -100 mask included."""
    b, n, c = x.shape
    guidance = guidance.repeat_interleave(b // guidance.shape[0], dim=0)
    window, shift = block._geometry(h, w)
    y = block.norm1(x).view(b, h, w, c)
    y = torch.cat([y, guidance.view(b, h, w, -1)], dim=-1)
    if shift:
        y = torch.roll(y, (-shift, -shift), (1, 2))
    win = window_partition(y, window)
    attn = block.attn
    heads = attn.num_heads
    q = attn.q(win).view(win.shape[0], -1, heads, c // heads).transpose(1, 2)
    k = attn.k(win).view(win.shape[0], -1, heads, c // heads).transpose(1, 2)
    v = attn.v(win[..., :c]).view(win.shape[0], -1, heads, c // heads).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / (c // heads) ** 0.5
    if shift:
        mask = _shift_mask(h, w, window, shift)
        logits = logits + mask.repeat(b, 1, 1).unsqueeze(1)
    out = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(win.shape[0], -1, c))
    out = out.view(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = x + out.reshape(b, n, c)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("slices", [1, 3])
def test_swin_block_equals_explicit_attention(shift, slices):
    torch.manual_seed(0)
    block = GuidedSwinBlock(16, 8, num_heads=2, window_size=4, shift_size=shift)
    x, guidance = torch.randn(2 * slices, 64, 16), torch.randn(2, 64, 8)  # guidance shared by the slices
    torch.testing.assert_close(
        block(x, guidance, 8, 8), _reference_window_attention(block, x, guidance, 8, 8), atol=1e-5, rtol=1e-4
    )


def test_linear_attention_formula_and_equivariance():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 2, 4), torch.randn(2, 7, 2, 4), torch.randn(2, 7, 2, 3)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    num = torch.einsum("nlhd,nshd,nshv->nlhv", phi_q, phi_k, v)
    den = torch.einsum("nlhd,nshd->nlh", phi_q, phi_k)[..., None]
    torch.testing.assert_close(linear_attention(q, k, v), num / (den + 1e-6), atol=1e-5, rtol=1e-4)
    layer = ClassAggregationLayer(dim=8, guidance_dim=4, num_heads=2, pad_len=10)
    x, g = torch.randn(1, 8, 6, 4, 4), torch.randn(1, 6, 4)
    perm = torch.tensor([5, 2, 0, 1, 4, 3])
    torch.testing.assert_close(
        layer(x[:, :, perm], g[:, perm], pool=2), layer(x, g, pool=2)[:, :, perm], atol=1e-5, rtol=1e-4
    )


def test_class_aggregation_and_decoder_equal_explicit_concatenation():
    """Broadcast guidance terms equal the concatenate-T-copies formulation of the official code."""
    from ovseg_lab.models.catseg import UpBlock

    torch.manual_seed(0)
    layer = ClassAggregationLayer(dim=8, guidance_dim=4, num_heads=2)
    x, g = torch.randn(2, 8, 5, 3, 3), torch.randn(2, 5, 4)
    tokens = x.permute(0, 3, 4, 2, 1).reshape(2 * 9, 5, 8)  # (B*h*w, T, C)
    norm = layer.norm1(tokens)
    cat = torch.cat([norm, g.repeat_interleave(9, dim=0)], dim=-1)
    att = layer.attention
    split = lambda t: t.reshape(*t.shape[:2], 2, 4)  # noqa: E731
    ref = tokens + linear_attention(split(att.q(cat)), split(att.k(cat)), split(att.v(norm))).reshape(18, 5, 8)
    ref = ref + layer.mlp(layer.norm2(ref))
    ref = x + ref.reshape(2, 3, 3, 5, 8).permute(0, 4, 3, 1, 2)
    torch.testing.assert_close(layer(x, g, pool=1), ref, atol=1e-5, rtol=1e-4)

    up = UpBlock(16, 8, 4)
    feats, guide = torch.randn(2 * 5, 16, 4, 4), torch.randn(2, 4, 8, 8)
    expected = up.conv(torch.cat([up.up(feats), guide.repeat_interleave(5, dim=0)], dim=1))
    torch.testing.assert_close(up(feats, guide), expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- official checkpoint import
# Conversion of the official layout is proven against the official code in tests/golden/test_golden_catseg.py.
def test_convert_script_refuses_mismatched_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"sem_seg_head.predictor.transformer.conv1.weight": torch.zeros(1)}}, bad)
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/convert_checkpoint.py",
            "--format",
            "catseg",
            "--input",
            str(bad),
            "--output",
            str(tmp_path / "out.ckpt"),
            "--",
            "clip=tiny",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "missing" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.ckpt").exists()


def test_count_params_prints_json_last():
    proc = subprocess.run(
        [sys.executable, "-m", "ovseg_lab.tools.count_params", "model=catseg", "clip=tiny", "finetune=qv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    # tiny CLIP qv: 4 visual blocks x 2 x 128^2 + 2 text blocks x 2 x 64^2
    assert counts["clip"] == 4 * 2 * 128 * 128 + 2 * 2 * 64 * 64
    assert counts["total"] == counts["clip"] + counts["head"] and counts["head"] > 0


# paper Table 6 (M learnable parameters incl. the 5.8M head); qv_img is 0.6M above the arithmetic in the paper
TABLE6 = {
    "freeze": 5.8,
    "prompt": 7.0,
    "full": 393.2,
    "attn": 134.9,
    "qk": 70.3,
    "kv": 70.3,
    "qv_img": 56.7,
    "qv_txt": 19.9,
    "qv": 70.3,
}
CLIP_ARITHMETIC = {
    "qv": 64_487_424,
    "attn": 129_110_016,
    "full": 387_363_840,
    "freeze": 0,
    "qk": 64_487_424,
    "kv": 64_487_424,
    "qv_img": 50_331_648,
    "qv_txt": 14_155_776,
    "prompt": 1_228_800,
}


@pytest.mark.slow
@pytest.mark.parametrize("finetune", sorted(TABLE6))
def test_vitl_counts_match_table6(finetune):
    from ovseg_lab.build import build_net
    from ovseg_lab.tools.count_params import count_learnable

    counts = count_learnable(build_net(["model=catseg", "clip=vitl14", f"finetune={finetune}"]))
    assert counts["clip"] == CLIP_ARITHMETIC[finetune]
    assert counts["head"] == 5_782_753
    tolerance = 0.011 if finetune == "qv_img" else 0.01
    assert abs(counts["total"] / 1e6 - TABLE6[finetune]) <= tolerance * TABLE6[finetune]


# ---------------------------------------------------------------------------- in-place evaluation path
@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize(
    "elements,decoder_pixels",
    [
        (100 * 16, 3 * 64),  # 1 class slice (Swin), 14 pixels (class aggregation), 3 classes (decoder) per step
        (500 * 16, 7 * 64),  # one whole image (7 classes x 8x8 = 448 tokens) per step
    ],
)
def test_head_in_place_chunked_path_equals_autograd_path(pool, elements, decoder_pixels, monkeypatch):
    """Without autograd the head works in place on its pixel-major tensor, a few classes / pixels / images per
    step; with autograd the same computation runs out of place in one step. Same logits (fp32 sums reordered
    only), any chunking."""
    import ovseg_lab.models.catseg as catseg

    torch.manual_seed(0)
    head = CATSegHead(
        32,
        48,
        hidden_dim=16,
        num_heads=2,
        window_size=4,
        appearance_guidance_proj_dim=8,
        text_guidance_proj_dim=8,
        decoder_dims=(16, 8),
        decoder_guidance_dims=(8, 8),
        decoder_guidance_proj_dims=(4, 4),
        pad_len=10,
    ).eval()
    for p in head.parameters():  # no constant weights: norms, biases and padding tokens matter too
        p.data.add_(0.1 * torch.randn_like(p))
    dense, text = torch.randn(2, 32, 8, 8), torch.randn(2, 7, 1, 32)
    inter = [torch.randn(2, 48, 8, 8), torch.randn(2, 48, 8, 8)]
    reference = head(dense, inter, text, class_pool=pool)  # autograd on: out of place
    assert reference.requires_grad
    with torch.no_grad():
        whole = head(dense, inter, text, class_pool=pool)
        chunked = head(dense, inter, text, class_pool=pool, class_chunk=2)
        monkeypatch.setattr(catseg, "WORKING_ELEMENTS", elements)  # hidden 16
        monkeypatch.setattr(catseg, "DECODER_PIXELS", decoder_pixels)
        small_steps = head(dense, inter, text, class_pool=pool)
    for out in (whole, chunked, small_steps):
        torch.testing.assert_close(out, reference.detach(), atol=1e-5, rtol=1e-4)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``fn`` runs (checkpointed regions keep theirs
    to themselves: what is counted is what stays alive until the backward pass)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, total


def test_train_class_chunk_keeps_gradients_and_bounds_saved_activations():
    """Training with class chunks (checkpointed): the same logits and gradients, a fraction of the activations."""
    images, names = torch.rand(2, 3, 32, 32), [f"object number {i}" for i in range(12)]
    labels = torch.randint(0, len(names), (2, 32, 32))
    results = []
    for chunk in (None, 3):
        model = tiny_catseg(seed=1).train()
        model.train_class_chunk = chunk
        logits, saved = _saved_bytes(lambda model=model: model(images, names))
        model.loss(logits, labels).backward()
        grads = {k: p.grad.clone() for k, p in model.head.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads, saved))
    (whole, whole_grads, whole_saved), (chunked, chunked_grads, chunked_saved) = results
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)
    assert whole_grads.keys() == chunked_grads.keys() and len(whole_grads) > 50
    for key, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[key], grad, atol=1e-6, rtol=1e-3, msg=key)
    assert chunked_saved < 0.5 * whole_saved, (chunked_saved, whole_saved)
