"""Turn an official benchmark download into the prepared layout ovseg-lab trains and evaluates on.

    python scripts/prepare_datasets.py NAME --raw DIR --out DIR [--splits val train] [--workers 8]

NAME      raw data (--raw points at)                                          writes
coco_stuff  COCO-Stuff: images/{train,val}2017 + annotations/{train,val}2017     coco_stuff (train, val)
            (stuffthingmaps_trainval2017.zip unpacked beside the COCO images also works)
coco_object COCO val2017 + annotations/instances_val2017.json (or the maps)      coco_object (val)
ade150      ADEChallengeData2016                                                 ade150 (val)
ade847      ADE20K_2021_17_01 (index_ade20k.pkl, images/ADE/...)                 ade847 (val, 16-bit)
pc59        VOCdevkit/VOC2010 + trainval_merged.json (or trainval/*.mat)        pc59 and pc59b (val)
pc459       VOCdevkit/VOC2010 + trainval/*.mat (trainval.tar.gz)                 pc459 (val, 16-bit)
voc20       VOCdevkit/VOC2012 (+ SegmentationClassAug)                           voc20 and voc20b (val)

Output: OUT/<benchmark>/images/<split>/<stem>.jpg, OUT/<benchmark>/labels/<split>/<stem>.png|.tif (train ids,
ignore 255 / 65535), OUT/<benchmark>/vocab.json and prepare_summary.json. Reruns skip finished files; every
file is written atomically. Details and the id conventions: docs/data.md.
"""

# Thin wrapper: the command is ovseg_lab/cli/prepare.py (installed as `ovseg-prepare`).
from ovseg_lab.cli.prepare import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
