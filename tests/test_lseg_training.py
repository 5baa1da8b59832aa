"""LSeg end to end on the toy benchmark: dense training, episodic training + evaluation, the CLI runs."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from ovseg_lab.eval.episodes import EpisodeIoU
from ovseg_lab.lit.base import to_unit_float
from ovseg_lab.vocab import Vocabulary
from tests.conftest import ROOT, compose, small_toy_overrides


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )


def _fit_and_measure(cfg, steps: int):
    """(module, datamodule, loss on a fixed batch before, after ``steps`` training steps)."""
    L.seed_everything(0)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = instantiate(cfg.model)
    trainer = _trainer(steps)
    module.trainer = trainer  # so the module reaches the datamodule before fit
    trainer.datamodule = datamodule
    batch = next(iter(datamodule.train_dataloader()))

    def loss_now() -> float:
        module.eval()
        with torch.no_grad():
            logits = module.training_logits(batch, to_unit_float(batch["image"]))
            value = module.net.loss(logits, batch["label"]).item()
        module.train()
        return value

    before = loss_now()
    trainer.fit(module, datamodule=datamodule)
    return module, datamodule, before, loss_now()


def test_lseg_dense_training_lowers_the_loss(toy_data_dir, tmp_path):
    cfg = compose(
        "train",
        [
            "experiment=quickstart",
            "model=lseg",
            "logger=none",
            "callbacks=none",
            "data.batch_size=8",
            *small_toy_overrides(toy_data_dir),
        ],
        tmp_path,
    )
    assert cfg.model.net.encoder.tiny and not cfg.model.net.encoder.pretrained  # data_model/toy_lseg.yaml
    module, _, before, after = _fit_and_measure(cfg, 25)
    assert after < 0.8 * before, (before, after)
    assert not any(p.requires_grad for p in module.net.clip.parameters())


def test_episodic_training_and_evaluation_on_toy_folds(toy_data_dir, tmp_path):
    cfg = compose(
        "train",
        [
            "experiment=lseg_folds_toy",
            "data.fold=2",
            "data.batch_size=8",
            "logger=none",
            "callbacks=none",
            *small_toy_overrides(toy_data_dir),
        ],
        tmp_path,
    )
    module, datamodule, before, after = _fit_and_measure(cfg, 20)
    assert after < 0.8 * before, (before, after)

    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    scores = module.eval_results["toy_folds_fold2"]
    bench = datamodule.eval_benchmarks[0]
    assert scores["num_episodes"] == len(datamodule.eval_episodes)
    assert list(scores["per_class_iou"]) == [bench.vocabulary[c] for c in bench.class_ids]
    assert 0 <= scores["mIoU"] <= 100 and 0 <= scores["FB-IoU"] <= 100

    # the same number from a hand-rolled loop: each episode asks about ["others", its class]
    reference = EpisodeIoU(bench.class_ids, len(bench.vocabulary))
    module.eval()
    with torch.no_grad():
        for item in datamodule._eval_set:
            vocabulary = Vocabulary("ref", ("others", bench.vocabulary[item["class_id"]]))
            logits = module.net(item["image"][None].float() / 255, vocabulary)
            reference.update(logits.argmax(dim=1), item["label"][None], torch.tensor([item["class_id"]]))
    expected = reference.compute()
    assert scores["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-6)
    assert scores["FB-IoU"] == pytest.approx(expected["FB-IoU"], abs=1e-6)


def test_episodes_without_per_image_vocabularies_are_run_per_class(toy_data_dir, tmp_path):
    """A net that takes one vocabulary per call (the cost-volume baseline) gets one call per distinct episode."""
    cfg = compose(
        "train",
        [
            "experiment=quickstart",
            "model=costvolume",
            "logger=none",
            "callbacks=none",
            "model._target_=ovseg_lab.lit.episodes.EpisodicModule",
            *small_toy_overrides(toy_data_dir),
        ],
        tmp_path,
    )
    module = instantiate(cfg.model).eval()
    assert not getattr(module.net, "per_image_vocabulary", False)
    images = torch.rand(3, 3, 64, 64)
    vocabularies = [
        Vocabulary("a", ("others", "red circle")),
        Vocabulary("b", ("others", "plain sky")),
        Vocabulary("c", ("others", "red circle")),
    ]
    with torch.no_grad():
        grouped = module.episode_logits(images, vocabularies)
        one_by_one = torch.cat([module.net(images[i : i + 1], v) for i, v in enumerate(vocabularies)])
        tiled = module.episode_logits(torch.cat([images, images]), vocabularies)  # two views per episode
    torch.testing.assert_close(grouped, one_by_one, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tiled[3:], grouped, rtol=1e-4, atol=1e-5)


def test_quickstart_lseg_writes_metrics_for_the_toy_table(toy_data_dir, tmp_path):
    cfg = compose("train", ["experiment=quickstart", "model=lseg"])
    assert str(cfg.hydra.run.dir).endswith(
        "quickstart_lseg"
    )  # beside outputs/quickstart (CAT-Seg), outputs/quickstart_costvolume
    run_dir = tmp_path / "qs_lseg"
    cmd = [
        sys.executable,
        "train.py",
        "experiment=quickstart",
        "model=lseg",
        "logger=csv",
        "trainer.max_steps=4",
        "trainer.val_check_interval=1000",
        "data.batch_size=4",
        f"hydra.run.dir={run_dir}",
        *small_toy_overrides(toy_data_dir),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"toy_seen", "toy_unseen", "toy_large"}
    assert all(len(m["per_class_iou"]) == m["num_classes"] for m in metrics.values())
    assert "LSegNet" in (run_dir / "config_resolved.yaml").read_text()


@pytest.mark.slow
def test_lseg_folds_toy_sweep_runs_every_job(toy_data_dir, tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=lseg_folds_toy",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        f"hydra.sweep.dir={tmp_path}",
        *small_toy_overrides(toy_data_dir),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(p.parent.name for p in tmp_path.glob("*/metrics.json"))
    assert found == [str(i) for i in range(8)]
    benchmarks = {next(iter(json.loads((tmp_path / job / "metrics.json").read_text()))) for job in found}
    assert benchmarks == {f"toy_folds_fold{i}" for i in range(4)}
