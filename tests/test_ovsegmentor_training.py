"""OVSegmentor through the CLI pieces: caption-only training lowers the loss; quickstart runs end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import ROOT, compose, small_toy_overrides

TINY = [
    "model.net.image_encoder.embed_dim=64",
    "model.net.image_encoder.num_heads=2",
    "model.net.image_encoder.depths=[1,1]",
    "model.net.proj_hidden=128",
    "model.net.embed_dim=64",
    "model.net.text_encoder.config.hidden_size=64",
    "model.net.text_encoder.config.num_attention_heads=2",
    "model.net.text_encoder.config.num_hidden_layers=1",
    "model.net.decoder_heads=2",
    "data.batch_size=16",
    "data.shuffle_buffer=64",
    "data.num_workers=0",
]


def test_caption_training_lowers_the_loss_without_reading_masks(toy_data_dir, tmp_path, monkeypatch):
    overrides = [
        "model=ovsegmentor",
        "experiment=quickstart",
        "logger=none",
        "callbacks=none",
        *TINY,
        "model.scheduler.warmup_steps=0",
        "trainer.max_steps=40",
        *small_toy_overrides(toy_data_dir),
    ]
    cfg = compose("train", overrides, tmp_path)
    L.seed_everything(0)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    # training must never open a label map
    import ovseg_lab.data.benchmark as benchmark

    monkeypatch.setattr(benchmark, "read_label", lambda path: (_ for _ in ()).throw(AssertionError(f"read {path}")))
    module = instantiate(cfg.model)
    loader = datamodule.train_dataloader()
    batch = next(iter(loader))
    assert set(batch) >= {"image", "caption", "mentions", "entities"} and "label" not in batch
    batch["image"] = batch["image"].float() / 255

    def loss_on_batch() -> float:
        torch.manual_seed(0)  # the same Gumbel noise and caption templates before and after
        with torch.no_grad():
            return module.net.training_losses(batch)["contrastive"].item()

    before = loss_on_batch()
    trainer = L.Trainer(
        max_steps=40,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
        use_distributed_sampler=False,
        gradient_clip_val=5.0,
    )
    trainer.fit(module, train_dataloaders=loader)
    after = loss_on_batch()
    assert after < 0.92 * before, (before, after)


def test_quickstart_ovsegmentor_reduced(toy_data_dir, tmp_path):
    run_dir = tmp_path / "qs"
    cmd = [
        sys.executable,
        "train.py",
        "model=ovsegmentor",
        "experiment=quickstart",
        "logger=csv",
        *TINY,
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "trainer.log_every_n_steps=2",
        "model.metric_convention=mmseg",  # GroupViT's: the toy report must score the way the run did
        f"hydra.run.dir={run_dir}",
        *small_toy_overrides(toy_data_dir),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"toy_seen", "toy_unseen", "toy_large"}
    assert metrics["toy_large"]["num_classes"] == 72
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["ovseg_net_class"] == "ovseg_lab.models.ovsegmentor.OVSegmentor"
    assert (toy_data_dir / "toy" / "toy_seen" / "caption_shards" / "manifest.json").is_file()
    csv = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/contrastive" in csv and "train/entity" in csv
    # the toy report re-evaluates the checkpoint group by group: same mIoU as the run, naming scores in range
    from ovseg_lab.tools.toy_report import main as toy_report

    (row,) = toy_report([str(run_dir), "--data-dir", str(toy_data_dir), "--json", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text())[0]["steps"] == 6
    assert row["steps"] == 6
    for split in ("toy_seen", "toy_unseen", "toy_large"):
        assert math.isclose(row[split]["mIoU"], metrics[split]["mIoU"], abs_tol=1e-6), split
        assert 0 <= row[split]["group_top1"] <= 100 and 0 < row[split]["group_purity"] <= 100
        assert 0 < row[split]["group_oracle_mIoU"] <= 100 and row[split]["groups_per_image"] >= 1
    assert row["toy_large"]["group_top1_chance"] == 100 / 72


@pytest.mark.slow
def test_quickstart_ovsegmentor_beats_the_untrained_model(tmp_path):
    """The issue's acceptance run: the full toy quickstart against the same model evaluated untrained."""
    data = [f"paths.data_dir={tmp_path / 'data'}"]
    trained_dir, untrained_dir = tmp_path / "trained", tmp_path / "untrained"
    train = [
        sys.executable,
        "train.py",
        "model=ovsegmentor",
        "experiment=quickstart",
        "logger=csv",
        *data,
        f"hydra.run.dir={trained_dir}",
    ]
    proc = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    untrained = [
        sys.executable,
        "eval.py",
        "model=ovsegmentor",
        "experiment=quickstart",
        "allow_untrained=true",
        *data,
        f"hydra.run.dir={untrained_dir}",
    ]
    proc = subprocess.run(untrained, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((trained_dir / "metrics.json").read_text())
    before = json.loads((untrained_dir / "metrics.json").read_text())
    for split in ("toy_seen", "toy_unseen", "toy_large"):
        assert after[split]["mIoU"] > before[split]["mIoU"], (split, before[split]["mIoU"], after[split]["mIoU"])
    assert after["toy_seen"]["mIoU"] > before["toy_seen"]["mIoU"] + 1.0
