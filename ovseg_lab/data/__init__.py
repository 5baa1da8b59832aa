"""Data: prepared benchmarks, the toy generator, transforms and DataModules."""

from ovseg_lab.data.benchmark import BenchmarkSpec, SegmentationFolder
from ovseg_lab.data.datamodule import EvalBenchmark, SegmentationDataModule, ShardedEvalSampler

__all__ = ["BenchmarkSpec", "EvalBenchmark", "SegmentationDataModule", "SegmentationFolder", "ShardedEvalSampler"]
