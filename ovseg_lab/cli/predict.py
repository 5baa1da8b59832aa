"""Open-vocabulary segmentation of your own images with any ovseg-lab checkpoint, on CPU or GPU.

    python scripts/predict.py --checkpoint outputs/quickstart/checkpoints/last.ckpt \
        --image photo.jpg --classes "red circle,striped grass,plain sky" --output predictions/
    python scripts/predict.py --checkpoint catseg_vitb16.ckpt --image folder/ --vocab ade150 --output out/
    ovseg-predict --model clearclip --image photo.jpg --classes "cat,sofa"   # training-free: no checkpoint

Writes per image <stem>_overlay.png (legend of the classes present), <stem>_labels.png (label map) and
<stem>_areas.json (pixels and area fraction per class) into --output, by default a folder of its own next to the
checkpoint's run (<run>/predict/<timestamp>/), never into the run's records. An image that cannot be read or
predicted is reported and skipped; the exit status is then 1 (2: nothing could run). The model's evaluation protocol is used (CAT-Seg:
sliding window); --inference whole|slide overrides it. Every method works: CAT-Seg, the cost-volume baseline,
LSeg, OVSeg (MaskFormer + CLIP ensemble), OVSegmentor and GroupViT (--background-threshold 0.95 when your
classes include "background", as on PASCAL VOC). Official checkpoints: convert them first with
scripts/convert_checkpoint.py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ovseg_lab.cli import guarded
from ovseg_lab.errors import SetupError


@guarded
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a train.py / converted checkpoint")
    parser.add_argument(
        "--model",
        default=None,
        help="a training-free model instead of a checkpoint (maskclip, sclip, clearclip, naclip): CLIP's weights only",
    )
    parser.add_argument(
        "overrides", nargs="*", help="with --model: Hydra overrides, e.g. clip.pretrained=/path/to/ViT-B-16.pt"
    )
    parser.add_argument("--image", required=True, type=Path, help="an image file or a folder of images")
    parser.add_argument("--classes", default=None, help='comma-separated class names, e.g. "cat,sofa,wall"')
    parser.add_argument(
        "--vocab", default=None, help="vocabulary file (JSON list / one name per line) or packaged name"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="output folder (default: <the checkpoint's run>/predict/<timestamp>/)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inference", choices=["whole", "slide"], default=None, help="override the protocol")
    parser.add_argument(
        "--background-threshold",
        type=float,
        default=None,
        help='OVSegmentor / GroupViT: "background" wins where no class scores above this (VOC: 0.95)',
    )
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.model is None):
        raise SetupError(
            "Give either --checkpoint <file.ckpt> or --model <training-free model>, e.g. --model clearclip."
        )
    if args.overrides and args.model is None:
        raise SetupError(f"Overrides {args.overrides} apply only with --model; a checkpoint carries its own config.")
    from ovseg_lab.checkpoints import model_from_checkpoint
    from ovseg_lab.predict import (
        check_same_classes,
        list_images,
        predict_paths,
        resolve_vocabulary,
        set_background_threshold,
    )
    from ovseg_lab.run_folder import RunLock, check_not_another_runs

    vocabulary = resolve_vocabulary(args.classes, args.vocab)
    output = output_folder(args.output, args.checkpoint)
    # one writer per output folder (a second predict into it exits 2 naming this one), before minutes of loading
    lock = RunLock.acquire(output, elsewhere="give another --output folder")
    try:
        check_not_another_runs(output, None, training=False, key="--output")
        check_same_classes(output, vocabulary)
        device = checked_device(args.device)
        images = list_images(args.image)
        if args.model is not None:
            from ovseg_lab.build import training_free_model

            module, _ = training_free_model(args.model, args.overrides)
        else:
            module, _ = model_from_checkpoint(args.checkpoint)
        module.to(device)
        set_background_threshold(module, vocabulary, args.background_threshold)
        inference = replace(module.inference_cfg, mode=args.inference) if args.inference else None
        report = predict_paths(module, images, vocabulary, output, inference)
    except KeyboardInterrupt:
        # every output file is written atomically: what is there is complete; the same command redoes the rest
        print(
            f"\ninterrupted: the predictions written so far in {output} are complete (each file is written whole); "
            "rerun the same command to predict every image.\n",
            file=sys.stderr,
        )
        return 130
    finally:
        lock.release()
    for result in report.results:
        top = ", ".join(f"{name} {info['fraction'] * 100:.1f}%" for name, info in list(result.areas.items())[:5])
        print(f"{result.overlay_path}: {top}")
    if report.failures:
        listing = "\n".join(f"  - {path}: {reason}" for path, reason in report.failures)
        print(
            f"ERROR: {len(report.failures)} of {len(images)} image(s) failed and were skipped:\n{listing}",
            file=sys.stderr,
        )
        return 1
    return 0


def output_folder(output: Path | None, checkpoint: Path | None) -> Path:
    """--output, or a folder of its own next to the checkpoint's run (outputs/predict/ for --model); checked before
    anything is loaded (a file in its place, read-only, a full disk: one paragraph each)."""
    import time

    from ovseg_lab.run_folder import record_dir
    from ovseg_lab.utils.io import check_writable

    if output is None:
        output = Path(
            record_dir(
                str(checkpoint) if checkpoint else None, "predict", "outputs", time.strftime("%Y-%m-%d_%H-%M-%S")
            )
        )
    check_writable(output, "--output")
    return output


def checked_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SetupError(f"--device {name}: {err} (use cpu, cuda or cuda:N).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(
            f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use --device cpu."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SetupError(f"--device {name}: there are {torch.cuda.device_count()} GPU(s) here (cuda:0 ...).")
    return device


if __name__ == "__main__":
    raise SystemExit(main())
