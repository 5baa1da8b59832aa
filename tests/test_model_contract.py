"""The net contract (docs/ARCHITECTURE.md) for every ``conf/model/*.yaml``, built tiny from its quickstart config:
``forward(images, vocabulary) -> logits (B, T, h, w)``, class-permutation equivariance, and a checkpoint round trip
through :mod:`ovseg_lab.checkpoints` (the rebuilt net gives the same logits). A new model file is covered the moment
it exists; the cost-volume baseline and OVSeg's SAM variant had no such test."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate

from ovseg_lab.config import resolved_model_config, without_init_files
from ovseg_lab.vocab import Vocabulary
from tests.conftest import CONF_DIR, TINY_SAM_CONFIG, compose

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
# the two heaviest builds (~6-7 CPU s each) run in the slow suite; their equivariance is also in test_catseg / test_ovseg
HEAVY = ("catseg", "ovseg")
CASES = [pytest.param(m, marks=pytest.mark.slow) if m in HEAVY else m for m in MODELS]
NAMES = ["red circle", "striped grass", "plain sky"]
PERMUTATION = [2, 0, 1]
TINY_SAM = {
    "_target_": "ovseg_lab.models.ovseg.SAMProposals",
    "model_name": None,
    "points_per_side": 2,
    "points_per_batch": 4,
    "pred_iou_thresh": -1e9,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 1.0,
    "config": TINY_SAM_CONFIG,
}
# per model: what makes its quickstart config tiny and offline where the quickstart alone does not
EXTRA = {"ovseg_sam": ["clip=tiny"]}
NET_EDITS = {"ovseg_sam": {"sam": TINY_SAM}}  # a random-init SAM from transformers.SamConfig, nothing downloaded


def build_net(model: str, seed: int) -> torch.nn.Module:
    from omegaconf import open_dict

    cfg = compose("train", ["experiment=quickstart", f"model={model}", *EXTRA.get(model, [])])
    model_cfg = resolved_model_config(cfg)
    without_init_files(model_cfg)  # earlier stages' outputs (OVSeg's MaskFormer, adapted CLIP) are not here
    with open_dict(model_cfg):
        model_cfg.net.update(NET_EDITS.get(model, {}))
    torch.manual_seed(seed)
    return instantiate(model_cfg.net).eval()


def logits(net: torch.nn.Module, images: torch.Tensor, names: list[str]) -> torch.Tensor:
    labels = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.long)  # OVSeg's gt-mask analysis reads them
    labels[:, :, images.shape[-1] // 2 :] = 1
    kwargs = {"labels": labels} if getattr(net, "needs_labels", False) else {}
    with torch.no_grad():
        return net(images, Vocabulary("contract", tuple(names)), **kwargs)


@pytest.mark.parametrize("model", CASES)
def test_net_contract(model, tmp_path):
    from ovseg_lab.checkpoints import load_into, read_weights

    net = build_net(model, seed=0)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = logits(net, images, NAMES)
    assert out.ndim == 4 and out.shape[:2] == (1, len(NAMES)) and torch.isfinite(out).all(), out.shape
    permuted = logits(net, images, [NAMES[i] for i in PERMUTATION])
    torch.testing.assert_close(permuted, out[:, PERMUTATION], atol=1e-4, rtol=1e-4)

    path = tmp_path / "net.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    rebuilt = copy.deepcopy(net)  # same architecture, other weights: what the file must overwrite
    with torch.no_grad():
        for parameter in rebuilt.parameters():
            parameter.add_(0.5)
    load_into(rebuilt, read_weights(path, ("net.",)), str(path), model)
    torch.testing.assert_close(logits(rebuilt, images, NAMES), out)
