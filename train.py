"""Train a model: `python train.py experiment=quickstart` (or `ovseg-train ...` once installed); with paper
defaults `python train.py`. Thin on purpose: the command is ovseg_lab/cli/train.py."""

from ovseg_lab.cli import ctrl_c_exits_130

# Ctrl-C while torch loads: one line and exit 130, not a traceback through the imports
with ctrl_c_exits_130():
    from ovseg_lab.cli.train import main

if __name__ == "__main__":
    main()
