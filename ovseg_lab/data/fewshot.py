"""The few-shot-split zero-shot protocol of LSeg's tables, as a DataModule.

Classes are split into folds (PASCAL-5i, COCO-20i) or class splits (FSS-1000). A model trains on the other
classes and is tested on the held-out ones, one *episode* at a time: an image, a class present in it, and
the 2-way question ["others", class]; the label is 1 on the class's pixels and 0 elsewhere (255 = ignore).
Scores (:class:`ovseg_lab.eval.episodes.EpisodeIoU`): foreground IoU per held-out class averaged over the
fold (mIoU) and FB-IoU. Training uses the same 2-way episodes over the training classes (LSeg's zero-shot
recipe).

=============  ===========================================================================================
protocol       held out (0-based class ids)                  test episodes
=============  ===========================================================================================
pascal5i       fold i: 5i .. 5i+4 (VOC classes 5i+1 .. 5i+5)   HSNet's fixed list of the fold (346/451/725/346)
coco20i        fold i: i + 4k, k = 0..19 (mask value +1)       ``episodes`` draws (class uniform, then an image
                                                               containing it) from a generator seeded ``seed``
fss1000        test split: ids 760 .. 999 (240 classes)       every test image except the support image "1"
toy_folds      fold i of the 36 toy_seen classes: i + 4k      every (val image, held-out class present) pair
toy_classes    the 36 toy_unseen names (train: toy_seen)      every (toy_unseen val image, class present) pair
=============  ===========================================================================================

Real data is read in the layout HSNet and LSeg distribute (``root`` = their ``Datasets_HSN`` folder)::

    ROOT/VOC2012/JPEGImages/<id>.jpg, ROOT/VOC2012/SegmentationClassAug/<id>.png   (0 bg, 1..20, 255 boundary)
    ROOT/COCO2014/{train2014,val2014}/<name>.jpg, ROOT/COCO2014/annotations/{train2014,val2014}/<name>.png
    ROOT/FSS-1000/<category>/<n>.jpg and <n>.png (binary mask, >= 128 = foreground)

The toy protocols read the toy benchmark (``scripts/make_toy.py``; generated on first use).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from ovseg_lab.data.benchmark import IMAGE_EXTENSIONS, read_image, read_label
from ovseg_lab.data.datamodule import ShardedEvalSampler
from ovseg_lab.data.transforms import resize_pair
from ovseg_lab.errors import DataError, SetupError
from ovseg_lab.utils.io import write_json
from ovseg_lab.vocab import PACKAGED_VOCABULARIES, Vocabulary, load_vocabulary

OTHERS = "others"
NUM_FOLDS = 4
FSS_SPLITS = {"trn": range(0, 520), "val": range(520, 760), "test": range(760, 1000)}
HSNET_LAYOUT_HINT = "see docs/lseg.md (\"Few-shot-split data\") for the expected HSNet/LSeg layout and downloads"


# ---------------------------------------------------------------------------------------------- fold definitions
def _check_fold(fold: int, num_folds: int = NUM_FOLDS) -> int:
    if not 0 <= int(fold) < num_folds:
        raise SetupError(f"data.fold must be in 0..{num_folds - 1}, got {fold}.")
    return int(fold)


def pascal5i_fold_classes(fold: int) -> list[int]:
    """Held-out classes of PASCAL-5i fold ``fold`` (0-based VOC ids; VOC classes 5i+1 .. 5i+5)."""
    fold = _check_fold(fold)
    return list(range(5 * fold, 5 * fold + 5))


def coco20i_fold_classes(fold: int) -> list[int]:
    """Held-out classes of COCO-20i fold ``fold``: 0-based COCO-80 ids fold + 4k (mask values fold + 4k + 1)."""
    fold = _check_fold(fold)
    return [fold + NUM_FOLDS * k for k in range(20)]


def interleaved_fold_classes(num_classes: int, fold: int, num_folds: int = NUM_FOLDS) -> list[int]:
    """COCO-20i-style folds over any class list: class c belongs to fold c mod num_folds."""
    fold = _check_fold(fold, num_folds)
    return [c for c in range(num_classes) if c % num_folds == fold]


def _read_lines(path: Path, key: str) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as err:
        raise DataError(f"Cannot read {path} ({key}): {err.strerror or err}.") from None


def _packaged_lines(name: str) -> list[str]:
    text = (resources.files("ovseg_lab") / "assets" / "fewshot" / name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _class_names(source: str | Sequence[str] | None, default: Sequence[str], expected: int) -> tuple[str, ...]:
    """Class names from a packaged vocabulary name, a file, an explicit list, or the protocol's default."""
    if source is None:
        names = list(default)
    elif isinstance(source, str):
        names = list(load_vocabulary(source).classes) if (source in PACKAGED_VOCABULARIES or Path(source).suffix == ".json") \
            else _read_lines(Path(source), "data.options.class_names")
    else:
        names = [str(n) for n in source]
    if len(names) != expected:
        raise SetupError(f"The few-shot protocol needs {expected} class names, got {len(names)} (data.options.class_names).")
    return tuple(names)


