"""Measuring tools behind scripts/ (reports that read runs and checkpoints; no training)."""
