"""``ovseg-train`` (``python train.py``): compose ``conf/train.yaml`` + overrides, then
:func:`ovseg_lab.runner.train` (fit, final evaluation, metrics.json)."""

import hydra
from omegaconf import DictConfig

import ovseg_lab.resolvers  # noqa: F401  (registers ${auto_precision:}, ${stage:})
from ovseg_lab.cli import interruptible
from ovseg_lab.config import CONF_DIR
from ovseg_lab.runner import main_guard, train


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = main_guard(train, cfg, training=True)
    # A scalar for Hydra sweepers that optimise: mean mIoU over the evaluation benchmarks.
    return sum(r["mIoU"] for r in results.values()) / len(results) if results else None


main = interruptible(main, "rerun with ckpt_path=last (and the same overrides) to continue from the last checkpoint.")


if __name__ == "__main__":
    main()
