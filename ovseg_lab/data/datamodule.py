"""The DataModule shared by every per-pixel method: one training benchmark, several evaluation benchmarks.

Each evaluation benchmark has its own vocabulary and is scored as ``val/<name>/mIoU``. Distributed evaluation
splits images across ranks without the duplicate padding of ``DistributedSampler``, so the summed confusion
matrices cover every image exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from ovseg_lab.data.bad_samples import BadSampleLog, split_bad
from ovseg_lab.data.benchmark import BenchmarkSpec, SegmentationFolder
from ovseg_lab.data.sampling import ResumableSampler
from ovseg_lab.data.transforms import build_train_transform
from ovseg_lab.errors import DataError
from ovseg_lab.vocab import Vocabulary


class ShardedEvalSampler(Sampler[int]):
    """Rank r of w gets indices r, r + w, ...: no padding, no duplicates, order kept within a rank."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-sized samples; keep lists when sizes differ (evaluation at original resolution).

    Unreadable samples (``{"bad": path, ...}``) are left out and listed in ``out["bad"]``; a batch of nothing
    but unreadable samples has empty ``image`` / ``label`` lists.
    """
    batch, bad = split_bad(list(batch))
    out: dict[str, Any] = {"stem": [b["stem"] for b in batch], "bad": bad}
    for key in ("image", "label"):
        tensors = [b[key] for b in batch]
        same = bool(tensors) and all(t.shape == tensors[0].shape for t in tensors)
        out[key] = torch.stack(tensors) if same else tensors
    return out


class EvalBenchmark:
    """An evaluation benchmark as the LightningModule sees it."""

    def __init__(self, spec: BenchmarkSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.vocabulary: Vocabulary = spec.load_vocabulary()
        self.num_classes = spec.num_eval_classes
        self.ignore_index = spec.ignore_index
        self.background_from = spec.background_from
        self.metric_convention = spec.metric_convention  # None: the model's convention
        if self.background_from is not None and not 0 < self.background_from < len(self.vocabulary):
            raise DataError(f"{self.name}: background_from={self.background_from} must lie inside its vocabulary.")

    def __repr__(self) -> str:
        return f"EvalBenchmark({self.name}, {len(self.vocabulary)} classes)"


class SegmentationDataModule(L.LightningDataModule):
    """Args:
    train: benchmark config of the training split (None for evaluation-only runs).
    eval: name -> benchmark config of each evaluation split.
    generate_toy: when set, ``prepare_data`` writes the toy benchmark to ``generate_toy.out`` if absent.
    max_bad_samples / max_bad_fraction: unreadable samples are skipped and reported each epoch; more distinct
        bad files than this, or a larger fraction of an epoch's samples, stop the run (None: no limit).
    root: the folder of a benchmark collection that evaluation entries name by key (``{mess: chase_db1}``: a MESS
        dataset under MESS's prepared root, ``ovseg_lab.data.mess``).
    generate_mess_fake: when set, ``prepare_data`` writes small fake copies of the configured MESS datasets under
        ``root`` where absent (``write_fake_root`` options; the toy flavour of data=mess).
    """

    def __init__(
        self,
        train: Mapping[str, Any] | None = None,
        eval: Mapping[str, Mapping[str, Any]] | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        transform: Mapping[str, Any] | None = None,
        generate_toy: Mapping[str, Any] | None = None,
        pin_memory: bool = False,
        shuffle_seed: int = 0,
        max_bad_samples: int | None = 100,
        max_bad_fraction: float | None = 0.01,
        root: str | None = None,
        generate_mess_fake: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.generate_mess_fake = dict(generate_mess_fake) if generate_mess_fake else None
        self.train_spec = BenchmarkSpec.from_config(train.get("name", "train"), train) if train else None
        self.eval_specs = [self._eval_spec(name, cfg) for name, cfg in (eval or {}).items()]
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.transform_cfg = dict(transform or {})
        self.generate_toy = dict(generate_toy) if generate_toy else None
        self.pin_memory = pin_memory
        self.shuffle_seed = shuffle_seed
        self._train_set: SegmentationFolder | None = None
        self._eval_sets: list[SegmentationFolder] = []
        self._benchmarks: list[EvalBenchmark] | None = None
        self._train_vocabulary: Vocabulary | None = None
        self.bad_samples = BadSampleLog(max_bad_samples, max_bad_fraction)
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def _eval_spec(self, name: str, cfg: Mapping[str, Any]) -> BenchmarkSpec:
        if cfg.get("mess"):  # a MESS dataset: folders, classes and ignore value from its catalog
            from ovseg_lab.data.mess import mess_spec

            return mess_spec(name, cfg["mess"], self.root, max_images=cfg.get("max_images"))
        return BenchmarkSpec.from_config(name, cfg)

    def summarize_results(self, results: dict[str, dict]) -> dict[str, dict]:
        """Figures over several benchmarks that a benchmark collection defines (MESS: per-domain means, mean and
        harmonic mean over datasets), keyed like benchmarks; {} when none applies."""
        from ovseg_lab.data.mess import summarize

        return summarize(results, self.eval_specs)

    # ------------------------------------------------------------------ availability
    def missing(self, stage: str = "fit") -> list[str]:
        """Every split this run needs that is not on disk, as user-facing lines."""
        if self.generate_toy or self.generate_mess_fake:
            return []  # prepare_data creates it
        specs = list(self.eval_specs)
        if stage == "fit" and self.train_spec is not None:
            specs.insert(0, self.train_spec)
        return [m for m in (s.missing() for s in specs) if m]

    def prepare_data(self) -> None:
        if self.generate_toy:
            from ovseg_lab.data.toy import generate_toy_from_config

            generate_toy_from_config(self.generate_toy)
        if self.generate_mess_fake:
            from ovseg_lab.data.mess import write_fake_root

            keys = [s.extra["mess"] for s in self.eval_specs if "mess" in s.extra]
            write_fake_root(self.root, keys, **self.generate_mess_fake)

    # ------------------------------------------------------------------ what the model needs to know
    @property
    def train_vocabulary(self) -> Vocabulary:
        if self._train_vocabulary is None:
            if self.train_spec is None:
                raise DataError("This data config has no training split (data.train).")
            self._train_vocabulary = self.train_spec.load_vocabulary()
        return self._train_vocabulary

    @property
    def eval_benchmarks(self) -> list[EvalBenchmark]:
        if self._benchmarks is None:
            self._benchmarks = [EvalBenchmark(spec) for spec in self.eval_specs]
        return self._benchmarks

    # ------------------------------------------------------------------ datasets and loaders
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_spec is not None and self._train_set is None:
            transform = build_train_transform(ignore_index=self.train_spec.ignore_index, **self.transform_cfg)
            self._train_set = SegmentationFolder(self.train_spec, len(self.train_vocabulary), transform)
        if not self._eval_sets:
            self._eval_sets = [SegmentationFolder(b.spec, len(b.vocabulary)) for b in self.eval_benchmarks]

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": collate,
        }

    def train_dataloader(self) -> DataLoader:
        if self._train_set is None:
            self.setup("fit")
        if self._train_set is None:
            raise DataError("No training split configured (data.train).")
        # The trainer runs with use_distributed_sampler=False (so evaluation is not padded); training
        # shards itself here, with the same seeded permutation whatever the world size: rank r of w takes
        # every w-th sample, so w ranks with batch b see exactly the samples of one process with batch w*b.
        # Lightning calls set_epoch on this sampler every epoch.
        # The order and each sample's augmentation depend only on (seed, epoch, index) (ResumableSampler), so a
        # run resumed mid-epoch (resume_at) trains on exactly the batches an uninterrupted run would.
        rank, world = self._rank_and_world()
        sampler = ResumableSampler(
            self._train_set, num_replicas=world, rank=rank, seed=self.shuffle_seed, drop_last=True
        )
        if self._resume is not None:
            epoch, batches = self._resume
            sampler.resume(epoch, batches * self.batch_size)
            self._resume = None
        return DataLoader(
            self._train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=len(self._train_set) >= self.batch_size,
            **self._loader_kwargs(),
        )

    def resume_at(self, epoch: int, batches: int) -> None:
        """The next training loader starts at ``epoch`` after its first ``batches`` batches (set on resume)."""
        self._resume = (int(epoch), int(batches))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the batch's unreadable samples (they were dropped by the loader's collate)."""
        if isinstance(batch, dict) and "bad" in batch:
            good = len(batch.get("stem", batch.get("key", ())))
            self.bad_samples.record(batch.pop("bad"), good)
        return batch

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def val_dataloader(self) -> list[DataLoader]:
        if not self._eval_sets:
            self.setup("validate")
        rank, world = self._rank_and_world()
        return [
            DataLoader(
                dataset,
                batch_size=self.eval_batch_size,
                sampler=ShardedEvalSampler(len(dataset), rank, world),
                **self._loader_kwargs(),
            )
            for dataset in self._eval_sets
        ]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    @property
    def data_roots(self) -> list[Path]:
        return [Path(s.root) for s in ([self.train_spec] if self.train_spec else []) + self.eval_specs]
