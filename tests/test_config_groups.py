"""Groups only some models read (clip, finetune, aggregation), the callbacks group, shard locations, and the
non-finite-loss policy of every training recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ovseg_lab.config import METHOD_GROUPS, drop_unused_groups, resolved_yaml, unused_groups
from ovseg_lab.config_checks import GROUP_READERS, config_problems
from ovseg_lab.errors import DataError
from tests.conftest import CONF_DIR, compose

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def test_the_recorded_groups_are_the_ones_the_model_reads():
    """What the config check calls 'not read' (GROUP_READERS, a sweep over it changes nothing) and what the runner
    leaves out of config_resolved.yaml (no interpolation reads it) agree for every model; finetune is the one
    semantic exception (LSeg / OVSeg interpolate it into their CLIP but freeze the tower afterwards)."""
    for model in MODELS:
        cfg = compose("train", ["experiment=quickstart", f"model={model}"])
        unread = set(unused_groups(cfg))
        for group in ("clip", "aggregation"):
            assert (group in unread) == (model not in GROUP_READERS[group]), (model, group, unread)
        assert "finetune" not in unread or model not in GROUP_READERS["finetune"], model


def _task_config(overrides, tmp_path):
    """A composed config as a @hydra.main task sees it (the hydra node in HydraConfig only)."""
    from omegaconf import open_dict

    cfg = compose("train", overrides, run_dir=tmp_path)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_ovsegmentor_records_no_clip(tmp_path):
    cfg = _task_config(["experiment=quickstart", "model=ovsegmentor"], tmp_path)
    assert drop_unused_groups(cfg) == list(METHOD_GROUPS)
    recorded = OmegaConf.create(resolved_yaml(cfg))
    assert not set(METHOD_GROUPS) & set(recorded)
    assert recorded.model.net._target_.endswith("OVSegmentor")  # the rest resolves without them
    catseg = _task_config(["experiment=quickstart"], tmp_path)
    assert drop_unused_groups(catseg) == [] and "clip" in OmegaConf.create(resolved_yaml(catseg))


def test_a_clip_choice_for_a_model_without_one_is_refused():
    cfg = compose(
        "train", ["experiment=quickstart", "model=ovsegmentor", "clip=vitl14", "finetune=qk", "aggregation=feature"]
    )
    problems = " ".join(config_problems(cfg))
    for group in ("clip=vitl14", "finetune=qk", "aggregation=feature"):
        assert f"{group}: model=ovsegmentor does not read" in problems


def test_callbacks_none_installs_only_the_bad_sample_report():
    from lightning.pytorch.callbacks import LearningRateMonitor

    from ovseg_lab.lit.bad_sample_report import BadSampleReport
    from ovseg_lab.lit.checkpoint_io import FinalStepCheckpoint
    from ovseg_lab.runner import run_callbacks

    none = run_callbacks(compose("train", ["experiment=quickstart", "callbacks=none"]), has_logger=True)
    assert [type(c) for c in none] == [BadSampleReport]
    default = run_callbacks(compose("train", ["experiment=quickstart"]), has_logger=False)
    kinds = [type(c) for c in default]
    assert kinds.count(BadSampleReport) == 1 and FinalStepCheckpoint in kinds and LearningRateMonitor not in kinds


def test_one_shard_resolver_for_captions_and_pairs(tmp_path):
    from ovseg_lab.data.caption_shards import shard_urls as caption_shards
    from ovseg_lab.data.mask_pairs import shard_urls as pair_shards

    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("b-000001.tar", "b-000000.tar"):
        (folder / name).write_bytes(b"")
    expected = [str(folder / "b-000000.tar"), str(folder / "b-000001.tar")]
    for resolve in (caption_shards, pair_shards):
        assert resolve(folder) == expected
        assert resolve(str(folder / "b-*.tar")) == expected
        assert resolve(str(folder / "b-{000000..000001}.tar")) == expected
    (folder / "manifest.json").write_text(json.dumps({"shards": ["b-000001.tar"]}))
    assert pair_shards(folder) == caption_shards(folder) == [str(folder / "b-000001.tar")]
    with pytest.raises(DataError, match=r"No mask-pair shards \(\*\.tar\) at .*nope.*mine_mask_pairs"):
        pair_shards(tmp_path / "nope")
    with pytest.raises(DataError, match=r"No caption shards at .*nope.*make_caption_shards"):
        caption_shards(tmp_path / "nope" / "*.tar")


@pytest.mark.parametrize("model", ["ovseg", "catseg", "ovsegmentor"])
def test_every_recipe_reads_the_nonfinite_policy(model):
    """model.nonfinite_loss reaches the recipe (OVSeg's MaskFormer stage used to raise whatever it said)."""
    import inspect

    from hydra.utils import get_class

    from ovseg_lab.lit.nonfinite import NonFiniteLossPolicy

    cfg = compose("train", ["experiment=quickstart", f"model={model}", "model.nonfinite_loss=skip"])
    assert not config_problems(cfg)
    recipe = get_class(cfg.model._target_)
    assert issubclass(recipe, NonFiniteLossPolicy) and "nonfinite_loss" in inspect.signature(recipe).parameters
    bad = compose("train", ["experiment=quickstart", f"model={model}", "model.nonfinite_loss=ignore"])
    assert any("model.nonfinite_loss='ignore'" in p for p in config_problems(bad))


def test_the_recipe_skips_or_names_the_batch():
    import torch

    from ovseg_lab.lit.nonfinite import NonFiniteLossError, NonFiniteLossPolicy

    class Recipe(NonFiniteLossPolicy):
        global_step = 3
        printed: list[str] = []

        def print(self, text):
            self.printed.append(text)

    recipe = Recipe()
    recipe._init_nonfinite("skip")
    assert recipe.loss_is_finite(torch.tensor(1.0), 0, "images []")
    assert not recipe.loss_is_finite(torch.tensor(float("nan")), 7, "images ['a']") and recipe.skipped_batches == 1
    recipe._init_nonfinite("raise")
    with pytest.raises(NonFiniteLossError, match=r"global step 3, batch 7 \(images \['a'\]\).*nonfinite_loss=skip"):
        recipe.loss_is_finite(torch.tensor(float("inf")), 7, "images ['a']")


def test_conf_is_found_through_the_package():
    import ovseg_lab
    from ovseg_lab.config import CONF_DIR as PACKAGE_CONF

    assert PACKAGE_CONF == Path(ovseg_lab.__file__).resolve().parent / "conf"
    assert (PACKAGE_CONF / "train.yaml").is_file() and (PACKAGE_CONF / "model" / "catseg.yaml").is_file()


def test_never_is_an_explicit_validation_interval():
    from ovseg_lab.runner import trainer_options

    never = compose("train", ["experiment=quickstart", "trainer.val_check_interval=never"])
    assert trainer_options(never)["val_check_interval"] > 10**15
    assert trainer_options(compose("train", ["experiment=quickstart"])) == {}
    stage = next(iter(compose("train", ["experiment=quickstart"]).pipeline.stages.values()))
    assert "trainer.val_check_interval=never" in stage.overrides  # the chain stages evaluate once, after training
    assert stage.overrides._get_node(4)._value() == "trainer.max_steps=${pipeline.params.pretrain_steps}"
