"""Turn an official benchmark download into the prepared layout ovseg-lab trains and evaluates on.

    python scripts/prepare_datasets.py NAME --raw DIR --out DIR [--splits val train] [--workers 8]

NAME      raw data (--raw points at)                                          writes
coco_stuff  COCO-Stuff: images/{train,val}2017 + annotations/{train,val}2017     coco_stuff (train, val)
            (stuffthingmaps_trainval2017.zip unpacked beside the COCO images also works)
coco_object COCO val2017 + annotations/instances_val2017.json (or the maps)      coco_object (val)
ade150      ADEChallengeData2016                                                 ade150 (val)
ade847      ADE20K_2021_17_01 (index_ade20k.pkl, images/ADE/...)                 ade847 (val, 16-bit)
pc59        VOCdevkit/VOC2010 + trainval_merged.json (or trainval/*.mat)        pc59 and pc59b (val)
pc459       VOCdevkit/VOC2010 + trainval/*.mat (trainval.tar.gz)                 pc459 (val, 16-bit)
voc20       VOCdevkit/VOC2012 (+ SegmentationClassAug)                           voc20 and voc20b (val)

Output: OUT/<benchmark>/images/<split>/<stem>.jpg, OUT/<benchmark>/labels/<split>/<stem>.png|.tif (train ids,
ignore 255 / 65535), OUT/<benchmark>/vocab.json and prepare_summary.json. Reruns skip finished files; every
file is written atomically. Details and the id conventions: docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ovseg_lab.cli import guarded
from ovseg_lab.data.prepare import ALIASES, PREPARERS, prepare_benchmark


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(PREPARERS) + sorted(ALIASES), help="benchmark to prepare")
    parser.add_argument("--raw", required=True, help="the unpacked official download (see the table above)")
    parser.add_argument(
        "--out",
        default=os.environ.get("OVSEG_DATA_DIR", "data"),
        help="data folder that receives OUT/<benchmark>/ (default: $OVSEG_DATA_DIR or data)",
    )
    parser.add_argument(
        "--splits", nargs="+", choices=("train", "val"), help="splits to prepare (default: val; coco_stuff: train val)"
    )
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    parser.add_argument(
        "--images",
        default="auto",
        choices=("auto", "hardlink", "symlink", "copy"),
        help="how unchanged images reach OUT (auto: hard link if possible, else copy)",
    )
    parser.add_argument(
        "--source", default="auto", help="coco_object: auto|stuffthingmaps|instances; pc59: auto|json|mat"
    )
    parser.add_argument("--force", action="store_true", help="rewrite files that already exist")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of each split (a quick look)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "scripts/prepare_datasets.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        summaries = prepare_benchmark(
            args.name,
            args.raw,
            args.out,
            splits=args.splits,
            workers=args.workers,
            force=args.force,
            image_mode=args.images,
            source=args.source,
            progress=not args.no_progress,
            limit=args.limit,
            command=command,
        )
    except KeyboardInterrupt as err:  # PrepareInterrupted says which split; a Ctrl-C elsewhere (listing) as well
        message = str(err) or "interrupted; rerun the same command to resume: finished files are kept and skipped."
        print(f"\n{message}\n  {command}", file=sys.stderr)
        return 130
    print(f"\nprepared into {Path(args.out).resolve()}:")
    for summary in summaries:
        print("  " + summary.line())
    benchmarks = sorted({s.target for s in summaries})
    print(f"evaluate with: python eval.py ... data/eval=[{','.join(benchmarks)}] paths.data_dir={args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
