"""The toy benchmark: deterministic, consistent labels/vocabularies/captions, compositional splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg_lab.data.toy import SHAPES, SURFACES, ToyConfig, generate_toy, split_vocabularies


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic_and_seed_dependent(tmp_path):
    cfg = ToyConfig(num_train=8, num_val=4)
    a = generate_toy(tmp_path / "a", cfg, progress=False)
    b = generate_toy(tmp_path / "b", cfg, progress=False)
    c = generate_toy(tmp_path / "c", ToyConfig(num_train=8, num_val=4, seed=1), progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_existing_identical_set_is_kept_and_different_one_replaced(tmp_path):
    out = generate_toy(tmp_path / "t", ToyConfig(num_train=4, num_val=2), progress=False)
    stamp = (out / "toy_seen" / "vocab.json").stat().st_mtime_ns
    generate_toy(out, ToyConfig(num_train=4, num_val=2), progress=False)
    assert (out / "toy_seen" / "vocab.json").stat().st_mtime_ns == stamp
    generate_toy(out, ToyConfig(num_train=6, num_val=2), progress=False)
    assert len(list((out / "toy_seen" / "images" / "train").iterdir())) == 6


def test_vocabularies_are_compositional():
    vocabs = split_vocabularies()
    seen, unseen, large = map(set, (vocabs["toy_seen"], vocabs["toy_unseen"], vocabs["toy_large"]))
    assert not seen & unseen
    assert seen | unseen == large
    assert len(large) > len(seen)
    seen_words = {w for name in seen for w in name.split()}
    for name in unseen:  # every held-out name is made of words seen in training
        assert set(name.split()) <= seen_words, name


def test_labels_captions_and_vocab_agree(toy_data_dir):
    root = toy_data_dir / "toy"
    for bench, split in [("toy_seen", "train"), ("toy_seen", "val"), ("toy_unseen", "val"), ("toy_large", "val")]:
        vocab = json.loads((root / bench / "vocab.json").read_text())
        assert vocab == split_vocabularies()[bench]
        captions = [
            json.loads(line) for line in (root / bench / "captions" / f"{split}.jsonl").read_text().splitlines()
        ]
        images = sorted((root / bench / "images" / split).iterdir())
        assert len(captions) == len(images) > 0
        for record, image_path in zip(captions, images):
            label = np.array(Image.open(root / bench / "labels" / split / image_path.name))
            image = np.array(Image.open(image_path))
            assert image.shape == (*label.shape, 3) and label.dtype == np.uint8
            present = {vocab[i] for i in np.unique(label)}
            assert int(label.max()) < len(vocab)
            assert set(record["entities"]) == present, record
            for entity in record["entities"]:
                assert f"a {entity}" in record["caption"]
            # every image has stuff (a surface) and at least one visible thing in these sizes of shapes
            kinds = {name.split()[1] for name in present}
            assert kinds & set(SURFACES)


def test_things_are_drawn_with_their_colour(toy_data_dir):
    """A red thing's pixels are red: names are grounded in pixels, which is what makes the task learnable."""
    from ovseg_lab.data.toy import THING_COLOURS

    root = toy_data_dir / "toy" / "toy_large"
    vocab = json.loads((root / "vocab.json").read_text())
    checked = 0
    for image_path in sorted((root / "images" / "val").iterdir()):
        image = np.array(Image.open(image_path)).astype(float)
        label = np.array(Image.open(root / "labels" / "val" / image_path.name))
        for cls in np.unique(label):
            colour, kind = vocab[cls].split()
            if kind in SHAPES and (label == cls).sum() > 20:
                mean = image[label == cls].mean(axis=0)
                assert np.abs(mean - np.array(THING_COLOURS[colour])).max() < 30
                checked += 1
    assert checked > 5