# ---------------------------------------------------------------------------------------------- episodes
@dataclass(frozen=True)
class Episode:
    """One 2-way problem: ``class_id`` indexes the protocol's class list; the label file's foreground is the
    pixels equal to ``label_value`` (None: a binary mask, foreground >= 128)."""

    image: str
    label: str
    class_id: int
    label_value: int | None
    stem: str


def _read_binary_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return (np.array(img.convert("L")) >= 128).astype(np.int64)
    except (OSError, SyntaxError) as err:
        raise DataError(f"Cannot read mask {path}: {err}") from None


class EpisodeDataset(Dataset):
    """Items ``{"image": uint8 (3, S, S), "label": int64 (S, S) in {0, 1, ignore}, "class_id": int, "stem"}``.

    Images are resized to ``image_size`` squared (bilinear; labels nearest), as HSNet and LSeg evaluate
    (480); None keeps the size.
    """

    def __init__(self, episodes: Sequence[Episode], image_size: int | None = 480, ignore_index: int = 255) -> None:
        self.episodes = list(episodes)
        self.image_size = image_size
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        episode = self.episodes[index]
        image = read_image(Path(episode.image))
        if episode.label_value is None:
            mask = _read_binary_mask(Path(episode.label))
        else:
            raw = read_label(Path(episode.label))
            mask = (raw == episode.label_value).astype(np.int64)
            mask[raw == self.ignore_index] = self.ignore_index
        if image.shape[:2] != mask.shape:
            raise DataError(f"Image {episode.image} is {image.shape[1]}x{image.shape[0]} but its mask {episode.label} "
                            f"is {mask.shape[1]}x{mask.shape[0]}.")
        image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        label_t = torch.from_numpy(mask)
        if self.image_size:
            image_t, label_t = resize_pair(image_t, label_t, (self.image_size, self.image_size))
        return {"image": image_t, "label": label_t, "class_id": episode.class_id, "stem": episode.stem}


def collate_episodes(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "label": torch.stack([b["label"] for b in batch]),
        "class_id": torch.tensor([b["class_id"] for b in batch], dtype=torch.long),
        "stem": [b["stem"] for b in batch],
    }


def index_labels(label_files: Mapping[str, Path], cache: Path | None = None, desc: str = "indexing labels",
                 ignore: Sequence[int] = (255,)) -> dict[int, list[str]]:
    """label value -> sorted stems whose label map contains it (scanned once, cached as JSON when possible)."""
    if cache is not None and cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("files") == len(label_files):
                return {int(k): v for k, v in stored["index"].items()}
        except (json.JSONDecodeError, KeyError):
            pass
    from tqdm import tqdm

    index: dict[int, list[str]] = {}
    for stem in tqdm(sorted(label_files), desc=desc, unit="label", disable=len(label_files) < 2000):
        for value in np.unique(read_label(label_files[stem])).tolist():
            if value not in ignore:
                index.setdefault(int(value), []).append(stem)
    if cache is not None:
        try:
            write_json(cache, {"files": len(label_files), "index": {str(k): v for k, v in sorted(index.items())}})
        except OSError:  # a read-only dataset folder: index again next time
            pass
    return index


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in extensions} if folder.is_dir() else {}


