"""OVSeg's data side: caption nouns, pair mining into shards, the CLIP adaptation recipe, the stage pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ovseg_lab.data.mask_pairs import PairShards, decode_pair, load_captions, shard_urls
from ovseg_lab.data.nouns import noun_phrases
from ovseg_lab.data.toy import SURFACES, THING_COLOURS
from ovseg_lab.errors import SetupError
from ovseg_lab.layers.contrastive import info_nce
from ovseg_lab.lit.ovseg import CLIPAdaptModule, parse_adapt
from ovseg_lab.models.ovseg import OVSeg
from ovseg_lab.ovseg_chain import mine_pairs
from tests.conftest import ROOT, small_toy_overrides
from tests.test_ovseg import tiny_clip


def test_noun_phrases_recover_every_toy_entity(toy_data_dir):
    rows = [
        json.loads(line)
        for line in (toy_data_dir / "toy" / "toy_seen" / "captions" / "train.jsonl").read_text().splitlines()
    ]
    assert rows
    for row in rows:
        assert noun_phrases(row["caption"], "phrase") == row["entities"], row
    assert noun_phrases("Two men riding horses near the buses.", "head") == ["man", "horse", "bus"]
    assert noun_phrases("A dog sitting on a wooden bench", "phrase") == ["dog", "wooden bench"]


def test_coco_captions_format_is_read(tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "000007.jpg"}],
        "annotations": [{"image_id": 7, "caption": "A cat."}, {"image_id": 7, "caption": "A sofa."}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert load_captions(tmp_path / "c.json") == {"000007": ["A cat.", "A sofa."]}


PALETTE = list(THING_COLOURS.values()) + list(SURFACES.values())
WORD_COLOUR = {
    **{w: i for i, w in enumerate(THING_COLOURS)},
    **{w: len(THING_COLOURS) + i for i, w in enumerate(SURFACES)},
}


def _colour_oracle(net):
    """Scores regions by colour alone: a crop's mean foreground colour vs the colour a toy name implies."""
    palette = torch.tensor(PALETTE, dtype=torch.float32) / 255

    def region_features(crops, crop_masks=None):
        rgb = crops * net.clip.std + net.clip.mean
        weights = crop_masks[:, None].float()
        mean = (rgb * weights).sum((2, 3)) / weights.sum((2, 3)).clamp(min=1)
        nearest = torch.cdist(mean, palette).argmin(1)
        return F.one_hot(nearest, len(PALETTE)).float()

    def text_features(names):
        index = [
            WORD_COLOUR[n.split(" ")[0]] if n.split(" ")[0] in WORD_COLOUR else WORD_COLOUR[n.split(" ")[-1]]
            for n in names
        ]
        return F.one_hot(torch.tensor(index), len(PALETTE)).float()

    net.region.region_features = region_features
    net.region.text_features = text_features
    return net


def test_mining_on_toy_captions_pairs_nouns_with_their_masks(toy_data_dir, tmp_path):
    """Masks from the ground truth, nouns from the captions, a colour-oracle scorer: the mining logic (noun
    extraction, per-noun choice of one mask, shards, match rate) must then pair almost every noun correctly."""
    toy = toy_data_dir / "toy" / "toy_seen"
    vocab = json.loads((toy / "vocab.json").read_text())
    net = _colour_oracle(OVSeg(tiny_clip(), None, analysis="gt_masks"))
    report = mine_pairs(
        net,
        toy / "images" / "train",
        tmp_path / "shards",
        captions=toy / "captions" / "train.jsonl",
        labels=toy / "labels" / "train",
        vocabulary=vocab,
        masks="gt",
        nouns="captions",
        noun_mode="phrase",
        progress=False,
    )
    assert report["images"] == 64 and report["pairs"] == report["nouns"] == report["checked"] > 100
    assert report["match_rate"] > 0.8, report
    assert json.loads((tmp_path / "shards" / "report.json").read_text()) == report
    assert not (tmp_path / "shards.partial").exists()

    import webdataset as wds

    samples = [decode_pair(s) for s in wds.WebDataset(shard_urls(tmp_path / "shards"), shardshuffle=False)]
    assert len(samples) == report["pairs"]
    first = samples[0]
    assert first["image"].shape == (3, 32, 32) and first["image"].dtype == torch.uint8
    assert first["mask"].dtype == torch.bool and first["mask"].any() and first["text"] in vocab
    # background pixels carry the CLIP mean colour
    mean = (net.clip.mean.view(3) * 255).round()
    background = first["image"][:, ~first["mask"]].float()
    if background.numel():
        assert (background - mean[:, None]).abs().max() <= 1
    stream = iter(PairShards(tmp_path / "shards", shuffle_buffer=10))
    assert next(stream)["text"] in vocab


