"""scripts/predict.py on a user's messy folder: duplicates, clashing stems, corrupt files, its own earlier outputs,
EXIF rotation, 16-bit images, non-ASCII names, large images, many classes, bad --device / --output."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))


def test_duplicate_class_names_are_refused():
    from ovseg_lab.errors import DataError
    from ovseg_lab.vocab import vocabulary_from_names

    with pytest.raises(DataError, match="repeats names.*'tree' / 'Tree'"):
        vocabulary_from_names("tree,Tree,tree ")
    assert vocabulary_from_names(" red  circle ,sky").classes == ("red circle", "sky")


def test_output_names_are_unique_per_input_and_own_outputs_are_not_inputs(tmp_path):
    from ovseg_lab.predict import list_images, output_stems, write_outputs
    from ovseg_lab.vocab import vocabulary_from_names

    for name in ("x.jpg", "x.png", "y.png"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    stems = output_stems(list_images(tmp_path))
    assert sorted(stems.values()) == ["x_jpg", "x_png", "y"]
    write_outputs(
        "y", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int64), vocabulary_from_names("a,b"), tmp_path
    )
    assert (tmp_path / "y_overlay.png").is_file()
    Image.new("RGB", (8, 8)).save(tmp_path / "holiday_overlay.png")  # a user's photo with that name is still an input
    assert [p.name for p in list_images(tmp_path)] == ["holiday_overlay.png", "x.jpg", "x.png", "y.png"]


def test_exif_orientation_is_applied_and_16_bit_images_are_scaled_with_a_warning(tmp_path):
    from ovseg_lab.predict import read_photo

    picture = np.zeros((20, 40, 3), np.uint8)
    picture[:, :20] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a portrait stored as landscape
    Image.fromarray(picture).save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    shown = read_photo(tmp_path / "portrait.jpg")
    assert shown.shape == (40, 20, 3)
    assert shown[5, 10, 0] > 200 and shown[35, 10, 0] < 60  # red on top after the rotation

    ramp = np.arange(64, dtype=np.uint16)[None].repeat(8, 0) * 1000  # 0 .. 63000
    Image.fromarray(ramp).save(tmp_path / "depth16.png")
    with pytest.warns(UserWarning, match="scaled to 8 bits"):
        grey = read_photo(tmp_path / "depth16.png")
    assert grey.dtype == np.uint8 and grey.shape == (8, 64, 3)
    assert grey[0, 0, 0] == 0 and grey[0, 63, 0] == round(63000 / 257) and len(np.unique(grey)) == 64  # not white
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_photo(tmp_path / "portrait.jpg")  # no warning for an ordinary image


def test_legend_renders_any_script_and_scales_with_the_image():
    """Every character of a legend name is drawn in a font that has its glyph (no warning), CJK included on a
    machine without a CJK font (the packaged Droid Sans Fallback); the drawn ideographs are glyphs, not the box
    drawn for a code point no font has. The text grows with the picture."""
    from fontTools.ttLib import TTFont
    from PIL import ImageDraw, ImageFont

    from ovseg_lab.viz import FALLBACK_FONT, _font_files, draw_text, font_runs, with_legend

    names = [
        "красный круг",
        "Ελληνικά",
        "straße café",
        "猫 (12.3%)",
        "고양이 (1.0%)",
        "ねこ",
        "قطة",
        "חתול",
        "猫 cat кот",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "no font has glyphs for ..." would fail here
        for name in names:
            runs = font_runs(name)
            assert "".join(chunk for chunk, _ in runs) == name
            for chunk, path in runs:
                cmap = TTFont(path, fontNumber=0).getBestCmap()
                assert all(ord(c) in cmap for c in chunk if not c.isspace()), (name, chunk, path)
    assert str(FALLBACK_FONT) in _font_files() and FALLBACK_FONT.is_file()

    def ink(text: str, font=None) -> np.ndarray:
        image = Image.new("L", (72, 72), 255)
        draw = ImageDraw.Draw(image)
        if font is None:
            draw_text(draw, (4, 4), text, 48, fill=0)
        else:
            draw.text((4, 4), text, font=font, fill=0)
        return np.array(image) < 128

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tofu = ink("\ue000")  # private use: no font has it, the .notdef box
    cat, dog = ink("猫"), ink("犬")
    assert cat.sum() > 100 and (cat != dog).sum() > 100 and (cat != tofu).sum() > 100
    dejavu = ImageFont.truetype(_font_files()[0], 48)  # the comparison can fail: DejaVu alone draws 猫 as its box
    assert (ink("猫", dejavu) == ink("\ue000", dejavu)).all()

    def panel(size: int) -> tuple[int, int]:
        picture = np.full((size, size * 4 // 3, 3), 128, np.uint8)
        canvas = with_legend(picture, [(0, "красный круг", 0.6), (1, "sky", 0.4)], 2)
        ink = np.array(canvas)[:, picture.shape[1] :].min(axis=2) < 100  # dark pixels of the legend panel
        rows = np.flatnonzero(ink.any(axis=1))
        return canvas.size[0] - picture.shape[1], rows[-1] - rows[0]

    small_width, small_text = panel(64)
    big_width, big_text = panel(3000)
    # the font grows with the picture (11 px on a toy image, ~100 px on a 4000x3000 photo), the panel with it
    assert big_text > 6 * small_text and big_width > 6 * small_width, (small_text, big_text, small_width, big_width)


def test_palette_keeps_847_classes_apart():
    from ovseg_lab.viz import _srgb_to_lab, palette

    colours = palette(847)
    lab = _srgb_to_lab(colours / 255.0)
    distance = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    assert distance.min() > 7.0  # CIELAB Delta-E; golden-ratio hues had 0.15 (indistinguishable) at 847
    assert np.linalg.norm(lab[1:] - lab[:-1], axis=1).min() > 10.0  # consecutive ids clearly different
    assert (palette(150) == colours[:150]).all()  # a class's colour does not depend on the vocabulary size


def test_bad_device_and_an_output_file_are_clear_errors(tmp_path, monkeypatch):
    import predict as script
    import torch

    from ovseg_lab.errors import SetupError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SetupError, match="no CUDA GPU is available here.*--device cpu"):
        script.checked_device("cuda")
    with pytest.raises(SetupError, match="--device gpu0"):
        script.checked_device("gpu0")
    (tmp_path / "out.png").write_bytes(b"x")
    with pytest.raises(SetupError, match="is a file; give a folder"):
        script.output_folder(tmp_path / "out.png", tmp_path / "run" / "checkpoints" / "last.ckpt")
    default = script.output_folder(None, tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert default.parent == tmp_path / "run" / "predict"


@pytest.mark.slow  # ~20-30 s: the default suite stays under 10 minutes; CI runs the slow suite too
def test_a_messy_folder_predicts_the_good_images_and_reports_the_bad_one(quickstart_run, toy_data_dir, tmp_path):
    """Clashing stems, a corrupt file and outputs written into the input folder, predicted twice: exit status 1
    naming the corrupt file, every good image predicted under its own name, nothing read back; the default output
    folder lies next to the checkpoint's run, not in it."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(quickstart_run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    folder = tmp_path / "photos"
    folder.mkdir()
    source = sorted((toy_data_dir / "toy" / "toy_seen" / "images" / "val").iterdir())[0]
    Image.open(source).convert("RGB").save(folder / "x.jpg", quality=95)
    shutil.copy(source, folder / "x.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cmd = [
        sys.executable,
        "scripts/predict.py",
        "--checkpoint",
        str(run / "checkpoints" / "last.ckpt"),
        "--image",
        str(folder),
        "--classes",
        "red circle,blue square,striped grass",
    ]
    for _ in range(2):
        proc = subprocess.run(cmd + ["--output", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "1 of 3 image(s) failed" in proc.stderr and "broken.jpg" in proc.stderr
        assert "Traceback" not in proc.stderr
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "broken.jpg",
        "x.jpg",
        "x.png",
        "x_jpg_areas.json",
        "x_jpg_labels.png",
        "x_jpg_overlay.png",
        "x_png_areas.json",
        "x_png_labels.png",
        "x_png_overlay.png",
    ]

    proc = subprocess.run(
        cmd[:-4] + ["--image", str(folder / "x.png"), "--classes", "tree,Tree,tree "],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "repeats names" in proc.stderr
    proc = subprocess.run(
        cmd[:-4] + ["--image", str(folder / "x.png"), "--classes", "red circle,sky"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (run / "predict").iterdir()
    assert (out / "x_overlay.png").is_file() and sorted(p.name for p in run.iterdir()) == ["checkpoints", "predict"]
