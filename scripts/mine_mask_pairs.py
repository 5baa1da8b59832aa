"""Mine OVSeg's mask-category pairs into webdataset shards (config: conf/mine.yaml).

    python scripts/mine_mask_pairs.py proposals_ckpt=outputs/ovseg/checkpoints/last.ckpt \
        images=data/coco/train2017 captions=data/coco/annotations/captions_train2017.json device=cuda

Thin on purpose: the logic is ovseg_lab.data.mask_pairs.mine_from_config.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ovseg_lab.resolvers  # noqa: E402,F401
from ovseg_lab.data.mask_pairs import mine_from_config  # noqa: E402
from ovseg_lab.runner import main_guard  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="mine")
def main(cfg: DictConfig) -> None:
    main_guard(mine_from_config, cfg)


if __name__ == "__main__":
    main()
