"""MESS: its datasets read from fake folders in MESS's prepared layouts, its scoring and summaries on hand-made
numbers, the offline error, the eval entry point and the paper table."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_lab.data.mess import load_catalog, summarize, write_fake_dataset
from tests.conftest import compose


def _datamodule(root, keys):
    from ovseg_lab.data.datamodule import SegmentationDataModule

    return SegmentationDataModule(eval={f"mess_{k}": {"mess": k} for k in keys}, root=str(root), num_workers=0)


def test_catalog_holds_mess_22_datasets_in_five_domains():
    catalog = load_catalog()
    datasets = {e["dataset"]: e["domain"] for e in catalog.values()}
    assert len(catalog) == 25 and len(datasets) == 22  # PAXRay-4 = four binary benchmarks
    counts = {d: list(datasets.values()).count(d) for d in set(datasets.values())}
    assert counts == {
        "General": 6,
        "Earth Monitoring": 5,
        "Medical Sciences": 4,
        "Engineering": 4,
        "Agriculture and Biology": 3,
    }
    assert {e["ignore_index"] for e in catalog.values()} == {255}
    # MESS's prompt-ready names, not the official ones (kvasir: 'tool', not 'surgical instrument')
    assert catalog["chase_db1"]["classes"] == ["others", "blood vessels"]
    assert catalog["kvasir_instrument"]["classes"] == ["others", "tool"]
    assert (
        catalog["isaid"]["classes"][:3] == ["others", "boat", "storage tank"] and len(catalog["isaid"]["classes"]) == 16
    )
    assert catalog["isprs_potsdam"]["images"].endswith("irrg")  # MESS scores the IRRG images


def test_fake_folders_read_with_mess_ids_and_class_lists(tmp_path):
    write_fake_dataset(tmp_path, "chase_db1", num_images=2, size=(12, 16))  # binary medical, .jpg images
    write_fake_dataset(tmp_path, "isaid", num_images=3, size=(20, 24))  # 16-class aerial, .png images
    write_fake_dataset(tmp_path, "suim", num_images=2, size=(10, 10), ignore_fraction=0.3)  # with ignore pixels
    write_fake_dataset(tmp_path, "dark_zurich", num_images=2, size=(8, 8))  # paired by '_rgb_anon.png' endings
    write_fake_dataset(tmp_path, "cwfid", num_images=2, size=(8, 8))  # 'image.png' / 'annotation.png'
    # a hand-made label: ids pass through unchanged, 255 stays ignore
    label = np.array([[0, 1, 255, 1]] * 3 + [[1] * 4] * 9, dtype=np.uint8)
    label = np.pad(label, ((0, 0), (0, 12)), constant_values=0)
    Image.fromarray(label).save(tmp_path / "CHASEDB1/annotations_detectron2/test/fake_0000.png")
    dm = _datamodule(tmp_path, ["chase_db1", "isaid", "suim", "dark_zurich", "cwfid"])
    assert dm.missing("validate") == []
    dm.setup("validate")
    benches = {b.name: b for b in dm.eval_benchmarks}
    assert list(benches["mess_chase_db1"].vocabulary) == ["others", "blood vessels"]
    assert benches["mess_isaid"].num_classes == 16 and benches["mess_isaid"].vocabulary[15] == "pier"
    assert all(b.ignore_index == 255 and b.metric_convention == "mmseg" for b in benches.values())
    sets = dict(zip(benches, dm._eval_sets))
    assert [len(s) for s in sets.values()] == [2, 3, 2, 2, 2]
    item = sets["mess_chase_db1"][0]
    assert item["image"].shape == (3, 12, 16) and torch.equal(item["label"], torch.from_numpy(label.astype(np.int64)))
    assert (sets["mess_suim"][1]["label"] == 255).any()
    for name in ("mess_dark_zurich", "mess_cwfid"):
        image, label_path = sets[name].samples[1]
        assert image.name.removesuffix(load_catalog()[name[5:]]["image_ext"]) == label_path.name.removesuffix(
            load_catalog()[name[5:]]["label_ext"]
        )


def test_missing_dataset_is_one_bullet_naming_the_mess_command(tmp_path):
    from ovseg_lab.errors import SetupError
    from ovseg_lab.preflight import check_run

    cfg = compose(
        "eval",
        ["experiment=catseg_mess", f"data.root={tmp_path}", "data/eval=[mess_chase_db1]", "clip.pretrained=null"],
    )
    from hydra.utils import instantiate

    with pytest.raises(SetupError) as err:
        check_run(cfg, instantiate(cfg.data), "validate")
    message = str(err.value)
    bullets = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(bullets) == 1 and "CHASEDB1" in bullets[0]  # the preflight's list: one missing dataset, one line
    assert (
        f'pip install -e ".[mess]" && DETECTRON2_DATASETS={tmp_path} python -m mess.prepare_datasets.prepare_chase_db1'
    ) in message
    assert str(tmp_path / "CHASEDB1/images_detectron2/test") in message


def test_summary_on_hand_made_numbers():
    from ovseg_lab.data.mess import mess_spec

    keys = {
        "chase_db1": 40.0,
        "kvasir_instrument": 60.0,
        "isaid": 30.0,
        "paxray_lungs": 20.0,
        "paxray_bones": 40.0,
        "paxray_mediastinum": 60.0,
        "paxray_diaphragm": 80.0,
    }
    specs = [mess_spec(f"mess_{k}", k, "/mess") for k in keys]
    results = {
        f"mess_{k}": {"mIoU": v, "pixel_accuracy": 2 * v, "fwIoU": v, "num_classes": 2, "convention": "mmseg"}
        for k, v in keys.items()
    }
    summary = summarize(results, specs)
    assert summary["mess_paxray_4"]["mIoU"] == pytest.approx(50.0)  # mean of its four parts
    assert summary["mess_paxray_4"]["pixel_accuracy"] == pytest.approx(100.0)
    assert summary["mess_domain_medical_sciences"]["mIoU"] == pytest.approx((40 + 60 + 50) / 3)
    assert summary["mess_domain_earth_monitoring"]["mIoU"] == pytest.approx(30.0)
    assert summary["mess_mean"]["mIoU"] == pytest.approx((40 + 60 + 50 + 30) / 4)  # datasets, not benchmarks
    assert summary["mess_hmean"]["mIoU"] == pytest.approx(4 / (1 / 40 + 1 / 60 + 1 / 50 + 1 / 30))  # 42.105...
    assert summary["mess_hmean"]["of"] == ["CHASE DB1", "Kvasir-Instrument", "iSAID", "PAXRay-4"]
    assert summarize({"ade150": results["mess_isaid"]}, []) == {}
    # a dataset at 0 mIoU pulls the harmonic mean to 0 (MESS's mean would hide it)
    zero = summarize({**results, "mess_isaid": {**results["mess_isaid"], "mIoU": 0.0}}, specs)
    assert zero["mess_hmean"]["mIoU"] == 0.0 and zero["mess_mean"]["mIoU"] == pytest.approx(37.5)


def test_mess_benchmarks_count_predicted_only_classes():
    """MESSSemSegEvaluator averages over classes in the ground truth or the prediction (our mmseg convention)."""
    from torch import nn

    from ovseg_lab.data.datamodule import EvalBenchmark
    from ovseg_lab.data.mess import mess_spec
    from ovseg_lab.lit.base import OpenVocabModule

    module = OpenVocabModule(nn.Identity(), metric_convention="detectron2")
    metric = module._make_metric(EvalBenchmark(mess_spec("mess_isaid", "isaid", "/mess")))
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    metric.update(torch.tensor([[[0, 0], [1, 1]]]), target)  # class 0: IoU 1/2; class 1 only predicted: IoU 0
    assert metric.compute()["mIoU"] == pytest.approx(25.0)  # detectron2's convention would give 50


def test_eval_entry_point_writes_per_dataset_domain_and_means(tmp_path):
    from omegaconf import open_dict

    from ovseg_lab.runner import evaluate

    keys = ["chase_db1", "isaid", "paxray_lungs", "paxray_bones"]
    for i, key in enumerate(keys):
        write_fake_dataset(tmp_path / "mess", key, num_images=1, size=(64, 64), seed=i, ignore_fraction=0.1)
    run_dir = tmp_path / "run"
    # the CAT-Seg recipe's truncation switch has no meaning for the baseline's net: removed with the model swap
    cfg = compose(
        "eval",
        [
            "experiment=catseg_mess",
            "model=costvolume",
            "~model.net.truncate_classes",
            "clip=tiny",
            "finetune=full",
            "allow_untrained=true",
            f"data.root={tmp_path / 'mess'}",
            "data.num_workers=0",
            f"data/eval=[{','.join('mess_' + k for k in keys)}]",
            "logger=none",
            "trainer=cpu",
        ],
        run_dir,
    )
    with open_dict(cfg):
        del cfg["hydra"]
    evaluate(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in (
        "mess_chase_db1",
        "mess_isaid",
        "mess_paxray_lungs",
        "mess_paxray_bones",
        "mess_paxray_4",
        "mess_domain_medical_sciences",
        "mess_domain_earth_monitoring",
        "mess_mean",
        "mess_hmean",
    ):
        assert 0 <= metrics[name]["mIoU"] <= 100, (name, metrics[name]["mIoU"])  # a number (NaN fails), a percentage
    assert metrics["mess_isaid"]["convention"] == "mmseg" and metrics["mess_isaid"]["num_classes"] == 16
    datasets = [metrics["mess_chase_db1"]["mIoU"], metrics["mess_isaid"]["mIoU"], metrics["mess_paxray_4"]["mIoU"]]
    assert metrics["mess_paxray_4"]["mIoU"] == pytest.approx(
        (metrics["mess_paxray_lungs"]["mIoU"] + metrics["mess_paxray_bones"]["mIoU"]) / 2
    )
    assert metrics["mess_mean"]["mIoU"] == pytest.approx(statistics.fmean(datasets))
    assert metrics["mess_hmean"]["mIoU"] == pytest.approx(statistics.harmonic_mean(datasets))


def test_make_table_lays_out_mess_with_the_paper_column(tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT

    sweep = tmp_path / "sweep"
    job = sweep / "0"
    (job / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"overrides": {"task": ["experiment=catseg_mess"]}}, "paper_tables": ["mess"]})
    )
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["experiment=catseg_mess", "clip=vitb16"]))
    (job / "metrics.json").write_text(
        json.dumps(
            {
                "mess_chase_db1": {"mIoU": 12.5},
                "mess_paxray_4": {"mIoU": 40.0},
                "mess_domain_medical_sciences": {"mIoU": 26.25},
                "mess_mean": {"mIoU": 26.25},
                "mess_hmean": {"mIoU": 19.06},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "scripts/make_table.py", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| row"))
    assert header.count("|") == 31 and "| Medical Sciences |" in header and "| H-mean |" in header
    base = next(line for line in proc.stdout.splitlines() if line.startswith("| CAT-Seg ViT-B/16 |"))
    assert "12.5 / 25.4" in base and "40.0 / 44.9" in base and "26.2 / 41.6" in base and "26.2 / 33.7" in base
    assert base.rstrip(" |").endswith("19.1")  # MESS publishes no harmonic mean: our cell alone
    assert "missing / 38.1" in next(line for line in proc.stdout.splitlines() if line.startswith("| CAT-Seg ViT-L/14"))


def test_packaged_catalog_matches_the_installed_mess_package():
    pytest.importorskip("mess.datasets")
    from ovseg_lab.data.mess import catalog_from_package

    assert catalog_from_package() == load_catalog()


def test_fake_folders_never_go_into_a_real_mess_root(tmp_path):
    from ovseg_lab.data.mess import write_fake_root
    from ovseg_lab.errors import DataError

    write_fake_root(tmp_path / "fake", ["chase_db1"])
    write_fake_root(tmp_path / "fake", ["chase_db1", "cwfid"])  # its own folder: adds what is missing
    assert (tmp_path / "fake/cwfid/annotations_detectron2/test").is_dir()
    (tmp_path / "real/CHASEDB1").mkdir(parents=True)
    with pytest.raises(DataError, match="not a folder of fake MESS datasets"):
        write_fake_root(tmp_path / "real", ["cwfid"])
    assert not (tmp_path / "real/cwfid").exists()


def _toy_catseg_checkpoint(path):
    """A checkpoint as train.py writes it for experiment=catseg_mess_toy (tiny CLIP, slim head), random weights."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from ovseg_lab.build import resolved_model_config, without_init_files
    from ovseg_lab.preflight import resolved_yaml

    cfg = compose("train", ["experiment=catseg_mess_toy", "clip.weights=null"])
    with open_dict(cfg):
        del cfg["hydra"]
    model_cfg = resolved_model_config(cfg)
    without_init_files(model_cfg)
    torch.save({"state_dict": instantiate(model_cfg).state_dict(), "ovseg_config": resolved_yaml(cfg)}, path)
    return path


