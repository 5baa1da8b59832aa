"""Nouns from captions, offline: a rule-based noun-phrase chunker with simplemma for singular forms.

OVSeg took nouns from COCO captions with NLTK, whose tagger needs a data download. Here a caption is cut into
chunks at function words (articles, prepositions, conjunctions, pronouns, auxiliaries), frequent verbs,
"-ing" participles and punctuation; each chunk is a noun phrase whose last word is its head noun.

- ``mode="head"``: the head noun alone, singular ("a man riding two horses" -> man, horse): OVSeg's nouns.
- ``mode="phrase"``: modifiers + head ("a red circle on striped grass" -> red circle, striped grass), which keeps
  attribute words such as colours (the toy benchmark's class names are such phrases).
"""

from __future__ import annotations

import re
from functools import lru_cache

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every all both either neither no another other such
of in on at to from by with without into onto over under above below behind beside besides between among
near next through across along around against toward towards during before after inside outside up down off
out about upon via while than as like
and or but nor so yet
i me my you your he him his she her it its we us our they them their there here who whom whose which what
is are was were be been being am has have had having do does did can could will would shall should may might must
very too also just not only almost quite rather really
one two three four five six seven eight nine ten several many few lots lot
""".split())

VERBS = frozenset("""
sits sit sat stands stand stood holds hold held rides ride rode lies lie lay lays laying looks look walks walk
flies fly plays play eats eat waits wait shows show contains contain has made covered filled parked topped
stacked seen taken shown placed set put sitting standing holding riding lying looking walking flying playing
eating waiting showing containing
""".split())

# words in -ing that are nouns, not participles
ING_NOUNS = frozenset("""
building ceiling painting ring string thing wing clothing icing railing pudding king swing stuffing topping
frosting evening morning sibling dumpling awning bedding siding fencing flooring lighting landing parking
""".split())

KEEP_PLURAL = frozenset("pants scissors glasses jeans shorts trousers sunglasses goggles clothes".split())
IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
             "mice": "mouse", "geese": "goose", "leaves": "leaf", "knives": "knife", "shelves": "shelf",
             "wolves": "wolf", "loaves": "loaf", "halves": "half", "calves": "calf", "scarves": "scarf"}


@lru_cache(maxsize=4096)
def singular(word: str) -> str:
    """Singular form of a noun; words that only look plural (bus, glass, tennis) stay.

    simplemma's dictionary lemmatiser (offline, fast to import); inflect was the first choice but its import
    takes tens of seconds on a busy 2-core machine (typeguard instruments it)."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word in KEEP_PLURAL or not word.endswith("s") or word.endswith(("ss", "us", "is")) or len(word) <= 3:
        return word
    import simplemma

    return simplemma.lemmatize(word, lang="en")


def _is_break(word: str) -> bool:
    if word in FUNCTION_WORDS or word in VERBS:
        return True
    return word.endswith("ing") and word not in ING_NOUNS and len(word) > 4


def noun_phrases(caption: str, mode: str = "phrase") -> list[str]:
    """Noun phrases (``phrase``) or head nouns (``head``) of a caption, in order, without repeats."""
    if mode not in ("phrase", "head"):
        raise ValueError(f"mode must be 'phrase' or 'head', got {mode!r}")
    found: list[str] = []
    for clause in re.split(r"[.,;:!?()\"]+", caption.lower()):
        chunk: list[str] = []
        for word in re.findall(r"[a-z]+(?:-[a-z]+)*", clause) + [""]:
            if word and not _is_break(word):
                chunk.append(word)
                continue
            if chunk and not chunk[-1].endswith("ly"):
                head = singular(chunk[-1])
                phrase = head if mode == "head" else " ".join(chunk[:-1] + [head])
                if phrase not in found:
                    found.append(phrase)
            chunk = []
    return found
