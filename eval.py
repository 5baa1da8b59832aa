"""Evaluate a checkpoint: `python eval.py experiment=quickstart ckpt=outputs/quickstart/checkpoints/last.ckpt`.

Thin on purpose: compose the config, hand it to ovseg_lab.runner.evaluate (validate, metrics.json).
"""

import hydra
from omegaconf import DictConfig

import ovseg_lab.resolvers  # noqa: F401  (registers ${auto_precision:})
from ovseg_lab.runner import evaluate, main_guard


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    main_guard(evaluate, cfg)


if __name__ == "__main__":
    main()
