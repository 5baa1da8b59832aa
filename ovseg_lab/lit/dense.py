"""Recipe for methods trained with per-pixel labels (cost-volume baseline, CAT-Seg, LSeg)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ovseg_lab.lit.base import OpenVocabModule, to_unit_float
from ovseg_lab.lit.nonfinite import NonFiniteLossError, NonFiniteLossPolicy

__all__ = ["DenseSupervisedModule", "NonFiniteLossError"]


class DenseSupervisedModule(NonFiniteLossPolicy, OpenVocabModule):
    """``loss = net.loss(net(images, train_vocabulary), labels)``.

    nonfinite_loss: ``raise`` stops the run naming the batch's images; ``skip`` drops the batch (no update).
    """

    def __init__(self, *args, nonfinite_loss: str = "raise", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_nonfinite(nonfinite_loss)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int):
        if not len(batch["image"]):  # every sample of the batch was unreadable (reported by the DataModule)
            return None
        images = to_unit_float(batch["image"])
        labels = batch["label"]
        logits = self.training_logits(batch, images)
        loss = self.net.loss(logits, labels)
        if not self.loss_is_finite(loss, batch_idx, f"images {list(batch.get('stem', []))[:8]}"):
            return None
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=images.shape[0])
        return loss

    def training_logits(self, batch: Mapping[str, Any], images: torch.Tensor) -> torch.Tensor:
        """Logits the loss compares with ``batch["label"]``: every image against the training vocabulary."""
        return self.net(images, self.train_vocabulary)
