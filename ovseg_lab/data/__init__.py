"""Data: prepared benchmarks, the toy generator, transforms, DataModules and benchmark preparation.

Attributes load lazily so that ``ovseg_lab.data.prepare`` (the preparation scripts) does not pull in torch
and Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "BenchmarkSpec": "ovseg_lab.data.benchmark",
    "SegmentationFolder": "ovseg_lab.data.benchmark",
    "EvalBenchmark": "ovseg_lab.data.datamodule",
    "SegmentationDataModule": "ovseg_lab.data.datamodule",
    "ShardedEvalSampler": "ovseg_lab.data.datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ovseg_lab.data' has no attribute {name!r}")
