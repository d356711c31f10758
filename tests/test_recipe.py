"""make recipe, tiny: the reference recipe's steps (train -> score the test split with flip TTA -> evaluate ->
the test photos pasted into scenes, detected, scored and evaluated -> held-out photos (All-Age-Faces' layout)
prepared, scored, evaluated -> model card) on the fixture table with one small epoch; the real recipe
(UTKFace, 60 minutes) does not run here."""
import json
import os
import subprocess

import pytest

from conftest import REPO, UTKFACE, encode, synthetic_photo, venv_env
from spark_jobs import model_card

AAF = UTKFACE.parent / "aaf"


def aaf_slice(folder, n: int = 24):
    """A folder laid out as ../shared/data/aaf (images/, labels.csv with path,age,gender): n of its photos when it
    is here, else n synthetic head-and-shoulders scenes named the same way."""
    (folder / "images").mkdir(parents=True)
    rows = []
    if (AAF / "labels.csv").exists():
        lines = (AAF / "labels.csv").read_text().splitlines()[1:]
        for line in lines[:: len(lines) // n][:n]:
            name = line.split(",")[0]
            os.symlink(AAF / "images" / name, folder / "images" / name)
            rows.append(line)
    else:
        for i in range(n):
            age = 3 + 3 * i
            photo, _ = synthetic_photo(age, seed=300 + i, scale=1.6, canvas=(300, 340))
            (folder / "images" / f"{i:05d}A{age:02d}.jpg").write_bytes(encode(photo))
            rows.append(f"{i:05d}A{age:02d}.jpg,{age},{i % 2}")
    (folder / "labels.csv").write_text("path,age,gender\n" + "\n".join(rows) + "\n")
    return folder


@pytest.mark.slow
def test_a_tiny_recipe_ends_in_a_model_card_with_the_reports_numbers(tables, tmp_path):
    root, _, _ = tables
    out = tmp_path / "recipe"
    train = "--image-size 32 --epochs 1 --batch-size 16 --workers 1 --schedule onecycle --head regression " \
            "--tta flip --no-progress"
    aaf = aaf_slice(tmp_path / "aaf")
    proc = subprocess.run(["make", "recipe", f"RECIPE={out}", f"RECIPE_DATA={root / 'pq'}", f"RECIPE_TRAIN={train}",
                           f"AAF={aaf}", f"AAF_DATA={tmp_path / 'aaf_table'}"],
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
    # faces unlike the training set: the test photos pasted into scenes, detected, scored, evaluated, on the card
    pasted = json.loads((out / "shift" / "scored" / "score_manifest.json").read_text())["counts"]
    cross = json.loads((out / "shift" / "report" / "metrics.json").read_text())
    assert pasted["photos"] == summary["rows"]["test"]  # one pasted photo per test face
    assert cross["rows"]["matched"] == pasted["photos_with_faces"] > 0  # each photo's face 0 joined its label by path
    assert "## Faces unlike the training set" in card
    ratio = cross["overall"]["mae"] / metrics["overall"]["mae"]
    assert f"| {cross['rows']['matched']} | {cross['overall']['mae']:.2f} (" in card and f"{ratio:.2f}×" in card
    # held-out photos: prepared with the detector on for their labels, the photos scored, joined by face id
    held = json.loads((out / "aaf" / "report" / "metrics.json").read_text())
    table = json.loads((tmp_path / "aaf_table" / "manifest.json").read_text())
    assert held["rows"]["matched"] == table["counts"]["faces"] > 0
    assert f"All-Age-Faces photos, held out (detector on) | {held['rows']['matched']} | " in card
    assert "All-Age-Faces photos, held out (detector on): by age group" in card


@pytest.mark.parametrize("bad", ["no-equals-sign", "=folder", "name=", "name=s3:/bucket/report"])
def test_a_malformed_cross_report_is_one_line_before_anything_is_read(bad, tmp_path, capsys):
    assert model_card.main(["--run", str(tmp_path / "absent"), "--report", str(tmp_path / "absent"), "--command",
                            "x", "--output", str(tmp_path / "card.md"), "--cross", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--cross" in err and "Traceback" not in err
    assert not (tmp_path / "card.md").exists()
