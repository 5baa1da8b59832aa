"""OVSeg's two training recipes, both evaluated through the shared base (with labels for the analysis modes).

- :class:`MaskFormerModule` (``model=ovseg``): stage 1, MaskFormer with the frozen CLIP text tower as its
  classifier; evaluation runs the whole OVSeg pipeline (proposals + masked-region CLIP + ensemble).
- :class:`CLIPAdaptModule` (``model=ovseg_clip_adapt``): adapts the CLIP image tower on mask-category pairs with
  a symmetric InfoNCE loss: full fine-tuning (``ft``), mask prompt tuning (``mpt``) or both in a configured
  order (``ft_mpt``: FT, then MPT on the frozen fine-tuned tower). Evaluation classifies ground-truth segments
  with the adapted CLIP (the bottleneck analysis). At the end it exports the CLIP weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ovseg_lab.checkpoints import load_state_from
from ovseg_lab.errors import SetupError
from ovseg_lab.eval.inference import segment
from ovseg_lab.layers.contrastive import info_nce
from ovseg_lab.lit.base import OpenVocabModule, to_unit_float
from ovseg_lab.lit.nonfinite import NonFiniteLossPolicy
from ovseg_lab.utils.io import atomic_path
from ovseg_lab.vocab import with_release_strings

ADAPT_KINDS = ("ft", "mpt", "pretrain")


def labels_at(labels: torch.Tensor, size) -> torch.Tensor:
    """(B, H, W) labels at the size the protocol resized the images to (nearest; the analysis modes read them at
    the image's resolution), unchanged when the sizes agree."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(labels.dtype)


class LabelAwareEval(OpenVocabModule):
    """Evaluation that hands ground-truth labels to nets whose analysis modes need them."""

    def _eval_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int) -> None:
        if not getattr(self.net, "needs_labels", False):
            return super()._eval_step(batch, batch_idx, dataloader_idx)
        if self.inference_cfg.mode != "whole":
            raise SetupError("OVSeg's analysis modes evaluate whole images: set model.inference.mode=whole.")
        bench = self._benchmarks[dataloader_idx]
        images, labels = batch["image"], batch["label"]
        pairs = (
            [(images, labels)]
            if isinstance(images, torch.Tensor)
            else [(i[None], l[None]) for i, l in zip(images, labels)]
        )
        vocabulary = with_release_strings(bench.vocabulary, self.class_strings)
        for image, label in pairs:
            with torch.no_grad():
                scores = segment(
                    lambda x: self.net(x, vocabulary, labels=labels_at(label, x.shape[-2:])), image, self.inference_cfg
                )
            pred = scores.argmax(dim=1)
            if bench.background_from is not None:
                pred = pred.clamp(max=bench.background_from)
            self.metrics[bench.name].update(pred, label)


class MaskFormerModule(NonFiniteLossPolicy, LabelAwareEval):
    """Stage 1: ``loss = SetCriterion(MaskFormer(images, text features of the training vocabulary), labels)``.

    The CLIP towers stay frozen (OVSeg trains MaskFormer against fixed CLIP text embeddings).
    """

    def __init__(
        self, *args, nonfinite_loss: str = "raise", no_weight_decay_names: Sequence[str] = (), **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_nonfinite(nonfinite_loss)
        self.net.clip.requires_grad_(False)
        # parameter names without weight decay (experiment=ovseg: the release's Swin position bias tables)
        self.no_weight_decay_names = tuple(no_weight_decay_names)

    def param_groups_for(self, base_lr: float, weight_decay: float, **exemptions: Any) -> list[dict]:
        return super().param_groups_for(base_lr, weight_decay, no_decay_names=self.no_weight_decay_names, **exemptions)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int):
        images = to_unit_float(batch["image"])
        labels = batch["label"]
        div = self.net.maskformer.size_divisibility
        ph, pw = (-images.shape[-2]) % div, (-images.shape[-1]) % div
        if (
            ph or pw
        ):  # the release's mapper pads uint8 crops with 128 before normalising (mask_former_semantic_dataset_mapper.py:156)
            images = F.pad(images, (0, pw, 0, ph), value=128 / 255)
            labels = F.pad(labels, (0, pw, 0, ph), value=self.net.ignore_index)
        self.net.clip.eval()
        # the release trains against its own COCO-Stuff strings too (model.class_strings)
        outputs = self.net.maskformer_outputs(
            images, with_release_strings(self.train_vocabulary, self.class_strings).classes
        )
        losses = self.net.loss(outputs, labels)
        if not self.loss_is_finite(losses["loss"], batch_idx, f"images {list(batch.get('stem', []))[:8]}"):
            return None
        batch_size = images.shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        for key in ("loss_ce", "loss_mask", "loss_dice"):
            self.log(f"train/{key}", losses[key], on_step=True, on_epoch=False, batch_size=batch_size)
        return losses["loss"]


