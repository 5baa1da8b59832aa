"""notebooks/qualitative.ipynb executes headless (nbclient), training its own short toy run in a temporary folder."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, SMALL_TOY


@pytest.mark.slow
def test_qualitative_notebook_executes(toy_data_dir, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("OVSEG_LAB_ROOT", str(ROOT))
    monkeypatch.setenv("QUALITATIVE_CKPT", str(tmp_path / "absent.ckpt"))  # exercise the train-here branch
    monkeypatch.setenv("QUALITATIVE_DATA_DIR", str(toy_data_dir))
    monkeypatch.setenv("QUALITATIVE_STEPS", "20")
    monkeypatch.setenv("QUALITATIVE_PRETRAIN_STEPS", "4")
    monkeypatch.setenv("QUALITATIVE_TOY", json.dumps(SMALL_TOY))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(ROOT / "notebooks" / "qualitative.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "store the notebook without outputs"
    )
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    text = "\n".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    assert "training 20 steps" in text and "raw" in text and "aggregated" in text
    assert (
        tmp_path / "qualitative_run" / "checkpoints" / "last.ckpt"
    ).is_file()  # outputs stay in the temporary folder
