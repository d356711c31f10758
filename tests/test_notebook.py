"""notebooks/walkthrough.ipynb, executed start to end by a real notebook runner (nbclient, an IPython kernel)."""
from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, UTKFACE

NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"

pytestmark = pytest.mark.slow


def test_the_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6
    assert all(not c.outputs and c.execution_count is None for c in code), "strip the outputs before committing"


def test_the_walkthrough_runs_prepare_train_tune_evaluate_predict(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEAGE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("FACEAGE_NOTEBOOK_EPOCHS", "1")  # the run, not the model: one epoch
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # a failing cell raises
    text = "\n".join(out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs)
    data = "utkface" if UTKFACE.is_dir() else "synthetic"
    assert f"data: {data}" in text
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["overall"]["count"] > 0 and metrics["overall"]["mae"] >= 0
    best = json.loads((tmp_path / "tune" / "best_params.json").read_text())
    assert best  # three trials ran and the best one's parameters were written
    images = [out for c in nb.cells if c.cell_type == "code" for out in c.outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 3  # the confusion matrix, MAE by age group, the predicted photo with its box
    assert "ok " in text  # the last cell printed a face found with its age
