"""The few-shot-split zero-shot protocol: fold splits, episodes, the episode metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_lab.data.fewshot import (
    FSS_SPLITS,
    Coco20i,
    EpisodeDataset,
    FewShotDataModule,
    Fss1000,
    Pascal5i,
    ToyClassSplit,
    ToyFolds,
    coco20i_fold_classes,
    interleaved_fold_classes,
    pascal5i_fold_classes,
)
from ovseg_lab.errors import SetupError
from ovseg_lab.eval.episodes import EpisodeIoU
from ovseg_lab.vocab import load_vocabulary


# ---------------------------------------------------------------------------------------------- fold splits
def test_pascal5i_folds_hold_out_classes_5i_plus_1_to_5i_plus_5():
    voc = load_vocabulary("voc20").classes
    folds = [pascal5i_fold_classes(i) for i in range(4)]
    assert [[voc[c] for c in f] for f in folds][0] == ["aeroplane", "bicycle", "bird", "boat", "bottle"]
    assert [voc[c] for c in folds[3]] == ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    for i, fold in enumerate(folds):
        assert [c + 1 for c in fold] == list(range(5 * i + 1, 5 * i + 6))  # 1-based VOC ids
    assert sorted(sum(folds, [])) == list(range(20))
    with pytest.raises(SetupError):
        pascal5i_fold_classes(4)


def test_packaged_pascal5i_lists_name_only_the_folds_classes():
    sizes = []
    for fold in range(4):
        protocol = Pascal5i("/nowhere", fold=fold, episodes=None)
        episodes = protocol.eval_episodes()
        sizes.append(len(episodes))
        assert {e.class_id for e in episodes} == set(pascal5i_fold_classes(fold))
        assert all(e.label_value == e.class_id + 1 for e in episodes)
        assert protocol.train_classes() == [c for c in range(20) if c not in pascal5i_fold_classes(fold)]
    assert sizes == [346, 451, 725, 346]  # HSNet's lists; all under the 1000-episode cap
    assert len(Pascal5i("/nowhere", fold=2, episodes=1000).eval_episodes()) == 725


def test_coco20i_folds_hold_out_every_fourth_class_from_the_fold_index():
    from ovseg_lab.data.fewshot import _packaged_lines

    names = _packaged_lines("coco80_lseg.txt")
    folds = [coco20i_fold_classes(i) for i in range(4)]
    assert folds[0][:3] == [0, 4, 8] and folds[3][-1] == 79
    assert [names[c] for c in folds[0][:3]] == ["person", "aeroplane", "boat"]  # mask values 1, 5, 9
    assert [names[c] for c in folds[1][:2]] == ["bicycle", "bus"]
    assert all(len(f) == 20 for f in folds) and sorted(sum(folds, [])) == list(range(80))


def test_fss1000_class_splits_are_520_240_240_and_disjoint():
    protocol = Fss1000("/nowhere")
    names = protocol.class_names
    assert len(names) == len(set(names)) == 1000
    assert [len(FSS_SPLITS[s]) for s in ("trn", "val", "test")] == [520, 240, 240]
    assert protocol.eval_classes() == list(range(760, 1000))
    assert set(protocol.train_classes()).isdisjoint(protocol.eval_classes())
    test_names = [names[c] for c in protocol.eval_classes()]
    assert test_names == sorted(test_names) and {"bus", "hotel_slipper", "tower_pisa"} <= set(test_names)
    assert "ac_wall" == names[0]  # the first training class


def test_toy_folds_interleave_classes():
    folds = [interleaved_fold_classes(36, i) for i in range(4)]
    assert folds[1] == list(range(1, 36, 4)) and sorted(sum(folds, [])) == list(range(36))


# ---------------------------------------------------------------------------------------------- episodes on disk
def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_pascal5i_episode_masks_the_class_and_keeps_boundaries_ignored(tmp_path):
    root = tmp_path / "hsnet"
    label = np.zeros((40, 60), np.uint8)
    label[5:20, 5:30] = 3  # bird (fold 0)
    label[25:35, 10:50] = 15  # person (fold 2)
    label[20, :] = 255  # boundary
    _save(label, root / "VOC2012" / "SegmentationClassAug" / "2007_000001.png")
    _save(np.full((40, 60, 3), 100, np.uint8), root / "VOC2012" / "JPEGImages" / "2007_000001.jpg")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "fold0.txt").write_text("2007_000001__03\n")
    protocol = Pascal5i(str(root), fold=0, val_lists=str(lists))
    episodes = protocol.eval_episodes()
    assert [(e.class_id, e.label_value) for e in episodes] == [(2, 3)]
    item = EpisodeDataset(episodes, image_size=None)[0]
    mask = item["label"].numpy()
    assert (mask[5:20, 5:30] == 1).all() and mask[25:35, 10:50].max() == 0  # the person is "others"
    assert (mask[20] == 255).all() and set(np.unique(mask)) == {0, 1, 255}
    resized = EpisodeDataset(episodes, image_size=32)[0]
    assert resized["image"].shape == (3, 32, 32) and resized["label"].shape == (32, 32)
    (lists / "fold0.txt").write_text("2007_000001__15\n")
    with pytest.raises(Exception, match="outside the fold"):
        protocol.eval_episodes()


def _fake_coco(root: Path, per_class: dict[int, int]) -> None:
    """val2014 masks: image k of class c holds value c + 1 (and a fold-1 class as distractor)."""
    for value, count in per_class.items():
        for k in range(count):
            stem = f"COCO_val2014_{value:03d}{k:03d}"
            label = np.zeros((16, 16), np.uint8)
            label[2:10, 2:10] = value
            label[12:, 12:] = 2  # bicycle, another fold
            _save(label, root / "COCO2014" / "annotations" / "val2014" / f"{stem}.png")
            _save(np.zeros((16, 16, 3), np.uint8), root / "COCO2014" / "val2014" / f"{stem}.jpg")


def test_coco20i_episodes_are_seeded_draws_from_the_fold(tmp_path):
    fold0_values = [c + 1 for c in coco20i_fold_classes(0)]
    _fake_coco(tmp_path, {v: 2 + v % 3 for v in fold0_values})
    first = Coco20i(str(tmp_path), fold=0, episodes=200, seed=0).eval_episodes()
    again = Coco20i(str(tmp_path), fold=0, episodes=200, seed=0).eval_episodes()
    other = Coco20i(str(tmp_path), fold=0, episodes=200, seed=1).eval_episodes()
    assert len(first) == 200 and first == again and first != other
    assert {e.class_id for e in first} <= set(coco20i_fold_classes(0))
    assert len({e.class_id for e in first}) > 15  # uniform over the 20 classes
    for episode in first[:20]:
        assert episode.label_value in np.unique(np.array(Image.open(episode.label)))
    with pytest.raises(Exception, match="no val2014 mask contains"):
        Coco20i(str(tmp_path), fold=1, episodes=10).eval_episodes()


def test_fss1000_test_episodes_skip_the_support_image_in_hsnet_order(tmp_path):
    protocol = Fss1000(str(tmp_path))
    name = protocol.class_names[760]
    folder = tmp_path / "FSS-1000" / name
    for n in range(1, 11):
        mask = np.zeros((8, 8), np.uint8)
        mask[:4] = 255
        _save(mask, folder / f"{n}.png")
        _save(np.zeros((8, 8, 3), np.uint8), folder / f"{n}.jpg")
    episodes = [e for e in protocol.eval_episodes() if e.class_id == 760]
    assert [Path(e.image).stem for e in episodes] == ["10", "2", "3", "4", "5", "6", "7", "8", "9"]
    item = EpisodeDataset(episodes, image_size=None)[0]
    assert item["label"][:4].eq(1).all() and item["label"][4:].eq(0).all() and item["class_id"] == 760
    assert any("category folders missing" in p for p in protocol.missing("test"))


def test_toy_protocols_never_train_on_held_out_classes(toy_data_dir):
    root = toy_data_dir / "toy"
    folds = ToyFolds(str(root), fold=1)
    held_out = set(folds.eval_classes())
    train, test = folds.train_episodes(), folds.eval_episodes()
    assert train and test and len(folds.class_names) == 36
    assert {e.class_id for e in test} <= held_out
    assert not held_out & {e.class_id for e in train}
    split = ToyClassSplit(str(root))
    assert len(split.class_names) == 72 and split.eval_classes() == list(range(36, 72))
    assert max(e.class_id for e in split.train_episodes()) < 36
    assert {e.class_id for e in split.eval_episodes()} <= set(range(36, 72))
    # every test episode's mask holds its class: the label value maps back into toy_unseen's own ids
    item = EpisodeDataset(split.eval_episodes()[:1], image_size=64)[0]
    assert item["label"].eq(1).any()


def test_datamodule_batches_episodes_and_reports_missing_data(toy_data_dir, tmp_path):
    module = FewShotDataModule(
        "toy_folds", str(toy_data_dir / "toy"), fold=0, image_size=64, batch_size=4, eval_batch_size=5, num_workers=0
    )
    bench = module.eval_benchmarks[0]
    assert bench.name == "toy_folds_fold0" and bench.class_ids == interleaved_fold_classes(36, 0)
    assert bench.episode_vocabulary(bench.class_ids[0]).classes == ("others", module.class_names[0])
    batch = next(iter(module.val_dataloader()[0]))
    assert batch["image"].shape == (5, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert batch["class_id"].shape == (5,) and set(batch["class_id"].tolist()) <= set(bench.class_ids)
    missing = FewShotDataModule("pascal5i", str(tmp_path)).missing("fit")
    assert missing and "VOC2012" in missing[0] and "docs/lseg.md" in missing[0]
    with pytest.raises(SetupError, match="Unknown few-shot protocol"):
        FewShotDataModule("pascal10i", str(tmp_path))


# ---------------------------------------------------------------------------------------------- the metric
def test_episode_metric_on_a_hand_made_case():
    # three 1x4 episodes over classes {0, 1} (held out) of a 3-class list; class 2 is not in the fold
    metric = EpisodeIoU(class_ids=[0, 1], num_classes=3)
    pred = torch.tensor([[[1, 1, 0, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0]], [[1, 1, 1, 1]]])
    gt = torch.tensor([[[1, 0, 0, 0]], [[1, 1, 255, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0]]])
    metric.update(pred, gt, torch.tensor([0, 0, 1, 2]))
    scores = metric.compute()
    # class 0: fg inter 1+1 = 2, union 2+2 = 4 -> 0.5; bg inter 2+1 = 3, union 3+2 = 5 (ignore pixel dropped)
    # class 1: fg inter 0, union 1 -> 0;                bg inter 3, union 4
    assert scores["per_class_iou"] == pytest.approx([50.0, 0.0])
    assert scores["mIoU"] == pytest.approx(25.0)
    # FB-IoU: fg 2/5, bg 6/9 -> mean 53.33
    assert scores["FB-IoU"] == pytest.approx((2 / 5 + 6 / 9) / 2 * 100)
    assert scores["num_episodes"] == 3 and scores["num_classes_evaluated"] == 2  # class 2 is not scored
    assert scores["pixel_accuracy"] == pytest.approx(8 / 11 * 100)


def test_episode_metric_counts_a_class_without_union_as_zero_and_rejects_bad_labels():
    metric = EpisodeIoU(class_ids=[0, 1], num_classes=2)
    metric.update(torch.ones(1, 2, 2), torch.ones(1, 2, 2), torch.tensor([0]))
    assert metric.compute()["mIoU"] == pytest.approx(50.0)  # class 1 never seen: IoU 0, as HSNet
    with pytest.raises(ValueError):
        metric.update(torch.full((1, 2, 2), 2), torch.ones(1, 2, 2), torch.tensor([0]))


# ---------------------------------------------------------------------------------------------- paper tables
@pytest.mark.parametrize("table", ["lseg_fss1000", "lseg_pascal5i", "lseg_coco20i"])
def test_lseg_paper_tables_match_their_sweeps(table):
    import json
    from importlib import resources

    from tests.conftest import compose

    spec = json.loads((resources.files("ovseg_lab") / "assets" / "paper_tables" / f"{table}.json").read_text())
    for flavour in ("", "_toy"):
        params = compose("train", [f"experiment={spec['experiment']}{flavour}"]).hydra.sweeper.params
        for row in spec["rows"]:
            for key, value in (row.get("toy_overrides", row["overrides"]) if flavour else row["overrides"]).items():
                assert value in str(params[key]).split(","), (flavour, key, value)
    real = {Pascal5i("/x", fold=i).benchmark_name for i in range(4)} | {
        Coco20i("/x", fold=i).benchmark_name for i in range(4)
    }
    toy = {ToyFolds("/x", fold=i).benchmark_name for i in range(4)} | {ToyClassSplit("/x").benchmark_name}
    for column in spec["columns"]:
        assert column["benchmark"] in real | {Fss1000("/x").benchmark_name} and column["toy"] in toy
        assert all(set(row["paper"]) <= {c["label"] for c in spec["columns"]} for row in spec["rows"])
