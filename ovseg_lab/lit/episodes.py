"""Recipe for the few-shot-split zero-shot protocol (LSeg): 2-way ["others", class] episodes.

Each image of a batch carries its own class (``batch["class_id"]``), so each is asked about its own 2-name
vocabulary. Nets that accept one vocabulary per image (``per_image_vocabulary = True``, e.g. LSeg) get the
whole batch at once; others are run once per distinct vocabulary. Training uses the same episodes with
per-pixel cross-entropy; evaluation scores episodic benchmarks with :class:`EpisodeIoU` (mIoU over the fold's
classes, FB-IoU) and every other benchmark as the base class does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ovseg_lab.eval.episodes import EpisodeIoU
from ovseg_lab.eval.inference import segment
from ovseg_lab.lit.base import to_unit_float
from ovseg_lab.lit.dense import DenseSupervisedModule
from ovseg_lab.vocab import Vocabulary


def _episodic(bench: Any) -> bool:
    return bool(getattr(bench, "episodic", False))


class EpisodicModule(DenseSupervisedModule):
    """Args: those of :class:`DenseSupervisedModule`; ``others`` is the name of the non-class label."""

    def __init__(self, *args, others: str = "others", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.others = others

    # ------------------------------------------------------------------ episodes
    def episode_vocabularies(self, class_ids: torch.Tensor, class_names: Sequence[str]) -> list[Vocabulary]:
        return [Vocabulary(f"episode[{c}]", (self.others, class_names[c])) for c in class_ids.tolist()]

    def episode_logits(self, images: torch.Tensor, vocabularies: Sequence[Vocabulary]) -> torch.Tensor:
        """images (N, 3, H, W), one vocabulary per image -> logits (N, 2, h, w).

        N may be a multiple of len(vocabularies): sliding-window inference stacks the views of a batch
        view after view, so the vocabularies repeat in the same order.
        """
        vocabularies = list(vocabularies)
        if images.shape[0] != len(vocabularies):
            if images.shape[0] % len(vocabularies):
                raise ValueError(f"{images.shape[0]} images for {len(vocabularies)} episode vocabularies")
            vocabularies = vocabularies * (images.shape[0] // len(vocabularies))
        if getattr(self.net, "per_image_vocabulary", False):
            return self.net(images, vocabularies)
        groups: dict[tuple[str, ...], list[int]] = {}
        for index, vocabulary in enumerate(vocabularies):
            groups.setdefault(vocabulary.classes, []).append(index)
        outputs: list[torch.Tensor | None] = [None] * len(vocabularies)
        for names, indices in groups.items():
            logits = self.net(images[indices], Vocabulary("episode", names))
            for position, index in enumerate(indices):
                outputs[index] = logits[position]
        return torch.stack(outputs)

    def training_logits(self, batch: Mapping[str, Any], images: torch.Tensor) -> torch.Tensor:
        if "class_id" not in batch:
            return super().training_logits(batch, images)
        return self.episode_logits(images, self.episode_vocabularies(batch["class_id"], self.datamodule.class_names))

    # ------------------------------------------------------------------ evaluation
    def _make_metric(self, bench):
        if _episodic(bench):
            return EpisodeIoU(bench.class_ids, len(bench.vocabulary), ignore_index=bench.ignore_index)
        return super()._make_metric(bench)

    def _eval_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int) -> None:
        bench = self._benchmarks[dataloader_idx]
        if not _episodic(bench):
            return super()._eval_step(batch, batch_idx, dataloader_idx)
        vocabularies = [bench.episode_vocabulary(c) for c in batch["class_id"].tolist()]
        with torch.no_grad():
            scores = segment(
                lambda x: self.episode_logits(x, vocabularies), to_unit_float(batch["image"]), self.inference_cfg
            )
        self.metrics[bench.name].update(scores.argmax(dim=1), batch["label"], batch["class_id"])

    def _benchmark_scores(self, bench, scores: dict) -> dict | None:
        if not _episodic(bench):
            return super()._benchmark_scores(bench, scores)
        if scores["num_episodes"] == 0:
            return None
        names = [bench.vocabulary.classes[c] for c in bench.class_ids]
        scores["per_class_iou"] = dict(zip(names, scores["per_class_iou"]))
        return scores

    def on_eval_results(self, prefix: str, results: dict[str, dict]) -> None:
        super().on_eval_results(prefix, results)
        for name, scores in results.items():
            if "FB-IoU" in scores:
                self.log(f"{prefix}/{name}/FB-IoU", scores["FB-IoU"], add_dataloader_idx=False, sync_dist=False)
