"""Web demo (Gradio) for ovseg-lab checkpoints: an image and class names in, the segmentation out.

    python scripts/demo.py --checkpoint outputs/quickstart/checkpoints/last.ckpt [--checkpoint other.ckpt ...] \
        [--host 127.0.0.1 --port 7860 --device auto]

Needs the optional extra: pip install -e ".[demo]". Without a checkpoint the page still starts and offers to load
the quickstart checkpoint or to train the 200-step toy CAT-Seg. Details: ovseg_lab/demo.py, README ("Web demo").
"""

# Thin wrapper: the command is ovseg_lab/demo.py (installed as `ovseg-demo`).
from ovseg_lab.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
