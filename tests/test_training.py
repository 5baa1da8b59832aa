"""A short training run lowers the loss, through the same LightningModule/DataModule the CLI uses."""

from __future__ import annotations

import lightning as L
import torch
from hydra.utils import instantiate

from tests.conftest import compose, small_toy_overrides


def _loss_on_fixed_batch(module, batch) -> float:
    module.eval()
    with torch.no_grad():
        logits = module.net(batch["image"].float() / 255, module.train_vocabulary)
        loss = module.net.loss(logits, batch["label"]).item()
    module.train()
    return loss


def test_short_training_run_lowers_the_loss(toy_data_dir, tmp_path):
    cfg = compose(
        "train",
        [
            "experiment=quickstart",
            "model=costvolume",
            "logger=none",
            "callbacks=none",
            *small_toy_overrides(toy_data_dir),
        ],
        tmp_path,
    )
    L.seed_everything(0)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = instantiate(cfg.model)
    trainer = L.Trainer(
        max_steps=60,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    batch = next(iter(datamodule.train_dataloader()))
    module.trainer = trainer  # to reach the datamodule's vocabulary before fit
    trainer.datamodule = datamodule
    before = _loss_on_fixed_batch(module, batch)
    trainer.fit(module, datamodule=datamodule)
    after = _loss_on_fixed_batch(module, batch)
    assert after < 0.85 * before, (before, after)
