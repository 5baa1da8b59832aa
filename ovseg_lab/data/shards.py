"""Where a webdataset's shards are: one resolver for the caption shards (OVSegmentor / GroupViT) and OVSeg's
mask-category pair shards."""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path

from ovseg_lab.errors import DataError


def shard_urls(location: str | Path | Sequence[str], what: str = "shards", hint: str = "") -> list[str]:
    """Shard paths from a folder (its manifest.json's ``shards`` list, else its ``*.tar`` sorted), a brace pattern
    (``cc12m/{000000..001242}.tar``), a glob (``pairs/pairs-*.tar``), one file, a URL, or a list of any of those.

    None found raises a :class:`DataError` naming ``location`` and ``what`` it should hold, then ``hint``."""
    if isinstance(location, (list, tuple)):
        urls = [str(u) for u in location]
    else:
        text = str(location)
        path = Path(text).expanduser()
        if path.is_dir():
            manifest = path / "manifest.json"
            names = json.loads(manifest.read_text())["shards"] if manifest.is_file() else None
            urls = [str(path / n) for n in names] if names is not None else sorted(str(p) for p in path.glob("*.tar"))
        elif "{" in text:
            import braceexpand

            urls = list(braceexpand.braceexpand(text))
        elif "://" in text or text.startswith("pipe:"):
            urls = [text]  # remote: webdataset opens it
        else:
            urls = sorted(glob.glob(str(path)))  # a pattern, or one file that exists
    if not urls:
        raise DataError(f"No {what} at {location}.{' ' + hint if hint else ''}")
    return urls
