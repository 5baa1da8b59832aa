"""Turn a Hydra sweep folder into its paper table, our numbers beside the paper's.

Usage and options: `python scripts/make_table.py --help` (the text of ovseg_lab/cli/make_table.py)."""

# Thin wrapper: the command is ovseg_lab/cli/make_table.py (installed as `ovseg-table`).
from ovseg_lab.cli.make_table import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
