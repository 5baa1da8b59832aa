"""Turn an official benchmark download into the prepared layout ovseg-lab trains and evaluates on.

Usage and options: `python scripts/prepare_datasets.py --help` (the text of ovseg_lab/cli/prepare.py)."""

# Thin wrapper: the command is ovseg_lab/cli/prepare.py (installed as `ovseg-prepare`).
from ovseg_lab.cli.prepare import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
