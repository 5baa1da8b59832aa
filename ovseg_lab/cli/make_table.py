"""Turn a Hydra sweep folder into its paper table, our numbers beside the paper's.

    python train.py -m experiment=catseg_table6_toy
    python scripts/make_table.py outputs/multirun/catseg_table6_toy/<date_time> [--format md|tex|csv] [--table NAME]

Writes table.md / table.tex / table.csv next to the sweep's job folders and prints the chosen format (a sweep
that fills several paper tables, listed in its experiment's ``paper_tables``, writes table_<name>.<fmt> for each).
Missing or failed jobs are marked in their row instead of stopping the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ovseg_lab.cli import guarded
from ovseg_lab.tables import build_table, render, sweep_table_names
from ovseg_lab.utils.io import write_text


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--format", default="md", choices=["md", "tex", "csv"], help="format printed (all are written)")
    parser.add_argument("--table", default=None, help="paper table name (default: from the sweep's experiment)")
    args = parser.parse_args(argv)
    names = sweep_table_names(args.sweep_dir, args.table)
    tables = [(name, build_table(args.sweep_dir, name, shared_sweep=len(names) > 1)) for name in names]
    for name, table in tables:
        stem = "table" if len(tables) == 1 else f"table_{name}"
        for fmt in ("md", "tex", "csv"):
            write_text(args.sweep_dir / f"{stem}.{fmt}", render(table, fmt))
        print(render(table, args.format), end="\n" if len(tables) > 1 else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
