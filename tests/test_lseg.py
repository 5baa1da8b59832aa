"""LSeg: DPT layers, the net's contracts (resolution, label equivariance, frozen text), its recipe's optimiser."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ovseg_lab.errors import SetupError
from ovseg_lab.layers.dpt import DPTFusion, Reassemble
from ovseg_lab.lit.optim import build_param_groups
from ovseg_lab.models.lseg import ENCODERS, LSegNet, RegularizationBlock, SpatialRegularization, build_encoder
from ovseg_lab.vocab import Vocabulary
from tests.conftest import CONF_DIR

NAMES = ("red circle", "blue square", "plain sky", "striped grass", "dotted sand")


@pytest.fixture(scope="module")
def tiny_clip():
    cfg = OmegaConf.load(CONF_DIR / "clip" / "tiny.yaml")
    cfg.finetune = "full"  # LSeg must freeze the text tower whatever the finetune strategy says
    return instantiate(cfg)


def make_net(clip, encoder="vit_large_16_384", kind="none", depth=2, share=True, features=16):
    torch.manual_seed(0)
    net = LSegNet(
        clip,
        build_encoder(encoder, pretrained=False, tiny=True),
        features=features,
        regularization=SpatialRegularization(kind, depth, "relu", share),
    )
    return net.eval()


# ---------------------------------------------------------------------------------------------- DPT layers
@pytest.mark.parametrize(
    "token_stride,target_stride,expected", [(16, 4, 32), (16, 8, 16), (16, 16, 8), (16, 32, 4), (32, 4, 32), (8, 32, 4)]
)
def test_reassemble_puts_tokens_at_the_target_stride(token_stride, target_stride, expected):
    grid = 128 // token_stride
    layer = Reassemble(width=24, channels=12, token_stride=token_stride, target_stride=target_stride, readout="project")
    out = layer(torch.randn(2, 24, grid, grid), torch.randn(2, 24))
    assert out.shape == (2, 12, expected, expected)  # = 128 / target_stride


def test_project_readout_uses_the_cls_token():
    layer = Reassemble(width=8, channels=4, token_stride=16, target_stride=16, readout="project").eval()
    tokens = torch.randn(1, 8, 3, 3)
    assert not torch.allclose(layer(tokens, torch.zeros(1, 8)), layer(tokens, torch.ones(1, 8)))
    ignore = Reassemble(width=8, channels=4, token_stride=16, target_stride=16, readout="ignore").eval()
    assert torch.allclose(ignore(tokens, torch.zeros(1, 8)), ignore(tokens, torch.ones(1, 8)))


def test_dpt_fusion_returns_half_the_finest_stride():
    fusion = DPTFusion([8, 16, 32, 32], features=8).eval()
    levels = [torch.randn(2, c, 96 // s, 64 // s) for c, s in zip([8, 16, 32, 32], [4, 8, 16, 32])]
    assert fusion(levels).shape == (2, 8, 48, 32)


@pytest.mark.parametrize("encoder", ["vit_large_16_384", "resnet101"])
@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_dpt_output_resolution_equals_the_input(tiny_clip, encoder, size):
    net = make_net(tiny_clip, encoder)
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        levels = net.encoder(net.encoder.normalize(images))
        logits = net(images, Vocabulary("v", NAMES))
    assert [tuple(level.shape[-2:]) for level in levels] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]
    assert logits.shape == (2, len(NAMES), *size)


def test_inputs_off_the_32_grid_are_resized_to_it(tiny_clip):
    net = make_net(tiny_clip)
    with torch.no_grad():
        assert net(torch.rand(1, 3, 70, 50), Vocabulary("v", NAMES)).shape == (1, len(NAMES), 64, 64)


# ---------------------------------------------------------------------------------------------- equivariance
@pytest.mark.parametrize(
    "kind,share",
    [("none", True), ("depthwise", True), ("bottleneck", True), ("depthwise", False), ("bottleneck", False)],
)
def test_permuting_labels_permutes_the_logits(tiny_clip, kind, share):
    net = make_net(tiny_clip, kind=kind, depth=3, share=share)
    for block in net.decoder.regularization.blocks:  # non-trivial kernels, so the blocks change the maps
        torch.nn.init.normal_(block.label_conv.conv.weight)
    images = torch.rand(2, 3, 64, 64)
    perm = [3, 0, 4, 1, 2]
    with torch.no_grad():
        base = net(images, Vocabulary("v", NAMES))
        permuted = net(images, Vocabulary("p", tuple(NAMES[i] for i in perm)))
        plain = make_net(tiny_clip, kind="none")(images, Vocabulary("v", NAMES)) if kind != "none" else None
    torch.testing.assert_close(permuted, base[:, perm], rtol=1e-4, atol=1e-4)
    if plain is not None:
        assert not torch.allclose(base, plain, atol=1e-3)  # the blocks did something


def test_bottleneck_block_matches_a_reference_computation():
    block = RegularizationBlock("bottleneck")
    x = torch.randn(2, 4, 6, 5)
    conv = block.label_conv.conv
    reference = torch.cat([F.conv2d(x[:, t : t + 1], conv.weight, conv.bias, padding=1) for t in range(4)], dim=1)
    reference = reference + x.max(dim=1, keepdim=True).values
    torch.testing.assert_close(block(x), reference)


def test_regularization_applies_depth_blocks_and_no_activation_after_the_last():
    reg = SpatialRegularization("depthwise", depth=2, activation="relu", share_weights=True)
    with torch.no_grad():
        reg.blocks[0].label_conv.conv.weight.zero_()
        reg.blocks[0].label_conv.conv.weight[0, 0, 1, 1] = 1.0
        reg.blocks[0].label_conv.conv.bias.fill_(-1.0)
    x = torch.full((1, 2, 3, 3), 0.5)
    # block: x - 1 = -0.5 -> relu -> 0 -> block: -1 (no relu after the last block)
    assert torch.allclose(reg(x), torch.full_like(x, -1.0))
    with pytest.raises(SetupError):
        SpatialRegularization("sideways")


def test_per_image_vocabularies_match_one_vocabulary_per_call(tiny_clip):
    net = make_net(tiny_clip)
    images = torch.rand(2, 3, 64, 64)
    first, second = Vocabulary("a", ("others", "red circle")), Vocabulary("b", ("others", "plain sky"))
    with torch.no_grad():
        joint = net(images, [first, second])
        separate = torch.cat([net(images[:1], first), net(images[1:], second)])
    torch.testing.assert_close(joint, separate, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- text, loss, optimiser
def test_text_tower_is_frozen_and_logits_are_scaled_cosines(tiny_clip):
    net = make_net(tiny_clip)
    assert not any(p.requires_grad for p in net.clip.parameters())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        pixels = net.pixel_embeddings(images)
        text = net.text_embeddings(Vocabulary("v", NAMES))
        logits = net(images, Vocabulary("v", NAMES))
    assert torch.allclose(pixels.norm(dim=1), torch.ones(1, 32, 32), atol=1e-5)
    assert torch.allclose(text.norm(dim=1), torch.ones(len(NAMES)), atol=1e-5)
    # at 1/2 resolution the logits are cos / 0.07; the net then upsamples x2 (bilinear, corners aligned)
    half = torch.einsum("bchw,tc->bthw", pixels, text) / 0.07
    expected = F.interpolate(half, size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_loss_is_cross_entropy_without_ignore_pixels(tiny_clip):
    net = make_net(tiny_clip)
    logits = torch.randn(2, 3, 8, 8)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, :4] = 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[labels != 255], labels[labels != 255])
    torch.testing.assert_close(net.loss(logits, labels), expected)


def test_decoder_trains_at_ten_times_the_base_learning_rate(tiny_clip):
    net = make_net(tiny_clip)
    groups = build_param_groups(net, lr=0.004, weight_decay=1e-4, weight_decay_norm=None, weight_decay_embed=None)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decoder = list(net.decoder.parameters())
    encoder = list(net.encoder.parameters())
    assert all(lr_of[id(p)] == pytest.approx(0.04) for p in decoder)
    assert all(lr_of[id(p)] == pytest.approx(0.004) for p in encoder)
    assert not any(id(p) in lr_of for p in net.clip.parameters())  # frozen: in no group
    assert {id(p) for p in decoder + encoder} == set(lr_of)


# ---------------------------------------------------------------------------------------------- encoders
def test_every_real_encoder_has_a_tiny_counterpart_of_its_family():
    for spec in ENCODERS.values():
        if spec.tiny is not None:
            assert ENCODERS[spec.tiny].kind == spec.kind and spec.tiny in ENCODERS
    assert ENCODERS["vit_large_16_384"].hooks == (5, 11, 17, 23)
    assert ENCODERS["vit_large_16_384"].channels == (256, 512, 1024, 1024)
    assert ENCODERS["vit_base_32_384"].hooks == (2, 5, 8, 11)


def test_offline_pretrained_encoder_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import ovseg_lab.models.lseg as lseg

    monkeypatch.setattr(lseg, "_timm_weights_cached", lambda name: False)
    with pytest.raises(SetupError, match="pretrained=false"):
        build_encoder("resnet101", pretrained=True)
    with pytest.raises(SetupError, match="not found"):
        build_encoder("resnet101", pretrained=True, checkpoint="/no/such/file.safetensors")
    with pytest.raises(SetupError, match="Unknown LSeg encoder"):
        build_encoder("vit_huge")


@pytest.mark.slow
def test_vit_b32_variant_reassembles_to_the_release_pyramid():
    encoder = build_encoder("vit_base_32_384", pretrained=False)
    with torch.no_grad():
        levels = encoder(torch.randn(1, 3, 384, 384))
    assert [tuple(level.shape[1:]) for level in levels] == [(96, 96, 96), (192, 48, 48), (384, 24, 24), (768, 12, 12)]
    assert len(encoder.vit.blocks) == 12 and isinstance(encoder.vit.norm, torch.nn.Identity)


@pytest.mark.slow
def test_vit_l16_variant_parameter_count():
    encoder = build_encoder("vit_large_16_384", pretrained=False)
    vit = sum(p.numel() for p in encoder.vit.parameters())
    # ViT-L/16 (Dosovitskiy et al.: 307M with the classifier) at 384: 303.69M without classifier and final norm
    assert 303.6e6 < vit < 303.8e6
    assert len(encoder.vit.blocks) == 24 and encoder.vit.embed_dim == 1024
    assert [r.project.out_channels for r in encoder.reassemble] == [256, 512, 1024, 1024]
