"""Convert an official checkpoint into an ovseg-lab checkpoint that eval.py / predict.py can load.

    python scripts/convert_checkpoint.py --format catseg --input model_final_vitb.pth \
        --output checkpoints/catseg_vitb16.ckpt        (ViT-B/16 or ViT-L/14: read off the checkpoint)
    python eval.py ckpt=checkpoints/catseg_vitb16.ckpt model=catseg experiment=catseg_vitb16_coco   (the line it prints)
    python scripts/convert_checkpoint.py --format lseg --input demo_e200.ckpt --output checkpoints/lseg_vitl16.ckpt
    python scripts/convert_checkpoint.py --format ovseg --input ovseg_clip_l_9a1909.pth --output checkpoints/ovseg_clip.pt
        (OVSeg's adapted CLIP, also read from the full ovseg_swinbase_vitL14_ft_mpt.pth: use it as
        model.net.clip_weights of model=ovseg)

Everything after ``--`` are Hydra overrides describing the model the checkpoint belongs to (the same ones you
pass to eval.py). The converted weights are checked key by key and shape by shape against that model (built
with random weights, nothing downloaded); a mismatch is refused with the offending keys named.
"""

# Thin wrapper: the command is ovseg_lab/cli/convert.py (installed as `ovseg-convert`).
from ovseg_lab.cli.convert import convert, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