def test_mining_needs_what_each_source_reads(tmp_path):
    net = OVSeg(tiny_clip(), None, analysis="gt_masks")
    with pytest.raises(SetupError, match="labels"):
        mine_pairs(net, tmp_path, tmp_path / "out", masks="gt", nouns="captions", captions=tmp_path / "c.jsonl")
    with pytest.raises(SetupError, match="MaskFormer"):
        mine_pairs(net, tmp_path, tmp_path / "out", masks="proposals", nouns="captions", captions=tmp_path / "c.jsonl")


def test_contrastive_loss_with_duplicate_nouns():
    image = F.normalize(torch.randn(4, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    plain = info_nce(image, text, torch.tensor(10.0), gather=False)
    logits = 10 * image @ text.t()
    reference = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4)))
    torch.testing.assert_close(plain, reference)
    # images 0 and 2 share text 0: both are its positives, no false negative between them
    groups = torch.tensor([0, 1, 0, 2])
    unique = info_nce(image, text[:3], torch.tensor(10.0), groups, gather=False)
    logits = 10 * image @ text[:3].t()
    i2t = F.cross_entropy(logits, groups)
    log_prob = logits.t().log_softmax(1)
    t2i = -(log_prob[0, [0, 2]].mean() + log_prob[1, 1] + log_prob[2, 3]) / 3
    torch.testing.assert_close(unique, 0.5 * (i2t + t2i))


def _adapt_module(adapt: str, steps: int = 4, depth: int = 2) -> CLIPAdaptModule:
    net = OVSeg(tiny_clip(mask_prompt_depth=depth), None, analysis="gt_masks")
    return CLIPAdaptModule(net, adapt=adapt, total_steps=steps, duplicate_texts="unique", train_template="a {}")


def test_adaptation_phases_train_exactly_their_parameters_in_order():
    assert parse_adapt("ft_mpt") == ["ft", "mpt"] and parse_adapt("none") == []
    with pytest.raises(SetupError):
        parse_adapt("mpt_mpt")
    module = _adapt_module("ft_mpt", steps=4)
    clip = module.net.clip
    trainable = lambda: {n for n, p in clip.named_parameters() if p.requires_grad}  # noqa: E731
    assert module.phase_at(0) == module.phase_at(1) == 0 and module.phase_at(2) == module.phase_at(3) == 1
    assert all(n.startswith("model.visual.") for n in trainable()) and "mask_prompts" not in trainable()
    module._set_phase(1)
    assert trainable() == {"mask_prompts"}
    optimizer = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = [optimizer.lr_lambdas[g](s) for s in range(4) for g in range(2)]
    # each group trains only inside its window (FT steps 0-1, MPT steps 2-3)
    assert [lr > 0 for lr in lrs] == [True, False, True, False, False, True, False, True]
    with pytest.raises(SetupError, match="mask_prompt_depth"):
        _adapt_module("mpt", depth=0)


@pytest.mark.parametrize("adapt,lr,factor", [("ft", 1e-3, 0.5), ("mpt", 5e-2, 0.95)])
def test_adaptation_lowers_the_pair_loss(adapt, lr, factor):
    """FT can fit 8 random pairs; MPT only changes background tokens shared by all crops, so it moves less."""
    torch.manual_seed(0)
    module = _adapt_module(adapt, steps=30)
    images = (torch.rand(8, 3, 32, 32) * 255).byte()
    masks = torch.zeros(8, 32, 32, dtype=torch.bool)
    masks[:, 4:20, 6:26] = True
    batch = {"image": images, "mask": masks, "text": ["red circle", "blue square", "grass", "sky"] * 2}
    optimizer = torch.optim.AdamW([p for p in module.net.clip.parameters() if p.requires_grad], lr=lr)
    before = module.training_step(batch, 0).item()
    for _ in range(25):
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()
    after = module.training_step(batch, 0).item()
    assert after < factor * before, (before, after)
    exported = module.training_adapted_state()
    assert ("mask_prompts" in exported) == (adapt == "mpt") and "model.visual.proj" in exported


