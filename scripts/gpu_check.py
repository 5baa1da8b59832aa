"""GPU check (under 8 minutes on one GPU): CAT-Seg ViT-B / ViT-L training step time and peak memory at batch 4
(freeze / prompt / full / qv, bf16, SDPA), sliding-window evaluation images/s at 171 and 847 classes, OVSeg's
per-image region classification time; one JSON (last stdout line, and --output).

    python scripts/gpu_check.py --output gpu_check.json
    python scripts/gpu_check.py --tiny --device cpu      # tiny models: checks the script without a GPU

See ovseg_lab/tools/gpu_check.py and docs/performance.md.
"""

# Thin wrapper: the command is ovseg_lab/cli/gpu_check.py (installed as `ovseg-gpu-check`).
from ovseg_lab.cli.gpu_check import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
