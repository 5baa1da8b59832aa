"""Import official checkpoints into ovseg-lab's parameter layout (``scripts/convert_checkpoint.py``).

Each format maps an official state dict to the keys of our LightningModule and names the Hydra overrides of
the model it fits; the result is checked key by key and shape by shape against a model built from config.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ovseg_lab.convert.catseg import convert_catseg_state_dict

Converter = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]

FORMATS: dict[str, tuple[Converter, list[str]]] = {
    "catseg": (convert_catseg_state_dict, ["model=catseg"]),
}
