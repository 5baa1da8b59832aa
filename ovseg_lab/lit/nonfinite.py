"""What a recipe does with a NaN / inf training loss: ``model.nonfinite_loss`` = ``raise`` (stop, naming the batch)
or ``skip`` (drop the batch: no update, counted in ``skipped_batches``). One implementation for every recipe."""

from __future__ import annotations

import torch

from ovseg_lab.config_checks import NONFINITE_POLICIES
from ovseg_lab.errors import SetupError


class NonFiniteLossError(SetupError):
    """The loss became NaN or inf; the message names the batch."""


def checked_policy(policy: str) -> str:
    if policy not in NONFINITE_POLICIES:
        raise SetupError(f"nonfinite_loss must be 'raise' or 'skip', got '{policy}'.")
    return policy


class NonFiniteLossPolicy:
    """Mixin for a LightningModule: call :meth:`_init_nonfinite` in ``__init__`` and :meth:`loss_is_finite` in
    ``training_step`` (return None when it says False)."""

    nonfinite_loss: str = "raise"
    skipped_batches: int = 0

    def _init_nonfinite(self, policy: str) -> None:
        self.nonfinite_loss = checked_policy(policy)
        self.skipped_batches = 0

    def loss_is_finite(self, loss: torch.Tensor, batch_idx: int, batch_items: str) -> bool:
        """True for a finite loss; otherwise raise :class:`NonFiniteLossError` or count the batch as skipped.
        ``batch_items``: what the message names, e.g. ``"images ['a', 'b']"``."""
        if torch.isfinite(loss):
            return True
        message = (
            f"Non-finite training loss ({loss.item()}) at global step {self.global_step}, batch {batch_idx} "
            f"({batch_items})."
        )
        if self.nonfinite_loss == "raise":
            raise NonFiniteLossError(message + " Set model.nonfinite_loss=skip to drop such batches instead.")
        self.skipped_batches += 1
        self.print(message + " Skipped.")
        return False
