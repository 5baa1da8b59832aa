"""Streaming image-caption training data for caption-supervised methods (OVSegmentor, GroupViT).

Reading (:class:`CaptionStream`): every (rank, dataloader worker) slot reads its own disjoint part of the
shards, at shard granularity when there are enough shards and sample granularity otherwise, and re-reads its
part in a fresh random order forever (resampled); an epoch is a fixed number of batches per rank, so ranks
never disagree on the number of steps (which would hang DDP). Samples that do not decode are skipped and
counted. With ``pair_images`` every sample is paired with a recent sample of the same slot that shares an
entity (OVSegmentor's cross-image mask consistency).

:class:`CaptionDataModule` adds this to the evaluation side of :class:`SegmentationDataModule` (benchmarks,
vocabularies, sharded evaluation); on the toy benchmark it writes the caption shards itself from the toy
captions, so training sees images and captions only, never a mask.
"""

from __future__ import annotations

import io
import json
import random
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ovseg_lab.data.caption_shards import from_toy, shard_urls, write_caption_shards
from ovseg_lab.data.datamodule import SegmentationDataModule
from ovseg_lab.data.entities import EntityParser, EntityVocabulary, build_parser, parsed_caption
from ovseg_lab.errors import DataError, SetupError
from ovseg_lab.layers.normalize import IMAGENET_MEAN, IMAGENET_STD
from ovseg_lab.vocab import Vocabulary

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


CAPTION_AUGMENTS = ("ours", "crop_flip", "deit")
# the releases' timm arguments (GroupViT / OVSegmentor configs/default.yml ``data.img_aug``, datasets/builder.py)
DEIT_AUGMENT = dict(
    color_jitter=0.4,  # unused by timm next to an auto-augment policy
    auto_augment="rand-m9-mstd0.5-inc1",
    re_prob=0.25,
    re_mode="pixel",
    re_count=1,
    interpolation="bilinear",
)


class CaptionTransform:
    """uint8 (3, H, W) -> (3, S, S): random resized crop (scale range of the crop's area) and horizontal flip.

    ``augment`` says whose:

    - ``ours``: torchvision v2 on the uint8 tensor (antialiased bilinear), uint8 out;
    - ``crop_flip``: the releases' ``deit_aug: false`` (OVSegmentor stage 2, datasets/builder.py:170-177):
      torchvision ``RandomResizedCrop`` (ratio 3/4-4/3) on the PIL image with PIL's bilinear filter, then
      ``RandomHorizontalFlip``; uint8 out;
    - ``deit``: the releases' ``deit_aug: true`` (GroupViT, OVSegmentor stage 1, builder.py:186-199): timm's
      ``create_transform`` with :data:`DEIT_AUGMENT` (``RandomResizedCropAndInterpolation``, flip, RandAugment
      ``rand-m9-mstd0.5-inc1``, normalisation, random erasing with per-pixel noise in the normalised space, 1 in
      4). The erased noise lies outside [0, 1], so the result is un-normalised back to the [0, 1] scale in float16
      (within 0.13 grey level of the release's tensor; 2 bytes a pixel in the shuffle buffer).
    """

    def __init__(
        self, image_size: int = 224, scale: Sequence[float] = (0.08, 1.0), flip: bool = True, augment: str = "ours"
    ) -> None:
        if augment not in CAPTION_AUGMENTS:
            raise DataError(f"data.augment must be one of {CAPTION_AUGMENTS}, got {augment!r}.")
        self.image_size, self.augment = image_size, augment
        if augment == "ours":
            from torchvision.transforms import v2

            ops = [v2.RandomResizedCrop(image_size, scale=tuple(scale), antialias=True)]
            if flip:
                ops.append(v2.RandomHorizontalFlip())
            self.ops = v2.Compose(ops)
        elif augment == "crop_flip":
            from torchvision import transforms

            ops = [transforms.RandomResizedCrop(image_size, scale=tuple(scale))]
            if flip:
                ops.append(transforms.RandomHorizontalFlip())
            self.ops = transforms.Compose(ops)
        else:
            from timm.data import create_transform

            self.ops = create_transform(
                input_size=image_size, is_training=True, scale=tuple(scale), hflip=0.5 if flip else 0.0, **DEIT_AUGMENT
            )
            self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.augment == "ours":
            return self.ops(image).contiguous()
        picture = Image.fromarray(image.permute(1, 2, 0).numpy())
        out = self.ops(picture)
        if self.augment == "crop_flip":
            return torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()
        return (out * self.std + self.mean).to(torch.float16).contiguous()


