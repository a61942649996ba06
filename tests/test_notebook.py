"""notebooks/residual_networks.ipynb runs top to bottom (with the small model) without a cell error."""

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "residual_networks.ipynb"


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and not any(cell.get("outputs") or cell.get("execution_count") for cell in code), (
        "the notebook is committed without outputs")
    monkeypatch.setenv("RESNET_FLAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("RESNET_FLAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on a cell error
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    for expected in ("Total params: 23,600,006", "relu(input) exactly: True", "Test Accuracy =", "first / last ="):
        assert expected in printed, expected
    assert any("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs), "the curves are drawn inline"
