"""Turn a Hydra sweep folder into its paper table, our numbers beside the paper's.

    python train.py -m experiment=catseg_table6_toy
    python scripts/make_table.py outputs/multirun/catseg_table6_toy/<date_time> [--format md|tex|csv] [--table NAME]

Writes table.md / table.tex / table.csv next to the sweep's job folders and prints the chosen format (a sweep
that fills several paper tables, listed in its experiment's ``paper_tables``, writes table_<name>.<fmt> for each).
Missing or failed jobs are marked in their row instead of stopping the table.
"""

# Thin wrapper: the command is ovseg_lab/cli/make_table.py (installed as `ovseg-table`).
from ovseg_lab.cli.make_table import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
