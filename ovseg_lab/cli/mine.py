"""``ovseg-mine`` (``python scripts/mine_mask_pairs.py``): mine OVSeg's mask-category pairs (``conf/mine.yaml``)
with :func:`ovseg_lab.ovseg_chain.mine_from_config`."""

import hydra
from omegaconf import DictConfig

import ovseg_lab.resolvers  # noqa: F401
from ovseg_lab.cli import interruptible
from ovseg_lab.config import CONF_DIR
from ovseg_lab.runner import main_guard


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="mine")
def main(cfg: DictConfig) -> None:
    from ovseg_lab.ovseg_chain import mine_from_config

    main_guard(mine_from_config, cfg)


main = interruptible(main, "rerun the same command.")


if __name__ == "__main__":
    main()
