"""Open-vocabulary segmentation of your own images with any ovseg-lab checkpoint, on CPU or GPU.

Usage and options: `python scripts/predict.py --help` (the text of ovseg_lab/cli/predict.py)."""

# Thin wrapper: the command is ovseg_lab/cli/predict.py (installed as `ovseg-predict`).
from ovseg_lab.cli import ctrl_c_exits_130

# Ctrl-C while torch loads: one line and exit 130, not a traceback through the imports
with ctrl_c_exits_130():
    from ovseg_lab.cli.predict import checked_device, main, output_folder  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
