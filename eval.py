"""Evaluate a checkpoint: `python eval.py experiment=quickstart ckpt=outputs/quickstart/checkpoints/last.ckpt` (or
`ovseg-eval ...` once installed). Thin on purpose: the command is ovseg_lab/cli/eval.py."""

from ovseg_lab.cli import ctrl_c_exits_130

# Ctrl-C while torch loads: one line and exit 130, not a traceback through the imports
with ctrl_c_exits_130():
    from ovseg_lab.cli.eval import main

if __name__ == "__main__":
    main()
