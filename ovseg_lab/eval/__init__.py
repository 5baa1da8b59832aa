"""Evaluation: inference protocols (whole image, sliding window) and benchmark-specific scoring."""
