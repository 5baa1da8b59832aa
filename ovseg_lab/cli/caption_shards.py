"""Write image-caption webdataset shards with parsed entities (OVSegmentor / GroupViT training data).

    python scripts/make_caption_shards.py --source <img2dataset output folder | pairs.tsv | pairs.parquet> \
        --out data/cc4m --entities ovsegmentor                  # CC4M: keep captions naming an entity
    python scripts/make_caption_shards.py --source <...> --out data/cc12m --keep-without-entity
    python scripts/make_caption_shards.py --toy data/toy/toy_seen --out data/toy/toy_seen/caption_shards

Logic lives in ovseg_lab.data.caption_shards; this is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ovseg_lab.cli import guarded
from ovseg_lab.data.caption_shards import from_toy, open_source, write_caption_shards
from ovseg_lab.data.entities import EntityParser, EntityVocabulary, OfficialEntityParser


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", help="img2dataset output folder, or a .tsv / .parquet table of (url|path, caption)")
    source.add_argument("--toy", help="a toy benchmark split folder (data/toy/toy_seen): its train captions")
    parser.add_argument("--out", required=True, help="output folder for shard-*.tar and manifest.json")
    parser.add_argument(
        "--entities",
        default=None,
        help="'ovsegmentor' (the CC4M list, default for --source), a JSON file, or omit with --toy (its class names)",
    )
    parser.add_argument(
        "--parser",
        choices=["ours", "official"],
        default="ours",
        help="entity parser: ours, or the OVSegmentor release's with its bugs (docs/fidelity.md); "
        "training can also re-parse at read time (data.entity_parser)",
    )
    parser.add_argument(
        "--keep-without-entity", action="store_true", help="keep captions that name no entity (CC12M as is)"
    )
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per shard")
    parser.add_argument(
        "--max-size", type=int, default=None, help="re-encode images whose long side exceeds this (e.g. 512)"
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.toy:
        root = Path(args.toy)
        names = json.loads((root / "vocab.json").read_text()) if (root / "vocab.json").is_file() else None
        vocabulary = EntityVocabulary.load(args.entities) if args.entities else EntityVocabulary.from_names(names or [])
        samples = from_toy(root, "train")
    else:
        vocabulary = EntityVocabulary.load(args.entities or "ovsegmentor")
        samples = open_source(args.source)
    entity_parser = (
        OfficialEntityParser.load(args.entities or "ovsegmentor")
        if args.parser == "official"
        else EntityParser(vocabulary)
    )
    stats = write_caption_shards(
        samples,
        args.out,
        entity_parser,
        maxcount=args.maxcount,
        require_entity=not args.keep_without_entity,
        max_size=args.max_size,
        overwrite=args.overwrite,
    )
    print(json.dumps(stats.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
