"""The training-free models (MaskCLIP, SCLIP, ClearCLIP, NACLIP) outside the golden tests: eval.py, ovseg-predict and
the demo run them with no checkpoint; without CLIP weights they say how to give them; their pieces behave."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_lab.clip.dense_paths import LastBlock, neighbourhood_prior, resampled_positions
from ovseg_lab.errors import SetupError
from ovseg_lab.layers.pamr import pamr
from tests.conftest import compose

TINY_CLIP = ["clip=tiny"]


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    """Toy CLIP weights as open_clip writes them (conf/clip/tiny.yaml's architecture), built here."""
    import open_clip

    cfg = compose("eval", ["model=clearclip", *TINY_CLIP]).clip.model_cfg
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**OmegaConf.to_container(cfg, resolve=True))
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype("uint8")).save(path)
    return path


def test_training_free_models_need_no_checkpoint_and_others_do():
    from ovseg_lab.runner import needs_checkpoint

    for model in ("maskclip", "sclip", "clearclip", "naclip"):
        assert not needs_checkpoint(compose("eval", [f"model={model}", *TINY_CLIP]))
    assert needs_checkpoint(compose("eval", ["model=costvolume", *TINY_CLIP]))


def test_predict_clearclip_writes_overlays_without_a_checkpoint(tiny_clip_file, photo, tmp_path):
    from ovseg_lab.cli.predict import main

    out = tmp_path / "out"
    argv = ["--model", "clearclip", *TINY_CLIP, f"clip.pretrained={tiny_clip_file}", "--image", str(photo)]
    assert main([*argv, "--classes", "red circle,plain sky", "--output", str(out)]) == 0
    assert (out / "photo_overlay.png").is_file() and (out / "photo_labels.png").is_file()
    areas = json.loads((out / "photo_areas.json").read_text())
    assert set(areas["areas"]) <= {"red circle", "plain sky"} and areas["areas"]


def test_predict_without_clip_weights_names_clip_pretrained_and_exits_2(photo, tmp_path, capsys, monkeypatch):
    from ovseg_lab.cli.predict import main

    monkeypatch.setattr("ovseg_lab.clip.loading.pretrained_cached", lambda *a: False)  # an empty cache
    status = main(["--model", "clearclip", "--image", str(photo), "--classes", "a,b", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2
    assert "clip.pretrained=<file>" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_predict_refuses_a_trained_model_without_checkpoint(photo, tmp_path, capsys):
    from ovseg_lab.cli.predict import main

    assert main(["--model", "costvolume", *TINY_CLIP, "--image", str(photo), "--classes", "a,b"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_demo_offers_a_training_free_model(tiny_clip_file, photo, tmp_path):
    from ovseg_lab.demo import DemoApp, parse_args

    args = parse_args(["--model", "clearclip", *TINY_CLIP, f"clip.pretrained={tiny_clip_file}"])
    app = DemoApp([], device="cpu", output_dir=tmp_path, training_free=args.model, model_overrides=args.overrides)
    assert not app.load_errors and len(app.models) == 1
    result = app.segment(str(photo), "red circle, plain sky")
    assert result.areas


def test_training_free_module_cannot_train():
    from hydra.utils import instantiate

    from ovseg_lab.config import resolved_model_config

    module = instantiate(resolved_model_config(compose("eval", ["model=sclip", *TINY_CLIP])))
    with pytest.raises(SetupError, match="training-free"):
        module.training_step({}, 0)
    assert not any(p.requires_grad for p in module.parameters())


def test_last_block_rejects_unknown_attention():
    with pytest.raises(SetupError, match="last_block.attention"):
        LastBlock("qkv")


def test_neighbourhood_prior_is_a_gaussian_of_patch_distance():
    prior = neighbourhood_prior((2, 3), std=1.0)
    assert prior.shape == (7, 7) and prior[0].abs().sum() == 0 and prior[:, 0].abs().sum() == 0
    assert torch.allclose(prior[1:, 1:].diagonal(), torch.ones(6))
    assert torch.isclose(prior[1, 2], torch.tensor(np.exp(-0.5), dtype=torch.float32))  # (0,0) - (0,1)
    assert torch.isclose(prior[1, 5], torch.tensor(np.exp(-1.0), dtype=torch.float32))  # (0,0) - (1,1)


def test_positions_are_kept_when_the_patch_count_matches():
    positions = torch.randn(17, 8)
    assert resampled_positions(positions, (2, 8)) is positions  # the releases' quirk: same count, no resampling
    assert resampled_positions(positions, (3, 5)).shape == (16, 8)


def test_pamr_keeps_constant_scores_and_smooths_within_regions():
    image = torch.zeros(1, 3, 12, 12)
    image[..., 6:] = 1.0
    constant = torch.full((1, 2, 12, 12), 0.5)
    torch.testing.assert_close(pamr(image, constant, 3, (1, 2)), constant)
    noisy = torch.rand(1, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    refined = pamr(image, noisy, 5, (1, 2))
    assert refined[..., :6].std() < noisy[..., :6].std()
