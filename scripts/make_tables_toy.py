"""Regenerate every paper table in toy mode (offline, CPU): run each ``*_toy`` experiment sweep, then make_table.

Usage and options: `python scripts/make_tables_toy.py --help` (the text of ovseg_lab/cli/tables_toy.py)."""

# Thin wrapper: the command is ovseg_lab/cli/tables_toy.py (installed as `ovseg-tables-toy`).
from ovseg_lab.cli.tables_toy import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
