"""``ovseg-eval`` (``python eval.py``): compose ``conf/eval.yaml`` + overrides, then
:func:`ovseg_lab.runner.evaluate` (validate a checkpoint, metrics.json)."""

import hydra
from omegaconf import DictConfig

import ovseg_lab.resolvers  # noqa: F401  (registers ${auto_precision:}, ${stage:})
from ovseg_lab.cli import interruptible
from ovseg_lab.config import CONF_DIR
from ovseg_lab.runner import evaluate, main_guard


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    main_guard(evaluate, cfg)


main = interruptible(main, "rerun the same command (it writes a new folder of its own).")


if __name__ == "__main__":
    main()
