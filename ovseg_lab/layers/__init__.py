"""Shared building blocks used by several methods."""
