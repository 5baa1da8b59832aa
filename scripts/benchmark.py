"""Latency, throughput and peak memory of a method with random weights; the last stdout line is JSON.

    python scripts/benchmark.py --method catseg --clip vitb16 --num-classes 171 --image-size 384 --device cpu --mode infer
    python scripts/benchmark.py --method catseg --sweep classes --classes-list 150,847 --device cpu
    python scripts/benchmark.py --method catseg --protocol eval --image-size 640 --num-classes 847 \
        model.net.class_chunk=128 --device cuda --precision bf16 --output bench.json

See ovseg_lab/tools/benchmark.py and docs/performance.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovseg_lab.errors import SetupError  # noqa: E402


def main() -> int:
    import ovseg_lab.resolvers  # noqa: F401
    from ovseg_lab.tools.benchmark import main as run

    try:
        run()
    except SetupError as err:
        print(f"\nERROR: {err}\n", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
