"""Image-caption webdataset shards with parsed entities (what OVSegmentor and GroupViT train on).

Each sample of a shard holds ``<key>.jpg|png`` (the encoded image, unchanged), ``<key>.txt`` (the caption) and
``<key>.json`` ({"entities": [...], "mentions": [[start, end, entity], ...], "source": ...}). Sources:

- img2dataset output: a folder of ``*.tar`` shards (``jpg`` + ``txt``) or of ``*.jpg`` files with ``.txt`` beside;
- a TSV (header row) or parquet table with an image column (``url``, ``path``, ``image``, ``filepath``) and a
  caption column (``caption``, ``text``, ``txt``); URLs are fetched, relative paths are relative to the table;
- the toy benchmark's ``captions/<split>.jsonl`` ({stem, caption, entities}).

Shards are written into a hidden folder and moved into place only when complete, with ``manifest.json``
(counts of kept, dropped and unreadable samples) written last, so an interrupted run leaves nothing that
looks finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from ovseg_lab.data.entities import EntityParser, parsed_caption
from ovseg_lab.data.shards import shard_urls as find_shards
from ovseg_lab.errors import DataError
from ovseg_lab.utils.io import write_json

IMAGE_COLUMNS = ("url", "path", "image", "filepath", "file", "image_path")
CAPTION_COLUMNS = ("caption", "text", "txt", "title")
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class RawSample:
    """One image-caption pair before parsing: ``image`` is the encoded file, or None with ``error`` set."""

    key: str
    caption: str
    image: bytes | None
    extension: str = "jpg"
    source: str = ""
    error: str | None = None


@dataclass
class ShardStats:
    seen: int = 0
    kept: int = 0
    without_entity: int = 0
    unreadable: int = 0
    examples_unreadable: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "dropped_without_entity": self.without_entity,
                "unreadable": self.unreadable, "examples_unreadable": self.examples_unreadable[:10]}


# ---------------------------------------------------------------------------------------------- sources
def _image_extension(name: str, default: str = "jpg") -> str:
    return IMAGE_SUFFIXES.get(Path(name).suffix.lower(), default)


def from_toy(benchmark_root: str | Path, split: str = "train") -> Iterator[RawSample]:
    """The toy benchmark's captions and images (labels are never read)."""
    root = Path(benchmark_root)
    captions = root / "captions" / f"{split}.jsonl"
    if not captions.is_file():
        raise DataError(f"Toy captions not found: {captions} (generate the toy benchmark with scripts/make_toy.py).")
    for line in captions.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        path = root / "images" / split / f"{record['stem']}.png"
        try:
            data, error = path.read_bytes(), None
        except OSError as err:
            data, error = None, f"{path}: {err}"
        yield RawSample(record["stem"], record["caption"], data, "png", str(path), error)


def from_img2dataset(folder: str | Path) -> Iterator[RawSample]:
    """img2dataset output: webdataset tars (jpg/png + txt) or loose files with a sibling .txt caption."""
    folder = Path(folder)
    tars = sorted(folder.glob("*.tar"))
    if tars:
        import webdataset as wds

        for tar in tars:
            errors: list[str] = []

            def keep_going(exn: Exception) -> bool:  # called within this iteration only
                errors.append(f"{tar}: {exn}")  # noqa: B023
                return True

            for sample in wds.tarfile_samples([{"url": str(tar)}], handler=keep_going):
                key = sample["__key__"]
                ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
                caption = sample.get("txt", b"").decode("utf-8", "replace").strip()
                image = sample.get(ext) if ext else None
                yield RawSample(f"{tar.stem}_{key}", caption, image, "jpg" if ext == "jpeg" else (ext or "jpg"),
                                f"{tar}:{key}", None if ext else f"{tar}:{key}: no image in the sample")
            for error in errors:
                yield RawSample(f"{tar.stem}_error", "", None, source=str(tar), error=error)
        return
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{folder} holds neither *.tar shards nor images: not an img2dataset output folder.")
    for path in images:
        caption_path = path.with_suffix(".txt")
        caption = caption_path.read_text(errors="replace").strip() if caption_path.is_file() else ""
        try:
            data, error = path.read_bytes(), None
        except OSError as err:
            data, error = None, f"{path}: {err}"
        key = str(path.relative_to(folder).with_suffix("")).replace(os.sep, "_")
        yield RawSample(key, caption, data, _image_extension(path.name), str(path), error)


def _fetch(location: str, base: Path, timeout: float) -> bytes:
    if location.startswith(("http://", "https://")):
        with urllib.request.urlopen(location, timeout=timeout) as response:  # noqa: S310 (user-given URLs)
            return response.read()
    path = Path(location).expanduser()
    return (path if path.is_absolute() else base / path).read_bytes()


def _table_rows(table: Path) -> tuple[list[str], Iterable[dict[str, Any]]]:
    if table.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"Reading {table} needs pyarrow: pip install pyarrow (or convert the table to TSV).") from None
        data = pq.read_table(table)
        return list(data.column_names), data.to_pylist()
    handle = table.open(newline="", encoding="utf-8")
    reader = csv.DictReader(handle, delimiter="\t")
    return list(reader.fieldnames or []), reader


