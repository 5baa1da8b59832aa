"""Evaluate a checkpoint: `python eval.py experiment=quickstart ckpt=outputs/quickstart/checkpoints/last.ckpt` (or
`ovseg-eval ...` once installed). Thin on purpose: the command is ovseg_lab/cli/eval.py."""

from ovseg_lab.cli.eval import main

if __name__ == "__main__":
    main()
