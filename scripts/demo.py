"""Web demo (Gradio) for ovseg-lab checkpoints: an image and class names in, the segmentation out.

    python scripts/demo.py --checkpoint outputs/quickstart/checkpoints/last.ckpt [--checkpoint other.ckpt ...] \
        [--host 127.0.0.1 --port 7860 --device auto]

Needs the optional extra: pip install -e ".[demo]". Without a checkpoint the page still starts and offers to load
the quickstart checkpoint or to train the 200-step toy CAT-Seg. Details: ovseg_lab/demo.py, README ("Web demo").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovseg_lab.demo import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
