"""The toy table of docs/toy.md: every method's toy run beside the split's chance figures, and, for the grouping
methods (OVSegmentor, GroupViT), whether a group gets the name of what it covers.

Per run folder (``train.py experiment=quickstart model=<name>``): steps and wall time (``run_info.json``), per
split mIoU and the two chance figures (``metrics.json``, see ``ovseg_lab.metrics``). For a grouping network the
checkpoint is evaluated once more on each split's val images, group by group:

- ``group_top1``: over every group that wins at least one labelled pixel (argmax of the assignment maps, the
  segmentation's own grouping), the fraction whose *majority true class* is the class name the model gives the
  group (the class predicted on its pixels). Chance: 1 / number of classes.
- ``group_purity``: the fraction of labelled pixels that belong to their group's majority class.
- ``group_oracle_mIoU``: mIoU when every group is labelled with its majority true class (what the grouping allows
  with perfect naming).

    python scripts/toy_report.py outputs/quickstart_groupvit outputs/quickstart_ovsegmentor [--data-dir data]
        [--json report.json] [--label NAME ...]        (or python -m ovseg_lab.tools.toy_report ...)

prints a markdown table (mIoU per split, in brackets: uniform random / present-class oracle mIoU) and writes every
figure (group purity, group-oracle mIoU, groups per image) to --json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovseg_lab.metrics import SegmentationMetric

SPLITS = ("toy_seen", "toy_unseen", "toy_large")


def grouping_scores(
    groups: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> dict[str, Any]:
    """Counts for group naming, summable over batches.

    groups (B, H, W) group ids in [0, G); pred, labels (B, H, W) class ids (labels may hold ``ignore_index``).
    Returns ``groups`` (groups with a labelled pixel), ``named_right`` (of those, named with their majority
    class), ``pure_pixels`` / ``pixels`` and ``oracle_labels`` (B, H, W): every pixel relabelled with its group's
    majority class (``ignore_index`` where unlabelled).
    """
    num_groups = int(groups.max()) + 1 if groups.numel() else 1
    out = {"groups": 0, "named_right": 0, "pure_pixels": 0, "pixels": 0}
    oracle = torch.full_like(labels, ignore_index)
    for g, p, y, o in zip(groups.long(), pred.long(), labels.long(), oracle):
        valid = y != ignore_index
        truth = torch.bincount(g[valid] * num_classes + y[valid], minlength=num_groups * num_classes)
        truth = truth.reshape(num_groups, num_classes)
        named = torch.bincount(g[valid] * num_classes + p[valid], minlength=num_groups * num_classes)
        named = named.reshape(num_groups, num_classes)
        used = truth.sum(dim=1) > 0
        majority = truth.argmax(dim=1)
        out["groups"] += int(used.sum())
        out["named_right"] += int((named.argmax(dim=1) == majority)[used].sum())
        out["pure_pixels"] += int(truth.max(dim=1).values.sum())
        out["pixels"] += int(valid.sum())
        o[valid] = majority[g[valid]].to(o.dtype)
    out["oracle_labels"] = oracle
    return out


def group_ids(net, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) id of the final group each pixel belongs to (as ``OVSegmentor.forward`` assigns it)."""
    out = net.image_encoder(net.normalize(images))
    maps = net.image_encoder.assignment_maps(out.assignments).reshape(images.shape[0], -1, *out.grid)
    return F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False).argmax(dim=1)


