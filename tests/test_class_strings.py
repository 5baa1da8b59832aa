"""Release class strings: what a method's text tower is sent for a packaged benchmark's classes."""

from __future__ import annotations

import json

import pytest
import torch

from ovseg_lab import vocab as vocab_module
from ovseg_lab.errors import DataError
from ovseg_lab.lit.base import OpenVocabModule
from ovseg_lab.vocab import load_vocabulary, vocabulary_from_names, with_release_strings


@pytest.fixture
def release_dir(tmp_path, monkeypatch):
    """A fake release 'fake' with strings for voc20 (only 'aeroplane' and 'bicycle' differ)."""
    names = load_vocabulary("voc20").classes
    strings = {n: n for n in names} | {"aeroplane": "airplane", "bicycle": "bike, cycle"}
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "voc20.json").write_text(json.dumps({"citation": "test", "strings": strings}))
    monkeypatch.setattr(
        vocab_module, "_class_strings_path", lambda release, source: tmp_path / release / f"{source}.json"
    )
    vocab_module.release_class_strings.cache_clear()
    yield tmp_path
    vocab_module.release_class_strings.cache_clear()


def test_release_strings_replace_names_in_order_and_keep_the_benchmark_name(release_dir):
    voc = load_vocabulary("voc20", name="voc20_val")
    text = with_release_strings(voc, "fake")
    assert text.name == "voc20_val" and len(text) == len(voc)
    assert text.classes[voc.classes.index("aeroplane")] == "airplane"
    assert text.classes[voc.classes.index("bicycle")] == "bike, cycle"
    assert [t for t, n in zip(text.classes, voc.classes) if t != n] == ["airplane", "bike, cycle"]
    sub = voc.subset([1, 0])  # a subset keeps its source, so the strings follow the classes
    assert with_release_strings(sub, "fake").classes == ("bike, cycle", "airplane")


def test_no_release_or_a_user_vocabulary_is_sent_unchanged(release_dir):
    voc = load_vocabulary("voc20")
    assert with_release_strings(voc, None) is voc
    custom = vocabulary_from_names("aeroplane,bicycle")
    assert with_release_strings(custom, "fake") is custom


def test_missing_file_or_class_is_a_clear_error(release_dir):
    with pytest.raises(DataError, match=r"model.class_strings=null"):
        with_release_strings(load_vocabulary("ade150"), "fake")
    strings = json.loads((release_dir / "fake" / "voc20.json").read_text())
    del strings["strings"]["cat"]
    (release_dir / "fake" / "voc20.json").write_text(json.dumps(strings))
    vocab_module.release_class_strings.cache_clear()
    with pytest.raises(DataError, match=r"no string for 1 class\(es\) of voc20: \['cat'\]"):
        with_release_strings(load_vocabulary("voc20"), "fake")


class _RecordingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images, vocabulary):
        self.seen.append(vocabulary.classes)
        return torch.zeros(images.shape[0], len(vocabulary), *images.shape[-2:])


def test_the_module_sends_release_strings_to_the_net(release_dir):
    net = _RecordingNet()
    module = OpenVocabModule(net, class_strings="fake")
    voc = load_vocabulary("voc20")
    module.predict_scores(torch.zeros(1, 3, 8, 8), voc)
    assert "airplane" in net.seen[-1] and "aeroplane" not in net.seen[-1]
    OpenVocabModule(net).predict_scores(torch.zeros(1, 3, 8, 8), voc)
    assert net.seen[-1] == voc.classes
