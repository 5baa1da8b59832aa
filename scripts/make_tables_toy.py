"""Regenerate every paper table in toy mode (offline, CPU): run each ``*_toy`` experiment sweep, then make_table.

    python scripts/make_tables_toy.py                       # every toy table -> outputs/tables_toy/
    python scripts/make_tables_toy.py catseg_table6_toy     # only these experiments
    python scripts/make_tables_toy.py --out DIR -- trainer.max_steps=20   # extra overrides for every job

Each sweep goes to ``OUT/<experiment>/`` (its table.md/.tex/.csv beside the jobs); all tables are collected in
``OUT/tables.md``. A sweep that fails is reported and the others still run (exit status 1 at the end).
"""

# Thin wrapper: the command is ovseg_lab/cli/tables_toy.py (installed as `ovseg-tables-toy`).
from ovseg_lab.cli.tables_toy import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