def test_maskformer_training_lowers_the_loss():
    from tests.test_ovseg import tiny_ovseg

    net = tiny_ovseg()
    net.clip.requires_grad_(False)
    net.train()
    label = torch.zeros(2, 64, 64, dtype=torch.long)
    label[0, 16:48, 16:48] = 1
    label[1, :, 32:] = 2
    images = torch.rand(2, 3, 64, 64)
    names = ["red circle", "blue square", "striped grass"]
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = net.loss(net.maskformer_outputs(images, names), label)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::5]


# ---------------------------------------------------------------------------------------------- pipeline
def fake_stage(cfg) -> None:
    """A stage that records its call (pytest may import this module twice, so in a file, not a list)."""
    from ovseg_lab.runner import run_dir_of

    run_dir = run_dir_of(cfg)
    with open(run_dir.parent / "calls.txt", "a") as calls:
        calls.write(f"{cfg.proposals_ckpt}\n")
    (run_dir / "out.txt").write_text(str(cfg.seed))


def test_pipeline_stage_folders_are_content_addressed_and_reused(tmp_path):
    from omegaconf import OmegaConf

    import ovseg_lab.resolvers  # noqa: F401
    from ovseg_lab.pipeline import run_stages

    def config(seed: int):
        return OmegaConf.create(
            {
                "seed": seed,
                "pipeline": {
                    "dir": str(tmp_path),
                    "reuse": True,
                    "inherit": ["seed"],
                    "stages": {
                        "a": {
                            "run": "tests.test_ovseg_pairs.fake_stage",
                            "config": "mine",
                            "overrides": ["proposals_ckpt=none"],
                        },
                        "b": {
                            "run": "tests.test_ovseg_pairs.fake_stage",
                            "config": "mine",
                            "overrides": ["proposals_ckpt=${stage:a}/out.txt"],
                        },
                    },
                },
                "uses": "${stage:b}/out.txt",
            }
        )

    calls = lambda: (tmp_path / "calls.txt").read_text().splitlines()  # noqa: E731
    cfg = config(1)
    folders = run_stages(cfg)
    assert [f.name.split("-")[0] for f in folders] == ["a", "b"]
    assert calls() == ["none", f"{folders[0]}/out.txt"]
    assert (folders[1] / "out.txt").read_text() == "1" and cfg.uses == f"{folders[1]}/out.txt"
    assert run_stages(config(1)) == folders and len(calls()) == 2  # finished stages are reused
    changed = run_stages(config(2))  # an inherited value changes every stage folder
    assert set(changed).isdisjoint(folders) and len(calls()) == 4


@pytest.mark.slow
def test_ovseg_quickstart_chain_runs_end_to_end(toy_data_dir, tmp_path):
    run_dir = tmp_path / "qs"
    cmd = [
        sys.executable,
        "train.py",
        "model=ovseg",
        "experiment=quickstart",
        "logger=csv",
        "ovseg.pretrain_steps=20",
        "ovseg.maskformer_steps=20",
        "ovseg.adapt_steps=10",
        f"hydra.run.dir={run_dir}",
        *small_toy_overrides(toy_data_dir),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"toy_seen", "toy_unseen", "toy_large"}
    stages = sorted(p.name.split("-")[0] for p in (run_dir / "stages").iterdir())
    assert stages == ["clip_adapt", "clip_pretrain", "maskformer", "mine"]
    report = json.loads(next((run_dir / "stages").glob("mine-*/mining_report.json")).read_text())
    assert report["pairs"] > 0 and 0 <= report["match_rate"] <= 1 and report["checked"] >= report["matched"]
