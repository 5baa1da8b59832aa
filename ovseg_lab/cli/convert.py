"""Convert an official checkpoint into an ovseg-lab checkpoint that eval.py / predict.py can load.

    python scripts/convert_checkpoint.py --format catseg --input model_final_vitb.pth \
        --output checkpoints/catseg_vitb16.ckpt        (ViT-B/16 or ViT-L/14: read off the checkpoint)
    python eval.py ckpt=checkpoints/catseg_vitb16.ckpt model=catseg experiment=catseg_vitb16_coco   (the line it prints)
    python scripts/convert_checkpoint.py --format lseg --input demo_e200.ckpt --output checkpoints/lseg_vitl16.ckpt
    python scripts/convert_checkpoint.py --format ovseg --input ovseg_swinbase_vitL14_ft_mpt.pth \
        --output checkpoints/ovseg_swinb.ckpt          (MaskFormer + adapted CLIP; Swin-B or R-101c read off the file)
    python scripts/convert_checkpoint.py --format ovseg_clip --input ovseg_clip_l_9a1909.pth --output checkpoints/ovseg_clip.pt
        (OVSeg's adapted CLIP alone: use it as model.net.clip_weights of model=ovseg)
    python scripts/convert_checkpoint.py --format groupvit|groupvit_hf|ovsegmentor --input <release file> --output <ckpt>

Everything after ``--`` are Hydra overrides describing the model the checkpoint belongs to (the same ones you
pass to eval.py). The converted weights are checked key by key and shape by shape against that model (built
with random weights, nothing downloaded); a mismatch is refused with the offending keys named.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ovseg_lab.cli import guarded
from ovseg_lab.convert import FORMATS
from ovseg_lab.convert.common import check_against, lightning_checkpoint, load_official
from ovseg_lab.errors import SetupError
from ovseg_lab.utils.io import atomic_path, check_writable


def check_output(target: Path, overwrite: bool) -> None:
    """Before converting: ``--output`` is not a record of a training run (the record policy of
    ``ovseg_lab.run_folder``), exists only with ``--overwrite``, and can be written (a read-only folder or full disk
    was found only after the whole conversion ran)."""
    from ovseg_lab.errors import FolderOfAnotherRun
    from ovseg_lab.run_folder import run_holding

    held = run_holding(target)
    if held is not None:
        run, records = held
        raise FolderOfAnotherRun(
            f"--output {target} lies in the training run {run} ({', '.join(records[:5])}); a converted checkpoint "
            "never replaces or joins a run's records. Give a file elsewhere, e.g. --output checkpoints/<name>.ckpt."
        )
    if target.is_dir():
        raise SetupError(
            f"--output {target} is a folder; give the checkpoint file to write, e.g. {target}/<name>.ckpt."
        )
    if target.exists() and not overwrite:
        raise SetupError(f"--output {target} exists; pass --overwrite to replace it, or give another file.")
    check_writable(target.parent, "--output's folder")


def convert(fmt: str, source: Path, target: Path, overrides: list[str]) -> tuple[Path, list[str]]:
    """Write the converted checkpoint; returns it with the overrides of the model it was checked against."""
    from omegaconf import OmegaConf

    from ovseg_lab.build import build_net
    from ovseg_lab.config import compose_config

    if fmt not in FORMATS:
        raise SetupError(f"Unknown --format {fmt!r}; choose one of {sorted(FORMATS)}.")
    spec = FORMATS[fmt]
    official = load_official(source)
    defaults = spec.overrides + (spec.detect(official) if spec.detect else [])
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    # the user's overrides replace the format's defaults of the same key (e.g. experiment=...)
    overrides = [o for o in defaults if o.split("=", 1)[0] not in given] + overrides
    converted = spec.converter(official)
    net = build_net(overrides)
    expected = {f"net.{k}": v for k, v in net.state_dict().items()}
    if spec.part:  # one sub-module: checked against that part of the configured model only
        expected = {k: v for k, v in expected.items() if k.startswith(spec.part)}
    check_against(converted, expected, str(source))
    net_class = f"{type(net).__module__}.{type(net).__qualname__}"
    config_yaml = None
    if not spec.part:
        cfg = compose_config(overrides)
        # the model node, resolved: what build.model_from_checkpoint needs to rebuild the network
        config_yaml = OmegaConf.to_yaml({"model": OmegaConf.to_container(cfg.model, resolve=True)})
    with atomic_path(target) as tmp:
        torch.save(lightning_checkpoint(converted, net_class, config_yaml), tmp)
    return target, overrides


@guarded
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--input", required=True, type=Path, help="official checkpoint file")
    parser.add_argument("--output", required=True, type=Path, help="ovseg-lab checkpoint to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = parser.parse_args(argv)
    from ovseg_lab.run_folder import RunLock

    check_output(args.output, args.overwrite)
    # one writer at a time in the output's folder; the file itself is written atomically (complete or absent)
    lock = RunLock.acquire(args.output.parent, elsewhere="give another --output folder")
    try:
        out, used = convert(args.format, args.input, args.output, overrides)
    finally:
        lock.release()
    print(f"wrote {out}")
    if FORMATS[args.format].usage:
        print("use it with: " + FORMATS[args.format].usage.format(out=out, overrides=" ".join(used)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
