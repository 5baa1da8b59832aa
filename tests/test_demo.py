"""The web demo (scripts/demo.py): launched on localhost, driven through gradio_client, and (slow) in headless Chromium.

The server gets a quickstart-style checkpoint (the ``quickstart_run`` fixture: the cost-volume baseline, 12 steps),
tiny random-init CAT-Seg and OVSeg checkpoints (saved like training saves them) and a checkpoint of another layout;
OVSeg's SAM proposals use a tiny random-init SamModel (``--sam-config``), so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, TINY_SAM_CONFIG

CLASSES = "red circle, striped grass, plain sky, blue square"
REQUESTED = [c.strip() for c in CLASSES.split(",")]
TINY_SAM = {
    "config": TINY_SAM_CONFIG,
    "points_per_side": 3,
    "points_per_batch": 9,
    "pred_iou_thresh": -1e9,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 1.0,
}
START_TIMEOUT_S = 180


def needs_gradio():
    pytest.importorskip("gradio", reason='the web demo needs the [demo] extra: pip install -e ".[demo]"')
    pytest.importorskip("gradio_client", reason='the web demo tests need gradio_client: pip install -e ".[demo]"')


@pytest.fixture(scope="session")
def gradio_available():
    """Skips (before any checkpoint is trained) when the [demo] extra is not installed."""
    needs_gradio()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_page(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"demo exited with {proc.returncode}:\n{log.read_text()[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"demo did not answer at {url} within {timeout} s:\n{log.read_text()[-3000:] if log else ''}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def demo_checkpoints(quickstart_run, toy_data_dir, tmp_path_factory) -> dict[str, Path]:
    from tests.test_predict_methods import save_toy_checkpoint

    folder = tmp_path_factory.mktemp("demo_ckpts")
    ckpts = {"quickstart": quickstart_run / "checkpoints" / "last.ckpt"}
    for method in ("catseg", "ovseg"):
        ckpts[method] = folder / method / "checkpoints" / "last.ckpt"
        ckpts[method].parent.mkdir(parents=True)
        save_toy_checkpoint(toy_data_dir, method, ckpts[method])
    ckpts["official"] = folder / "model_final.pth"  # an official release's layout: weights, no ovseg-lab config
    torch.save({"model": {"sem_seg_head.predictor.transformer.conv1.weight": torch.zeros(2, 2)}}, ckpts["official"])
    return ckpts


@pytest.fixture(scope="module")
def demo_server(gradio_available, demo_checkpoints, tmp_path_factory):
    """scripts/demo.py on 127.0.0.1 with four checkpoints (one of another layout); stopped after the module."""
    folder = tmp_path_factory.mktemp("demo_server")
    (folder / "sam.json").write_text(json.dumps(TINY_SAM))
    port = free_port()
    log = folder / "server.log"
    cmd = [
        sys.executable,
        "scripts/demo.py",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--sam-config",
        str(folder / "sam.json"),
        "--output-dir",
        str(folder / "requests"),
    ]
    for name in ("quickstart", "catseg", "ovseg", "official"):
        cmd += ["--checkpoint", str(demo_checkpoints[name])]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_page(url, proc, log)
        yield {"url": url, "proc": proc, "log": log, "ckpts": demo_checkpoints}
    finally:
        stop(proc)


def model_labels(client) -> dict[str, str]:
    """method -> label of the loaded models, read from the model picker's choices in the page config."""
    config = client.config
    for component in config["components"]:
        if component.get("props", {}).get("elem_id") == "model":
            labels = [c[0] if isinstance(c, (list, tuple)) else c for c in component["props"]["choices"]]
            break
    else:
        raise AssertionError("no model picker on the page")
    out = {}
    for label in labels:
        for method, tag in (("quickstart", "[cost-volume baseline]"), ("catseg", "[CAT-Seg]"), ("ovseg", "[OVSeg]")):
            if label.endswith(tag):
                out[method] = label
    return out


def example_image() -> Path:
    from ovseg_lab.demo import load_examples

    examples = load_examples()
    assert len(examples) >= 2, "the demo ships example images (ovseg_lab/assets/demo)"
    return Path(examples[0]["image"])


def file_of(value) -> str:
    """A file output as gradio_client returns it: a path, or a component update ({"value": ...}) holding one."""
    while isinstance(value, dict):
        value = value.get("value", value.get("path"))
    return value


