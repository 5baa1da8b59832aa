"""The LightningModule base every method shares: evaluation, metrics, logging, optimizers.

A method plugs in a ``net`` with ``net(images, vocabulary) -> logits (B, T, h, w)`` (images in [0, 1]) and a
recipe subclass that defines ``training_step``. Evaluation runs every benchmark of the DataModule with its own
vocabulary, through the configured inference protocol, into one confusion matrix per benchmark.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from ovseg_lab.eval.inference import InferenceConfig, segment, to_unit_float
from ovseg_lab.lit.optim import build_param_groups
from ovseg_lab.metrics import SegmentationMetric
from ovseg_lab.vocab import Vocabulary, with_release_strings


def save_label_maps(pred: torch.Tensor, stems: list[str], folder: Path) -> None:
    """(B, H, W) class ids -> folder/<stem>.png (uint8, or uint16 above 255 classes), written atomically."""
    import numpy as np
    from PIL import Image

    from ovseg_lab.utils.io import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    for label, stem in zip(pred.cpu().numpy(), stems):
        dtype = np.uint8 if label.max(initial=0) < 255 else np.uint16
        with atomic_path(folder / f"{stem}.png") as tmp:
            Image.fromarray(label.astype(dtype)).save(tmp, format="PNG")


class OpenVocabModule(L.LightningModule):
    """Args:
    net: the method's network.
    optimizer: partial optimizer (``_partial_: true``) taking param groups.
    scheduler: partial schedule taking the optimizer, stepped every iteration.
    backbone_lr_multiplier: learning-rate factor for CLIP parameters (CAT-Seg: 0.01).
    weight_decay_norm, weight_decay_embed, weight_decay_rule: which parameters decay
        (:func:`~ovseg_lab.lit.optim.build_param_groups`; ``one_dim``: the GroupViT / OVSegmentor releases' rule).
    inference: :class:`InferenceConfig` fields (whole / slide).
    metric_convention: detectron2 (classes present in GT) or mmseg.
    class_strings: whose official class strings the text tower is sent for packaged benchmark vocabularies
        (``assets/class_strings/<release>/``, e.g. ``ovseg``); None sends the benchmark's own names. Metric rows
        and legends keep the benchmark's names either way.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        backbone_lr_multiplier: float = 1.0,
        weight_decay_norm: float | None = 0.0,
        weight_decay_embed: float | None = 0.0,
        weight_decay_rule: str = "types",
        inference: Mapping[str, Any] | None = None,
        metric_convention: str = "detectron2",
        num_visuals: int = 4,
        class_strings: str | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone_lr_multiplier = backbone_lr_multiplier
        self.weight_decay_norm = weight_decay_norm
        self.weight_decay_embed = weight_decay_embed
        self.weight_decay_rule = weight_decay_rule
        self.inference_cfg = InferenceConfig.from_config(inference)
        self.metric_convention = metric_convention
        self.class_strings = class_strings
        self.metrics = nn.ModuleDict()
        self.num_visuals = num_visuals
        # first evaluation batch of each benchmark (fixed across evaluations): images, predictions, labels
        self._visuals: dict[str, list[tuple[Any, Any, Any]]] = {}
        self._benchmarks: list = []
        self.eval_results: dict[str, dict] = {}
        self.eval_results_step: int | None = None  # global step at which eval_results were computed
        self.run_config_yaml: str | None = None  # the resolved Hydra config, stored in checkpoints
        self.save_predictions_dir: str | None = None  # eval.py save_predictions=true: label maps per image

    # ------------------------------------------------------------------ data-dependent state
    @property
    def datamodule(self):
        trainer = self._trainer
        return trainer.datamodule if trainer is not None else None

    @property
    def train_vocabulary(self) -> Vocabulary:
        return self.datamodule.train_vocabulary

    def setup(self, stage: str) -> None:
        datamodule = self.datamodule
        benchmarks = getattr(datamodule, "eval_benchmarks", []) if datamodule is not None else []
        self._benchmarks = list(benchmarks)
        for bench in self._benchmarks:
            if bench.name not in self.metrics:
                self.metrics[bench.name] = self._make_metric(bench)

    def _make_metric(self, bench):
        """The metric a benchmark is scored with (a recipe may score its own kinds of benchmark differently)."""
        convention = getattr(bench, "metric_convention", None) or self.metric_convention  # MESS scores its own way
        return SegmentationMetric(bench.num_classes, ignore_index=bench.ignore_index, convention=convention)

    # ------------------------------------------------------------------ inference
    def forward(self, images: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
        return self.net(images, vocabulary)

    @torch.no_grad()
    def predict_scores(
        self, images: torch.Tensor, vocabulary: Vocabulary, inference: InferenceConfig | None = None
    ) -> torch.Tensor:
        """Per-class scores (B, T, H, W) at the input resolution under the inference protocol."""
        text_vocabulary = with_release_strings(vocabulary, self.class_strings)
        return segment(lambda x: self.net(x, text_vocabulary), images, inference or self.inference_cfg)

    @torch.no_grad()
    def predict_labels(
        self, images: torch.Tensor, vocabulary: Vocabulary, background_from: int | None = None
    ) -> torch.Tensor:
        """(B, H, W) argmax class ids; with ``background_from`` ids above it collapse onto it (PAS-20b)."""
        pred = self.predict_scores(images, vocabulary).argmax(dim=1)
        if background_from is not None:
            pred = pred.clamp(max=background_from)
        return pred

    # ------------------------------------------------------------------ evaluation loop
    def _eval_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int) -> None:
        bench = self._benchmarks[dataloader_idx]
        images, labels, stems = batch["image"], batch["label"], list(batch.get("stem", []))
        if isinstance(images, torch.Tensor):
            groups = [(images, labels, stems)]
        else:  # differently sized images: one at a time
            groups = [(img[None], lab[None], stems[i : i + 1]) for i, (img, lab) in enumerate(zip(images, labels))]
        keep = batch_idx == 0 and self.num_visuals > 0 and self.trainer.is_global_zero
        if keep:
            self._visuals[bench.name] = []
        for image, label, group_stems in groups:
            pred = self.predict_labels(image, bench.vocabulary, bench.background_from)
            self.metrics[bench.name].update(pred, label)
            if self.save_predictions_dir is not None:
                save_label_maps(pred, group_stems, Path(self.save_predictions_dir) / bench.name)
            if keep:
                for i in range(min(len(pred), self.num_visuals - len(self._visuals[bench.name]))):
                    self._visuals[bench.name].append(
                        (image[i].permute(1, 2, 0).cpu().numpy(), pred[i].cpu().numpy(), label[i].cpu().numpy())
                    )

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx)

    def _finish_eval(self, prefix: str) -> None:
        results: dict[str, dict] = {}
        for bench in self._benchmarks:
            metric = self.metrics[bench.name]
            # Every rank computes (a collective sync), also one that received no image of this benchmark.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = metric.compute()
            metric.reset()
            scores = self._benchmark_scores(bench, scores)
            if scores is None:
                continue
            results[bench.name] = scores
            for key in ("mIoU", "pixel_accuracy", "fwIoU"):
                self.log(f"{prefix}/{bench.name}/{key}", scores[key], add_dataloader_idx=False, sync_dist=False)
        if results:
            mean = sum(r["mIoU"] for r in results.values()) / len(results)
            self.log(f"{prefix}/mIoU_mean", mean, add_dataloader_idx=False, prog_bar=True)
        summarize = getattr(self.datamodule, "summarize_results", None)
        for name, scores in (summarize(results) if summarize else {}).items():  # MESS: domains, mean, harmonic mean
            self.log(f"{prefix}/{name}/mIoU", scores["mIoU"], add_dataloader_idx=False, sync_dist=False)
            results[name] = scores
        self.eval_results = results
        self.eval_results_step = self.global_step
        self.on_eval_results(prefix, results)

    def _benchmark_scores(self, bench, scores: dict) -> dict | None:
        """metric.compute() -> the benchmark's metrics.json entry (None: it saw no pixel, leave it out)."""
        if scores["num_pixels"] == 0:
            return None
        class_names = list(bench.vocabulary.classes[: bench.num_classes])
        if bench.background_from is not None:
            class_names = class_names[: bench.background_from] + ["background"]
        scores["per_class_iou"] = dict(zip(class_names, scores["per_class_iou"]))
        scores["per_class_accuracy"] = dict(zip(class_names, scores["per_class_accuracy"]))
        return scores

    def on_eval_results(self, prefix: str, results: dict[str, dict]) -> None:
        """W&B: a per-class IoU table and prediction / ground-truth masks of a fixed batch per benchmark."""
        from lightning.pytorch.loggers import WandbLogger

        if self._trainer is None or not self.trainer.is_global_zero:
            return
        for logger in (lg for lg in self.loggers if isinstance(lg, WandbLogger)):
            for bench in self._benchmarks:
                if bench.name not in results:
                    continue
                rows = [
                    [name, None if iou != iou else iou] for name, iou in results[bench.name]["per_class_iou"].items()
                ]
                logger.log_table(
                    key=f"{prefix}/{bench.name}/per_class_iou",
                    columns=["class", "IoU"],
                    data=rows,
                    step=self.global_step,
                )
                visuals = self._visuals.get(bench.name)
                if visuals:
                    names = list(results[bench.name]["per_class_iou"])
                    class_labels = {i: n for i, n in enumerate(names)} | {bench.ignore_index: "ignore"}
                    masks = [
                        {
                            "predictions": {"mask_data": pred.astype("int64"), "class_labels": class_labels},
                            "ground_truth": {"mask_data": label.astype("int64"), "class_labels": class_labels},
                        }
                        for _, pred, label in visuals
                    ]
                    logger.log_image(
                        key=f"{prefix}/{bench.name}/masks",
                        images=[img for img, _, _ in visuals],
                        masks=masks,
                        step=self.global_step,
                    )

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("No optimizer configured (model.optimizer).")
        base_lr = (
            self.optimizer_factory.keywords.get("lr", 1e-3) if hasattr(self.optimizer_factory, "keywords") else 1e-3
        )
        weight_decay = (
            self.optimizer_factory.keywords.get("weight_decay", 0.0)
            if hasattr(self.optimizer_factory, "keywords")
            else 0.0
        )
        optimizer = self.optimizer_factory(self.param_groups_for(base_lr, weight_decay))
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }

    def param_groups_for(self, base_lr: float, weight_decay: float, **exemptions: Any) -> list[dict]:
        """The optimizer's parameter groups; a method adds its release's exemptions (``build_param_groups``'
        keywords, e.g. ``no_decay_names``)."""
        return build_param_groups(
            self,
            base_lr,
            weight_decay,
            self.backbone_lr_multiplier,
            self.weight_decay_norm,
            self.weight_decay_embed,
            weight_decay_rule=self.weight_decay_rule,
            **exemptions,
        )

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain strings only, so checkpoints load with torch.load(weights_only=True).
        if self.run_config_yaml is not None:
            checkpoint["ovseg_config"] = self.run_config_yaml
        checkpoint["ovseg_net_class"] = f"{type(self.net).__module__}.{type(self.net).__qualname__}"