def decode_image(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        array = np.array(img.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def slot_of(rank: int, world: int) -> tuple[int, int]:
    """(this reader's slot, number of slots) over every rank's dataloader workers."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


class CaptionStream(IterableDataset):
    """Endless, shuffled, rank- and worker-disjoint samples of caption shards, ``samples_per_epoch`` per rank.

    Items: {"image": uint8 (3, S, S), "caption": str, "mentions": [[start, end, entity]], "entities": [str],
    "key": str, "skipped": int (this reader's unreadable samples so far), "reader": int}, plus
    "pair_image" / "pair_entity" / "has_pair" with ``pair_images``.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform: CaptionTransform,
        samples_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        pair_images: bool = False,
        pair_buffer: int = 512,
        noun_parser: EntityParser | None = None,
        entity_parser: Any = None,
    ) -> None:
        super().__init__()
        if not urls:
            raise DataError("CaptionStream needs at least one shard.")
        self.urls = list(urls)
        self.transform = transform
        self.samples_per_epoch = samples_per_epoch
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.pair_images = pair_images
        self.pair_buffer = pair_buffer
        self.noun_parser = noun_parser
        self.entity_parser = entity_parser
        self.skipped = 0
        self._new_bad: list[dict[str, str]] = []  # skipped since the last yielded item: {"bad": name, "reason"}
        self._passes = 0

    # -- reading ------------------------------------------------------------------------------
    def _raw(self, slot: int, slots: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Raw tar samples of this slot, forever; each pass visits the slot's shards in a new order."""
        import webdataset as wds

        if len(self.urls) >= slots:
            shards = [(i, u) for i, u in enumerate(self.urls) if i % slots == slot]
            by_sample = False
        else:  # fewer shards than readers: every reader scans all shards and keeps every slots-th sample
            shards, by_sample = list(enumerate(self.urls)), True

        def count_error(exn: Exception) -> bool:  # a broken tar member or a truncated shard
            self.skipped += 1
            self._new_bad.append({"bad": f"{current[0]}", "reason": f"{type(exn).__name__}: {exn}"[:200]})
            return True

        current = [""]

        while True:
            order = shards[:]
            rng.shuffle(order)
            for shard_index, url in order:
                current[0] = url
                for position, sample in enumerate(wds.tarfile_samples([{"url": url}], handler=count_error)):
                    if by_sample and (shard_index + position) % slots != slot:
                        continue
                    yield sample

    def _decoded(self, slot: int, slots: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        for raw in self._raw(slot, slots, rng):
            try:
                ext = next(e for e in IMAGE_KEYS if e in raw)
                image = self.transform(decode_image(raw[ext]))
                caption = raw["txt"].decode("utf-8")
                meta = json.loads(raw["json"]) if "json" in raw else {"entities": [], "mentions": []}
            except Exception as err:  # a broken image, caption or metadata must not stop a week-long run
                self.skipped += 1
                name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
                self._new_bad.append({"bad": name, "reason": f"{type(err).__name__}: {err}"[:200]})
                continue
            item = {
                "image": image,
                "caption": caption,
                "mentions": meta.get("mentions", []),
                "entities": meta.get("entities", []),
                "key": raw.get("__key__", ""),
            }
            if "question" in meta:  # shards written with the official parser (make_caption_shards.py --parser official)
                item["question"] = meta["question"]
            if self.entity_parser is not None:  # re-parsed here instead of the shard's stored mentions (and question)
                item.pop("question", None)
                item.update(parsed_caption(self.entity_parser, caption))
            if self.noun_parser is not None:
                item["noun_mentions"] = [m.to_list() for m in self.noun_parser.noun_mentions(caption)]
            yield item

    def _shuffled(self, items: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        buffer: list[dict[str, Any]] = []
        for item in items:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], item = item, buffer[index]
            yield item
        yield from buffer

    def _paired(self, items: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        """Attach to every sample a recent sample that shares one of its entities (None while none is buffered)."""
        recent: deque[dict[str, Any]] = deque(maxlen=self.pair_buffer)
        by_entity: dict[str, list[dict[str, Any]]] = {}
        for item in items:
            candidates = [(e, p) for e in item["entities"] for p in by_entity.get(e, []) if p is not item]
            if candidates:
                entity, partner = rng.choice(candidates)
                item = {**item, "pair_image": partner["image"], "pair_entity": entity, "has_pair": True}
            else:
                item = {
                    **item,
                    "pair_image": torch.zeros_like(item["image"]),
                    "pair_entity": item["entities"][0] if item["entities"] else "",
                    "has_pair": False,
                }
            if len(recent) == recent.maxlen:
                old = recent[0]
                for e in old["entities"]:
                    by_entity[e] = [p for p in by_entity.get(e, []) if p is not old]
            recent.append(item)
            for e in item["entities"]:
                by_entity.setdefault(e, []).append(item)
            yield item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = slot_of(self.rank, self.world_size)
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        # torch.initial_seed() differs in every freshly started worker (Lightning seeds them per epoch from the
        # run seed); _passes does in the main process: every epoch visits the shards in a new order
        self._passes += 1
        rng = random.Random(hash((self.seed, torch.initial_seed(), self._passes, slot)) & 0xFFFFFFFF)
        per_reader = -(-self.samples_per_epoch // workers)
        items = self._shuffled(self._decoded(slot, slots, rng), rng)
        if self.pair_images:
            items = self._paired(items, rng)
        for count, item in enumerate(items):
            if count >= per_reader:
                return
            bad, self._new_bad = self._new_bad, []
            yield {**item, "skipped": self.skipped, "reader": slot, "bad": bad}


NOUN_PADDINGS = ("caption", "mask")


def noun_prompts(
    caption: str,
    nouns: Sequence[str],
    k: int,
    templates: Sequence[str],
    rng: np.random.RandomState,
    padding: str = "caption",
) -> tuple[list[str], list[bool]]:
    """GroupViT's multi-label prompts of one caption: ``k`` strings and which of them are real prompts.

    Up to ``k`` distinct positions of ``nouns`` drawn without replacement, each put into a template drawn from
    ``templates`` (GroupViT: the 80 ImageNet ones), with the draws made in the order of the release's
    ``WordAugTokenizeWrapper.__call__`` (datasets/builder.py:330-332: ``np.random.choice(nouns, n, replace=False)``,
    then one ``np.random.choice(templates)`` per chosen noun), so a ``RandomState`` seeded like the release's global
    one gives its strings. Short lists are padded to ``k``:

    - ``caption``: with the caption itself, counted as positives (the release, builder.py:333-334);
    - ``mask``: with empty strings marked invalid (ours: the multi-label loss ignores them).
    """
    if padding not in NOUN_PADDINGS:
        raise SetupError(f"Multi-label prompt padding must be one of {NOUN_PADDINGS}, got '{padding}'.")
    prompts: list[str] = []
    if len(nouns) > 0:
        chosen = rng.choice(list(nouns), min(k, len(nouns)), replace=False)
        prompts = [str(rng.choice(list(templates))).format(noun) for noun in chosen]
    valid = [True] * len(prompts)
    missing = k - len(prompts)
    if missing > 0:
        prompts += [caption if padding == "caption" else ""] * missing
        valid += [padding == "caption"] * missing
    return prompts, valid


def collate_captions(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; keep texts and mention lists as lists."""
    out: dict[str, Any] = {"image": torch.stack([b["image"] for b in batch])}
    for key in ("caption", "mentions", "entities", "key", "noun_mentions", "pair_entity", "question"):
        if key in batch[0]:
            out[key] = [b[key] for b in batch]
    if "pair_image" in batch[0]:
        out["pair_image"] = torch.stack([b["pair_image"] for b in batch])
        out["has_pair"] = torch.tensor([bool(b["has_pair"]) for b in batch])
    # unreadable samples so far, per reader (a reader's count only grows)
    skipped: dict[int, int] = {}
    for b in batch:
        skipped[b["reader"]] = max(skipped.get(b["reader"], 0), b["skipped"])
    out["skipped"] = skipped
    out["bad"] = [entry for b in batch for entry in b.get("bad", [])]  # recorded by the DataModule
    return out


class CaptionDataModule(SegmentationDataModule):
    """Caption shards for training, prepared benchmarks for evaluation.

    Args (beyond :class:`SegmentationDataModule`'s evaluation ones):
        shards: a shard folder (with manifest.json), a brace pattern or a list of tar paths.
        toy_shards: on the toy benchmark, where to write caption shards made from ``train``'s captions
            (entities = the training class names); ``shards`` is then ignored.
        steps_per_epoch: batches per rank per epoch (the resampled stream has no natural end).
        image_size, scale, flip, augment: training augmentation (:class:`CaptionTransform`; ``augment``: ``ours``,
            ``crop_flip`` or ``deit``, the releases' two).
        pair_images: pair samples that share an entity (stage 2, cross-image mask consistency).
        nouns: a word list for the "all nouns" masking ablation (None: unavailable).
        entity_parser: parse every caption when it is read, overriding the shard's stored mentions: ``official``
            (the release's parser with its bugs, :class:`~ovseg_lab.data.entities.OfficialEntityParser`, also
            giving the release's masked questions; paper recipes) or ``ours`` over ``entity_source``; None: use
            the mentions stored in the shards (the toy).
        entity_source: the entity file the re-parsing reads ("ovsegmentor": the packaged CC4M list).
        entity_vocabulary: what ``toy_shards`` parses ("train": the training class names, or see
            :meth:`EntityVocabulary.load`).
    """

    def __init__(
        self,
        shards: str | list[str] | None = None,
        toy_shards: Mapping[str, Any] | None = None,
        steps_per_epoch: int = 1000,
        image_size: int = 224,
        scale: Sequence[float] = (0.08, 1.0),
        flip: bool = True,
        augment: str = "ours",
        shuffle_buffer: int = 1000,
        pair_images: bool = False,
        pair_buffer: int = 512,
        nouns: Sequence[str] | None = None,
        seed: int = 0,
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
        entity_parser: str | None = None,
        entity_source: str = "ovsegmentor",
    ) -> None:
        super().__init__(
            train=train,
            eval=eval,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            transform=transform,
            generate_toy=generate_toy,
            pin_memory=pin_memory,
            shuffle_seed=shuffle_seed,
            max_bad_samples=max_bad_samples,
            max_bad_fraction=max_bad_fraction,
        )
        self.shards = shards
        self.toy_shards = dict(toy_shards) if toy_shards else None
        if shards is None and self.toy_shards is None:
            raise SetupError("CaptionDataModule needs data.shards (caption webdataset shards) or data.toy_shards.")
        self.steps_per_epoch = int(steps_per_epoch)
        self.caption_transform = CaptionTransform(image_size, scale, flip, augment)
        self.shuffle_buffer = shuffle_buffer
        self.pair_images = pair_images
        self.pair_buffer = pair_buffer
        if isinstance(nouns, str):  # a word-list file, one word per line
            path = Path(nouns).expanduser()
            if not path.is_file():
                raise DataError(f"Noun list {path} (data.nouns) not found.")
            nouns = [w.strip() for w in path.read_text().splitlines() if w.strip()]
        self.nouns = list(nouns) if nouns is not None else None
        if entity_parser not in (None, "official", "ours"):
            raise DataError(f"data.entity_parser must be official, ours or null, got {entity_parser!r}.")
        self.entity_parser, self.entity_source = entity_parser, entity_source
        self.seed = seed
        self._stream: CaptionStream | None = None

    # ------------------------------------------------------------------ shards
    @property
    def shard_location(self) -> str | list[str]:
        return self.toy_shards["out"] if self.toy_shards else self.shards

    def missing(self, stage: str = "fit") -> list[str]:
        problems = [] if self.generate_toy else [m for m in (s.missing() for s in self.eval_specs) if m]
        if stage == "fit" and not self.toy_shards:
            try:
                for url in shard_urls(self.shards):
                    if "://" not in url and not Path(url).is_file():
                        problems.append(
                            f"caption shard {url} not found (write shards with scripts/make_caption_shards.py)"
                        )
                        break
            except DataError as err:
                problems.append(f"{err} (write shards with scripts/make_caption_shards.py)")
        return problems

    def prepare_data(self) -> None:
        super().prepare_data()
        if not self.toy_shards:
            return
        out = Path(self.toy_shards["out"])
        manifest = out / "manifest.json"
        fingerprint = self._toy_fingerprint()
        if manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint:
            return
        if self.train_spec is None:
            raise SetupError("data.toy_shards needs data.train (the toy split whose captions become shards).")
        write_caption_shards(
            from_toy(self.train_spec.root, self.train_spec.split),
            out,
            self.toy_parser(),
            maxcount=int(self.toy_shards.get("maxcount", 100)),
            overwrite=True,
            progress=False,
            extra_manifest={"fingerprint": fingerprint},
        )

    def _toy_fingerprint(self) -> str:
        toy_manifest = Path(self.train_spec.root).parent / "manifest.json" if self.train_spec else None
        toy_print = (
            json.loads(toy_manifest.read_text()).get("fingerprint") if toy_manifest and toy_manifest.is_file() else ""
        )
        return f"{toy_print}/{self.toy_shards.get('maxcount', 100)}/{self.toy_shards.get('entities', 'train')}"

    def toy_parser(self) -> EntityParser:
        source = self.toy_shards.get("entities", "train") if self.toy_shards else "train"
        vocabulary = (
            EntityVocabulary.from_names(self.train_vocabulary.classes, name=self.train_vocabulary.name)
            if source == "train"
            else EntityVocabulary.load(source)
        )
        return EntityParser(vocabulary, self.nouns)

    # ------------------------------------------------------------------ loaders
    @property
    def train_vocabulary(self) -> Vocabulary:
        return super().train_vocabulary

    def setup(self, stage: str | None = None) -> None:
        # Training reads shards only (never the masks of data.train); evaluation as in the base class.
        if not self._eval_sets:
            from ovseg_lab.data.benchmark import SegmentationFolder

            self._eval_sets = [SegmentationFolder(b.spec, len(b.vocabulary)) for b in self.eval_benchmarks]

    def build_stream(self, rank: int = 0, world_size: int = 1) -> CaptionStream:
        """The training stream of one rank (tests build two to check that ranks read disjoint samples)."""
        noun_parser = EntityParser(None, self.nouns) if self.nouns is not None else None
        return CaptionStream(
            shard_urls(self.shard_location),
            self.caption_transform,
            self.steps_per_epoch * self.batch_size,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            pair_images=self.pair_images,
            pair_buffer=self.pair_buffer,
            noun_parser=noun_parser,
            entity_parser=build_parser(self.entity_parser, self.entity_source) if self.entity_parser else None,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        self._stream = self.build_stream(rank, world)
        workers = self.num_workers
        return DataLoader(
            self._stream,
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            collate_fn=collate_captions,
        )
