"""Write image-caption webdataset shards with parsed entities (OVSegmentor / GroupViT training data).

Usage and options: `python scripts/make_caption_shards.py --help` (the text of ovseg_lab/cli/caption_shards.py)."""

# Thin wrapper: the command is ovseg_lab/cli/caption_shards.py (installed as `ovseg-caption-shards`).
from ovseg_lab.cli.caption_shards import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
