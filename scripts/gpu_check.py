"""GPU check (under 8 minutes on one GPU): CAT-Seg ViT-B / ViT-L training step time and peak memory at batch 4
(freeze / prompt / full / qv, bf16, SDPA), sliding-window evaluation images/s at 171 and 847 classes, OVSeg's
per-image region classification time; one JSON (last stdout line, and --output).

    python scripts/gpu_check.py --output gpu_check.json
    python scripts/gpu_check.py --tiny --device cpu      # tiny models: checks the script without a GPU

See ovseg_lab/tools/gpu_check.py and docs/performance.md.
"""

# Thin wrapper: installed as `ovseg-gpu-check` (ovseg_lab/cli/__init__.py).
from ovseg_lab.cli import gpu_check as main

if __name__ == "__main__":
    raise SystemExit(main())