def parse_adapt(adapt: str) -> list[str]:
    """``"ft_mpt"`` -> ["ft", "mpt"]; ``"none"`` or "" -> [] (the CLIP is exported unchanged)."""
    if adapt in (None, "", "none"):
        return []
    phases = str(adapt).split("_")
    bad = [p for p in phases if p not in ADAPT_KINDS]
    if bad or len(set(phases)) != len(phases):
        raise SetupError(
            f"model.adapt='{adapt}': use phases from {ADAPT_KINDS} joined by '_' (each once), e.g. ft_mpt."
        )
    return phases


def release_no_decay(name: str, param: torch.Tensor) -> bool:
    """The release's weight-decay exemption (open_clip_training/src/training/main.py:173)."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


class CLIPAdaptModule(LabelAwareEval):
    """Adapts CLIP to masked regions on (masked crop, noun) pairs.

    Args:
        adapt: phases joined by '_' run one after the other, each for ``phase_steps`` (default: equal shares of
            ``total_steps``):
            ``ft`` (whole image tower), ``mpt`` (mask prompts only; needs ``clip.mask_prompt_depth > 0``),
            ``pretrain`` (every CLIP parameter but the token embedding table, both towers and the logit scale:
            the toy stand-in for CLIP's web pre-training, on image-caption pairs); ``none`` exports the CLIP
            unchanged.
        lr / weight_decay: per phase kind (OVSeg: FT 5e-6 / 0.2, MPT 5e-2 / 0).
        train_template: how a noun becomes a prompt for the (frozen) text tower.
        duplicate_texts: ``unique`` (same noun twice in a batch = one text, both images positive) or ``keep``
            (CLIP's loss: duplicates are false negatives, as in the release).
        init_weights: CLIP weights to start from (a previous stage's export); mask prompts may be absent.
        param_groups: ``ours`` (one AdamW group per phase, its weight decay on every parameter) or ``release``
            (open_clip_training/src/training/main.py:173-186: no weight decay on parameters with fewer than 2
            dimensions or named bn / ln / bias / logit_scale).
        train_logit_scale: CLIP's logit scale trains in every phase, at that phase's learning rate (the release
            trains it in FT and in MPT: neither ``--lock-text`` nor ``--lock-image`` freezes it); each phase starts
            it with fresh AdamW moments, as each release phase is its own run. False keeps it fixed.
        logit_scale_clamp: ``forward`` (ours: ``exp(logit_scale)`` capped at 100 where the loss reads it) or
            ``parameter`` (the release, train.py:117-119: the parameter itself clamped to [0, ln 100] after every
            optimizer step, read unclamped).
        betas / eps: AdamW's (torch's defaults; the release: (0.9, 0.98) / 1e-6 for ViTs, params.py:4-10).
        ft_mask_prompts: whether FT already runs the image tower with the mask prompts (ours: the tower FT adapts
            is the one MPT and inference use) or without them, background patches as they are (the release: its FT
            CLIP has no mask embedding, ``--mask-emb-depth`` 0 and no ``--with-mask``).
        schedule: ``ours`` (the warm-up factor multiplies a cosine over the whole phase) or ``release``
            (open_clip_training/src/training/scheduler.py: linear warm-up ``(step + 1) / warmup`` to the base lr,
            then a cosine over the phase's remaining steps).
        export: file name in the run directory for the adapted CLIP state dict (``model.net.clip_weights``).
    """

    def __init__(
        self,
        *args,
        adapt: str = "mpt",
        total_steps: int = 1,
        phase_steps: list[int] | None = None,
        lr: Mapping[str, float] | None = None,
        weight_decay: Mapping[str, float] | None = None,
        warmup_steps: int = 0,
        train_template: str = "a photo of a {}.",
        duplicate_texts: str = "unique",
        init_weights: str | None = None,
        export: str = "clip_adapted.pt",
        param_groups: str = "ours",
        train_logit_scale: bool = False,
        logit_scale_clamp: str = "forward",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        schedule: str = "ours",
        ft_mask_prompts: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.phases = parse_adapt(adapt)
        if "mpt" in self.phases and self.net.clip.mask_prompts is None:
            raise SetupError("model.adapt includes mpt but clip.mask_prompt_depth is 0: set a prompt depth (paper: 3).")
        if duplicate_texts not in ("unique", "keep"):
            raise SetupError(f"model.duplicate_texts must be 'unique' or 'keep', got '{duplicate_texts}'.")
        if "{}" not in train_template:
            raise SetupError(f"model.train_template must contain '{{}}', got '{train_template}'.")
        self.total_steps = max(1, int(total_steps))
        if phase_steps is None:  # equal shares
            bounds = [round(self.total_steps * (i + 1) / max(1, len(self.phases))) for i in range(len(self.phases))]
        else:
            if len(phase_steps) != len(self.phases):
                raise SetupError(
                    f"model.phase_steps {list(phase_steps)} must give one step count per phase of '{adapt}'."
                )
            bounds = [int(sum(phase_steps[: i + 1])) for i in range(len(phase_steps))]
        self.phase_bounds = [0] + bounds  # phase i trains steps [bounds[i], bounds[i+1])
        self.lr = {"ft": 5e-6, "mpt": 5e-2, "pretrain": 1e-3, **dict(lr or {})}
        self.weight_decay = {"ft": 0.2, "mpt": 0.0, "pretrain": 0.1, **dict(weight_decay or {})}
        self.warmup_steps = warmup_steps
        self.train_template = train_template
        self.duplicate_texts = duplicate_texts
        self.export = export
        if param_groups not in ("ours", "release"):
            raise SetupError(f"model.param_groups must be 'ours' or 'release', got '{param_groups}'.")
        self.param_groups = param_groups
        self.train_logit_scale = train_logit_scale
        if logit_scale_clamp not in ("forward", "parameter"):
            raise SetupError(f"model.logit_scale_clamp must be 'forward' or 'parameter', got '{logit_scale_clamp}'.")
        self.logit_scale_clamp = logit_scale_clamp
        self.betas, self.eps = tuple(float(b) for b in betas), float(eps)
        if schedule not in ("ours", "release"):
            raise SetupError(f"model.schedule must be 'ours' or 'release', got '{schedule}'.")
        self.schedule = schedule
        self.ft_mask_prompts = ft_mask_prompts
        clip = self.net.clip
        if init_weights:
            state = load_state_from(init_weights, ("net.clip.", "clip.", ""))
            if "mask_prompts" not in state and clip.mask_prompts is not None:
                state["mask_prompts"] = clip.mask_prompts.detach().clone()  # fresh prompts for a first MPT
            missing, unexpected = clip.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise SetupError(
                    f"model.init_weights {init_weights} does not fit the configured CLIP: missing {missing[:3]}, unexpected {unexpected[:3]}."
                )
        clip.requires_grad_(False)
        self._set_phase(0 if self.phases else None)

    # ------------------------------------------------------------------ what trains when
    def phase_params(self, kind: str) -> list[torch.nn.Parameter]:
        """The parameters phase ``kind`` trains, without the logit scale when it has its own group
        (``train_logit_scale``)."""
        clip = self.net.clip
        if kind == "ft":
            params = list(clip.model.visual.parameters())
        elif kind == "mpt":
            params = [clip.mask_prompts]
        else:
            # pretrain: everything but the token embedding table (49k x width, random fixed inputs serve as well
            # and its dense Adam update would dominate a tiny model's step)
            embedding = clip.model.token_embedding.weight
            params = [p for p in clip.model.parameters() if p is not embedding] + (
                [clip.mask_prompts] if clip.mask_prompts is not None else []
            )
        if self.train_logit_scale:
            params = [p for p in params if p is not clip.model.logit_scale]
        return params

    def phase_at(self, step: int) -> int:
        return next((i for i in range(len(self.phases)) if step < self.phase_bounds[i + 1]), len(self.phases) - 1)

    def _set_phase(self, index: int | None) -> None:
        self.net.clip.requires_grad_(False)
        if index is not None:
            for param in self.phase_params(self.phases[index]):
                param.requires_grad_(True)
            if self.train_logit_scale:
                self.net.clip.model.logit_scale.requires_grad_(True)
        self._phase = index

    def _start_logit_scale_phase(self, optimizer: torch.optim.Optimizer, index: int) -> None:
        """The logit scale's group takes phase ``index``'s weight decay and fresh AdamW moments (each release
        phase is its own run with its own optimizer)."""
        scale = self.net.clip.model.logit_scale
        optimizer.state.pop(scale, None)
        for group in optimizer.param_groups:
            if any(p is scale for p in group["params"]):
                decay = self.param_groups == "ours"  # the release exempts the logit scale
                group["weight_decay"] = self.weight_decay[self.phases[index]] if decay else 0.0

    def on_train_start(self) -> None:
        if not self.phases:
            self.trainer.should_stop = True  # adapt=none: nothing trains, the CLIP is exported as it is

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.phases:
            index = self.phase_at(self.global_step)
            if index != self._phase:
                self._set_phase(index)
                if self.train_logit_scale:
                    self._start_logit_scale_phase(self.optimizers(use_pl_optimizer=False), index)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.logit_scale_clamp == "parameter":  # the release, after every optimizer step (train.py:117-119)
            with torch.no_grad():
                self.net.clip.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self):
        if not self.phases:
            return None
        groups, seen, phase_of_group = [], set(), []
        for index, kind in enumerate(self.phases):
            params = [p for p in self.phase_params(kind) if id(p) not in seen]
            seen.update(id(p) for p in params)
            for group_params, decay in self.decay_split(params):
                groups.append(
                    {
                        "params": group_params,
                        "lr": self.lr[kind],
                        "weight_decay": self.weight_decay[kind] if decay else 0.0,
                    }
                )
                phase_of_group.append(index)
        factors = [self.phase_window(i) for i in phase_of_group]
        if self.train_logit_scale:
            # one group across the phases: its base lr is 1 and its factor the active phase's lr at this step
            groups.append({"params": [self.net.clip.model.logit_scale], "lr": 1.0, "weight_decay": 0.0})
            windows = [(self.lr[kind], self.phase_window(i)) for i, kind in enumerate(self.phases)]
            factors.append(lambda step: sum(lr * window(step) for lr, window in windows))
        optimizer = torch.optim.AdamW(groups, betas=self.betas, eps=self.eps, foreach=True)
        if self.train_logit_scale:
            self._start_logit_scale_phase(optimizer, self._phase or 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def phase_window(self, index: int):
        """step -> factor of phase ``index``'s base lr at that (global) step; 0 outside the phase. LambdaLR steps
        after each optimizer step, so step s trains with factor(s), as the release's ``scheduler(step)`` before it."""
        start, span = self.phase_bounds[index], max(1, self.phase_bounds[index + 1] - self.phase_bounds[index])
        warmup = self.warmup_steps

        def factor(step: int) -> float:
            local = step - start
            if local < 0 or local >= span:
                return 0.0  # another phase trains now
            if self.schedule == "release":  # scheduler.py cosine_lr: warm-up, then the cosine after it
                if local < warmup:
                    return (local + 1) / warmup
                return 0.5 * (1 + math.cos(math.pi * (local - warmup) / max(1, span - warmup)))
            warm = min(1.0, (local + 1) / warmup) if warmup else 1.0
            return warm * 0.5 * (1 + math.cos(math.pi * local / span))

        return factor

    def decay_split(self, params: list[torch.nn.Parameter]) -> list[tuple[list[torch.nn.Parameter], bool]]:
        """[(parameters, weight decay applies)]: one group (``ours``), or the release's split into decayed and
        not-decayed parameters (``release``); empty groups are left out."""
        if self.param_groups == "ours":
            return [(params, True)]
        names = {id(p): n for n, p in self.net.clip.named_parameters()}
        exempt = [p for p in params if release_no_decay(names[id(p)], p)]
        rest = [p for p in params if not release_no_decay(names[id(p)], p)]
        return [(group, decay) for group, decay in ((exempt, False), (rest, True)) if group]

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int):
        clip = self.net.clip
        masks = batch["mask"].bool()
        # background exactly at the CLIP mean (0) whatever rounding the stored crop went through
        crops = clip.normalize(to_unit_float(batch["image"])) * masks[:, None]
        prompted = self.ft_mask_prompts or self.phases[self._phase] != "ft"
        image = self.net.region.region_features(crops, masks if prompted else None)
        texts = list(batch["text"])
        if self.duplicate_texts == "unique":
            unique = list(dict.fromkeys(texts))
            groups = torch.tensor([unique.index(t) for t in texts], device=image.device)
        else:
            unique, groups = texts, None
        prompts = [self.train_template.format(t) for t in unique]
        with torch.set_grad_enabled(self.phases[self._phase] == "pretrain"):
            text = F.normalize(clip.encode_text(prompts).float(), dim=-1)
        scale = clip.model.logit_scale.exp()
        if self.logit_scale_clamp == "forward":
            scale = scale.clamp(max=100)
        loss = info_nce(image, text, scale, groups, gather=False)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=crops.shape[0])
        self.log("train/phase", float(self._phase), on_step=True, on_epoch=False, batch_size=crops.shape[0])
        return loss

    def training_adapted_state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu() for k, v in self.net.clip.state_dict().items()}
        if "mpt" not in self.phases:
            state.pop("mask_prompts", None)  # untrained prompts are not part of the result
        return state

    def on_fit_end(self) -> None:
        if self.trainer is None or not self.trainer.is_global_zero:
            return
        path = Path(self.trainer.default_root_dir) / self.export
        with atomic_path(path) as tmp:
            torch.save(self.training_adapted_state(), tmp)
        self.print(f"adapted CLIP written to {path}")
