"""Regenerate golden fixtures from an official release (see tests/golden/README.md).

    python tests/golden/make_golden.py --official /tmp/catseg --method catseg --detectron2 /tmp/detectron2

``--official`` is an extracted copy of the official repository (never committed here); ``--detectron2`` an
extracted detectron2, for the few detectron2 functions a protocol runs. The fixtures are written to
tests/golden/fixtures/ with the official commit they came from.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.golden.harness import FIXTURE_DIR  # noqa: E402

METHODS = {
    "catseg": "tests.golden.official_catseg",
    "catseg_train": "tests.golden.official_catseg_train",
    "lseg": "tests.golden.official_lseg",
    "lseg_train": "tests.golden.official_lseg_train",
    "groupvit": "tests.golden.official_groupvit",
    "ovsegmentor": "tests.golden.official_ovsegmentor",
    "ovseg": "tests.golden.official_ovseg",
    "ovseg_train": "tests.golden.official_ovseg_train",
    "groupvit_train": "tests.golden.official_groupvit_train",
    "ovsegmentor_train": "tests.golden.official_ovsegmentor_train",
    # the training-free releases: one generator, the release told apart by its segmentor file
    "sclip": "tests.golden.official_trainingfree",
    "naclip": "tests.golden.official_trainingfree",
    "clearclip": "tests.golden.official_trainingfree",
}


def official_commit(root: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(
            f"{root} is not a git checkout: pass --commit <the official commit it was extracted from>"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, type=Path, help="extracted official repository")
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--detectron2", type=Path, help="extracted detectron2 (protocol fixtures)")
    parser.add_argument("--clip", type=Path, help="extracted openai/CLIP (LSeg imports OpenAI's clip package)")
    parser.add_argument("--mmcv", type=Path, help="extracted mmcv v1.3.14 (GroupViT's keep-ratio resize sizes)")
    parser.add_argument(
        "--mmseg", type=Path, help="mmseg 0.x mmseg/models/segmentors/encoder_decoder.py tree (GroupViT)"
    )
    parser.add_argument("--encoding", type=Path, help="extracted PyTorch-Encoding (LSeg training: dataset, loss)")
    parser.add_argument("--ovseg", type=Path, help="extracted ov-seg (catseg_train: its training mapper)")
    parser.add_argument(
        "--timm", type=Path, help="timm extracted at the release's pinned tag (GroupViT 0.4.12, OVSegmentor 0.6.12)"
    )
    parser.add_argument("--commit", help="official commit, when --official is not a git checkout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR)
    args = parser.parse_args(argv)
    import importlib

    module = importlib.import_module(METHODS[args.method])
    extra = {
        "lseg": args.clip,
        "lseg_train": {"clip": args.clip, "encoding": args.encoding},
        "groupvit": {"mmcv": args.mmcv, "mmseg": args.mmseg},
        "catseg_train": {"detectron2": args.detectron2, "ovseg": args.ovseg},
        "groupvit_train": {"timm": args.timm},
        "ovsegmentor_train": {"timm": args.timm},
    }.get(args.method, args.detectron2)
    paths = module.make(args.official, extra, args.out, official_commit(args.official, args.commit), args.seed)
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
