"""Mine OVSeg's mask-category pairs into webdataset shards (config: conf/mine.yaml).

    python scripts/mine_mask_pairs.py proposals_ckpt=outputs/ovseg/checkpoints/last.ckpt \
        images=data/coco/train2017 captions=data/coco/annotations/captions_train2017.json device=cuda

Thin on purpose: the logic is ovseg_lab.ovseg_chain.mine_from_config.
"""

# Thin wrapper: the command is ovseg_lab/cli/mine.py (installed as `ovseg-mine`).
from ovseg_lab.cli import ctrl_c_exits_130

# Ctrl-C while torch loads: one line and exit 130, not a traceback through the imports
with ctrl_c_exits_130():
    from ovseg_lab.cli.mine import main

if __name__ == "__main__":
    main()
