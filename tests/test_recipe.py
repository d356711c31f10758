"""make recipe, tiny: the reference recipe's steps (train -> score the test split with flip TTA -> evaluate ->
model card) on the fixture table with one small epoch; the real recipe (UTKFace, 60 minutes) does not run here."""
import json
import subprocess

import pytest

from conftest import REPO, venv_env


@pytest.mark.slow
def test_a_tiny_recipe_ends_in_a_model_card_with_the_reports_numbers(tables, tmp_path):
    root, _, _ = tables
    out = tmp_path / "recipe"
    train = "--image-size 32 --epochs 1 --batch-size 16 --workers 1 --schedule onecycle --head regression " \
            "--tta flip --no-progress"
    proc = subprocess.run(["make", "recipe", f"RECIPE={out}", f"RECIPE_DATA={root / 'pq'}", f"RECIPE_TRAIN={train}"],
                          cwd=REPO, env=venv_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    card = (out / "MODEL_CARD.md").read_text()
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert f"| {metrics['overall']['mae']:.2f} (" in card  # the evaluated test MAE, with its interval
    assert f"MAE {summary['test_mae']:.2f}" in card and summary["tta"] == "flip"
    assert "### By age group" in card and "### By gender" in card and "regression head" in card
    assert f"make recipe RECIPE_TRAIN='{train}'" in card  # the exact command
    scored = json.loads((out / "scored" / "score_manifest.json").read_text())
    assert scored["counts"]["faces"] == metrics["rows"]["matched"] == summary["rows"]["test"]
