"""Checkpoints (atomic writes, weights_only loads, mismatch messages), config checks before data loads, and the
non-finite-loss policy."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import ConfigCompositionException

from ovseg_lab.config_checks import config_problems
from ovseg_lab.errors import SetupError
from ovseg_lab.lit.checkpoint_io import AtomicCheckpointIO
from ovseg_lab.lit.resume import resolve_ckpt_path
from tests.conftest import CONF_DIR, compose


class Pickled:  # any Python object that is not a tensor or a plain container
    pass


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_save_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # "Can't pickle local object"
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "hook": lambda: None}, path)  # unpicklable
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary left behind
    # weights_only=True: a checkpoint holding pickled objects is refused with a message
    torch.save({"state_dict": {}, "extra": Pickled()}, tmp_path / "pickled.ckpt")
    with pytest.raises(SetupError, match=r"pickled.ckpt.*weights_only=True"):
        io.load_checkpoint(tmp_path / "pickled.ckpt")
    # a truncated file (what a non-atomic writer leaves after SIGKILL)
    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(SetupError, match="cut.ckpt.*truncated"):
        io.load_checkpoint(tmp_path / "cut.ckpt")


@pytest.mark.parametrize("steps, saved", [(7, [5, 7]), (10, [5, 10])])
def test_last_checkpoint_holds_the_final_weights_whatever_the_save_schedule(tmp_path, steps, saved):
    import lightning as L

    from ovseg_lab.lit.checkpoint_io import FinalStepCheckpoint

    class Line(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return ((self.w - batch) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    writes = []

    class Counting(AtomicCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            writes.append(checkpoint["global_step"])
            return super().save_checkpoint(checkpoint, path, storage_options)

    callback = FinalStepCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=5)
    module = Line()
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[callback],
        plugins=[Counting()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=1))
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == steps and torch.equal(last["state_dict"]["w"], module.w.detach())
    assert writes == saved  # the final step once, not twice when the schedule already saved it
    with pytest.raises(SetupError, match="save_last=link is not supported"):
        FinalStepCheckpoint(dirpath=tmp_path, save_last="link")


def test_ckpt_path_last_resolves_in_the_run_directory(tmp_path):
    assert resolve_ckpt_path(None, tmp_path) is None
    with pytest.raises(SetupError, match=r"ckpt_path=last: no checkpoint at .*checkpoints/last.ckpt.*hydra.run.dir"):
        resolve_ckpt_path("last", tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(SetupError, match="ckpt_path=/nope.ckpt: no such checkpoint"):
        resolve_ckpt_path("/nope.ckpt", tmp_path)


def test_checkpoint_of_another_model_or_shape_is_a_clear_error():
    from hydra.utils import instantiate

    from ovseg_lab.build import resolved_model_config
    from ovseg_lab.runner import check_fits, load_weights

    cfg = compose("train", ["experiment=quickstart", "model=costvolume"])
    module = instantiate(resolved_model_config(cfg))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    load_weights(module, {"state_dict": state})  # its own weights fit
    # another shape (e.g. another vocabulary size / CLIP width): names the key and both shapes
    key = next(k for k, v in state.items() if v.ndim == 2)
    wrong = {**state, key: torch.zeros(state[key].shape[0] + 1, state[key].shape[1])}
    with pytest.raises(SetupError, match=rf"ckpt.pt does not fit .*CostVolumeBaseline.*1 with other shapes.*{key}"):
        check_fits(module, {"state_dict": wrong, "ovseg_net_class": "x.CostVolumeBaseline"}, "Checkpoint ckpt.pt")
    # another model: missing and unexpected keys, and what it was trained with
    other = {f"net.aggregator.{k}": v for k, v in list(state.items())[:5]}
    with pytest.raises(SetupError, match=r"trained with ovseg_lab.models.catseg.CATSeg.*missing keys.*unexpected"):
        check_fits(module, {"state_dict": other, "ovseg_net_class": "ovseg_lab.models.catseg.CATSeg"}, "Checkpoint c")


def test_unknown_keys_fail_at_compose_time_with_hydras_message():
    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        compose("train", ["experiment=quickstart", "trainer.max_stepz=3"])
    with pytest.raises(ConfigCompositionException, match="finetune"):
        compose("train", ["experiment=quickstart", "finetune=qv_both"])  # no such option of the group


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_steps=abc", "trainer.max_steps='abc' must be an integer"),
        ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
        ("data.max_bad_fraction=2", "data.max_bad_fraction=2 must be a number in [0, 1]"),
        ("trainer.precision=15", "trainer.precision=15 is not a Lightning precision"),
        ("model.nonfinite_loss=ignore", "model.nonfinite_loss='ignore' must be one of"),
        ("finetune.strategy=qvk", "Unknown finetune strategy 'qvk'"),
        ("model.inference.mode=tile", "inference.mode must be 'whole', 'slide' or 'multiscale'"),
    ],
)
def test_invalid_values_are_named(override, message):
    cfg = compose("train", ["experiment=quickstart", override])
    assert any(message in p for p in config_problems(cfg)), config_problems(cfg)


def test_incompatible_combinations_are_named():
    cfg = compose(
        "train", ["experiment=quickstart", "finetune=prompt", "finetune.prompt_length=4", "finetune.prompt_depth=9"]
    )
    assert any("prompt_depth=9 exceeds the 4 blocks of the image tower" in p for p in config_problems(cfg))
    cfg = compose("train", ["experiment=quickstart", "model=catseg", "aggregation.input=pixels"])
    assert any("aggregation.input must be 'cost' or 'feature'" in p for p in config_problems(cfg))
    cfg = compose("train", ["experiment=quickstart", "trainer=cpu", "trainer.precision=16-mixed"])
    assert any("needs a GPU" in p for p in config_problems(cfg))


def test_every_experiment_passes_the_config_checks():
    experiments = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    bad = {}
    for name in experiments:
        problems = config_problems(compose("train", [f"experiment={name}"]))
        if problems and all("local -m sweep" in p for p in problems):
            # multi-GPU DDP sweeps (OVSegmentor's paper tables) are launched one SLURM job per point, as their
            # headers say; everything else about them must pass
            problems = config_problems(compose("train", [f"experiment={name}", "hydra/launcher=slurm"]))
        if problems:
            bad[name] = problems
    assert not bad


def test_a_bad_config_fails_before_any_data_is_touched(tmp_path):
    from ovseg_lab.runner import train

    data_dir = tmp_path / "data"
    cfg = compose(
        "train",
        ["experiment=quickstart", "model=costvolume", f"paths.data_dir={data_dir}", "finetune.strategy=qvk"],
        run_dir=tmp_path / "run",
    )
    with pytest.raises(SetupError, match="Invalid configuration.*finetune strategy 'qvk'"):
        train(cfg)
    assert not data_dir.exists()  # the toy benchmark was not even generated


def _dense_module(policy: str):
    from ovseg_lab.lit.dense import DenseSupervisedModule

    class NanNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def loss(self, logits, labels):
            return logits.mean() * float("nan")

    module = DenseSupervisedModule(NanNet(), nonfinite_loss=policy)
    module._trainer = SimpleNamespace(
        is_global_zero=True, global_step=12, progress_bar_callback=None
    )  # what the hooks read of the trainer
    module.training_logits = lambda batch, images: images * module.net.w
    return module


def test_nonfinite_loss_stops_naming_the_batch_or_skips_it():
    from ovseg_lab.lit.dense import NonFiniteLossError

    batch = {
        "image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
        "label": torch.zeros(2, 4, 4, dtype=torch.long),
        "stem": ["img_007", "img_042"],
    }
    with pytest.raises(
        NonFiniteLossError, match=r"global step 12, batch 5 \(images \['img_007', 'img_042'\]\).*nonfinite_loss=skip"
    ):
        _dense_module("raise").training_step(batch, 5)
    module = _dense_module("skip")
    assert module.training_step(batch, 5) is None and module.skipped_batches == 1  # no loss: no update
    # a batch whose samples were all unreadable trains nothing
    assert module.training_step({"image": [], "label": [], "stem": []}, 6) is None
