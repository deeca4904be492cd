"""The examples run as documented: the quickstart script and the notebooks.

The notebooks are stored executed (outputs and figures are what a reader sees); here they are executed again with a
tiny budget: the one cell tagged ``parameters`` is rewritten first (papermill-style), so no test-only switch reaches
the notebooks' code. The kernel imports this checkout's package (``PYTHONPATH``), not an installed copy.

Refresh the stored outputs after changing a notebook (their full budget; a few minutes on 2 CPU cores):
``python tests/test_examples.py [names]``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = ["quickstart.ipynb", "cross_sensor_dgss.ipynb", "sharing_adapters.ipynb"]


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


def parameters_cell(notebook) -> nbformat.NotebookNode:
    cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1 and cells[0].cell_type == "code", "expected exactly one code cell tagged 'parameters'"
    return cells[0]


def assigned_names(source: str) -> set[str]:
    tree = ast.parse(source)
    return {target.id for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def set_parameters(notebook, parameters: dict) -> None:
    """Rewrite the parameters cell: its own assignments, then the overrides (which must name its variables)."""
    cell = parameters_cell(notebook)
    unknown = set(parameters) - assigned_names(cell.source)
    assert not unknown, f"the parameters cell does not define {sorted(unknown)}"
    overrides = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    cell.source = f"{cell.source}\n# injected by tests/test_examples.py\n{overrides}\n"


def kernel_imports_this_checkout(monkeypatch) -> None:
    """The kernel (started from this environment) runs this interpreter (``python`` on PATH) and imports this
    checkout (PYTHONPATH), not a copy installed in site-packages; its working directory is the test's tmp_path."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def run_notebook(name: str, tmp_path: Path, monkeypatch, **parameters) -> tuple[str, object]:
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    set_parameters(notebook, parameters)
    kernel_imports_this_checkout(monkeypatch)
    resources = {"metadata": {"path": str(tmp_path)}}
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    return outputs, notebook


def images(notebook) -> list:
    return [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


def test_notebook_runs_this_checkout(tmp_path, monkeypatch):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import spectralmoe_peft\n"
                                                                           "print(spectralmoe_peft.__file__)")])
    kernel_imports_this_checkout(monkeypatch)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o["text"] for o in notebook.cells[0].outputs if o.get("name") == "stdout")
    assert Path(printed.strip()).resolve() == ROOT / "spectralmoe_peft" / "__init__.py"


def test_quickstart_notebook(tmp_path, monkeypatch):
    outputs, notebook = run_notebook("quickstart.ipynb", tmp_path, monkeypatch, STEPS=3)
    assert "reloaded adapter gives identical outputs: True" in outputs
    assert len(re.findall(r"step +\d+ +task loss", outputs)) == 3  # the tiny budget reached the loop
    assert len(images(notebook)) == 1  # loss curves and expert load
    assert (tmp_path / "quickstart_adapter" / "adapter_model.safetensors").exists()


def test_cross_sensor_dgss_notebook(tmp_path, monkeypatch):
    outputs, notebook = run_notebook("cross_sensor_dgss.ipynb", tmp_path, monkeypatch, STEPS=3, TRAINER_STEPS=2)
    assert "target mIoU" in outputs and "EPSG:32633" in outputs
    assert len(images(notebook)) == 3  # the scenes, the training curves, the routing map
    assert (tmp_path / "dgss_adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "target_prediction.tif").exists()
    assert "'loss'" in outputs and "aux_loss" in outputs
    assert "Trainer: 2 steps" in outputs  # the tiny budget reached the Trainer too


def test_sharing_adapters_notebook(tmp_path, monkeypatch):
    outputs, notebook = run_notebook("sharing_adapters.ipynb", tmp_path, monkeypatch, STEPS=2)
    assert "identical outputs: True" in outputs and "import spectralmoe_peft" in outputs
    assert "the two adapters give different features: True" in outputs
    for name in ("true_colour", "false_colour"):
        assert f"identical to the saved {name}: True" in outputs
    assert "switching changes the features: True" in outputs and "adapter changes the features: True" in outputs
    assert len(images(notebook)) == 1
    configs = [json.loads((tmp_path / f"adapter_{name}" / "adapter_config.json").read_text())
               for name in ("true_colour", "false_colour")]
    assert [c["rgb_band_indices"] for c in configs] == [[2, 1, 0], [3, 2, 1]]  # two really different adapters


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_stored_executed(name):
    """What a reader opens: every code cell executed in order with its outputs, figures as modest PNGs, a kernelspec,
    no errors, and none of the test suite's plumbing in the code."""
    path = EXAMPLES / name
    assert path.stat().st_size < 1_000_000
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert notebook.metadata["kernelspec"]["language"] == "python"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert images(notebook), "no figure stored"
    stored_text = "".join(o.get("text", "") for o in outputs)
    # run from a clean folder, not by the tests; no local paths or third-party environment noise
    assert "/tmp/" not in stored_text and "pytest" not in stored_text and "site-packages" not in stored_text
    source = "\n".join(cell.source for cell in code)
    assert "environ" not in source and "SPECTRALMOE_" not in source  # no env-var switch in user code
    assert "injected by tests" not in source
    # the balance loss is in the graph by default (aux_loss_in_graph=True): adding get_aux_loss() would count it twice
    assert not re.search(r"\+\s*\w+(\.base_model)?\.get_aux_loss\(\)", source)
    markdown = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    assert "tiny random" in markdown.lower() or "randomly initialized" in markdown.lower()


def refresh_stored_outputs(names: list[str]) -> None:
    """Execute the notebooks with their own parameters, each in a scratch folder, and store them with outputs."""
    import tempfile

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    for name in names or NOTEBOOKS:
        notebook = nbformat.read(EXAMPLES / name, as_version=4)
        with tempfile.TemporaryDirectory() as scratch:
            NotebookClient(notebook, timeout=1800, kernel_name="python3", record_timing=False,
                           resources={"metadata": {"path": scratch}}).execute()
        nbformat.write(notebook, EXAMPLES / name)
        print(f"{name}: stored executed ({(EXAMPLES / name).stat().st_size:,d} bytes)")


if __name__ == "__main__":
    refresh_stored_outputs(sys.argv[1:])
