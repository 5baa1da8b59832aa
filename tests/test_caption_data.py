"""Caption shards: round trip, the CC4M filter, corrupt samples, rank-disjoint streaming, entity pairing."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_lab.data.caption_shards import RawSample, from_table, from_toy, shard_urls, write_caption_shards
from ovseg_lab.data.captions import CaptionStream, CaptionTransform, collate_captions
from ovseg_lab.data.entities import EntityParser, EntityVocabulary
from ovseg_lab.errors import DataError


def _png(value: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _samples(captions: list[str]) -> list[RawSample]:
    return [RawSample(f"s{i}", c, _png(i), "png", f"src{i}") for i, c in enumerate(captions)]


PARSER = EntityParser(EntityVocabulary.load("ovsegmentor"))


def _stream(urls, **kwargs) -> CaptionStream:
    kwargs.setdefault("shuffle_buffer", 4)
    return CaptionStream(urls, CaptionTransform(16, (1.0, 1.0), flip=False), **kwargs)


def test_toy_shards_round_trip_captions_entities_and_pixels(toy_data_dir, tmp_path):
    root = toy_data_dir / "toy" / "toy_seen"
    vocab = json.loads((root / "vocab.json").read_text())
    stats = write_caption_shards(
        from_toy(root),
        tmp_path / "shards",
        EntityParser(EntityVocabulary.from_names(vocab)),
        maxcount=10,
        progress=False,
    )
    records = [json.loads(line) for line in (root / "captions" / "train.jsonl").read_text().splitlines()]
    assert stats.kept == len(records) == 64 and stats.unreadable == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 7 and not list((tmp_path / "shards").glob(".partial-*"))
    stream = CaptionStream(
        shard_urls(tmp_path / "shards"), CaptionTransform(64, (1.0, 1.0), flip=False), 64, shuffle_buffer=1
    )
    items = list(stream)
    by_caption = {r["caption"]: r for r in records}
    assert len(items) == 64 and {i["caption"] for i in items} == set(by_caption)
    for item in items[:10]:
        record = by_caption[item["caption"]]
        assert item["entities"] == list(dict.fromkeys(record["entities"]))
        for start, end, entity in item["mentions"]:
            assert item["caption"][start:end] == entity  # toy mentions are the class names themselves
        original = np.array(Image.open(root / "images" / "train" / f"{record['stem']}.png").convert("RGB"))
        assert torch.equal(item["image"], torch.from_numpy(original).permute(2, 0, 1))


def test_cc4m_filter_and_unreadable_images_are_counted(tmp_path):
    samples = _samples(["a dog on a bus", "a sunset", "two glasses"])
    samples.append(RawSample("broken", "a cat", b"not an image", "jpg", "broken.jpg"))
    samples.append(RawSample("missing", "a cat", None, "jpg", "http://x/y.jpg", error="URLError: offline"))
    stats = write_caption_shards(samples, tmp_path / "cc4m", PARSER, progress=False)
    assert (stats.seen, stats.kept, stats.without_entity, stats.unreadable) == (5, 2, 1, 2)
    manifest = json.loads((tmp_path / "cc4m" / "manifest.json").read_text())
    assert manifest["dropped_without_entity"] == 1 and manifest["unreadable"] == 2
    kept = {
        i["caption"]: i["entities"]
        for i in _stream(shard_urls(tmp_path / "cc4m"), samples_per_epoch=2, shuffle_buffer=1)
    }
    assert kept == {"a dog on a bus": ["dog", "bus"], "two glasses": ["glass"]}
    # GroupViT keeps every caption
    stats = write_caption_shards(
        _samples(["a sunset"]), tmp_path / "cc12m", PARSER, require_entity=False, progress=False
    )
    assert stats.kept == 1
    with pytest.raises(DataError, match="already holds"):
        write_caption_shards(_samples(["a dog"]), tmp_path / "cc12m", PARSER, progress=False)


def test_corrupt_samples_inside_shards_are_skipped_and_counted(tmp_path):
    import webdataset as wds

    path = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "0", "png": _png(1), "txt": "a dog", "json": b'{"entities": ["dog"], "mentions": []}'})
        writer.write({"__key__": "1", "png": b"garbage", "txt": "a cat", "json": b'{"entities": ["cat"]}'})
        writer.write({"__key__": "2", "png": _png(2), "txt": "a cow", "json": b"{not json"})
        writer.write({"__key__": "3", "png": _png(3), "txt": "a bus", "json": b'{"entities": ["bus"], "mentions": []}'})
    stream = _stream([str(path)], samples_per_epoch=4, shuffle_buffer=1)
    items = list(stream)
    assert [i["caption"] for i in items[:2]] and {i["caption"] for i in items} == {"a dog", "a bus"}
    assert items[-1]["skipped"] >= 2 and stream.skipped >= 2
    batch = collate_captions(items[:2])
    assert batch["image"].shape == (2, 3, 16, 16) and sum(batch["skipped"].values()) >= 2


def test_two_ddp_ranks_read_disjoint_samples(tmp_path):
    captions = [f"dog number {i}" for i in range(40)]
    write_caption_shards(_samples(captions), tmp_path / "s", PARSER, maxcount=5, progress=False)
    urls = shard_urls(tmp_path / "s")
    assert len(urls) == 8
    # one pass each (no shuffle buffer): every rank reads its 20 samples
    per_rank = [
        [i["caption"] for i in _stream(urls, samples_per_epoch=20, rank=r, world_size=2, shuffle_buffer=1)]
        for r in (0, 1)
    ]
    assert all(len(set(p)) == 20 for p in per_rank)
    per_rank = [set(p) for p in per_rank]
    assert per_rank[0].isdisjoint(per_rank[1])
    assert per_rank[0] | per_rank[1] == set(captions)
    # fewer shards than readers: the split falls back to samples, still disjoint and complete
    one = [str(tmp_path / "s" / "shard-000000.tar")]
    # (no shuffle buffer: with one, 6 random draws may miss one of a rank's 3 samples, depending on the seed)
    halves = [
        {i["caption"] for i in _stream(one, samples_per_epoch=6, rank=r, world_size=2, shuffle_buffer=1)}
        for r in (0, 1)
    ]
    assert halves[0].isdisjoint(halves[1]) and len(halves[0] | halves[1]) == 5


def test_epoch_length_is_fixed_and_the_stream_resamples(tmp_path):
    write_caption_shards(_samples([f"a dog {i}" for i in range(6)]), tmp_path / "s", PARSER, maxcount=3, progress=False)
    items = list(_stream(shard_urls(tmp_path / "s"), samples_per_epoch=15, shuffle_buffer=1))
    assert len(items) == 15 and len({i["caption"] for i in items}) == 6  # more than one pass over 6 samples


def test_pairs_share_an_entity(tmp_path):
    captions = ["a dog", "a cat", "a dog and a bus", "a cat on a sofa", "a bus", "a dog"] * 3
    write_caption_shards(_samples(captions), tmp_path / "s", PARSER, progress=False)
    items = list(
        _stream(shard_urls(tmp_path / "s"), samples_per_epoch=18, pair_images=True, pair_buffer=8, shuffle_buffer=1)
    )
    paired = [i for i in items if i["has_pair"]]
    assert len(paired) >= 12
    for item in paired:
        assert item["pair_entity"] in item["entities"]
        assert item["pair_image"].shape == item["image"].shape


def test_tsv_source_reads_paths_and_reports_failures(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(5))
    table = tmp_path / "pairs.tsv"
    table.write_text("url\tcaption\na.png\ta dog\nmissing.png\ta cat\n")
    samples = list(from_table(table))
    assert samples[0].image is not None and samples[0].caption == "a dog"
    assert samples[1].image is None and "missing.png" in samples[1].error
    bad = tmp_path / "bad.tsv"
    bad.write_text("link\tcaption\na.png\tx\n")
    with pytest.raises(DataError, match="image column"):
        list(from_table(bad))


def test_official_parser_questions_reach_the_batch():
    from ovseg_lab.data.captions import collate_captions, parsed_caption
    from ovseg_lab.data.entities import build_parser

    parser = build_parser("official")
    items = [
        {
            "image": torch.zeros(3, 4, 4, dtype=torch.uint8),
            "caption": c,
            "key": str(i),
            "skipped": 0,
            "reader": 0,
            **parsed_caption(parser, c),
        }
        for i, c in enumerate(["A dog on a sofa", "Two cats"])
    ]
    batch = collate_captions(items)
    assert batch["question"] == ["A [MASK] on a ofa", "Two [MASK]"]
    assert batch["entities"] == [["dog"], ["cat"]] and batch["mentions"][1] == [[4, 8, "cat"]]


def test_shards_written_with_the_official_parser_store_its_questions(tmp_path):
    import io
    import json
    import tarfile

    import numpy as np
    from PIL import Image

    from ovseg_lab.data.caption_shards import RawSample, write_caption_shards
    from ovseg_lab.data.entities import OfficialEntityParser

    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    samples = [RawSample(str(i), c, png.getvalue(), "png") for i, c in enumerate(["A man on a bus", "A bus"])]
    stats = write_caption_shards(samples, tmp_path, OfficialEntityParser.load(), progress=False)
    assert stats.kept == 1  # the release's parser never finds "bus" (strip("'s") -> "bu")
    with tarfile.open(next(tmp_path.glob("shard-*.tar"))) as tar:
        meta = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert meta[0]["question"] == "A [MASK] on a bu" and meta[0]["entities"] == ["people"]