def _pairs(index: Mapping[int, list[str]], classes: Sequence[int], value_of, images: Mapping[str, Path],
           labels: Mapping[str, Path]) -> list[Episode]:
    """Every (image, class) pair of ``classes`` (0-based) in ``index`` (label value -> stems)."""
    episodes = []
    for class_id in classes:
        value = value_of(class_id)
        for stem in index.get(value, []):
            if stem in images:
                episodes.append(Episode(str(images[stem]), str(labels[stem]), class_id, value, f"{stem}__{class_id}"))
    return sorted(episodes, key=lambda e: (e.stem.rsplit("__", 1)[0], e.class_id))


def _missing_dirs(name: str, folders: Sequence[Path], hint: str) -> list[str]:
    absent = [str(f) for f in folders if not f.is_dir()]
    return [f"{name}: {', '.join(absent)} not found ({hint})"] if absent else []


# ---------------------------------------------------------------------------------------------- protocols
class FewShotProtocol:
    """Which classes are held out and where the train / test episodes come from."""

    name: str = "fewshot"
    class_names: tuple[str, ...] = ()

    def eval_classes(self) -> list[int]:
        raise NotImplementedError

    def train_classes(self) -> list[int]:
        held_out = set(self.eval_classes())
        return [c for c in range(len(self.class_names)) if c not in held_out]

    def eval_episodes(self) -> list[Episode]:
        raise NotImplementedError

    def train_episodes(self) -> list[Episode]:
        raise NotImplementedError

    def missing(self, stage: str = "fit") -> list[str]:
        return []

    @property
    def benchmark_name(self) -> str:
        return self.name


