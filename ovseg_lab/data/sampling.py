"""A training sampler whose order and augmentations depend only on (seed, epoch, sample), so a resumed run
sees exactly the batches an uninterrupted one would have.

Each epoch is a seeded permutation (``DistributedSampler``'s, also across ranks). Every index is yielded as a
:class:`SampleKey` carrying a per-sample augmentation seed derived from (seed, epoch, index): the dataset seeds
its transform with it, so augmentation depends neither on dataloader-worker RNG nor on which process loaded the
sample. ``resume(epoch, samples_done)`` makes the next pass skip the samples an interrupted run already trained
on, while ``len()`` keeps the full epoch (Lightning counts the resumed epoch's batches from where it stopped).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
from torch.utils.data import Dataset, DistributedSampler


class SampleKey(NamedTuple):
    """A dataset index with the seed its augmentation must use."""

    index: int
    seed: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


class ResumableSampler(DistributedSampler):
    """Seeded, rank-sharded permutation per epoch yielding :class:`SampleKey`; can skip a resumed epoch's head."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, drop_last: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self._skip = 0

    def resume(self, epoch: int, samples_done: int) -> None:
        """The next pass is ``epoch`` without its first ``samples_done`` samples (of this rank)."""
        if samples_done >= self.num_samples:  # the interrupted run had finished that epoch
            epoch, samples_done = epoch + 1, 0
        self.set_epoch(epoch)
        self._skip = samples_done

    def __iter__(self) -> Iterator[SampleKey]:
        # eager, not a generator: the skip applies to the pass that is started now, and only to it
        indices = list(super().__iter__())[self._skip:]
        self._skip = 0
        return iter([SampleKey(int(i), sample_seed(self.seed, self.epoch, int(i))) for i in indices])
