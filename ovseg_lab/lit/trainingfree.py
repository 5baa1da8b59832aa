"""The recipe of the training-free methods: nothing to train, each benchmark evaluated under the release's protocol.

The releases (SCLIP, ClearCLIP, NACLIP, mmseg 1.x) give every benchmark its own config: the test resize
(``Resize(scale=(2048, short), keep_ratio=True)``), the logit scale, the background threshold ``prob_thd``,
SCLIP's ``area_thd``, the sliding window (``slide_crop`` 0: one whole pass). :class:`Protocol` is one such config;
the model file gives the method's defaults and per-vocabulary changes (keyed by the packaged vocabulary name,
``voc21``, ``pc60``, ...). Scores follow the releases' order: per-name cosines averaged over windows, resized to the
image, PAMR when on (NACLIP), then ``class_probabilities``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

from ovseg_lab.errors import SetupError
from ovseg_lab.eval.inference import InferenceConfig, keep_ratio_size, segment, to_unit_float
from ovseg_lab.layers.pamr import pamr
from ovseg_lab.lit.base import OpenVocabModule
from ovseg_lab.vocab import Vocabulary, with_release_strings


@dataclass(frozen=True)
class Protocol:
    """One benchmark's evaluation settings, the fields of the releases' ``cfg_<dataset>.py``."""

    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    short_side: int = 336  # Resize(scale=(long_side, short_side), keep_ratio=True)
    long_side: int = 2048
    slide_crop: int = 224  # 0: the whole resized image in one pass
    slide_stride: int = 112
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)

    def inference(self) -> InferenceConfig:
        """The sliding window (mmseg ``slide``: raw cosines averaged, no global view) or one whole pass."""
        if self.slide_crop <= 0:
            return InferenceConfig(mode="whole", score="identity")
        return InferenceConfig(
            mode="slide",
            score="identity",
            slide_size=self.short_side,
            slide_max=self.long_side,
            keep_ratio=True,
            crop=self.slide_crop,
            stride=self.slide_stride,
            global_view=False,
        )


def _protocol(fields_: Mapping[str, Any]) -> Protocol:
    known = {f.name for f in fields(Protocol)}
    unknown = sorted(set(fields_) - known)
    if unknown:
        raise SetupError(f"Unknown training-free protocol fields {unknown}; known: {sorted(known)}.")
    values = dict(fields_)
    if "pamr_dilations" in values:
        values["pamr_dilations"] = tuple(int(d) for d in values["pamr_dilations"])
    return Protocol(**values)


class TrainingFreeModule(OpenVocabModule):
    """Evaluation-only module around a :class:`~ovseg_lab.models.trainingfree.TrainingFreeSegmenter`.

    protocol: :class:`Protocol` fields, the method's defaults. benchmarks: per-vocabulary changes
    ({"voc21": {"prob_thd": 0.1}, ...}).
    """

    def __init__(
        self,
        *args,
        protocol: Mapping[str, Any] | None = None,
        benchmarks: Mapping[str, Mapping[str, Any]] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.protocol = _protocol(protocol or {})
        self.benchmark_protocols = {
            name: _protocol({**asdict(self.protocol), **dict(changes)}) for name, changes in (benchmarks or {}).items()
        }
        self.inference_cfg = self.protocol.inference()

    @property
    def needs_checkpoint(self) -> bool:
        return bool(getattr(self.net, "needs_checkpoint", True))

    def protocol_for(self, vocabulary: Vocabulary) -> Protocol:
        return self.benchmark_protocols.get(vocabulary.source or vocabulary.name, self.protocol)

    @torch.no_grad()
    def predict_scores(
        self, images: torch.Tensor, vocabulary: Vocabulary, inference: InferenceConfig | None = None
    ) -> torch.Tensor:
        """Class scores (B, T, H, W) whose argmax is the release's prediction (see ``class_probabilities``)."""
        protocol = self.protocol_for(vocabulary)
        if inference is not None:  # e.g. ovseg-predict --inference whole
            protocol = replace(protocol, slide_crop=0) if inference.mode == "whole" else protocol
        text_vocabulary = with_release_strings(vocabulary, self.class_strings)
        return self.release_scores(images, vocabulary, text_vocabulary, protocol)

    def release_scores(
        self, images: torch.Tensor, vocabulary: Vocabulary, text_vocabulary: Vocabulary, protocol: Protocol
    ) -> torch.Tensor:
        """images (B, 3, H, W) uint8 or in [0, 1] -> class scores (B, T, H, W): the release's test resize,
        per-name cosines through the window protocol, back to the image size, PAMR, ``class_probabilities``.
        ``text_vocabulary`` holds the strings the text tower reads; "background" in ``vocabulary`` is the class
        unsure pixels fall to."""
        height, width = images.shape[-2:]
        resized_hw = keep_ratio_size(height, width, protocol.short_side, protocol.long_side)
        images = to_unit_float(images)
        resized = F.interpolate(images, size=resized_hw, mode="bilinear", align_corners=False)
        cfg = protocol.inference()
        view = resized if cfg.mode == "whole" else images  # the slide protocol resizes itself (keep_ratio)
        logits = segment(lambda x: self.net(x, text_vocabulary), view, cfg)
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        if protocol.pamr_steps > 0:
            # the release refines on the resized picture brought back to the image size
            picture = F.interpolate(resized, size=(height, width), mode="bilinear", align_corners=False)
            logits = pamr(self.net.clip.normalize(picture), logits, protocol.pamr_steps, protocol.pamr_dilations)
        background = vocabulary.classes.index("background") if "background" in vocabulary.classes else None
        return self.net.class_probabilities(
            logits, text_vocabulary, protocol.logit_scale, protocol.prob_thd, protocol.area_thd, background
        )

    def training_step(self, batch, batch_idx: int):
        raise SetupError(
            f"{type(self.net).__name__} is training-free: evaluate it with eval.py (no checkpoint needed) or "
            "segment your images with ovseg-predict; train.py has nothing to train."
        )

    def configure_optimizers(self):
        return None
