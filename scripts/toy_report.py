"""Report toy runs beside their chance figures; grouping methods also get group-to-name top-1 (docs/toy.md).

    python scripts/toy_report.py outputs/quickstart_groupvit outputs/quickstart_ovsegmentor [--data-dir data]
        [--json report.json] [--label NAME ...]

Prints a markdown table (mIoU per split, in brackets: uniform random / present-class oracle mIoU) and writes the
full figures (group purity, group-oracle mIoU, groups per image) to --json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovseg_lab.tools.toy_report import markdown, run_row  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (run_info.json, metrics.json, checkpoints/)")
    parser.add_argument("--data-dir", type=Path, default=None, help="holds toy/ (default: the run's paths.data_dir)")
    parser.add_argument("--label", nargs="*", default=None, help="row names (default: the folders)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--no-grouping", action="store_true", help="skip the checkpoint evaluation of grouping nets")
    args = parser.parse_args(argv)
    rows = []
    for index, run in enumerate(args.runs):
        if not (run / "metrics.json").is_file():
            print(f"ERROR: {run} holds no metrics.json (not a finished run folder).", file=sys.stderr)
            return 2
        row = run_row(run, args.data_dir, grouping=not args.no_grouping)
        if args.label and index < len(args.label):
            row["label"] = args.label[index]
        rows.append(row)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
