"""A web demo (Gradio) for any ovseg-lab checkpoint: an image and class names in, the segmentation out.

    python scripts/demo.py --checkpoint outputs/quickstart/checkpoints/last.ckpt [--checkpoint other.ckpt ...]
    ovseg-demo --checkpoint ckpt.ckpt --host 127.0.0.1 --port 7860 --device auto

The page takes an uploaded image (or one of the shipped examples), comma-separated class names or a benchmark
vocabulary, the model among the loaded checkpoints (any method), and for OVSeg the proposal generator (its own
MaskFormer or Segment Anything through ``transformers``' ``SamModel``) with SAM's granularity. It shows the overlay
with a legend of the classes present (never a class that was not asked for), the area of each class and, for
CAT-Seg, the score map of a chosen class.

Every request goes through the CLI's code (:mod:`ovseg_lab.predict`: ``read_photo``, ``predict_scores_image``,
``write_outputs``), on one model object per checkpoint loaded at start, so CLIP's text-embedding cache
(``clip.cache_text``) keeps a vocabulary's embeddings across requests. Without a checkpoint (and without network)
the page still starts and offers to load ``outputs/quickstart/checkpoints/last.ckpt`` or to train the 200-step toy
CAT-Seg (1-2 minutes on a CPU).

The request logic (:class:`DemoApp`) needs no Gradio; :func:`build_ui` and :func:`main` do (``pip install
"ovseg_lab[demo]"``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ovseg_lab.cli import guarded
from ovseg_lab.errors import SetupError, user_error

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "demo"
QUICKSTART_CKPT = Path("outputs") / "quickstart" / "checkpoints" / "last.ckpt"
TOY_RUN_DIR = Path("outputs") / "demo_toy"
CUSTOM = "(the class names above)"
TOY_VOCABULARIES = ("toy_seen", "toy_unseen", "toy_large")
PROPOSALS = ("MaskFormer", "SAM")
METHOD_NAMES = {
    "CATSeg": "CAT-Seg",
    "CostVolumeBaseline": "cost-volume baseline",
    "LSegNet": "LSeg",
    "OVSeg": "OVSeg",
    "OVSegmentor": "OVSegmentor / GroupViT",
    "TrainingFreeSegmenter": "training-free CLIP (MaskCLIP / SCLIP / ClearCLIP / NACLIP)",
}
# the notebook's short toy run: CAT-Seg, 150 steps of CLIP pre-training then 200 steps (1-2 minutes on a CPU)
TOY_TRAIN_OVERRIDES = (
    "experiment=quickstart",
    "model=catseg",
    "logger=csv",
    "trainer.max_steps=200",
    "trainer.val_check_interval=200",
    "callbacks.model_checkpoint.every_n_train_steps=200",
    "pipeline.params.pretrain_steps=150",
)
GRADIO_MISSING = (
    'The web demo needs Gradio, an optional extra: pip install "ovseg_lab[demo]" '
    "(or pip install gradio). The rest of ovseg-lab does not need it."
)
# small images (the 64x64 toy) are drawn at the size of their box, not at their pixel size (the files stay as written)
DEMO_CSS = "#image img, #overlay img, #score_map img {width: 100%; height: 100%; object-fit: contain;}"
KEEP_REQUESTS = 32  # request folders kept on disk (overlay, labels, areas); older ones are removed


def no_progress(fraction: float, desc: str) -> None:
    return None


@dataclass
class LoadedModel:
    label: str  # shown in the model picker
    path: Path
    module: Any
    method: str  # human name of the method

    @property
    def is_catseg(self) -> bool:
        return type(self.module.net).__name__ == "CATSeg"

    @property
    def is_ovseg(self) -> bool:
        return type(self.module.net).__name__ == "OVSeg"


@dataclass
class DemoResult:
    overlay_path: Path  # overlay + legend (the CLI's <stem>_overlay.png; legend also in its "legend" text chunk)
    legend: list[str]  # classes present, largest first (a subset of the requested classes)
    areas: dict[str, dict[str, float]]  # class -> {"pixels", "fraction"}
    classes: list[str]  # the requested vocabulary
    size: tuple[int, int]  # (width, height) of the input image
    scores: np.ndarray | None  # CAT-Seg: (K, H, W) float16 per-class scores in [0, 1]; otherwise None
    info: str  # one line: model, device, time, ...
    timings: dict[str, float] = field(default_factory=dict)


def method_name(module) -> str:
    return METHOD_NAMES.get(type(module.net).__name__, type(module.net).__name__)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SetupError(f"--device {name}: {err} (use auto, cpu, cuda or cuda:N).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"--device {name}: no CUDA GPU is available here; use --device cpu (or auto).")
    return device


def vocabulary_choices() -> list[str]:
    from ovseg_lab.vocab import PACKAGED_VOCABULARIES

    return [CUSTOM, *TOY_VOCABULARIES, *PACKAGED_VOCABULARIES]


def demo_vocabulary(classes: str | None, vocabulary: str | None):
    """The picked benchmark vocabulary, or else the typed class names (the CLI's ``resolve_vocabulary``)."""
    from ovseg_lab.predict import resolve_vocabulary
    from ovseg_lab.vocab import Vocabulary

    if vocabulary and vocabulary != CUSTOM:
        if vocabulary in TOY_VOCABULARIES:
            from ovseg_lab.data.toy import split_vocabularies

            return Vocabulary(vocabulary, tuple(split_vocabularies()[vocabulary]))
        return resolve_vocabulary(None, vocabulary)
    if not classes or not classes.replace(",", " ").strip():
        raise SetupError(
            'No classes given: type comma-separated class names (e.g. "red circle, striped grass") '
            "or pick a benchmark vocabulary."
        )
    return resolve_vocabulary(classes, None)


def load_examples() -> list[dict[str, str]]:
    """The shipped example images (``assets/demo/examples.json``: image file, class names, vocabulary)."""
    index = EXAMPLES_DIR / "examples.json"
    if not index.is_file():
        return []
    examples = json.loads(index.read_text())
    return [{**e, "image": str(EXAMPLES_DIR / e["image"])} for e in examples if (EXAMPLES_DIR / e["image"]).is_file()]


def score_picture(scores: np.ndarray, index: int) -> np.ndarray:
    """(K, H, W) scores in [0, 1] -> (H, W, 3) uint8 viridis picture of class ``index``."""
    from matplotlib import colormaps

    values = np.clip(scores[index].astype(np.float32), 0.0, 1.0)
    return (colormaps["viridis"](values)[..., :3] * 255).round().astype(np.uint8)


class DemoApp:
    """The models and the request logic of the page, without Gradio (tests call it directly too).

    Args:
        checkpoints: loaded at start; one that fails is reported on the page (``load_errors``), the others load.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        sam_model: Hugging Face id or local folder of Segment Anything (OVSeg's SAM proposals).
        sam_options: extra :class:`~ovseg_lab.models.ovseg.SAMProposals` arguments (``config`` builds a random-init
            SamModel from ``transformers.SamConfig`` arguments instead of loading ``sam_model``).
        root: folder whose ``outputs/`` holds the quickstart checkpoint and the demo's toy run (default: the
            repository when run from a checkout, else the current folder). Training runs the repository's train.py.
        toy_overrides: Hydra overrides of the toy training run (default: the notebook's 200-step CAT-Seg).
    """

    def __init__(
        self,
        checkpoints: list[Path] | tuple = (),
        device: str = "auto",
        sam_model: str = "facebook/sam-vit-huge",
        sam_options: dict | None = None,
        root: Path | None = None,
        output_dir: Path | None = None,
        toy_overrides: list[str] | tuple = TOY_TRAIN_OVERRIDES,
        training_free: list[str] | tuple = (),
        model_overrides: list[str] | tuple = (),
    ) -> None:
        self.device = resolve_device(device)
        self.models: dict[str, LoadedModel] = {}
        self.load_errors: list[str] = []
        self.sam_model = sam_model
        self.sam_options = dict(sam_options or {})
        self._sam = None
        self.root = Path(root) if root is not None else (ROOT if (ROOT / "train.py").is_file() else Path.cwd())
        self.toy_overrides = list(toy_overrides)
        self.lock = threading.Lock()  # one request at a time touches a model (OVSeg's proposals are switched)
        self.output_dir = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="ovseg-demo-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._requests: list[Path] = []
        for path in checkpoints:
            try:
                self.load(path)
            except SetupError as err:
                self.load_errors.append(str(err))
                print(f"ERROR: {err}", file=sys.stderr)
        for name in training_free:
            try:
                self.load_training_free(name, model_overrides)
            except SetupError as err:
                self.load_errors.append(str(err))
                print(f"ERROR: {err}", file=sys.stderr)

    # ------------------------------------------------------------------ models
    @property
    def quickstart_checkpoint(self) -> Path:
        return self.root / QUICKSTART_CKPT

    @property
    def toy_run_dir(self) -> Path:
        return self.root / TOY_RUN_DIR

    def load(self, path: str | Path) -> LoadedModel:
        """Load a checkpoint (the CLI's ``model_from_checkpoint``); a clear :class:`SetupError` when it cannot."""
        from ovseg_lab.build import model_from_checkpoint

        path = Path(str(path).strip()).expanduser()
        if not str(path) or not path.is_file():
            raise SetupError(
                f"Checkpoint not found: {path}. Give the path of a .ckpt written by train.py or "
                "scripts/convert_checkpoint.py."
            )
        for loaded in self.models.values():
            if loaded.path.resolve() == path.resolve():
                return loaded
        try:
            module, _ = model_from_checkpoint(path)
        except Exception as err:  # another layout (an official release not converted), a truncated file, ...
            known = user_error(err)
            if known is None:
                raise SetupError(
                    f"Cannot load {path} as an ovseg-lab checkpoint ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:300] if str(err) else ''}). Official checkpoints must "
                    "be converted first: scripts/convert_checkpoint.py."
                ) from None
            raise SetupError(f"Cannot load {path}: {known}") from None
        module.to(self.device)
        run = path.parent.parent.name if path.parent.name == "checkpoints" else path.parent.name
        label = f"{run}/{path.name} [{method_name(module)}]"
        index = 2
        while label in self.models:
            label = f"{run}/{path.name} [{method_name(module)}] ({index})"
            index += 1
        loaded = LoadedModel(label, path, module, method_name(module))
        self.models[label] = loaded
        return loaded

    def load_training_free(self, name: str, overrides: list[str] | tuple = ()) -> LoadedModel:
        """A training-free model (``model=<name>``, CLIP's weights only: ``clip.pretrained=<file>`` offline)."""
        from ovseg_lab.build import training_free_model

        module, _ = training_free_model(name, list(overrides))
        module.to(self.device)
        label = f"{name} (training-free) [{method_name(module)}]"
        loaded = LoadedModel(label, Path(f"model={name}"), module, method_name(module))
        self.models[label] = loaded
        return loaded

    def model(self, label: str | None) -> LoadedModel:
        if not self.models:
            raise SetupError("No model is loaded. " + self.how_to_get_a_model())
        if not label:
            return next(iter(self.models.values()))
        if label not in self.models:
            raise SetupError(f"Unknown model '{label}'; loaded: {', '.join(self.models)}.")
        return self.models[label]

    def how_to_get_a_model(self) -> str:
        quick = self.quickstart_checkpoint
        options = []
        if quick.is_file():
            options.append(f"load the quickstart checkpoint ({quick}) with the button below")
        else:
            options.append(f"run `make quickstart` (writes {QUICKSTART_CKPT}, ~4 min on a CPU, offline) and load it")
        options.append("train the 200-step toy CAT-Seg here with the button below (1-2 minutes on a CPU, no network)")
        options.append(
            "restart with `python scripts/demo.py --checkpoint <file.ckpt>` (any method; official releases "
            "converted with scripts/convert_checkpoint.py)"
        )
        return "To get one: " + "; or ".join(options) + "."

    def status_markdown(self) -> str:
        lines = []
        if self.models:
            lines.append(f"**Models loaded** (device `{self.device}`): " + ", ".join(f"`{m}`" for m in self.models))
        else:
            lines.append("**No model is loaded.** " + self.how_to_get_a_model())
        for error in self.load_errors:
            lines.append(f"\n**Could not load a checkpoint:** {error}")
        return "\n".join(lines)

    def toy_train_command(self) -> list[str]:
        if not (ROOT / "train.py").is_file():
            raise SetupError(
                f"Training the toy model needs the ovseg-lab repository (train.py next to {Path(__file__).parent}); "
                "from an installed package, load a checkpoint instead."
            )
        return [
            sys.executable,
            str(ROOT / "train.py"),
            *self.toy_overrides,
            f"hydra.run.dir={self.toy_run_dir.resolve()}",
        ]

    def train_toy(self, poll_s: float = 2.0) -> Iterator[str]:
        """Train the toy CAT-Seg in ``outputs/demo_toy`` (or reuse a finished run) and load it; yields status lines."""
        ckpt = self.toy_run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            cmd = self.toy_train_command()
            yield "Training the toy CAT-Seg: " + " ".join(cmd[1:])
            log = self.toy_run_dir.with_name(self.toy_run_dir.name + ".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            start = time.time()
            with open(log, "w") as handle:
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
                while proc.poll() is None:
                    time.sleep(poll_s)
                    yield f"Training the toy CAT-Seg ({time.time() - start:.0f} s; log: {log}) ..."
            if proc.returncode != 0 or not ckpt.is_file():
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
                raise SetupError(f"The toy training run failed (exit {proc.returncode}; log {log}):\n{tail}")
        loaded = self.load(ckpt)
        yield f"Loaded `{loaded.label}`."

    # ------------------------------------------------------------------ SAM
    def sam_proposals(self):
        """One Segment Anything (SAMProposals) for the whole session, built on first use."""
        if self._sam is None:
            from ovseg_lab.models.ovseg import SAMProposals

            options = dict(self.sam_options)
            model_name = None if options.get("config") else self.sam_model
            options.pop("model_name", None)
            self._sam = SAMProposals(model_name, **options).to(self.device)
        return self._sam

    # ------------------------------------------------------------------ a request
    def _request_dir(self) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="req-", dir=self.output_dir))
        self._requests.append(folder)
        while len(self._requests) > KEEP_REQUESTS:
            shutil.rmtree(self._requests.pop(0), ignore_errors=True)
        return folder

    def segment(
        self,
        image_path: str | Path | None,
        classes: str | None,
        vocabulary: str | None = None,
        model_label: str | None = None,
        proposals: str = "MaskFormer",
        granularity: float = 0.8,
        progress: Callable[[float, str], None] = no_progress,
    ) -> DemoResult:
        """One request: the CLI's read_photo -> predict_scores_image -> write_outputs. Bad input: SetupError."""
        from ovseg_lab.predict import labels_from_scores, predict_scores_image, read_photo, write_outputs

        start = time.time()
        loaded = self.model(model_label)
        vocab = demo_vocabulary(classes, vocabulary)
        if image_path is None or not str(image_path).strip():
            raise SetupError("No image: upload one or pick an example.")
        path = Path(image_path)
        progress(0.05, "reading the image")
        try:
            image = read_photo(path)
        except Exception as err:
            raise SetupError(
                f"Cannot read the image {path.name}: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}. Upload a JPEG or PNG file."
            ) from None
        if proposals not in PROPOSALS:
            raise SetupError(f"Unknown proposal generator '{proposals}'; choose {' or '.join(PROPOSALS)}.")
        with self.lock:
            net = loaded.module.net
            restore = None
            if loaded.is_ovseg:
                restore = (net.proposals, net.sam, net.granularity)
                if proposals == "SAM":
                    if not 0.0 <= float(granularity) <= 1.0:
                        raise SetupError(f"SAM granularity must lie in [0, 1], got {granularity}.")
                    progress(0.1, "loading Segment Anything")
                    sam = net.sam if net.sam is not None else self.sam_proposals()  # model=ovseg_sam brings its own
                    net.sam, net.proposals, net.granularity = sam, "sam", float(granularity)
                elif net.maskformer is None:
                    raise SetupError("This OVSeg checkpoint has no MaskFormer (model=ovseg_sam): choose SAM proposals.")
                else:
                    net.proposals = "maskformer"
            try:
                progress(0.2, f"segmenting with {loaded.method} ({len(vocab)} classes, {self.device})")
                scores = predict_scores_image(loaded.module, image, vocab)
                labels = labels_from_scores(scores)
            finally:
                if restore is not None:
                    net.proposals, net.sam, net.granularity = restore
        progress(0.9, "drawing the overlay")
        prediction = write_outputs(path.stem, image, labels, vocab, self._request_dir())
        kept = None
        if loaded.is_catseg:
            kept = scores.float().clamp(0, 1).cpu().numpy().astype(np.float16)
        seconds = time.time() - start
        extra = (
            f", {proposals} proposals" + (f", granularity {float(granularity):g}" if proposals == "SAM" else "")
            if loaded.is_ovseg
            else ""
        )
        picked = f" ({vocab.name})" if vocabulary and vocabulary != CUSTOM else ""
        info = (
            f"{loaded.label} on {self.device}{extra}: {image.shape[1]}x{image.shape[0]} px, {len(vocab)} classes "
            f"asked{picked}, {len(prediction.areas)} present, {seconds:.2f} s"
        )
        return DemoResult(
            prediction.overlay_path,
            list(prediction.areas),
            prediction.areas,
            list(vocab.classes),
            (image.shape[1], image.shape[0]),
            kept,
            info,
            {"total_s": seconds},
        )


