"""Regenerate every paper table in toy mode (offline, CPU): run each ``*_toy`` experiment sweep, then make_table.

    python scripts/make_tables_toy.py                       # every toy table -> outputs/tables_toy/
    python scripts/make_tables_toy.py catseg_table6_toy     # only these experiments
    python scripts/make_tables_toy.py --out DIR -- trainer.max_steps=20   # extra overrides for every job

Each sweep goes to ``OUT/<experiment>/`` (its table.md/.tex/.csv beside the jobs); all tables are collected in
``OUT/tables.md``. A sweep that fails is reported and the others still run (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from ovseg_lab.cli import guarded
from ovseg_lab.config import CONF_DIR
from ovseg_lab.utils.io import write_text


def toy_experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*_toy.yaml"))


@guarded
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "experiments", nargs="*", help="toy experiments to run (default: every conf/experiment/*_toy.yaml)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs") / "tables_toy")
    args = parser.parse_args(argv)
    known = toy_experiments()
    chosen = args.experiments or known
    unknown = [e for e in chosen if e not in known]
    if unknown:
        print(f"ERROR: unknown toy experiment(s) {unknown}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    sections, failed = [], []
    for i, experiment in enumerate(chosen, 1):
        sweep = args.out / experiment
        print(f"[{i}/{len(chosen)}] {experiment} -> {sweep}", flush=True)
        start = time.time()
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "ovseg_lab.cli.train",
                "-m",
                f"experiment={experiment}",
                f"hydra.sweep.dir={sweep}",
                *extra,
            ]
        )
        table = subprocess.run(
            [sys.executable, "-m", "ovseg_lab.cli.make_table", str(sweep)], capture_output=True, text=True
        )
        minutes = (time.time() - start) / 60
        if run.returncode != 0 or table.returncode != 0:
            failed.append(experiment)
            print(f"  sweep exit {run.returncode}, table exit {table.returncode}: {table.stderr.strip()}", flush=True)
        sections.append(
            f"## {experiment} ({minutes:.1f} min)\n\n" + (table.stdout or f"(no table: {table.stderr.strip()})\n")
        )
        write_text(args.out / "tables.md", "# Paper tables, toy mode\n\n" + "\n".join(sections))
    print(f"tables: {args.out / 'tables.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
