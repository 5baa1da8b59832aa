"""Train a model: `python train.py experiment=quickstart` (or `ovseg-train ...` once installed); with paper
defaults `python train.py`. Thin on purpose: the command is ovseg_lab/cli/train.py."""

from ovseg_lab.cli.train import main

if __name__ == "__main__":
    main()