def test_eval_of_a_toy_checkpoint_with_the_paper_recipe_builds_the_checkpoints_model(tmp_path, capsys):
    """experiment=catseg_mess composes the paper CAT-Seg ViT-B/16; a toy checkpoint does not fit it, so eval builds
    the net from the checkpoint's stored config (with a notice), keeps the recipe's protocol and the MESS data, and
    records the evaluated model. A checkpoint without a stored config still gets the does-not-fit error."""
    from omegaconf import open_dict

    from ovseg_lab.data.mess import write_fake_root
    from ovseg_lab.errors import SetupError
    from ovseg_lab.runner import evaluate

    ckpt = _toy_catseg_checkpoint(tmp_path / "toy.ckpt")
    write_fake_root(tmp_path / "mess", ["chase_db1", "cwfid"], num_images=1, size=(32, 48))
    run_dir = tmp_path / "run"
    cfg = compose(
        "eval",
        [
            "experiment=catseg_mess",
            f"ckpt={ckpt}",
            f"data.root={tmp_path / 'mess'}",
            "data/eval=[mess_chase_db1,mess_cwfid]",
            "data.num_workers=0",
            "logger=none",
            "trainer=cpu",
        ],
        run_dir,
    )
    with open_dict(cfg):
        del cfg["hydra"]
    evaluate(cfg)
    err = capsys.readouterr().err
    assert "does not fit this config's model" in err and "evaluation protocol (model.inference)" in err, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mess_chase_db1"]["mIoU"] is not None and metrics["mess_hmean"]["mIoU"] is not None
    record = (run_dir / "config_resolved.yaml").read_text()
    assert "model_name: tiny" in record or "tiny" in record.split("clip:", 1)[1][:400], record[:2000]
    assert "crop: 384" in record  # the recipe's sliding-window protocol, not the toy's

    from hydra.utils import instantiate

    from ovseg_lab.build import resolved_model_config
    from ovseg_lab.runner import _model_fitting_checkpoint

    bare = torch.load(ckpt, weights_only=True)
    del bare["ovseg_config"]
    other = instantiate(resolved_model_config(compose("eval", ["experiment=quickstart", "model=costvolume"])))
    with pytest.raises(SetupError, match="does not fit the configured model"):
        _model_fitting_checkpoint(cfg, other, bare)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_must_show_eval_command_on_fake_mess_folders(tmp_path):
    """Issue 25's command as written, on fake folders of all 22 datasets (one small image each): exit 0,
    metrics.json with per-dataset, per-domain, mean and harmonic-mean figures (5-10 min on 2 loaded cores)."""
    import os
    import subprocess
    import sys

    from ovseg_lab.data.mess import write_fake_root
    from tests.conftest import ROOT

    ckpt = _toy_catseg_checkpoint(tmp_path / "toy.ckpt")
    write_fake_root(tmp_path / "mess", list(load_catalog()), num_images=1, size=(40, 56))
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "experiment=catseg_mess",
            f"ckpt={ckpt}",
            f"data.root={tmp_path / 'mess'}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics_path,) = (tmp_path / "logs" / "eval" / "toy").glob("*/metrics.json")
    metrics = json.loads(metrics_path.read_text())
    for key in load_catalog():
        assert metrics[f"mess_{key}"]["mIoU"] is not None, key
    for name in (
        "mess_paxray_4",
        "mess_domain_general",
        "mess_domain_earth_monitoring",
        "mess_domain_medical_sciences",
        "mess_domain_engineering",
        "mess_domain_agriculture_and_biology",
        "mess_mean",
        "mess_hmean",
    ):
        assert metrics[name]["mIoU"] is not None, name