def areas_table(result: DemoResult) -> list[list[Any]]:
    return [[name, int(info["pixels"]), round(100.0 * info["fraction"], 2)] for name, info in result.areas.items()]


# ---------------------------------------------------------------------------------------------- the page
def import_gradio():
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (offline machines wait on them)
    try:
        import gradio as gr
    except ImportError:
        raise SetupError(GRADIO_MISSING) from None
    return gr


def build_ui(app: DemoApp):
    """The Gradio Blocks of the page around ``app``. API names: /segment, /score_map, /load_checkpoint,
    /load_quickstart, /train_toy."""
    gr = import_gradio()

    examples = load_examples()

    def as_gradio_error(err: BaseException):
        known = user_error(err)
        return gr.Error(str(known) if known is not None else f"{type(err).__name__}: {err}", print_exception=False)

    def model_update(selected: str | None = None):
        choices = list(app.models)
        value = selected if selected in app.models else (choices[0] if choices else None)
        return gr.update(choices=choices, value=value)

    def ovseg_controls(label: str | None):
        visible = bool(label) and label in app.models and app.models[label].is_ovseg
        return gr.update(visible=visible)

    def segment(image, classes, vocabulary, model_label, proposals, granularity, progress=gr.Progress()):
        # preprocess=False: the upload arrives as Gradio's file payload (already checked and moved into its cache),
        # so an unreadable file reaches read_photo and gets our message rather than a generic processing error
        if isinstance(image, dict):
            image = image.get("path")
        try:
            result = app.segment(
                image,
                classes,
                vocabulary,
                model_label,
                proposals,
                granularity,
                progress=lambda f, d: progress(f, desc=d),
            )
        except SetupError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # an unexpected failure: say what, keep the page alive
            import traceback

            traceback.print_exc()
            raise as_gradio_error(err) from None
        state = {"classes": result.classes, "scores": result.scores}
        if result.scores is not None:
            first = result.legend[0] if result.legend else result.classes[0]
            score_class = gr.update(choices=result.classes, value=first, visible=True)
            score_image = gr.update(value=score_picture(result.scores, result.classes.index(first)), visible=True)
        else:
            score_class, score_image = (
                gr.update(choices=[], value=None, visible=False),
                gr.update(value=None, visible=False),
            )
        return (str(result.overlay_path), areas_table(result), result.info, score_class, score_image, state)

    def score_map(state, name):
        if not state or state.get("scores") is None:
            raise gr.Error("Score maps are shown for CAT-Seg models, after a segmentation.", print_exception=False)
        if name not in state["classes"]:
            raise gr.Error(f"'{name}' was not among the requested classes.", print_exception=False)
        return score_picture(state["scores"], state["classes"].index(name))

    def load_checkpoint(path, current):
        try:
            loaded = app.load(path or "")
        except SetupError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return model_update(loaded.label), app.status_markdown(), ovseg_controls(loaded.label)

    def load_quickstart(current):
        if not app.quickstart_checkpoint.is_file():
            raise gr.Error(
                f"No quickstart checkpoint at {app.quickstart_checkpoint}: run `make quickstart` first, "
                "or train the toy model here.",
                print_exception=False,
            )
        return load_checkpoint(str(app.quickstart_checkpoint), current)

    def train_toy(current, progress=gr.Progress()):
        try:
            for line in app.train_toy():
                progress(0.5, desc=line[:120])
                yield gr.update(), line, gr.update()
        except SetupError as err:
            raise gr.Error(str(err), print_exception=False) from None
        label = list(app.models)[-1]
        yield model_update(label), app.status_markdown(), ovseg_controls(label)

    with gr.Blocks(title="ovseg-lab demo") as demo:
        gr.Markdown(
            "# ovseg-lab: open-vocabulary segmentation\nAn image and any class names in, a segmentation out. "
            "Same code as `scripts/predict.py`; models: CAT-Seg, LSeg, OVSeg, OVSegmentor / GroupViT, "
            "the cost-volume baseline."
        )
        status = gr.Markdown(app.status_markdown(), elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    type="filepath", label="image", sources=["upload", "clipboard"], elem_id="image", height=280
                )
                classes = gr.Textbox(
                    label="class names (comma-separated)",
                    placeholder="red circle, striped grass, plain sky",
                    elem_id="classes",
                )
                vocabulary = gr.Dropdown(
                    vocabulary_choices(),
                    value=CUSTOM,
                    label="or a benchmark vocabulary",
                    info="when one is picked, it replaces the class names above",
                    elem_id="vocabulary",
                )
                first = next(iter(app.models), None)
                model = gr.Dropdown(list(app.models), value=first, label="model", elem_id="model")
                with gr.Group(visible=bool(first) and app.models[first].is_ovseg) as ovseg_box:
                    proposals = gr.Radio(
                        list(PROPOSALS),
                        value="MaskFormer",
                        label="OVSeg proposals",
                        info="the model's MaskFormer, or Segment Anything (transformers' SamModel)",
                    )
                    granularity = gr.Slider(
                        0.0,
                        1.0,
                        value=0.8,
                        step=0.05,
                        label="SAM granularity",
                        info="1: one mask per class; lower keeps more masks per class",
                    )
                run = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column(scale=1):
                overlay = gr.Image(
                    type="filepath",
                    label="overlay (legend: classes present)",
                    elem_id="overlay",
                    interactive=False,
                    height=280,
                )
                areas = gr.Dataframe(
                    headers=["class", "pixels", "area %"], label="area per class", elem_id="areas", interactive=False
                )
                info = gr.Markdown(elem_id="info")
                score_class = gr.Dropdown([], label="CAT-Seg score map of class", visible=False, elem_id="score_class")
                score_image = gr.Image(
                    type="numpy",
                    label="score map (0 dark, 1 yellow)",
                    visible=False,
                    interactive=False,
                    elem_id="score_map",
                    height=280,
                )
        if examples:
            gr.Examples(
                [[e["image"], e.get("classes", ""), e.get("vocabulary") or CUSTOM] for e in examples],
                inputs=[image, classes, vocabulary],
                label="examples (toy benchmark images)",
                elem_id="examples",
            )
        with gr.Accordion("models", open=not app.models):
            with gr.Row():
                ckpt_path = gr.Textbox(label="checkpoint path (on the server)", scale=3)
                load_btn = gr.Button("Load checkpoint", scale=1)
            with gr.Row():
                quick_btn = gr.Button(f"Load {QUICKSTART_CKPT}", interactive=app.quickstart_checkpoint.is_file())
                train_btn = gr.Button("Train the 200-step toy CAT-Seg (1-2 min, CPU, offline)")
        score_state = gr.State(None)

        run.click(
            segment,
            [image, classes, vocabulary, model, proposals, granularity],
            [overlay, areas, info, score_class, score_image, score_state],
            api_name="segment",
            preprocess=False,
        )
        score_class.input(score_map, [score_state, score_class], score_image, api_name="score_map")
        model.change(ovseg_controls, model, ovseg_box, api_name=False)
        load_btn.click(load_checkpoint, [ckpt_path, model], [model, status, ovseg_box], api_name="load_checkpoint")
        quick_btn.click(load_quickstart, [model], [model, status, ovseg_box], api_name="load_quickstart")
        train_btn.click(train_toy, [model], [model, status, ovseg_box], api_name="train_toy")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint",
        action="append",
        type=Path,
        default=[],
        help="an ovseg-lab checkpoint (any method); repeat to offer several models",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="a training-free model, no checkpoint (maskclip, sclip, clearclip, naclip); repeat for several",
    )
    parser.add_argument(
        "overrides", nargs="*", help="with --model: Hydra overrides, e.g. clip.pretrained=/path/to/ViT-B-16.pt"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument(
        "--sam-model",
        default="facebook/sam-vit-huge",
        help="Segment Anything for OVSeg's SAM proposals: Hugging Face id or a local folder",
    )
    parser.add_argument(
        "--sam-config",
        type=Path,
        default=None,
        help="JSON of SAMProposals arguments (e.g. points_per_side; 'config' builds a random-init "
        "SamModel from transformers.SamConfig arguments: offline tests)",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where request outputs go (default: a temp folder)"
    )
    parser.add_argument(
        "--toy-overrides",
        default=None,
        help="Hydra overrides of the toy training run, space-separated (default: the 200-step CAT-Seg)",
    )
    return parser.parse_args(argv)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import_gradio()
    sam_options = json.loads(args.sam_config.read_text()) if args.sam_config else None
    toy = args.toy_overrides.split() if args.toy_overrides else TOY_TRAIN_OVERRIDES
    app = DemoApp(
        args.checkpoint,
        args.device,
        args.sam_model,
        sam_options,
        output_dir=args.output_dir,
        toy_overrides=toy,
        training_free=args.model,
        model_overrides=args.overrides,
    )
    demo = build_ui(app)
    print(f"ovseg-lab demo: {len(app.models)} model(s) on {app.device}; http://{args.host}:{args.port}", flush=True)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host,
        server_port=args.port,
        show_error=True,
        allowed_paths=[str(EXAMPLES_DIR)],
        inbrowser=False,
        css=DEMO_CSS,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
