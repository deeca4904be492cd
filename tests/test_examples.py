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


def run_notebook(name: str, tmp_path: Path) -> tuple[str, object]:
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    return outputs, notebook


def test_cross_sensor_dgss_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRALMOE_NOTEBOOK_STEPS", "3")  # a tiny budget; the notebook's default is 300
    outputs, notebook = run_notebook("cross_sensor_dgss.ipynb", tmp_path)
    assert "target mIoU" in outputs and "EPSG:32633" in outputs
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the scenes and the routing map
    assert (tmp_path / "dgss_adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "target_prediction.tif").exists()
    assert "'loss'" in outputs and "aux_loss" in outputs


def test_sharing_adapters_notebook(tmp_path):
    outputs, _ = run_notebook("sharing_adapters.ipynb", tmp_path)
    assert "identical outputs: True" in outputs and "import spectralmoe_peft" in outputs
    assert "adapter changes the features: True" in outputs
