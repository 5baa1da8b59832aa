"""Initialising a module from a weights file: kept for the imports of earlier code; the one implementation is
:mod:`ovseg_lab.checkpoints` (reading with weights_only, prefix-picking, every mismatch named in one message)."""

from ovseg_lab.checkpoints import load_into, load_state_from

__all__ = ["load_into", "load_state_from"]
