"""Latency, throughput and peak memory of a method with random weights; the last stdout line is JSON.

    python scripts/benchmark.py --method catseg --clip vitb16 --num-classes 171 --image-size 384 --device cpu --mode infer
    python scripts/benchmark.py --method catseg --sweep classes --classes-list 150,847 --device cpu
    python scripts/benchmark.py --method catseg --protocol eval --image-size 640 --num-classes 847 \
        model.net.class_chunk=128 --device cuda --precision bf16 --output bench.json

See ovseg_lab/tools/benchmark.py and docs/performance.md.
"""

# Thin wrapper: installed as `ovseg-benchmark` (ovseg_lab/cli/__init__.py).
from ovseg_lab.cli import benchmark as main

if __name__ == "__main__":
    raise SystemExit(main())
