"""ovseg-lab: open-vocabulary semantic segmentation experiments (LSeg, CAT-Seg, OVSeg, OVSegmentor)."""

__version__ = "0.1.0"
