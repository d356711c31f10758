"""make e2e: the one-command path (generated photos -> prepare -> train -> score -> evaluate -> report)."""
import json
import subprocess

import pytest

from conftest import REPO, venv_env


@pytest.mark.slow
def test_make_e2e_ends_in_a_report(tmp_path):
    out = tmp_path / "e2e"
    proc = subprocess.run(["make", "e2e", f"E2E={out}", "E2E_EPOCHS=1", "E2E_PHOTOS=100"], cwd=REPO,
                          env=venv_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    prepared = json.loads((out / "prepared" / "manifest.json").read_text())
    scored = json.loads((out / "scored" / "score_manifest.json").read_text())
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    # every generated file is accounted for at each stage
    assert scored["counts"]["photos"] == prepared["counts"]["inputs"]
    assert scored["counts"]["photos_with_faces"] == prepared["counts"]["faces"]  # the same crop function finds the same faces
    assert metrics["rows"]["matched"] == prepared["splits"]["test"]
    assert metrics["rows"]["labels_without_prediction"] == 0
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert metrics["overall"]["mae"] == pytest.approx(summary["test_mae"], rel=1e-4)  # same crops, same model
    assert "data:image/png;base64," in (out / "report" / "report.html").read_text()
    # quiet consoles: no Spark INFO lines, no Ivy resolution report, no log4j start-up notice
    lines = (proc.stdout + proc.stderr).splitlines()
    noise = [line for line in lines if " INFO " in line or ":: resolving" in line or "Ivy Default Cache" in line
             or "log4j" in line.lower() or "SLF4J" in line]
    assert noise == [], noise[:5]
