"""Vocabularies: the class names a model is asked about. Data, never baked into weights.

A vocabulary comes from a packaged benchmark list (``"ade150"``, ``"coco_stuff171"``, ...) or from a file:
a JSON array of names in train-id order, or a text file with one name per line.

The names identify classes (metric rows, legends). What a method's text tower is sent can differ: each official
release embeds its own strings for a benchmark's classes (OVSeg "building, edifice", GroupViT "table" for
"diningtable"). Those are data too: ``assets/class_strings/<release>/<packaged vocabulary>.json``, applied by
:func:`with_release_strings` when a recipe sets ``model.class_strings: <release>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from ovseg_lab.errors import DataError

PACKAGED_VOCABULARIES = (
    "ade150",
    "ade847",
    "coco_stuff171",
    "pc59",
    "pc459",
    "voc20",
    "voc20b",
    "voc21",
    "pc60",
    "coco_object81",
    "cityscapes19",
)


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of class names; index i is train id i."""

    name: str
    classes: tuple[str, ...]
    source: str | None = None  # the packaged vocabulary it came from ("ade150"); None for files and CLI lists

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    def __getitem__(self, index: int) -> str:
        return self.classes[index]

    def subset(self, indices, name: str | None = None) -> Vocabulary:
        return Vocabulary(name or f"{self.name}[subset]", tuple(self.classes[i] for i in indices), self.source)


def _packaged_path(name: str) -> Path:
    return Path(str(resources.files("ovseg_lab") / "assets" / "vocab" / f"{name}.json"))


def _parse_names(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"Vocabulary file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise DataError(
            f"Vocabulary file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None
    if path.suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"Vocabulary file {path} is not valid JSON ({err}).") from None
        if isinstance(names, dict) and "classes" in names:
            names = names["classes"]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise DataError(f"Vocabulary file {path} must hold a JSON array of non-empty class-name strings.")
    return names


def load_vocabulary(source: str | Path, name: str | None = None, expected_size: int | None = None) -> Vocabulary:
    """Load a vocabulary from a packaged name or a file path.

    ``expected_size`` guards against a vocabulary file that does not match the labels it describes.
    """
    source_str = str(source)
    if source_str in PACKAGED_VOCABULARIES:
        path = _packaged_path(source_str)
    else:
        path = Path(source_str).expanduser()
    names = _parse_names(path)
    if not names:
        raise DataError(f"Vocabulary file {path} is empty.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"Vocabulary file {path} repeats class names {duplicates[:5]}: train ids would be ambiguous.")
    if expected_size is not None and len(names) != expected_size:
        raise DataError(
            f"Vocabulary file {path} has {len(names)} classes but {expected_size} were expected "
            "(num_classes of the benchmark config)."
        )
    return Vocabulary(name or path.stem, tuple(names), source_str if source_str in PACKAGED_VOCABULARIES else None)


def _class_strings_path(release: str, source: str) -> Path:
    return Path(str(resources.files("ovseg_lab") / "assets" / "class_strings" / release / f"{source}.json"))


@cache
def release_class_strings(release: str, source: str) -> dict[str, str]:
    """{our class name: the string ``release``'s official code sends to its text tower} for a packaged vocabulary.

    File layout: ``{"citation": "<repository@commit path:line>", "strings": {"<name>": "<string>", ...}}``.
    """
    path = _class_strings_path(release, source)
    if not path.is_file():
        raise DataError(
            f"The recipe sends {release}'s official class strings to the text tower (model.class_strings={release}), "
            f"but there are none for the vocabulary {source!r} (no file {path}). Add that file, or set "
            "model.class_strings=null to send the benchmark's own class names."
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        strings = content["strings"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"Class-string file {path} must be JSON with a 'strings' object ({err}).") from None
    if not isinstance(strings, dict) or not all(isinstance(v, str) and v.strip() for v in strings.values()):
        raise DataError(f"Class-string file {path}: 'strings' must map class names to non-empty strings.")
    return dict(strings)


def with_release_strings(vocabulary: Vocabulary, release: str | None) -> Vocabulary:
    """The vocabulary as ``release``'s text tower reads it: same order and ids, the release's strings.

    ``release=None`` or a vocabulary that is not a packaged benchmark list (a file, names typed on the command line)
    is returned unchanged: there the user chose the strings.
    """
    if release is None or vocabulary.source is None:
        return vocabulary
    strings = release_class_strings(release, vocabulary.source)
    missing = [name for name in vocabulary.classes if name not in strings]
    if missing:
        raise DataError(
            f"{_class_strings_path(release, vocabulary.source)} has no string for {len(missing)} class(es) of "
            f"{vocabulary.source}: {missing[:5]}."
        )
    return Vocabulary(vocabulary.name, tuple(strings[name] for name in vocabulary.classes), vocabulary.source)


def vocabulary_from_names(names: str | list[str], name: str = "custom") -> Vocabulary:
    """Build a vocabulary from a comma-separated string or a list of names (CLI use)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = [" ".join(n.split()) for n in names if n and n.strip()]
    if not names:
        raise DataError("An empty class list was given.")
    # as in vocabulary files, a name may appear once; here also up to case and spacing ("tree,Tree,tree "), since
    # the text towers lower-case: two ids with one embedding, and one of them never wins a pixel
    seen: dict[str, str] = {}
    repeated = []
    for n in names:
        key = n.casefold()
        if key in seen:
            repeated.append(f"{seen[key]!r} / {n!r}")
        seen.setdefault(key, n)
    if repeated:
        raise DataError(
            f"The class list repeats names (up to case and spacing): {', '.join(repeated[:5])}; give each class once."
        )
    return Vocabulary(name, tuple(names))
