"""Write image-caption webdataset shards with parsed entities (OVSegmentor / GroupViT training data).

    python scripts/make_caption_shards.py --source <img2dataset output folder | pairs.tsv | pairs.parquet> \
        --out data/cc4m --entities ovsegmentor                  # CC4M: keep captions naming an entity
    python scripts/make_caption_shards.py --source <...> --out data/cc12m --keep-without-entity
    python scripts/make_caption_shards.py --toy data/toy/toy_seen --out data/toy/toy_seen/caption_shards

Logic lives in ovseg_lab.data.caption_shards; this is the command line.
"""

# Thin wrapper: the command is ovseg_lab/cli/caption_shards.py (installed as `ovseg-caption-shards`).
from ovseg_lab.cli.caption_shards import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
