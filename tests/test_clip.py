"""CLIP layer: split attention, dense features, fine-tuning strategies, prompts, text cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovseg_lab.clip import STRATEGIES, CLIPBackbone, SplitQKVAttention
from ovseg_lab.errors import SetupError

TINY = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=3, width=64, patch_size=8, head_width=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
)


def tiny_clip(**kwargs) -> CLIPBackbone:
    torch.manual_seed(0)
    kwargs.setdefault("feature_layers", (0, 1))
    return CLIPBackbone("tiny", None, model_cfg=TINY, **kwargs)


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_equals_multihead(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    split = SplitQKVAttention.from_multihead(mha)
    x = torch.randn(3, 5, 32) if batch_first else torch.randn(5, 3, 32)  # 3 sequences of 5 tokens
    mask = torch.full((5, 5), float("-inf")).triu(1)
    for m in (None, mask):
        expected = mha(x, x, x, need_weights=False, attn_mask=m)[0]
        torch.testing.assert_close(split(x, x, x, attn_mask=m)[0], expected, atol=1e-5, rtol=1e-5)


def test_dense_features_match_reference_formula():
    """Last block without attention mixing, written out by hand from the open_clip weights."""
    clip = tiny_clip().eval()
    images = torch.randn(2, 3, 32, 32)
    out = clip.encode_dense(images)

    visual = clip.model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    hidden = []
    for block in visual.transformer.resblocks[:-1]:
        y = block.ln_1(x)
        attn = block.attn
        q, k, v = (
            F.linear(y, w, b)
            for w, b in zip((attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight), attn.in_proj_bias.chunk(3))
        )
        heads = lambda t: t.reshape(2, -1, 2, 32).transpose(1, 2)  # noqa: E731 (2 heads of 32)
        weights = (heads(q) @ heads(k).transpose(-1, -2) / 32**0.5).softmax(-1)
        x = x + attn.out_proj((weights @ heads(v)).transpose(1, 2).reshape(2, -1, 64))
        x = x + block.mlp(block.ln_2(x))
        hidden.append(x)
    last = visual.transformer.resblocks[-1]
    v = F.linear(last.ln_1(x), last.attn.v_proj_weight, last.attn.in_proj_bias[128:])
    y = last.attn.out_proj(v) + x[:, :1]
    y = y + last.mlp(last.ln_2(y))
    ref = visual.ln_post(y) @ visual.proj
    ref_dense = ref[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)

    torch.testing.assert_close(out.dense, ref_dense, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        out.intermediates[1], hidden[1][:, 1:].transpose(1, 2).reshape(2, 64, 4, 4), atol=1e-5, rtol=1e-4
    )
    assert out.dense.shape == (2, 32, 4, 4) and len(out.intermediates) == 2


def test_position_embeddings_follow_the_input_size():
    clip = tiny_clip().eval()
    out = clip.encode_dense(torch.randn(1, 3, 48, 64))
    assert out.dense.shape == (1, 32, 6, 8)


def test_float64_model_keeps_float64_text_and_position_grid():
    """No float32 round trip in a float64 model (the float64 golden training steps depend on it); fp32 stays fp32."""
    clip = tiny_clip().double().eval()
    assert clip.encode_vocabulary(["sky"]).dtype == torch.float64
    pos = clip.model.visual.positional_embedding
    side = int((pos.shape[0] - 1) ** 0.5)
    grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)[0]
    resized = clip._positional_embedding((6, 8))
    assert resized.dtype == torch.float64 and torch.equal(resized[1:], expected)
    assert tiny_clip().encode_vocabulary(["sky"]).dtype == torch.float32


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_trains_exactly_its_parameters(strategy):
    finetune = {"strategy": strategy, "prompt_length": 3 if strategy == "prompt" else 0, "prompt_depth": 0}
    clip = tiny_clip(finetune=finetune)
    trainable = {n for n, p in clip.named_parameters() if p.requires_grad}
    frozen_always = (
        "model.visual.conv1",
        "model.visual.class_embedding",
        "model.visual.positional_embedding",
        "model.visual.ln_pre",
        "model.visual.ln_post",
        "model.visual.proj",
        "model.token_embedding",
        "model.positional_embedding",
        "model.ln_final",
        "model.text_projection",
        "model.logit_scale",
    )
    assert not [n for n in trainable if n.startswith(frozen_always)]
    visual = {n for n in trainable if n.startswith("model.visual.transformer")}
    text = {n for n in trainable if n.startswith("model.transformer")}
    suffixes = {n.split(".attn.")[-1] for n in visual | text if ".attn." in n}
    expected = {
        "freeze": set(),
        "prompt": set(),
        "full": None,
        "attn": {"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"},
        "qk": {"q_proj_weight", "k_proj_weight"},
        "kv": {"k_proj_weight", "v_proj_weight"},
        "qv": {"q_proj_weight", "v_proj_weight"},
        "qv_img": {"q_proj_weight", "v_proj_weight"},
        "qv_txt": {"q_proj_weight", "v_proj_weight"},
    }[strategy]
    if expected is not None:
        assert suffixes == expected
    assert bool(visual) == (strategy in ("full", "attn", "qk", "kv", "qv", "qv_img"))
    assert bool(text) == (strategy in ("full", "attn", "qk", "kv", "qv", "qv_txt"))
    assert ("visual_prompts" in trainable) == (strategy == "prompt")
    if strategy == "full":
        assert any(".mlp." in n for n in visual) and any(".ln_1." in n for n in text)

    # gradients reach the trainable parameters and nothing else
    dense = clip.encode_dense(torch.randn(2, 3, 32, 32)).dense
    loss = dense.square().mean() + clip.encode_vocabulary(["red circle", "blue square"]).sum()
    if strategy == "freeze":
        assert not loss.requires_grad
        return
    loss.backward()
    with_grad = {n for n, p in clip.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= trainable


def test_prompt_tokens_change_features_at_any_depth():
    for depth in (1, 2, 3):
        clip = tiny_clip(finetune={"strategy": "prompt", "prompt_length": 2, "prompt_depth": depth}).eval()
        images = torch.randn(1, 3, 32, 32)
        base = clip.encode_dense(images).dense
        with torch.no_grad():
            clip.visual_prompts.add_(1.0)
        changed = clip.encode_dense(images).dense
        # The prompts of the blocks before the last one feed the output; shapes never change with depth.
        assert base.shape == changed.shape == (1, 32, 4, 4)
        assert not torch.allclose(base, changed)
    with pytest.raises(SetupError):
        tiny_clip(finetune={"strategy": "prompt", "prompt_length": 2, "prompt_depth": 4})


def test_mask_prompt_replaces_only_fully_masked_patches():
    clip = tiny_clip(mask_prompt_depth=2).eval()
    tokens = torch.randn(1, 16, 64)
    keep = torch.zeros(1, 16)
    keep[0, :5] = 1  # patches with some foreground stay
    replaced = clip._apply_mask_prompt(tokens, keep, 0)
    torch.testing.assert_close(replaced[0, :5], tokens[0, :5])
    torch.testing.assert_close(replaced[0, 5:], clip.mask_prompts[0, 5:])
    images = torch.randn(1, 3, 32, 32)
    assert clip.encode_image(images, keep).shape == (1, 32)
    assert not torch.allclose(clip.encode_image(images, keep), clip.encode_image(images))


def test_text_cache_runs_once_per_vocabulary_and_invalidates_after_a_step():
    clip = tiny_clip(finetune="qv")
    optimizer = torch.optim.SGD([p for p in clip.parameters() if p.requires_grad], lr=0.1)
    vocab_a, vocab_b = ["red circle", "blue square"], ["grass", "sky", "water"]
    with torch.no_grad():
        calls = clip.text_tower_calls
        first = clip.encode_vocabulary(vocab_a)
        for _ in range(5):  # an eval loop over many batches
            clip.encode_vocabulary(vocab_a)
        assert clip.text_tower_calls == calls + 1
        assert clip.encode_vocabulary(vocab_b).shape == (3, 1, 32)  # a second vocabulary is not served the first
        assert clip.text_tower_calls == calls + 2
    # a training step on the text tower changes its weights: the next eval must recompute
    loss = clip.encode_vocabulary(vocab_a).sum()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        calls = clip.text_tower_calls
        again = clip.encode_vocabulary(vocab_a)
        assert clip.text_tower_calls == calls + 1
        assert not torch.allclose(first, again)


def test_templates_and_synonyms():
    clip = tiny_clip(templates="vild14", synonyms="mean")
    emb = clip.encode_vocabulary(["building, edifice", "sky"])
    assert emb.shape == (2, 14, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 14))
    first = tiny_clip(templates="vild14", synonyms="first").encode_vocabulary(["building, edifice"])
    assert not torch.allclose(emb[:1], first)
    with pytest.raises(SetupError):
        tiny_clip(templates="nope")
    with pytest.raises(SetupError):
        tiny_clip(templates=["no placeholder"])


def test_weights_file_initialises_the_towers(tmp_path):
    """clip.weights: the towers of another backbone (e.g. the toy pre-training stage's export) replace the random
    init, under any fine-tuning strategy; a file of another architecture is refused, naming the option."""
    source = tiny_clip(finetune="full")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "clip_adapted.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    loaded = CLIPBackbone("tiny", None, model_cfg=TINY, feature_layers=(0, 1), finetune="qv", weights=str(path))
    for name, value in source.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert loaded.model.visual.transformer.resblocks[0].attn.q_proj_weight.requires_grad  # qv still trains
    assert not loaded.model.visual.transformer.resblocks[0].attn.k_proj_weight.requires_grad

    wider = dict(TINY, embed_dim=48)
    with pytest.raises(SetupError, match=r"clip\.weights.*other shapes"):
        CLIPBackbone("tiny", None, model_cfg=wider, feature_layers=(0, 1), weights=str(path))
    with pytest.raises(SetupError, match=r"CLIP weights file not found: .*absent\.pt \(clip\.weights\)"):
        CLIPBackbone("tiny", None, model_cfg=TINY, feature_layers=(0, 1), weights=str(tmp_path / "absent.pt"))
