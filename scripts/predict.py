"""Open-vocabulary segmentation of your own images with any ovseg-lab checkpoint, on CPU or GPU.

    python scripts/predict.py --checkpoint outputs/quickstart/checkpoints/last.ckpt \
        --image photo.jpg --classes "red circle,striped grass,plain sky" --output predictions/
    python scripts/predict.py --checkpoint catseg_vitb16.ckpt --image folder/ --vocab ade150 --output out/

Writes per image <stem>_overlay.png (legend of the classes present), <stem>_labels.png (label map) and
<stem>_areas.json (pixels and area fraction per class) into --output, by default a folder of its own next to the
checkpoint's run (<run>/predict/<timestamp>/), never into the run's records. An image that cannot be read or
predicted is reported and skipped; the exit status is then 1 (2: nothing could run). The model's evaluation protocol is used (CAT-Seg:
sliding window); --inference whole|slide overrides it. Every method works: CAT-Seg, the cost-volume baseline,
LSeg, OVSeg (MaskFormer + CLIP ensemble), OVSegmentor and GroupViT (--background-threshold 0.95 when your
classes include "background", as on PASCAL VOC). Official checkpoints: convert them first with
scripts/convert_checkpoint.py.
"""

# Thin wrapper: the command is ovseg_lab/cli/predict.py (installed as `ovseg-predict`).
from ovseg_lab.cli.predict import main, output_folder, checked_device  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
