"""scripts/predict.py with a checkpoint of every method: tiny random-init models saved the way training saves them.

The checkpoint goes through Lightning's ``Trainer.save_checkpoint`` (the ``on_save_checkpoint`` hook stores the
resolved run config), then ``build.model_from_checkpoint`` rebuilds the model from that config alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import compose

METHODS = ["catseg", "costvolume", "lseg", "ovseg", "ovsegmentor", "groupvit"]
CLASSES = "red circle,plain sky,striped grass"


def _run_config(data_dir: Path, model: str, run_dir: Path, extra: list[str] = ()) -> tuple:
    """(config to build from, resolved YAML stored in the checkpoint) for ``experiment=quickstart model=...``."""
    from omegaconf import open_dict

    from ovseg_lab.preflight import resolved_yaml

    cfg = compose(
        "train", ["experiment=quickstart", f"model={model}", f"paths.data_dir={data_dir}", *extra], run_dir=run_dir
    )
    stored = cfg.copy()
    with open_dict(stored):
        del stored["hydra"]  # train.py's config has no hydra node
    return cfg, resolved_yaml(stored)


def save_toy_checkpoint(data_dir: Path, model: str, path: Path, state_filter=None) -> torch.nn.Module:
    """A tiny random-init ``model`` saved like ModelCheckpoint saves it; returns the module."""
    import lightning as L
    from hydra.utils import instantiate

    from ovseg_lab.build import resolved_model_config

    # OVSeg's toy run points at its stages' outputs (MaskFormer checkpoint, adapted CLIP), which do not exist here:
    # build without them, but store the config as training would, paths included (a moved checkpoint).
    build_extra = ["model.net.maskformer_weights=null", "model.net.clip_weights=null"] if model == "ovseg" else []
    cfg, _ = _run_config(data_dir, model, path.parent / model, build_extra)
    _, stored_yaml = _run_config(data_dir, model, path.parent / model)
    torch.manual_seed(0)
    module = instantiate(resolved_model_config(cfg))
    module.run_config_yaml = stored_yaml
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    if state_filter is not None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if state_filter(k)}
        torch.save(checkpoint, path)
    return module.eval()


@pytest.fixture(scope="module")
def images(toy_data_dir) -> Path:
    return toy_data_dir / "toy" / "toy_unseen" / "images" / "val"


@pytest.mark.parametrize("model", METHODS)
def test_predict_cli_with_a_checkpoint_of_every_method(model, toy_data_dir, images, tmp_path, capsys):
    from ovseg_lab.vocab import vocabulary_from_names
    from scripts.predict import main

    ckpt = tmp_path / f"{model}.ckpt"
    original = save_toy_checkpoint(toy_data_dir, model, ckpt)
    folder = tmp_path / "imgs"
    folder.mkdir()
    picked = sorted(images.iterdir())[:2]
    for image in picked:
        (folder / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--image", str(folder), "--classes", CLASSES, "--output", str(out)]) == 0
    names = CLASSES.split(",")
    vocabulary = vocabulary_from_names(CLASSES)
    for image in picked:
        labels = np.array(Image.open(out / f"{image.stem}_labels.png"))
        rgb = np.array(Image.open(image).convert("RGB"))
        assert labels.shape == rgb.shape[:2] and labels.max() < len(names)
        # the reloaded model predicts what the saved one predicts (weights and config round-trip)
        expected = original.predict_scores(torch.from_numpy(rgb).permute(2, 0, 1)[None], vocabulary).argmax(dim=1)[0]
        np.testing.assert_array_equal(labels, expected.numpy())
        areas = json.loads((out / f"{image.stem}_areas.json").read_text())["areas"]
        assert set(areas) == {names[i] for i in np.unique(labels)}
        assert sum(a["pixels"] for a in areas.values()) == labels.size
        overlay = Image.open(out / f"{image.stem}_overlay.png")
        assert set(json.loads(overlay.text["legend"])) == set(areas)
    assert "_overlay.png" in capsys.readouterr().out


def test_ovseg_checkpoint_adapted_without_mask_prompts_loads(toy_data_dir, tmp_path):
    """A CLIP adapted by FT alone has no mask prompts: the rebuilt OVSeg must drop them, not refuse the checkpoint."""
    from ovseg_lab.build import model_from_checkpoint

    ckpt = tmp_path / "ovseg_ft.ckpt"
    save_toy_checkpoint(toy_data_dir, "ovseg", ckpt, state_filter=lambda k: not k.endswith("mask_prompts"))
    module, _ = model_from_checkpoint(ckpt)
    assert module.net.clip.mask_prompts is None


def test_background_threshold_makes_background_win_where_no_class_is_confident(toy_data_dir, images, tmp_path):
    from scripts.predict import main

    ckpt = tmp_path / "ovsegmentor.ckpt"
    save_toy_checkpoint(toy_data_dir, "ovsegmentor", ckpt)
    image = sorted(images.iterdir())[0]
    args = ["--checkpoint", str(ckpt), "--image", str(image), "--classes", "background,red circle,plain sky"]
    assert main(args + ["--output", str(tmp_path / "all"), "--background-threshold", "1.0"]) == 0
    labels = np.array(Image.open(tmp_path / "all" / f"{image.stem}_labels.png"))
    # threshold 1: min(1, best group score) is the best score itself, so every pixel below it is background
    assert (labels == 0).mean() > 0.5
    assert main(args + ["--output", str(tmp_path / "bad"), "--background-threshold", "2"]) == 2
    ck2 = tmp_path / "costvolume.ckpt"
    save_toy_checkpoint(toy_data_dir, "costvolume", ck2)
    assert (
        main(
            [
                "--checkpoint",
                str(ck2),
                "--image",
                str(image),
                "--classes",
                "background,sky",
                "--output",
                str(tmp_path / "cv"),
                "--background-threshold",
                "0.9",
            ]
        )
        == 2
    )
