"""Generate the toy open-vocabulary benchmark (deterministic from --seed).

    python scripts/make_toy.py --out data/toy [--seed 0] [--num-train 1200] [--num-val 120] [--force]

The quickstart generates it on first use; this script is for other sizes/seeds. See ovseg_lab/data/toy.py.
"""

# Thin wrapper: the command is ovseg_lab/cli/make_toy.py (installed as `ovseg-make-toy`).
from ovseg_lab.cli.make_toy import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