class Pascal5i(FewShotProtocol):
    """PASCAL-5i fold ``fold``. Test episodes: HSNet's list (packaged, or ``val_lists`` = a folder of
    ``fold{i}.txt``), capped at ``episodes`` as in HSNet. Training pairs: HSNet's ``trn`` lists when
    ``train_lists`` names their folder, otherwise every (image, training class present) pair of the
    SegmentationClassAug images outside VOC2012 val (``ImageSets/Segmentation/val.txt``)."""

    name = "pascal5i"

    def __init__(self, root: str, fold: int = 0, episodes: int | None = 1000, seed: int = 0,
                 class_names: Any = None, val_lists: str | None = None, train_lists: str | None = None) -> None:
        self.root = Path(root)
        self.fold = _check_fold(fold)
        self.episodes = episodes
        self.class_names = _class_names(class_names, load_vocabulary("voc20").classes, 20)
        self.val_lists = Path(val_lists) if val_lists else None
        self.train_lists = Path(train_lists) if train_lists else None
        self.image_dir = self.root / "VOC2012" / "JPEGImages"
        self.label_dir = self.root / "VOC2012" / "SegmentationClassAug"

    @property
    def benchmark_name(self) -> str:
        return f"{self.name}_fold{self.fold}"

    def eval_classes(self) -> list[int]:
        return pascal5i_fold_classes(self.fold)

    def _list(self, folder: Path | None, fold: int) -> list[tuple[str, int]]:
        lines = _packaged_lines(f"pascal5i_val_fold{fold}.txt") if folder is None else \
            _read_lines(folder / f"fold{fold}.txt", "data.options.val_lists / train_lists")
        pairs = []
        for line in lines:
            stem, _, cls = line.partition("__")
            pairs.append((stem, int(cls) - 1))
        return pairs

    def _episode(self, stem: str, class_id: int) -> Episode:
        return Episode(str(self.image_dir / f"{stem}.jpg"), str(self.label_dir / f"{stem}.png"), class_id, class_id + 1,
                       f"{stem}__{class_id}")

    def eval_episodes(self) -> list[Episode]:
        pairs = self._list(self.val_lists, self.fold)
        held_out = set(self.eval_classes())
        foreign = sorted({c for _, c in pairs if c not in held_out})
        if foreign:
            raise DataError(f"The PASCAL-5i fold {self.fold} list names classes {foreign} outside the fold {sorted(held_out)}.")
        episodes = [self._episode(stem, cls) for stem, cls in pairs]
        return episodes[: self.episodes] if self.episodes else episodes

    def train_episodes(self) -> list[Episode]:
        if self.train_lists is not None:
            pairs = [p for j in range(NUM_FOLDS) if j != self.fold for p in self._list(self.train_lists, j)]
            return [self._episode(stem, cls) for stem, cls in pairs]
        val_ids = set(_read_lines(self.root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt", "VOC2012 val ids"))
        labels = {s: p for s, p in _files_by_stem(self.label_dir, (".png",)).items() if s not in val_ids}
        images = {s: self.image_dir / f"{s}.jpg" for s in labels}
        index = index_labels(labels, self.root / ".ovseg_cache" / "pascal5i_train_index.json", "PASCAL-5i train labels")
        return _pairs(index, self.train_classes(), lambda c: c + 1, images, labels)

    def missing(self, stage: str = "fit") -> list[str]:
        problems = _missing_dirs("PASCAL-5i", [self.image_dir, self.label_dir], HSNET_LAYOUT_HINT)
        if stage == "fit" and self.train_lists is None and not problems:
            val_txt = self.root / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
            if not val_txt.is_file():
                problems.append(f"PASCAL-5i training needs {val_txt} (to leave VOC val images out) or "
                                "data.options.train_lists=<HSNet repo>/data/splits/pascal/trn")
        return problems


class Coco20i(FewShotProtocol):
    """COCO-20i fold ``fold``: ``episodes`` test episodes drawn with a generator seeded ``seed`` (a class of
    the fold uniformly, then uniformly one val2014 image whose mask contains it), as HSNet samples them."""

    name = "coco20i"

    def __init__(self, root: str, fold: int = 0, episodes: int | None = 1000, seed: int = 0,
                 class_names: Any = None) -> None:
        self.root = Path(root) / "COCO2014"
        self.fold = _check_fold(fold)
        self.episodes = episodes or 1000
        self.seed = seed
        self.class_names = _class_names(class_names, _packaged_lines("coco80_lseg.txt"), 80)

    @property
    def benchmark_name(self) -> str:
        return f"{self.name}_fold{self.fold}"

    def eval_classes(self) -> list[int]:
        return coco20i_fold_classes(self.fold)

    def _split(self, split: str) -> tuple[dict[int, list[str]], dict[str, Path], dict[str, Path]]:
        labels = _files_by_stem(self.root / "annotations" / split, (".png",))
        images = {s: self.root / split / f"{s}.jpg" for s in labels}
        index = index_labels(labels, self.root / ".ovseg_cache" / f"coco20i_{split}_index.json", f"COCO-20i {split} labels")
        return index, images, labels

    def eval_episodes(self) -> list[Episode]:
        index, images, labels = self._split("val2014")
        classes = self.eval_classes()
        empty = [self.class_names[c] for c in classes if not index.get(c + 1)]
        if empty:
            raise DataError(f"COCO-20i fold {self.fold}: no val2014 mask contains {empty} ({self.root / 'annotations' / 'val2014'}).")
        rng = np.random.default_rng(self.seed)
        episodes = []
        for _ in range(self.episodes):
            class_id = classes[int(rng.integers(len(classes)))]
            stems = index[class_id + 1]
            stem = stems[int(rng.integers(len(stems)))]
            episodes.append(Episode(str(images[stem]), str(labels[stem]), class_id, class_id + 1, f"{stem}__{class_id}"))
        return episodes

    def train_episodes(self) -> list[Episode]:
        index, images, labels = self._split("train2014")
        return _pairs(index, self.train_classes(), lambda c: c + 1, images, labels)

    def missing(self, stage: str = "fit") -> list[str]:
        splits = ["val2014"] + (["train2014"] if stage == "fit" else [])
        folders = [self.root / s for s in splits] + [self.root / "annotations" / s for s in splits]
        return _missing_dirs("COCO-20i", folders, HSNET_LAYOUT_HINT)


class Fss1000(FewShotProtocol):
    """FSS-1000 class splits (520 training / 240 validation / 240 test classes, HSNet's lists). Test episodes:
    every image of every ``split`` class, minus the support image "1" when ``exclude_support`` (HSNet's
    1-shot test set, which LSeg's zero-shot test script uses: 2,160 episodes); training: every image of the
    520 training classes."""

    name = "fss1000"

    def __init__(self, root: str, fold: int = 0, episodes: int | None = None, seed: int = 0,
                 class_names: Any = None, split: str = "test", exclude_support: bool = True) -> None:
        if split not in ("val", "test"):
            raise SetupError(f"FSS-1000 evaluates the 'val' or 'test' class split, got '{split}' (data.options.split).")
        self.root = Path(root) / "FSS-1000"
        self.episodes = episodes
        self.split = split
        self.exclude_support = exclude_support
        self.class_names = _class_names(class_names, _packaged_lines("fss1000_classes.txt"), 1000)

    def eval_classes(self) -> list[int]:
        return list(FSS_SPLITS[self.split])

    def train_classes(self) -> list[int]:
        return list(FSS_SPLITS["trn"])

    def _episodes(self, classes: Sequence[int], exclude_support: bool) -> list[Episode]:
        episodes = []
        for class_id in sorted(classes, key=lambda c: self.class_names[c]):
            folder = self.root / self.class_names[class_id]
            # HSNet sorts the paths as strings ("1.jpg" < "10.jpg" < "2.jpg"); "1" is the 1-shot support image
            for image in sorted(folder.glob("*.jpg"), key=str):
                if exclude_support and image.stem == "1":
                    continue
                episodes.append(Episode(str(image), str(image.with_suffix(".png")), class_id, None,
                                        f"{folder.name}__{image.stem}"))
        return episodes

    def eval_episodes(self) -> list[Episode]:
        episodes = self._episodes(self.eval_classes(), self.exclude_support)
        return episodes[: self.episodes] if self.episodes else episodes

    def train_episodes(self) -> list[Episode]:
        return self._episodes(self.train_classes(), False)

    def missing(self, stage: str = "fit") -> list[str]:
        problems = _missing_dirs("FSS-1000", [self.root], HSNET_LAYOUT_HINT)
        if not problems:
            classes = self.eval_classes() + (self.train_classes() if stage == "fit" else [])
            absent = [self.class_names[c] for c in classes if not (self.root / self.class_names[c]).is_dir()]
            if absent:
                problems.append(f"FSS-1000: {len(absent)} category folders missing under {self.root} (e.g. {absent[:3]})")
        return problems


class _ToyProtocol(FewShotProtocol):
    """Shared reading of the toy benchmark (prepared layout, 0-based train ids, no background value)."""

    def __init__(self, root: str, episodes: int | None = None) -> None:
        self.root = Path(root)
        self.episodes = episodes

    def _vocab(self, bench: str) -> tuple[str, ...]:
        return load_vocabulary(self.root / bench / "vocab.json").classes

    def _split_pairs(self, bench: str, split: str, classes: Sequence[int], offset: int) -> list[Episode]:
        """Pairs of ``bench/split`` for global ``classes``; label value = global id - offset."""
        labels = _files_by_stem(self.root / bench / "labels" / split, (".png",))
        images = _files_by_stem(self.root / bench / "images" / split, IMAGE_EXTENSIONS)
        index = index_labels(labels, None, f"{bench} {split} labels")
        return _pairs(index, classes, lambda c: c - offset, images, labels)

    def _missing(self, parts: Sequence[tuple[str, str]]) -> list[str]:
        folders = [self.root / b / kind / s for b, s in parts for kind in ("images", "labels")]
        return _missing_dirs("toy benchmark", folders, f"generate it with: python scripts/make_toy.py --out {self.root}")


class ToyFolds(_ToyProtocol):
    """The fold protocol on the toy benchmark: folds of the 36 toy_seen classes (class c in fold c mod 4);
    train on toy_seen/train pairs of the other folds, test on every toy_seen/val pair of the fold's classes."""

    name = "toy_folds"

    def __init__(self, root: str, fold: int = 0, episodes: int | None = None, seed: int = 0, bench: str = "toy_seen") -> None:
        super().__init__(root, episodes)
        self.fold = _check_fold(fold)
        self.bench = bench
        self.class_names = self._vocab(bench) if (self.root / bench / "vocab.json").is_file() else ()

    @property
    def benchmark_name(self) -> str:
        return f"{self.name}_fold{self.fold}"

    def eval_classes(self) -> list[int]:
        return interleaved_fold_classes(len(self.class_names), self.fold)

    def eval_episodes(self) -> list[Episode]:
        episodes = self._split_pairs(self.bench, "val", self.eval_classes(), 0)
        return episodes[: self.episodes] if self.episodes else episodes

    def train_episodes(self) -> list[Episode]:
        return self._split_pairs(self.bench, "train", self.train_classes(), 0)

    def missing(self, stage: str = "fit") -> list[str]:
        return self._missing([(self.bench, "val")] + ([(self.bench, "train")] if stage == "fit" else []))


class ToyClassSplit(_ToyProtocol):
    """The class-split protocol (FSS-1000 style) on the toy benchmark: train on the toy_seen classes
    (toy_seen/train), test on the disjoint toy_unseen classes (every toy_unseen/val pair)."""

    name = "toy_classes"

    def __init__(self, root: str, fold: int = 0, episodes: int | None = None, seed: int = 0) -> None:
        super().__init__(root, episodes)
        ready = all((self.root / b / "vocab.json").is_file() for b in ("toy_seen", "toy_unseen"))
        self.seen = self._vocab("toy_seen") if ready else ()
        self.class_names = self.seen + self._vocab("toy_unseen") if ready else ()

    def eval_classes(self) -> list[int]:
        return list(range(len(self.seen), len(self.class_names)))

    def eval_episodes(self) -> list[Episode]:
        episodes = self._split_pairs("toy_unseen", "val", self.eval_classes(), len(self.seen))
        return episodes[: self.episodes] if self.episodes else episodes

    def train_episodes(self) -> list[Episode]:
        return self._split_pairs("toy_seen", "train", self.train_classes(), 0)

    def missing(self, stage: str = "fit") -> list[str]:
        return self._missing([("toy_unseen", "val")] + ([("toy_seen", "train")] if stage == "fit" else []))


PROTOCOLS: dict[str, type[FewShotProtocol]] = {
    "pascal5i": Pascal5i, "coco20i": Coco20i, "fss1000": Fss1000, "toy_folds": ToyFolds, "toy_classes": ToyClassSplit,
}


# ---------------------------------------------------------------------------------------------- data module
class EpisodeBenchmark:
    """An episodic evaluation benchmark as the LightningModule sees it (cf. ``EvalBenchmark``).

    vocabulary: every class name of the protocol (episodes index it); class_ids: the held-out classes the
    scores average over. Each episode asks the model about ``[others, vocabulary[class_id]]``.
    """

    episodic = True
    num_classes = 2
    background_from = None

    def __init__(self, name: str, class_names: Sequence[str], class_ids: Sequence[int], ignore_index: int = 255,
                 others: str = OTHERS) -> None:
        self.name = name
        self.vocabulary = Vocabulary(name, tuple(class_names))
        self.class_ids = list(class_ids)
        self.ignore_index = ignore_index
        self.others = others

    def episode_vocabulary(self, class_id: int) -> Vocabulary:
        return Vocabulary(f"{self.name}[{class_id}]", (self.others, self.vocabulary.classes[class_id]))

    def __repr__(self) -> str:
        return f"EpisodeBenchmark({self.name}, {len(self.class_ids)} held-out classes)"


class FewShotDataModule(L.LightningDataModule):
    """Args:
    protocol: pascal5i | coco20i | fss1000 | toy_folds | toy_classes (see the module docstring).
    root: the protocol's data folder (HSNet's Datasets_HSN for the real ones, the toy folder for the toy ones).
    fold: the held-out fold (PASCAL-5i, COCO-20i, toy_folds).
    episodes: test episodes (1000 in the papers; None = all the protocol defines).
    seed: seed of sampled episodes (COCO-20i).
    image_size: square size episodes are resized to (480 in LSeg / HSNet).
    options: protocol-specific arguments (class_names, val_lists, train_lists, split, exclude_support, bench).
    generate_toy: when set, ``prepare_data`` writes the toy benchmark (same options as the toy data config).
    """

    def __init__(
        self,
        protocol: str,
        root: str,
        fold: int = 0,
        episodes: int | None = 1000,
        seed: int = 0,
        image_size: int | None = 480,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 4,
        pin_memory: bool = False,
        ignore_index: int = 255,
        others: str = OTHERS,
        options: Mapping[str, Any] | None = None,
        generate_toy: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if protocol not in PROTOCOLS:
            raise SetupError(f"Unknown few-shot protocol '{protocol}' (data.protocol); choose one of {sorted(PROTOCOLS)}.")
        self.protocol_name = protocol
        self.root = root
        self.fold = fold
        self.episodes = episodes
        self.seed = seed
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.ignore_index = ignore_index
        self.others = others
        self.options = dict(options or {})
        self.generate_toy = dict(generate_toy) if generate_toy else None
        self._protocol: FewShotProtocol | None = None
        self._train_set: EpisodeDataset | None = None
        self._eval_set: EpisodeDataset | None = None
        self._benchmark: EpisodeBenchmark | None = None

    # ------------------------------------------------------------------ protocol
    @property
    def protocol(self) -> FewShotProtocol:
        if self._protocol is None or not self._protocol.class_names:  # toy names appear once generated
            self._protocol = PROTOCOLS[self.protocol_name](
                root=self.root, fold=self.fold, episodes=self.episodes, seed=self.seed, **self.options
            )
        return self._protocol

    def missing(self, stage: str = "fit") -> list[str]:
        if self.generate_toy:
            return []  # prepare_data creates it
        return self.protocol.missing(stage)

    def prepare_data(self) -> None:
        if self.generate_toy:
            from ovseg_lab.data.toy import generate_toy_from_config

            generate_toy_from_config(self.generate_toy)

    # ------------------------------------------------------------------ what the model needs to know
    @property
    def class_names(self) -> tuple[str, ...]:
        return self.protocol.class_names

    @property
    def train_vocabulary(self) -> Vocabulary:
        names = self.class_names
        return Vocabulary(f"{self.protocol.benchmark_name}_train", tuple(names[c] for c in self.protocol.train_classes()))

    @property
    def eval_benchmarks(self) -> list[EpisodeBenchmark]:
        if self._benchmark is None:
            protocol = self.protocol
            self._benchmark = EpisodeBenchmark(protocol.benchmark_name, protocol.class_names, protocol.eval_classes(),
                                               self.ignore_index, self.others)
        return [self._benchmark]

    # ------------------------------------------------------------------ datasets and loaders
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self._train_set is None:
            episodes = self.protocol.train_episodes()
            if not episodes:
                raise DataError(f"{self.protocol.benchmark_name}: no training episode found under {self.root}.")
            self._train_set = EpisodeDataset(episodes, self.image_size, self.ignore_index)
        if self._eval_set is None:
            episodes = self.protocol.eval_episodes()
            if not episodes:
                raise DataError(f"{self.protocol.benchmark_name}: no test episode found under {self.root}.")
            self._eval_set = EpisodeDataset(episodes, self.image_size, self.ignore_index)

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                "persistent_workers": self.num_workers > 0, "collate_fn": collate_episodes}

    def train_dataloader(self) -> DataLoader:
        if self._train_set is None:
            self.setup("fit")
        rank, world = self._rank_and_world()
        sampler: Sampler[int] = DistributedSampler(self._train_set, num_replicas=world, rank=rank, shuffle=True) \
            if world > 1 else RandomSampler(self._train_set)
        return DataLoader(self._train_set, batch_size=self.batch_size, sampler=sampler,
                          drop_last=len(self._train_set) >= self.batch_size, **self._loader_kwargs())

    def val_dataloader(self) -> list[DataLoader]:
        if self._eval_set is None:
            self.setup("validate")
        rank, world = self._rank_and_world()
        return [DataLoader(self._eval_set, batch_size=self.eval_batch_size,
                           sampler=ShardedEvalSampler(len(self._eval_set), rank, world), **self._loader_kwargs())]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    @property
    def eval_episodes(self) -> list[Episode]:
        if self._eval_set is None:
            self.setup("validate")
        return self._eval_set.episodes
