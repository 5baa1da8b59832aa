"""scripts/convert_checkpoint.py --format lseg|ovseg: synthetic checkpoints in the official key layouts (tiny shapes).

The official state dicts are produced by modules built the way the official code builds them (an OpenAI-layout
open_clip model with fused ``in_proj_weight``, a timm ViT, DPT ``act_postprocess`` Sequentials, the ``scratch``
module), so key names, nesting and shapes come from module structure, not from our converter's rename table.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.conftest import ROOT

LSEG_TOY = ["experiment=quickstart", "model=lseg"]  # tiny ViT (4 blocks, width 96, 8x8 patches), DPT width 32
OVSEG_TOY = [
    "experiment=quickstart",
    "model=ovseg",
    "clip.mask_prompt_depth=3",
    "model.net.maskformer_weights=null",
    "model.net.clip_weights=null",
]


def openai_layout_clip(mask_prompt_depth: int = 0, context_length: int = 16) -> nn.Module:
    """The tiny CLIP of conf/clip/tiny.yaml as stock open_clip builds it (fused attention projections), the
    layout of OpenAI's ``clip.load`` and of OVSeg's open_clip fork; OVSeg's mask prompts added as
    ``visual.mask_embedding`` (depth, grid*grid, width)."""
    import open_clip
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "clip" / "tiny.yaml").model_cfg, resolve=True)
    cfg["text_cfg"]["context_length"] = context_length  # OVSeg's toy CLIP reads whole captions (32 tokens)
    torch.manual_seed(1)
    model = open_clip.CLIP(**cfg)
    if mask_prompt_depth:
        grid = model.visual.grid_size
        model.visual.mask_embedding = nn.Parameter(
            torch.randn(mask_prompt_depth, grid[0] * grid[1], model.visual.conv1.out_channels)
        )
    return model.eval()


class ProjectReadout(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())


class RCU(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(features), nn.BatchNorm2d(features)


class Refine(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1, self.resConfUnit2 = RCU(features), RCU(features)


def official_lseg_state_dict(embed_dim: int) -> dict[str, torch.Tensor]:
    """An ``LSegModule`` Lightning state dict (``net.`` prefix) for the tiny encoder: ViT width 96, 8x8 patches,
    reassemble widths (24, 48, 96, 96), DPT width 32; text tower = the tiny OpenAI-layout CLIP."""
    import timm

    torch.manual_seed(2)
    net = nn.Module()
    net.clip_pretrained = openai_layout_clip()
    net.pretrained = nn.Module()
    net.pretrained.model = timm.create_model(
        "vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3
    )
    channels, width = (24, 48, 96, 96), 96
    # patch stride 8 -> strides 4, 8, 16, 32: x2 transposed conv, nothing, stride-2 conv, stride-4 (two stride-2)
    resample = [nn.ConvTranspose2d(24, 24, 2, 2), None, nn.Conv2d(96, 96, 3, 2, 1), nn.Conv2d(96, 96, 3, 2, 1)]
    for i, (c, res) in enumerate(zip(channels, resample), start=1):
        layers = [ProjectReadout(width), nn.Identity(), nn.Identity(), nn.Conv2d(width, c, 1)] + (
            [res] if res is not None else []
        )
        setattr(net.pretrained, f"act_postprocess{i}", nn.Sequential(*layers))
    net.scratch = nn.Module()
    for i, c in enumerate(channels, start=1):
        setattr(net.scratch, f"layer{i}_rn", nn.Conv2d(c, 32, 3, padding=1, bias=False))
        setattr(net.scratch, f"refinenet{i}", Refine(32))
    net.scratch.head1 = nn.Conv2d(32, embed_dim, 1)
    for module in net.modules():  # non-trivial BatchNorm statistics, so a swapped mapping changes outputs
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return {f"net.{k}": v for k, v in net.state_dict().items()}


def test_lseg_conversion_loads_with_no_missing_or_unexpected_keys_and_reproduces_text_embeddings():
    from ovseg_lab.build import build_net
    from ovseg_lab.convert.lseg import convert_lseg_state_dict

    net = build_net(LSEG_TOY)
    official = official_lseg_state_dict(net.clip.embed_dim)
    converted = convert_lseg_state_dict(official, prefix="")
    own = net.state_dict()
    assert set(converted) == set(own), (sorted(set(own) - set(converted))[:5], sorted(set(converted) - set(own))[:5])
    assert all(converted[k].shape == own[k].shape for k in own)
    net.load_state_dict(converted)
    # anchors: the official coarse-to-fine order (refinenet4 takes layer4) is our fuse[3] / project[3]
    torch.testing.assert_close(
        net.decoder.fusion.fuse[3].out_conv.weight, official["net.scratch.refinenet4.out_conv.weight"]
    )
    torch.testing.assert_close(
        net.decoder.fusion.fuse[0].skip_unit.bn2.running_var,
        official["net.scratch.refinenet1.resConfUnit1.bn2.running_var"],
    )
    torch.testing.assert_close(
        net.encoder.reassemble[0].resample.weight, official["net.pretrained.act_postprocess1.4.weight"]
    )
    torch.testing.assert_close(net.log_scale.exp(), torch.tensor(1 / 0.07))
    # reference: the OpenAI-layout CLIP itself encodes text exactly as our q/k/v-split copy
    reference = openai_layout_clip()
    tokens = net.clip.tokenize(["red circle", "plain sky"])
    with torch.no_grad():
        torch.testing.assert_close(
            net.clip.model.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=1e-5
        )
    # and the whole network runs on the converted weights
    from ovseg_lab.vocab import Vocabulary

    logits = net.eval()(torch.rand(1, 3, 64, 64), Vocabulary("v", ("a", "b")))
    assert logits.shape == (1, 2, 64, 64) and torch.isfinite(logits).all()


def test_lseg_conversion_refuses_unknown_keys():
    from ovseg_lab.convert.lseg import convert_lseg_state_dict
    from ovseg_lab.errors import SetupError

    official = {"net.scratch.head1.weight": torch.zeros(1), "net.auxiliary_head.conv.weight": torch.zeros(1)}
    with pytest.raises(SetupError, match="auxiliary_head"):
        convert_lseg_state_dict(official)


@pytest.mark.parametrize("layout", ["open_clip", "open_clip_ddp", "ovseg_detectron2"])
def test_ovseg_clip_conversion_matches_the_open_clip_reference(layout):
    from ovseg_lab.build import build_net
    from ovseg_lab.convert.ovseg import convert_ovseg_clip_state_dict

    reference = openai_layout_clip(mask_prompt_depth=3, context_length=32)
    state = reference.state_dict()
    if layout == "open_clip_ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    elif layout == "ovseg_detectron2":  # the full OVSeg checkpoint: MaskFormer parts beside the CLIP adapter
        state = {f"clip_adapter.clip_model.{k}": v for k, v in state.items()}
        state |= {
            "backbone.patch_embed.proj.weight": torch.zeros(2),
            "sem_seg_head.predictor.query_embed.weight": torch.zeros(2),
            "clip_adapter.non_object_embedding": torch.zeros(1, 64),
        }
    converted = convert_ovseg_clip_state_dict(state, prefix="")
    net = build_net(OVSEG_TOY)
    own = {k: v for k, v in net.state_dict().items() if k.startswith("clip.")}
    assert set(converted) == set(own)
    net.clip.load_state_dict({k[len("clip.") :]: v for k, v in converted.items()})
    torch.testing.assert_close(net.clip.mask_prompts, reference.visual.mask_embedding)
    images = torch.randn(2, 3, 64, 64)
    tokens = net.clip.tokenize(["red circle", "plain sky"])
    with torch.no_grad():
        torch.testing.assert_close(
            net.clip.model.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            net.clip.model.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=1e-5
        )


def test_convert_script_writes_ovseg_clip_weights_that_ovseg_loads(tmp_path):
    from ovseg_lab.build import build_net
    from scripts.convert_checkpoint import convert

    source = tmp_path / "ovseg_clip.pth"
    reference = openai_layout_clip(mask_prompt_depth=3, context_length=32)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, source)
    out, _ = convert(
        "ovseg_clip",
        source,
        tmp_path / "clip.pt",
        ["experiment=quickstart", "model=ovseg", "model.net.maskformer_weights=null", "model.net.clip_weights=null"],
    )
    net = build_net(OVSEG_TOY[:-1] + [f"model.net.clip_weights={out}"])  # OVSeg loads it as its adapted CLIP
    torch.testing.assert_close(net.clip.mask_prompts, reference.visual.mask_embedding)


def test_convert_script_refuses_a_checkpoint_of_another_model(tmp_path):
    bad = tmp_path / "lseg_like.pth"
    state = {f"module.{k}": v for k, v in openai_layout_clip(context_length=32).state_dict().items()}  # no mask prompts
    torch.save(state, bad)
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/convert_checkpoint.py",
            "--format",
            "ovseg_clip",
            "--input",
            str(bad),
            "--output",
            str(tmp_path / "o.pt"),
            "--",
            "experiment=quickstart",
            "model=ovseg",
            "model.net.maskformer_weights=null",
            "model.net.clip_weights=null",
            "clip.mask_prompt_depth=3",
        ],  # a model with prompts: the user's override beats detection
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing" in proc.stderr and "mask_prompts" in proc.stderr
    assert not (tmp_path / "o.pt").exists()


def test_converted_lseg_checkpoint_predicts_through_the_predict_path(tmp_path):
    import numpy as np

    from ovseg_lab.build import model_from_checkpoint
    from ovseg_lab.predict import predict_image
    from ovseg_lab.vocab import vocabulary_from_names
    from scripts.convert_checkpoint import convert

    source = tmp_path / "demo_e200.ckpt"
    torch.save({"epoch": 200, "state_dict": official_lseg_state_dict(64)}, source)
    out, _ = convert("lseg", source, tmp_path / "lseg.ckpt", LSEG_TOY)
    module, _ = model_from_checkpoint(out)
    torch.testing.assert_close(
        module.net.decoder.head.weight, torch.load(source, weights_only=True)["state_dict"]["net.scratch.head1.weight"]
    )
    labels = predict_image(
        module,
        np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8),
        vocabulary_from_names("cat,sofa,wall"),
    )
    assert labels.shape == (50, 70) and labels.max() < 3


def test_ovsegmentor_release_layouts_convert_to_the_same_weights():
    """The release's DINO-initialised pos_embed (N, C) and the random-init one (1, N, C) give the same tensor;
    1x1 Conv1d projector weights become Linear weights; unused modules are dropped; unknown keys are refused."""
    from ovseg_lab.convert.ovsegmentor import convert_ovsegmentor_state_dict, ovsegmentor_overrides
    from ovseg_lab.errors import SetupError

    pos = torch.randn(1, 196, 8)
    conv = torch.randn(4096, 8, 1)
    base = {
        "img_encoder.pos_embed": pos,
        "img_projector.linear_hidden.0.weight": conv,
        "multimodal_groupingblock.blocks.0.assign.q_proj.weight": torch.randn(8, 8),
        "text_encoder.transformer.pooler.dense.weight": torch.randn(8, 8),
        "logit_scale_mask": torch.zeros(()),
        "img_encoder_momentum.norm.weight": torch.ones(8),
        "multimodal_groupingblock.blocks.0.post_attn.attn.qkv.weight": torch.randn(24, 8),
    }
    batched = convert_ovsegmentor_state_dict(base)
    dino = convert_ovsegmentor_state_dict({**base, "img_encoder.pos_embed": pos[0]})
    assert set(batched) == {
        "net.image_encoder.pos_embed",
        "net.image_head.fc1.weight",
        "net.decoder.self_attn.attn.qkv.weight",
    }
    assert torch.equal(batched["net.image_encoder.pos_embed"], dino["net.image_encoder.pos_embed"])
    assert torch.equal(batched["net.image_head.fc1.weight"], conv[..., 0])
    with pytest.raises(SetupError, match="Unrecognised OVSegmentor"):
        convert_ovsegmentor_state_dict({**base, "something.else": torch.zeros(1)})
    with pytest.raises(SetupError, match="pos_embed is missing"):
        ovsegmentor_overrides({"text_projector.linear_out.weight": torch.zeros(1)})
