"""Methods, one file per family. Each maps (images in [0, 1], vocabulary) to per-class logits."""
