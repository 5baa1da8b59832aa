"""Recipe for methods trained from image-caption pairs alone (OVSegmentor, GroupViT).

``training_step`` hands the caption batch to ``net.training_losses`` and logs every term; evaluation is the
base class's zero-shot segmentation of every benchmark. Stage 2 starts from a stage-1 checkpoint
(``init_from``) and keeps a momentum copy of the image encoder, updated after every optimizer step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ovseg_lab.lit.base import OpenVocabModule, to_unit_float
from ovseg_lab.lit.nonfinite import NonFiniteLossPolicy


class CaptionPretrainModule(NonFiniteLossPolicy, OpenVocabModule):
    """Args (beyond :class:`OpenVocabModule`):
    init_from: a checkpoint (stage 1) whose net weights start this run; the momentum encoder, absent from a
        stage-1 checkpoint, starts as a copy of the loaded image encoder.
    nonfinite_loss: ``raise`` or ``skip`` a batch whose loss is NaN / inf.
    """

    def __init__(self, *args, init_from: str | None = None, nonfinite_loss: str = "raise", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_nonfinite(nonfinite_loss)
        self._unreadable: dict[int, int] = {}
        if init_from:
            self.load_stage(init_from)

    def load_stage(self, path: str) -> None:
        """Load a previous stage's net weights (weights_only); keys it lacks must be momentum-encoder keys."""
        from ovseg_lab.checkpoints import load_into, read_weights

        net_state = read_weights(path, ("net.", ""), "stage checkpoint", "model.init_from")
        load_into(
            self.net,
            net_state,
            f"{path} (model.init_from)",
            "Stage-1",
            " Use the same model/experiment as stage 1.",
            ignore_missing=lambda k: k.startswith("momentum_encoder."),
        )
        if not any(k.startswith("momentum_encoder.") for k in net_state):
            self.net.reset_momentum()

    @property
    def unreadable_samples(self) -> int:
        """Training samples skipped so far because they did not decode (summed over dataloader readers)."""
        return sum(self._unreadable.values())

    def training_step(self, batch: Mapping[str, Any], batch_idx: int):
        batch = dict(batch)
        batch["image"] = to_unit_float(batch["image"])
        if "pair_image" in batch:
            batch["pair_image"] = to_unit_float(batch["pair_image"])
        for reader, count in batch.get("skipped", {}).items():
            self._unreadable[reader] = max(self._unreadable.get(reader, 0), int(count))
        losses = self.net.training_losses(batch)
        loss = losses["loss"]
        if not self.loss_is_finite(loss, batch_idx, f"keys {list(batch.get('key', []))[:8]}"):
            return None
        size = batch["image"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", on_step=True, on_epoch=False, batch_size=size)
        self.log("train/logit_scale", self.net.scale, on_step=True, on_epoch=False, batch_size=size)
        self.log(
            "train/unreadable_samples", float(self.unreadable_samples), on_step=True, on_epoch=False, batch_size=size
        )
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.net.update_momentum()