def _read_split(bench_dir: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    from PIL import Image

    vocab = json.loads((bench_dir / "vocab.json").read_text())
    files = sorted((bench_dir / "images" / "val").glob("*.png"))
    images = np.stack([np.array(Image.open(f).convert("RGB")) for f in files])
    labels = np.stack([np.array(Image.open(bench_dir / "labels" / "val" / f.name)) for f in files])
    return vocab, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def evaluate_grouping(module, bench_dir: Path, name: str, batch_size: int = 40) -> dict[str, float]:
    """Group naming scores and the mIoU of the checkpoint on one toy split (val images)."""
    from ovseg_lab.vocab import Vocabulary

    vocab, images, labels = _read_split(bench_dir)
    vocabulary = Vocabulary(name, vocab)
    # scored as the run scored it (GroupViT's recipe reports mmseg's mIoU, the toy default detectron2's)
    convention = getattr(module, "metric_convention", "detectron2")
    metric, oracle = (SegmentationMetric(len(vocab), convention=convention) for _ in range(2))
    totals = {"groups": 0, "named_right": 0, "pure_pixels": 0, "pixels": 0}
    for start in range(0, len(images), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        pred = module.predict_labels(x, vocabulary)
        scores = grouping_scores(group_ids(module.net, x), pred, y, len(vocab))
        metric.update(pred, y)
        oracle.update(scores["oracle_labels"].clamp(max=len(vocab) - 1).masked_fill(y == 255, 0), y)
        for key in totals:
            totals[key] += scores[key]
    result = metric.compute()
    return {
        "mIoU": result["mIoU"],
        "chance_uniform_mIoU": result["chance_uniform_mIoU"],
        "chance_present_classes_mIoU": result["chance_present_classes_mIoU"],
        "group_top1": 100 * totals["named_right"] / max(totals["groups"], 1),
        "group_top1_chance": 100 / len(vocab),
        "group_purity": 100 * totals["pure_pixels"] / max(totals["pixels"], 1),
        "group_oracle_mIoU": oracle.compute()["mIoU"],
        "groups_per_image": totals["groups"] / len(images),
    }


def run_row(run_dir: Path, data_dir: Path | None = None, grouping: bool = True) -> dict[str, Any]:
    """One table row from a run folder; ``grouping``: also score group naming when the net groups."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run_info.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row: dict[str, Any] = {"run": str(run_dir), "steps": info.get("global_step"), "wall_s": info.get("train_seconds")}
    for split in SPLITS:
        if split in metrics:
            m = metrics[split]
            row[split] = {k: m.get(k) for k in ("mIoU", "chance_uniform_mIoU", "chance_present_classes_mIoU")}
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if grouping and checkpoint.is_file():
        from ovseg_lab.build import model_from_checkpoint

        module, cfg = model_from_checkpoint(checkpoint)
        if hasattr(module.net, "image_encoder") and hasattr(module.net.image_encoder, "assignment_maps"):
            root = Path(data_dir) if data_dir is not None else Path(cfg.paths.data_dir)
            for split in SPLITS:
                if (root / "toy" / split).is_dir():
                    row.setdefault(split, {}).update(evaluate_grouping(module, root / "toy" / split, split))
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    """The docs/toy.md table: mIoU (uniform random / present-class oracle) per split, group top-1 (chance)."""

    def cell(row: dict, split: str) -> str:
        m = row.get(split)
        if not m or m.get("mIoU") is None:
            return ""
        return f"{m['mIoU']:.2f} ({m['chance_uniform_mIoU']:.2f} / {m['chance_present_classes_mIoU']:.2f})"

    def top1(row: dict) -> str:
        cells = [f"{row[s]['group_top1']:.1f}" for s in SPLITS if s in row and "group_top1" in row[s]]
        if not cells:
            return ""
        chance = row["toy_seen"]["group_top1_chance"] if "group_top1_chance" in row.get("toy_seen", {}) else None
        return " / ".join(cells) + (f" (chance {chance:.1f})" if chance else "")

    lines = [
        "| run | steps | wall | toy_seen | toy_unseen | toy_large | group-to-name top-1 seen / unseen / large |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        wall = f"{row['wall_s'] / 60:.1f} min" if row.get("wall_s") else ""
        lines.append(
            f"| {row.get('label', row['run'])} | {row.get('steps')} | {wall} | {cell(row, 'toy_seen')} | "
            f"{cell(row, 'toy_unseen')} | {cell(row, 'toy_large')} | {top1(row)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from ovseg_lab.errors import SetupError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (run_info.json, metrics.json, checkpoints/)")
    parser.add_argument("--data-dir", type=Path, default=None, help="holds toy/ (default: the run's paths.data_dir)")
    parser.add_argument("--label", nargs="*", default=None, help="row names (default: the folders)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--no-grouping", action="store_true", help="skip the checkpoint evaluation of grouping nets")
    args = parser.parse_args(argv)
    rows = []
    for index, run in enumerate(args.runs):
        if not (run / "metrics.json").is_file() or not (run / "run_info.json").is_file():
            raise SetupError(f"{run} holds no metrics.json / run_info.json: not a finished training run folder.")
        row = run_row(run, args.data_dir, grouping=not args.no_grouping)
        if args.label and index < len(args.label):
            row["label"] = args.label[index]
        rows.append(row)
    print(markdown(rows))
    if args.json:
        from ovseg_lab.utils.io import write_json

        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
