"""Generate the toy open-vocabulary benchmark (deterministic from --seed).

Usage and options: `python scripts/make_toy.py --help` (the text of ovseg_lab/cli/make_toy.py)."""

# Thin wrapper: the command is ovseg_lab/cli/make_toy.py (installed as `ovseg-make-toy`).
from ovseg_lab.cli.make_toy import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
