"""Convert an official checkpoint into an ovseg-lab checkpoint that eval.py / predict.py can load.

Usage and options: `python scripts/convert_checkpoint.py --help` (the text of ovseg_lab/cli/convert.py)."""

# Thin wrapper: the command is ovseg_lab/cli/convert.py (installed as `ovseg-convert`).
from ovseg_lab.cli import ctrl_c_exits_130

# Ctrl-C while torch loads: one line and exit 130, not a traceback through the imports
with ctrl_c_exits_130():
    from ovseg_lab.cli.convert import convert, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
