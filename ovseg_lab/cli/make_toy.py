"""Generate the toy open-vocabulary benchmark (deterministic from --seed).

    python scripts/make_toy.py --out data/toy [--seed 0] [--num-train 1200] [--num-val 120] [--force]

The quickstart generates it on first use; this script is for other sizes/seeds. See ovseg_lab/data/toy.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ovseg_lab.cli import guarded
from ovseg_lab.data.toy import ToyConfig, generate_toy


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/toy", help="output folder (default: data/toy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=1200)
    parser.add_argument("--num-val", type=int, default=120)
    parser.add_argument("--force", action="store_true", help="regenerate even if an identical set exists")
    args = parser.parse_args(argv)
    cfg = ToyConfig(seed=args.seed, image_size=args.image_size, num_train=args.num_train, num_val=args.num_val)
    out = generate_toy(args.out, cfg, force=args.force)
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    for split, info in manifest["summary"].items():
        print(
            f"{split:<18} {info['images']:>5} images  {info['classes']:>3} classes ({info['classes_present']} present)"
        )
    print(f"toy benchmark at {out} (fingerprint {manifest['fingerprint']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
