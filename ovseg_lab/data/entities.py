"""Entities in captions: which words name one of the visual concepts OVSegmentor masks and pairs images by.

An :class:`EntityVocabulary` maps surface words or phrases to canonical entity names (OVSegmentor's 100 CC4M
words with their synonym map, or the class names of a benchmark). :class:`EntityParser` finds them in a
caption, offline: words are lower-cased and lemmatised with simplemma ("buses" -> "bus", "children" ->
"child"), possessives are removed as a *suffix* ("dog's" -> "dog", "bus's" -> "bus"), and the longest phrase
wins ("red circle" before "circle"). The released OVSegmentor stripped possessives with ``str.strip("'s")``,
which eats any leading or trailing ``s`` and ``'`` characters, so "bus", "glass", "sheep", "sofa", "sink",
"spoon" and "shirt" were never found; here every mention keeps its exact character span in the caption,
which is what the masking uses. :class:`OfficialEntityParser` is the released parser with all its bugs, for the
paper recipes (``data.entity_parser: official``); the golden test compares it with the release on 36 captions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ovseg_lab.errors import DataError

# A word: letters/digits, optionally joined by inner hyphens or apostrophes ("T-shirt", "dog's", "o'clock").
WORD = re.compile(r"[A-Za-z0-9]+(?:[-'\u2019][A-Za-z0-9]+)*")
POSSESSIVE = re.compile(r"['\u2019]s$", re.IGNORECASE)


@lru_cache(maxsize=65536)
def normalize_word(word: str) -> str:
    """Lower-case lemma of one word ("Buses" -> "bus", "T-shirts" -> "t-shirt"); possessive already removed."""
    import simplemma

    lower = word.lower()
    lemma = simplemma.lemmatize(lower, lang="en").lower()
    return lemma or lower


@dataclass(frozen=True)
class Mention:
    """A span ``caption[start:end]`` that names ``entity`` (its canonical name)."""

    start: int
    end: int
    entity: str

    def to_list(self) -> list:
        return [self.start, self.end, self.entity]


@dataclass(frozen=True)
class Word:
    start: int
    end: int
    text: str
    norm: str


def split_words(caption: str) -> list[Word]:
    """Words of a caption with their spans; a trailing possessive ('s) is cut off the span."""
    words = []
    for match in WORD.finditer(caption):
        text, start, end = match.group(0), match.start(), match.end()
        possessive = POSSESSIVE.search(text)
        if possessive and len(text) > 2:
            text, end = text[: possessive.start()], start + possessive.start()
        words.append(Word(start, end, text, normalize_word(text)))
    return words


class EntityVocabulary:
    """Surface phrases -> canonical entity names.

    phrases: surface phrase -> canonical name (a phrase is one or more words; matching compares lemmas).
    """

    def __init__(self, phrases: Mapping[str, str], name: str = "entities") -> None:
        if not phrases:
            raise DataError(f"The entity vocabulary '{name}' is empty.")
        self.name = name
        self.canonical: tuple[str, ...] = tuple(dict.fromkeys(phrases.values()))
        self._index: dict[tuple[str, ...], str] = {}
        for phrase, canonical in phrases.items():
            key = tuple(w.norm for w in split_words(phrase))
            if not key:
                raise DataError(f"Entity phrase {phrase!r} of '{name}' holds no word.")
            self._index.setdefault(key, canonical)
        self.max_words = max(len(k) for k in self._index)

    def lookup(self, key: tuple[str, ...]) -> str | None:
        return self._index.get(key)

    def __len__(self) -> int:
        return len(self.canonical)

    @classmethod
    def from_names(cls, names: Iterable[str], name: str = "entities") -> "EntityVocabulary":
        """Every name is its own canonical entity (benchmark class names, e.g. the toy's "red circle")."""
        return cls({n: n for n in names}, name)

    @classmethod
    def from_ovsegmentor_json(cls, path: str | Path) -> "EntityVocabulary":
        """The released CC4M entity list: ``TOP_CLASSES_1`` words, ``syn_dict`` synonyms, ``TOP_UNIQUE_CLASSES``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            words, synonyms, unique = data["TOP_CLASSES_1"], data["syn_dict"], data["TOP_UNIQUE_CLASSES"]
        except FileNotFoundError:
            raise DataError(f"Entity vocabulary file not found: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(
                f"{path} is not an OVSegmentor entity file (needs TOP_CLASSES_1, syn_dict, TOP_UNIQUE_CLASSES): {err}"
            ) from None
        phrases = {}
        for word in words:
            canonical = synonyms.get(word, synonyms.get(word.lower(), word))
            if canonical not in unique:
                raise DataError(f"{path}: entity word {word!r} maps to {canonical!r}, which is not in TOP_UNIQUE_CLASSES.")
            phrases[word] = canonical
        return cls(phrases, name=path.stem)

    @classmethod
    def load(cls, source: str | Sequence[str]) -> "EntityVocabulary":
        """``"ovsegmentor"`` (the packaged CC4M list), a JSON file (OVSegmentor format or an array of names),
        or a list of names."""
        if not isinstance(source, str):
            return cls.from_names([str(s) for s in source])
        if source == "ovsegmentor":
            return cls.from_ovsegmentor_json(Path(str(resources.files("ovseg_lab") / "assets" / "vocab" / "ovsegmentor_entities.json")))
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"Entity vocabulary {source!r} is neither 'ovsegmentor' nor an existing file.")
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "TOP_CLASSES_1" in data:
            return cls.from_ovsegmentor_json(path)
        if isinstance(data, list) and all(isinstance(n, str) for n in data):
            return cls.from_names(data, name=path.stem)
        raise DataError(f"Entity vocabulary {path} must be an OVSegmentor entity file or a JSON array of names.")


class EntityParser:
    """Finds entity mentions (and, given a noun lexicon, noun mentions) in captions."""

    def __init__(self, vocabulary: EntityVocabulary | None, nouns: Iterable[str] | None = None) -> None:
        self.vocabulary = vocabulary
        self.nouns = frozenset(normalize_word(n) for n in nouns) if nouns is not None else None

    def mentions(self, caption: str) -> list[Mention]:
        """Entity mentions in caption order, longest phrase first, no overlaps."""
        if self.vocabulary is None:
            raise DataError("This parser has no entity vocabulary (nouns only).")
        words = split_words(caption)
        found, i = [], 0
        while i < len(words):
            for length in range(min(self.vocabulary.max_words, len(words) - i), 0, -1):
                entity = self.vocabulary.lookup(tuple(w.norm for w in words[i : i + length]))
                if entity is not None:
                    found.append(Mention(words[i].start, words[i + length - 1].end, entity))
                    i += length
                    break
            else:
                i += 1
        return found

    def entities(self, caption: str) -> list[str]:
        """Unique canonical entities of a caption, in order of first mention."""
        return list(dict.fromkeys(m.entity for m in self.mentions(caption)))

    def noun_mentions(self, caption: str) -> list[Mention]:
        """Every word whose lemma is in the noun lexicon (the "all nouns" masking ablation)."""
        if self.nouns is None:
            raise DataError("No noun lexicon configured: the 'all_nouns' masking objective needs data.nouns (a word list).")
        return [Mention(w.start, w.end, w.norm) for w in split_words(caption) if w.norm in self.nouns]


# ------------------------------------------------------------------------------------------ the release's parser
# WordNet's noun rules (nltk's morphy, MORPHOLOGICAL_SUBSTITUTIONS["n"]) and the irregular plurals of its
# noun.exc that end on an entity word; the release lemmatises with nltk's WordNetLemmatizer, whose data cannot be
# installed offline. Only the answer "is the lemma an entity word, and which" matters, which these reproduce.
WORDNET_NOUN_RULES = (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
                      ("shes", "sh"), ("men", "man"), ("ies", "y"))
WORDNET_NOUN_EXCEPTIONS = {"children": "child", "men": "man", "women": "woman", "mice": "mouse", "kine": "cow"}


class OfficialEntityParser:
    """The released OVSegmentor parser, bugs included (datasets/clip_dataset.py:203-269), for paper recipes.

    Per space-separated word: ``word.strip("'s")`` (strips any leading/trailing ``'`` and lower-case ``s``
    characters, so "bus" -> "bu", "glass" -> "gla", "sheep" -> "heep", but "Sheep" stays), then only ``.`` is
    removed, the lower-cased word is lemmatised (WordNet; after the strip, so "buses" -> "buse" is no plural any
    more), the synonym map is looked up after lower-casing (its keys "TV", "T-shirt", "T-Shirt" never match),
    and the lemma must be one of the unique entities. The question is the caption with every entity word
    replaced by "[MASK]" and every other word kept *stripped* ("Bus's" -> "Bu"), apostrophes removed; entities
    keep their order of mention (the release joins a Python ``set`` of them, in hash order).

    ``parser: ours`` (:class:`EntityParser`) fixes all of this; the toy uses it.
    """

    kind = "official"

    def __init__(self, words: Sequence[str], synonyms: Mapping[str, str], unique: Sequence[str], name: str = "ovsegmentor") -> None:
        self.name = name
        self.words = tuple(words)
        self.synonyms = dict(synonyms)
        self.unique = frozenset(unique)
        # lemmas that can name an entity: the unique names and the synonym keys as the lookup sees them
        self._targets = self.unique | set(self.synonyms)

    @classmethod
    def load(cls, source: str = "ovsegmentor") -> "OfficialEntityParser":
        path = (Path(str(resources.files("ovseg_lab") / "assets" / "vocab" / "ovsegmentor_entities.json"))
                if source == "ovsegmentor" else Path(source).expanduser())
        try:
            data = json.loads(path.read_text())
            parser = cls(data["TOP_CLASSES_1"], data["syn_dict"], data["TOP_UNIQUE_CLASSES"], name=path.stem)
            parser.vocabulary = EntityVocabulary.from_ovsegmentor_json(path)  # the same entities, for manifests
            return parser
        except FileNotFoundError:
            raise DataError(f"Entity vocabulary file not found: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path} is not an OVSegmentor entity file (needs TOP_CLASSES_1, syn_dict, "
                            f"TOP_UNIQUE_CLASSES) as the official parser requires: {err}") from None

    def lemma(self, word: str) -> str:
        """WordNet noun lemma of a lower-case word, as far as it decides entity membership."""
        forms = [word, WORDNET_NOUN_EXCEPTIONS[word]] if word in WORDNET_NOUN_EXCEPTIONS else [word] + [
            word[: -len(old)] + new for old, new in WORDNET_NOUN_RULES if word.endswith(old)]
        known = [f for f in forms if f in self._targets]
        return min(known, key=len) if known else word

    def judge(self, word: str) -> str | None:
        """The entity a (stripped) word names, or None (``judge_noun``, clip_dataset.py:203-214)."""
        lemma = self.lemma(word.replace(".", "").lower())
        lemma = self.synonyms.get(lemma, lemma)
        return lemma if lemma in self.unique else None

    def parse(self, caption: str) -> tuple[str, list[Mention]]:
        """(question, mentions): the release's masked question and the space-separated words it masked (spans
        of the whole word in ``caption``, punctuation included)."""
        question, mentions, position = "", [], 0
        for raw in caption.split(" "):
            start = position
            position += len(raw) + 1
            word = raw.strip("'s").strip(" ").strip("\n")
            entity = self.judge(word)
            if entity is not None:
                question += "[MASK] "
                mentions.append(Mention(start, start + len(raw), entity))
            else:
                question += word + " "
        return question.replace("'", "").strip(), mentions

    def mentions(self, caption: str) -> list[Mention]:
        return self.parse(caption)[1]

    def question(self, caption: str) -> str:
        return self.parse(caption)[0]

    def entities(self, caption: str) -> list[str]:
        return list(dict.fromkeys(m.entity for m in self.mentions(caption)))


PARSERS = ("official", "ours")


def build_parser(kind: str, vocabulary: str | Sequence[str] = "ovsegmentor", nouns: Iterable[str] | None = None):
    """``official`` (:class:`OfficialEntityParser`, needs an OVSegmentor entity file) or ``ours``
    (:class:`EntityParser`)."""
    if kind == "official":
        if not isinstance(vocabulary, str):
            raise DataError("entities.parser=official reads an OVSegmentor entity file (TOP_CLASSES_1, syn_dict, "
                            "TOP_UNIQUE_CLASSES); a list of names needs parser=ours.")
        return OfficialEntityParser.load(vocabulary)
    if kind == "ours":
        return EntityParser(EntityVocabulary.load(vocabulary), nouns)
    raise DataError(f"entities.parser must be one of {PARSERS}, got {kind!r}.")


def parsed_caption(parser, caption: str) -> dict:
    """mentions / entities of a caption by ``parser``, and the release's masked ``question`` when the parser is
    the official one (:class:`~ovseg_lab.data.entities.OfficialEntityParser`)."""
    if getattr(parser, "kind", None) == "official":
        question, mentions = parser.parse(caption)
        extra = {"question": question}
    else:
        mentions, extra = parser.mentions(caption), {}
    return {"mentions": [m.to_list() for m in mentions], "entities": list(dict.fromkeys(m.entity for m in mentions)), **extra}