def from_table(table: str | Path, timeout: float = 10.0) -> Iterator[RawSample]:
    """(url or path, caption) rows of a TSV with a header, or of a parquet file."""
    table = Path(table)
    if not table.is_file():
        raise DataError(f"Caption table not found: {table}")
    columns, rows = _table_rows(table)
    lower = {c.lower(): c for c in columns}
    image_col = next((lower[c] for c in IMAGE_COLUMNS if c in lower), None)
    caption_col = next((lower[c] for c in CAPTION_COLUMNS if c in lower), None)
    if image_col is None or caption_col is None:
        raise DataError(
            f"{table} needs an image column (one of {IMAGE_COLUMNS}) and a caption column (one of {CAPTION_COLUMNS}); "
            f"its columns are {columns}."
        )
    for index, row in enumerate(rows):
        location, caption = str(row.get(image_col) or ""), str(row.get(caption_col) or "")
        try:
            data, error = _fetch(location, table.parent, timeout), None
        except Exception as err:  # network and file errors of every kind: counted, never fatal
            data, error = None, f"{location}: {type(err).__name__}: {err}"
        yield RawSample(f"{index:09d}", caption, data, _image_extension(location.split("?")[0]), location, error)


def open_source(source: str | Path) -> Iterator[RawSample]:
    """A folder (img2dataset output) or a .tsv / .parquet table."""
    path = Path(source)
    if path.is_dir():
        return from_img2dataset(path)
    if path.suffix.lower() in (".tsv", ".parquet"):
        return from_table(path)
    raise DataError(f"Unknown caption source {source}: give an img2dataset output folder or a .tsv / .parquet table.")


# ---------------------------------------------------------------------------------------------- writing
def check_image(data: bytes, max_size: int | None = None) -> tuple[bytes, str | None]:
    """Verify that ``data`` decodes; with ``max_size`` re-encode images whose long side exceeds it (JPEG).

    Returns (bytes, None) or (b"", error message).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if max_size and max(img.size) > max_size:
                img = img.convert("RGB")
                img.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                img.save(buffer, format="JPEG", quality=92)
                return buffer.getvalue(), None
    except Exception as err:  # PIL raises many types for broken files
        return b"", f"{type(err).__name__}: {err}"
    return data, None


def write_caption_shards(
    samples: Iterable[RawSample],
    out_dir: str | Path,
    parser: EntityParser,  # or OfficialEntityParser (its masked questions are stored too)
    maxcount: int = 10000,
    require_entity: bool = True,
    max_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    extra_manifest: dict[str, Any] | None = None,
) -> ShardStats:
    """Parse, filter and write samples as ``out_dir/shard-%06d.tar`` + ``manifest.json``.

    require_entity: the CC4M rule, drop captions that mention no entity.
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").exists() and not overwrite:
        raise DataError(f"{out_dir} already holds caption shards (manifest.json); pass overwrite to replace them.")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    stats = ShardStats()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"caption shards -> {out_dir}", unit="img")
    try:
        with wds.ShardWriter(str(staging / "shard-%06d.tar"), maxcount=maxcount, verbose=0) as writer:
            for sample in samples:
                stats.seen += 1
                if bar is not None:
                    bar.update(1)
                data, error = (sample.image, sample.error) if sample.image is not None else (b"", sample.error or "no image")
                if error is None:
                    data, error = check_image(data, max_size)
                if error is not None:
                    stats.unreadable += 1
                    stats.examples_unreadable.append(f"{sample.source or sample.key}: {error}")
                    continue
                parsed = parsed_caption(parser, sample.caption)
                if require_entity and not parsed["mentions"]:
                    stats.without_entity += 1
                    continue
                meta = {**parsed, "source": sample.source}
                ext = "jpg" if max_size and data is not sample.image else sample.extension
                writer.write({"__key__": f"{stats.kept:09d}", ext: data, "txt": sample.caption,
                              "json": json.dumps(meta).encode()})
                stats.kept += 1
        if stats.kept == 0:
            raise DataError(
                f"No sample was kept for {out_dir}: {stats.seen} seen, {stats.without_entity} without an entity of "
                f"'{parser.vocabulary.name}', {stats.unreadable} unreadable (e.g. {stats.examples_unreadable[:2]})."
            )
        for old in out_dir.glob("shard-*.tar"):
            old.unlink()
        shards = sorted(staging.glob("shard-*.tar"))
        for shard in shards:
            os.replace(shard, out_dir / shard.name)
        write_json(out_dir / "manifest.json", {
            "shards": [s.name for s in shards], "entity_vocabulary": parser.vocabulary.name,
            "require_entity": require_entity, **stats.as_dict(), **(extra_manifest or {}),
        })
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    return stats


def shard_urls(location: str | Path | list) -> list[str]:
    """Shard paths from a folder with manifest.json, a brace pattern ("cc12m/{000000..001242}.tar") or a list."""
    return find_shards(location, "caption shards", "Write them with scripts/make_caption_shards.py.")