def read_overlay(path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def test_demo_serves_the_cli_prediction_through_gradio_client(demo_server, tmp_path):
    from gradio_client import Client, handle_file

    from scripts.predict import main as predict_main

    client = Client(demo_server["url"], verbose=False)
    labels = model_labels(client)
    assert set(labels) == {"quickstart", "catseg", "ovseg"}
    # a non-square photo-sized image, so that "the right size" is not the toy's 64x64
    source = np.array(Image.open(example_image()).convert("RGB"))
    picture = Image.fromarray(source).resize((96, 80), Image.NEAREST)
    image = tmp_path / "photo.png"
    picture.save(image)

    overlay_file, areas, info, *_ = client.predict(
        handle_file(str(image)),
        CLASSES,
        "(the class names above)",
        labels["quickstart"],
        "MaskFormer",
        0.8,
        api_name="/segment",
    )
    overlay = read_overlay(overlay_file)
    rows = areas["data"] if isinstance(areas, dict) else areas
    present = [row[0] for row in rows]
    assert present and set(present) <= set(REQUESTED)  # only requested classes, and only those present
    assert sum(int(row[1]) for row in rows) == 96 * 80
    assert overlay.height == 80 and overlay.width > 96  # the image at its own size, the legend panel beside it
    if "legend" in getattr(overlay, "text", {}):  # kept when the PNG is served as written
        assert json.loads(overlay.text["legend"]) == present
    assert "96x80 px" in info and "4 classes asked" in info

    # one path with the CLI: scripts/predict.py writes the same overlay for the same image and classes
    out = tmp_path / "cli"
    assert (
        predict_main(
            [
                "--checkpoint",
                str(demo_server["ckpts"]["quickstart"]),
                "--image",
                str(image),
                "--classes",
                CLASSES,
                "--output",
                str(out),
            ]
        )
        == 0
    )
    cli = read_overlay(out / "photo_overlay.png")
    np.testing.assert_array_equal(np.array(overlay.convert("RGB")), np.array(cli.convert("RGB")))
    cli_areas = json.loads((out / "photo_areas.json").read_text())["areas"]
    assert list(cli_areas) == present and [cli_areas[n]["pixels"] for n in present] == [int(r[1]) for r in rows]


def test_demo_catseg_score_map_and_ovseg_proposals(demo_server):
    from gradio_client import Client, handle_file

    client = Client(demo_server["url"], verbose=False)
    labels = model_labels(client)
    image = example_image()
    width, height = Image.open(image).size
    overlay_file, areas, info, score_class, score_map, *_ = client.predict(
        handle_file(str(image)),
        CLASSES,
        "(the class names above)",
        labels["catseg"],
        "MaskFormer",
        0.8,
        api_name="/segment",
    )
    score_map = file_of(score_map)
    assert score_map is not None and Image.open(score_map).size == (width, height)
    assert file_of(score_class) in REQUESTED
    picked = client.predict(REQUESTED[-1], api_name="/score_map")  # another class's map, from the session's scores
    assert Image.open(file_of(picked)).size == (width, height)
    assert not np.array_equal(np.array(Image.open(file_of(picked))), np.array(Image.open(score_map)))

    for proposals in ("MaskFormer", "SAM"):
        overlay_file, areas, info, *_ = client.predict(
            handle_file(str(image)),
            CLASSES,
            "(the class names above)",
            labels["ovseg"],
            proposals,
            0.5,
            api_name="/segment",
        )
        rows = areas["data"] if isinstance(areas, dict) else areas
        assert {row[0] for row in rows} <= set(REQUESTED)
        assert read_overlay(overlay_file).height == height
        assert f"{proposals} proposals" in info

    # a benchmark vocabulary instead of typed names
    overlay_file, areas, info, *_ = client.predict(
        handle_file(str(image)), "", "toy_seen", labels["quickstart"], "MaskFormer", 0.8, api_name="/segment"
    )
    from ovseg_lab.data.toy import split_vocabularies

    rows = areas["data"] if isinstance(areas, dict) else areas
    assert rows and {row[0] for row in rows} <= set(split_vocabularies()["toy_seen"])
    assert "36 classes asked (toy_seen)" in info


def test_demo_error_paths_are_clear_messages(demo_server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(demo_server["url"], verbose=False)
    labels = model_labels(client)
    image = example_image()

    def error_of(*args, api_name="/segment") -> str:
        with pytest.raises(AppError) as caught:
            client.predict(*args, api_name=api_name)
        return str(caught.value)

    assert "No classes given" in error_of(
        handle_file(str(image)), " , ", "(the class names above)", labels["quickstart"], "MaskFormer", 0.8
    )
    assert "repeats names" in error_of(
        handle_file(str(image)), "sky, Sky", "(the class names above)", labels["quickstart"], "MaskFormer", 0.8
    )
    assert "No image" in error_of(None, CLASSES, "(the class names above)", labels["quickstart"], "MaskFormer", 0.8)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    message = error_of(
        handle_file(str(broken)), CLASSES, "(the class names above)", labels["quickstart"], "MaskFormer", 0.8
    )
    assert "Cannot read the image broken.png" in message and "Traceback" not in message
    # a checkpoint of another layout: on the page since start, and refused when loaded from the page
    assert "carries no ovseg-lab config" in json.dumps(client.config)
    message = error_of(str(demo_server["ckpts"]["official"]), labels["quickstart"], api_name="/load_checkpoint")
    assert "carries no ovseg-lab config" in message and "convert" in message.lower()
    assert "Checkpoint not found" in error_of(
        str(tmp_path / "nope.ckpt"), labels["quickstart"], api_name="/load_checkpoint"
    )
    # the server is still serving after all of that
    overlay_file, *_ = client.predict(
        handle_file(str(image)),
        CLASSES,
        "(the class names above)",
        labels["quickstart"],
        "MaskFormer",
        0.8,
        api_name="/segment",
    )
    assert read_overlay(overlay_file).height == Image.open(image).height


def test_text_embedding_cache_is_kept_across_requests(demo_checkpoints, tmp_path, monkeypatch):
    from ovseg_lab.clip.backbone import CLIPBackbone
    from ovseg_lab.demo import DemoApp, load_examples

    app = DemoApp([demo_checkpoints["quickstart"]], device="cpu", output_dir=tmp_path)
    calls = []
    clips = [m for m in next(iter(app.models.values())).module.modules() if isinstance(m, CLIPBackbone)]
    assert clips
    for clip in clips:
        original = clip.encode_text
        monkeypatch.setattr(
            clip, "encode_text", lambda prompts, _f=original: (calls.append(len(prompts)), _f(prompts))[1]
        )
    image = load_examples()[0]["image"]
    first = app.segment(image, CLASSES)
    assert len(calls) == 1
    second = app.segment(image, CLASSES)
    assert len(calls) == 1  # the second request reused the cached text embeddings
    assert first.areas == second.areas
    app.segment(image, "red circle, plain sky")
    assert len(calls) == 2  # a new vocabulary is encoded once


def test_sam_offline_is_a_clear_message(demo_checkpoints, tmp_path, monkeypatch):
    from ovseg_lab.demo import DemoApp, load_examples
    from ovseg_lab.errors import SetupError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = DemoApp(
        [demo_checkpoints["ovseg"]], device="cpu", sam_model=str(tmp_path / "no-sam-here"), output_dir=tmp_path
    )
    with pytest.raises(SetupError, match="Could not load Segment Anything"):
        app.segment(load_examples()[0]["image"], CLASSES, proposals="SAM")
    with pytest.raises(SetupError, match="granularity"):
        app.segment(load_examples()[0]["image"], CLASSES, proposals="SAM", granularity=1.5)


def test_without_gradio_the_demo_says_how_to_install_it(monkeypatch, capsys):
    from ovseg_lab import demo

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert demo.main(["--port", "1"]) == 2
    assert 'pip install "ovseg_lab[demo]"' in capsys.readouterr().err


def test_demo_starts_without_a_checkpoint_and_offers_one(gradio_available, demo_checkpoints, tmp_path):
    """No checkpoint, no network: the page starts, says how to get a model, and loads the quickstart one."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from ovseg_lab.demo import DemoApp, build_ui, load_examples

    app = DemoApp([], device="cpu", root=tmp_path, output_dir=tmp_path / "requests")
    demo = build_ui(app)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_page(url, None, None, timeout=60)
        client = Client(url, verbose=False)
        page = json.dumps(client.config)
        assert "No model is loaded" in page and "train the 200-step toy CAT-Seg" in page
        assert "make quickstart" in page
        image = load_examples()[0]["image"]
        with pytest.raises(AppError, match="No model is loaded"):
            client.predict(
                handle_file(image), CLASSES, "(the class names above)", None, "MaskFormer", 0.8, api_name="/segment"
            )
        with pytest.raises(AppError, match="No quickstart checkpoint"):
            client.predict(None, api_name="/load_quickstart")
        quick = tmp_path / "outputs" / "quickstart" / "checkpoints" / "last.ckpt"
        quick.parent.mkdir(parents=True)
        quick.write_bytes(demo_checkpoints["quickstart"].read_bytes())
        client.predict(None, api_name="/load_quickstart")
        assert len(app.models) == 1
        overlay_file, areas, info, *_ = client.predict(
            handle_file(image),
            CLASSES,
            "(the class names above)",
            list(app.models)[0],
            "MaskFormer",
            0.8,
            api_name="/segment",
        )
        assert Image.open(overlay_file).height == Image.open(image).height
    finally:
        demo.close()


@pytest.mark.slow
def test_train_toy_button_trains_and_loads_a_model(toy_data_dir, tmp_path):
    """The page's "train the toy model" path, with a few steps on the small toy set."""
    from ovseg_lab.demo import TOY_TRAIN_OVERRIDES, DemoApp, load_examples
    from tests.conftest import small_toy_overrides

    overrides = [o for o in TOY_TRAIN_OVERRIDES if "steps" not in o and "val_check" not in o]
    overrides += [
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "pipeline.params.pretrain_steps=4",
        *small_toy_overrides(toy_data_dir),
    ]
    app = DemoApp([], device="cpu", root=tmp_path, output_dir=tmp_path / "requests", toy_overrides=overrides)
    lines = list(app.train_toy(poll_s=0.5))
    assert lines[-1].startswith("Loaded") and len(app.models) == 1
    assert (tmp_path / "outputs" / "demo_toy" / "checkpoints" / "last.ckpt").is_file()
    result = app.segment(load_examples()[0]["image"], CLASSES)
    assert set(result.legend) <= set(REQUESTED) and result.scores is not None


# ---------------------------------------------------------------------------------------------- headless Chromium
def chromium_binary() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (commands on the browser's fd 3,
    answers on its fd 4, NUL-terminated JSON): no websocket library needed. Drives the first page target."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        import fcntl

        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        # above fd 4, so that the dup2 calls in the child cannot clobber each other
        high_r, high_w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def child_fds():
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        with open(log, "w") as handle:
            self.proc = subprocess.Popen(
                [*cmd, "--remote-debugging-pipe"],
                stdout=handle,
                stderr=subprocess.STDOUT,
                preexec_fn=child_fds,
                close_fds=False,
            )
        os.close(high_r)
        os.close(high_w)
        self.buffer = b""
        self.next_id = 0
        self.session = None
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self.buffer:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise TimeoutError("no message from the browser")
            ready, _, _ = select.select([self.from_browser], [], [], remaining)
            if ready:
                chunk = os.read(self.from_browser, 1 << 20)
                if not chunk:
                    raise AssertionError("the browser closed its DevTools pipe")
                self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, timeout: float = 60, **params):
        self.next_id += 1
        command = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None:
            command["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(command).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def close(self) -> None:
        try:
            self.session = None
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        stop(self.proc)
        os.close(self.to_browser)
        os.close(self.from_browser)


@pytest.mark.slow
def test_demo_in_headless_chromium(demo_server, tmp_path):
    """Open the page, pick an example, press Segment, wait for the overlay and the areas, save a screenshot.

    OVSEG_DEMO_SCREENSHOT=<path> also copies the screenshot there (docs/demo_screenshot.png in the README)."""
    browser = chromium_binary()
    if browser is None:
        pytest.skip("no Chromium: apt-get install -y chromium")
    profile = tmp_path / "profile"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
        "about:blank",
    ]
    devtools = DevTools(cmd, tmp_path / "chromium.log")
    try:
        devtools.call("Page.enable")
        devtools.call("Emulation.setDeviceMetricsOverride", width=1280, height=1000, deviceScaleFactor=1, mobile=False)
        devtools.call("Page.navigate", url=demo_server["url"])
        devtools.wait_for(
            "!!document.querySelector('#segment') && document.readyState === 'complete'", 90, "the page to render"
        )
        # pick the first example: Gradio fills the image and the class names
        devtools.wait_for(
            "(() => { const t = document.querySelector('#examples');"
            " const b = t && t.querySelector('button, tbody tr, .gallery-item');"
            " if (b) { b.click(); return true; } return false; })()",
            30,
            "the examples",
        )
        devtools.wait_for(
            "(() => { const t = document.querySelector('#classes textarea, #classes input');"
            " return !!t && t.value.length > 0 && !!document.querySelector('#image img'); })()",
            30,
            "the example to fill the inputs",
        )
        devtools.js("document.querySelector('#segment').click()")
        devtools.wait_for(
            "(() => { const img = document.querySelector('#overlay img');"
            " const rows = document.querySelectorAll('#areas tbody tr');"
            " return !!img && img.complete && img.naturalWidth > 0 && rows.length > 0; })()",
            120,
            "the overlay and the areas",
        )
        time.sleep(1.0)  # let the last frame settle
        table = devtools.js("document.querySelector('#areas').innerText")
        legend_text = devtools.js("document.querySelector('#info').innerText")
        shot = devtools.call("Page.captureScreenshot", format="png")
    finally:
        devtools.close()
    import base64

    path = tmp_path / "demo_screenshot.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    picture = Image.open(path)
    target = os.environ.get("OVSEG_DEMO_SCREENSHOT")
    if target:
        small = picture.convert("RGB").resize((960, 750), Image.LANCZOS).quantize(colors=128)
        small.save(target, optimize=True)
    print("areas table:", repr(table), "| info:", repr(legend_text))
    assert picture.size == (1280, 1000)
    from ovseg_lab.demo import load_examples

    asked = [c.strip() for c in load_examples()[0]["classes"].split(",")]
    shown = [name for name in asked if name in table]
    assert shown, table  # the areas list classes that were asked for
    assert "4 classes asked" in legend_text
