"""The examples run as documented: the quickstart script and its notebook."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_script(tmp_path):
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLES / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--out", str(tmp_path), "--steps", "3"])
    assert result["reload_equal"] is True and math.isfinite(result["loss"])
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert weights.stat().st_size < 1_000_000
    assert all("spectralmoe_" in key for key in load_file(weights))


def test_quickstart_notebook(tmp_path):
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "identical outputs" in outputs
