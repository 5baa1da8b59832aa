"""Recipe for methods trained with per-pixel labels (cost-volume baseline, CAT-Seg, LSeg)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ovseg_lab.errors import SetupError
from ovseg_lab.lit.base import OpenVocabModule, to_unit_float


class NonFiniteLossError(SetupError):
    """The loss became NaN or inf; the message names the batch."""


class DenseSupervisedModule(OpenVocabModule):
    """``loss = net.loss(net(images, train_vocabulary), labels)``.

    nonfinite_loss: ``raise`` stops the run naming the batch's images; ``skip`` drops the batch (no update).
    """

    def __init__(self, *args, nonfinite_loss: str = "raise", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if nonfinite_loss not in ("raise", "skip"):
            raise SetupError(f"nonfinite_loss must be 'raise' or 'skip', got '{nonfinite_loss}'.")
        self.nonfinite_loss = nonfinite_loss
        self.skipped_batches = 0

    def training_step(self, batch: Mapping[str, Any], batch_idx: int):
        if not len(batch["image"]):  # every sample of the batch was unreadable (reported by the DataModule)
            return None
        images = to_unit_float(batch["image"])
        labels = batch["label"]
        logits = self.training_logits(batch, images)
        loss = self.net.loss(logits, labels)
        if not torch.isfinite(loss):
            stems = list(batch.get("stem", []))
            message = (
                f"Non-finite training loss ({loss.item()}) at global step {self.global_step}, batch {batch_idx} "
                f"(images {stems[:8]})."
            )
            if self.nonfinite_loss == "raise":
                raise NonFiniteLossError(message + " Set model.nonfinite_loss=skip to drop such batches instead.")
            self.skipped_batches += 1
            self.print(message + " Skipped.")
            return None
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=images.shape[0])
        return loss

    def training_logits(self, batch: Mapping[str, Any], images: torch.Tensor) -> torch.Tensor:
        """Logits the loss compares with ``batch["label"]``: every image against the training vocabulary."""
        return self.net(images, self.train_vocabulary)
