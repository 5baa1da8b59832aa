"""LightningModules: one per training recipe, sharing a base that owns evaluation, metrics and logging."""

from ovseg_lab.lit.base import OpenVocabModule
from ovseg_lab.lit.caption import CaptionPretrainModule
from ovseg_lab.lit.dense import DenseSupervisedModule, NonFiniteLossError

__all__ = ["CaptionPretrainModule", "DenseSupervisedModule", "NonFiniteLossError", "OpenVocabModule"]
