"""A truncated checkpoint (a run killed while saving, a full disk, an interrupted copy) given to every loading path
gives our one-paragraph error naming the file, never a ``PytorchStreamReader failed`` traceback.

Each path is driven through its real entry function in process (a subprocess per path would cost ~10 s each): the
commands' shared guard (``ovseg_lab.cli.guarded``, ``runner.main_guard``) must print one paragraph and exit 2."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ovseg_lab.errors import SetupError
from tests.conftest import CONF_DIR, compose


@pytest.fixture(scope="module")
def truncated(tmp_path_factory) -> Path:
    whole = io.BytesIO()
    torch.save({"state_dict": {"net.weight": torch.randn(64, 64)}, "ovseg_config": "model: {}"}, whole)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    path.write_bytes(whole.getvalue()[:-64])  # the zip central directory is gone: what a killed writer leaves
    return path


def _guarded_cli(fn, *args) -> str:
    """stderr of a command run through its guard, which must exit with status 2."""
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            status = fn(*args)
        except SystemExit as stop:
            status = stop.code
    assert status == 2, err.getvalue()
    return err.getvalue()


def resume(path, tmp_path):
    from ovseg_lab.runner import main_guard, train

    cfg = compose(
        "train",
        ["experiment=quickstart", "model=costvolume", "logger=none", f"ckpt_path={path}"],
        run_dir=tmp_path / "run",
    )
    return _guarded_cli(main_guard, train, _task(cfg))


def evaluate(path, tmp_path):
    from ovseg_lab.runner import evaluate as run_eval
    from ovseg_lab.runner import main_guard

    cfg = compose(
        "eval", ["experiment=quickstart", "model=costvolume", "logger=none", f"ckpt={path}"], run_dir=tmp_path / "run"
    )
    return _guarded_cli(main_guard, run_eval, _task(cfg))


def _task(cfg):
    """As in a @hydra.main task: the hydra node lives in HydraConfig only."""
    from omegaconf import open_dict

    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def predict(path, tmp_path):
    from ovseg_lab.cli.predict import main

    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    return _guarded_cli(
        main, ["--checkpoint", str(path), "--image", str(image), "--classes", "a,b", "--output", str(tmp_path / "out")]
    )


def convert(path, tmp_path):
    from ovseg_lab.cli.convert import main

    return _guarded_cli(main, ["--format", "catseg", "--input", str(path), "--output", str(tmp_path / "c.ckpt")])


def stage_load(path, tmp_path):
    """OVSegmentor / GroupViT stage 2 reading its stage-1 checkpoint (model.init_from)."""
    from ovseg_lab.lit.caption import CaptionPretrainModule

    CaptionPretrainModule.load_stage(SimpleNamespace(net=torch.nn.Linear(2, 2)), str(path))


def stage_weights(path, tmp_path):
    """OVSeg's nets reading an earlier stage's file (clip_weights, maskformer_weights, init_weights)."""
    from ovseg_lab.checkpoints import load_state_from

    load_state_from(path, ("net.clip.", "clip.", ""))


def mining(path, tmp_path):
    from ovseg_lab.ovseg_chain import build_mining_net

    build_mining_net(OmegaConf.create({"proposals_ckpt": str(path)}))


def clip_weights(path, tmp_path):
    """A local CLIP file (clip.pretrained): the TorchScript fallback must not swallow a truncated file."""
    from ovseg_lab.clip.loading import build_open_clip

    tiny = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "clip" / "tiny.yaml").model_cfg)
    build_open_clip("tiny", str(path), model_cfg=tiny)


CLI_PATHS = [resume, evaluate, predict, convert]
FUNCTION_PATHS = [stage_load, stage_weights, mining, clip_weights]


@pytest.mark.parametrize("path_kind", CLI_PATHS, ids=lambda f: f.__name__)
def test_commands_print_one_paragraph(path_kind, truncated, tmp_path):
    text = path_kind(truncated, tmp_path)
    assert "Traceback" not in text and "Cannot read the" in text
    paragraph = text.strip().removeprefix("ERROR: ")
    assert "\n" not in paragraph, paragraph
    assert str(truncated) in paragraph and "truncated" in paragraph


@pytest.mark.parametrize("path_kind", FUNCTION_PATHS, ids=lambda f: f.__name__)
def test_loaders_raise_one_paragraph(path_kind, truncated, tmp_path):
    with pytest.raises(SetupError) as caught:
        path_kind(truncated, tmp_path)
    message = str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained torch traceback
    assert "\n" not in message and str(truncated) in message and "truncated" in message, message


def test_refused_pickles_say_so(tmp_path):
    from ovseg_lab.checkpoints import read_checkpoint

    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "callback": SimpleNamespace(a=1)}, path)
    with pytest.raises(SetupError, match=r"weights_only=True.*re-save its state dict alone"):
        read_checkpoint(path, key="ckpt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
