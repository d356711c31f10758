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
            "--tta flip-zoom --age-weighting sqrt_inv --no-progress"
    aaf = aaf_slice(tmp_path / "aaf")
    proc = subprocess.run(["make", "recipe", f"RECIPE={out}", f"RECIPE_DATA={root / 'pq'}", f"RECIPE_TRAIN={train}",
                           f"AAF={aaf}", f"AAF_DATA={tmp_path / 'aaf_table'}"],
                          cwd=REPO, env=venv_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    card = (out / "MODEL_CARD.md").read_text()
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert f"| {metrics['overall']['mae']:.2f} (" in card  # the evaluated test MAE, with its interval
    assert f"MAE {summary['test_mae']:.2f}" in card and summary["tta"] == "flip-zoom"
    assert "### By age group" in card and "### By gender" in card and "regression head" in card
    assert f"make recipe RECIPE_TRAIN='{train}'" in card  # the exact command
    assert "loss weighted by age (`sqrt_inv`)" in card and summary["age_weighting"] == "sqrt_inv"
    assert f"(world size 1), {summary['precision']} arithmetic." in card and summary["precision"] in ("fp32", "bf16")
    scored = json.loads((out / "scored" / "score_manifest.json").read_text())
    assert scored["counts"]["faces"] == metrics["rows"]["matched"] == summary["rows"]["test"]
    # every scoring of the report used the TTA the training's metrics and calibration were fitted under
    assert {json.loads((out / part / "score_manifest.json").read_text())["tta"]
            for part in ("scored", "scored_unmapped", "shift/scored", "aaf/scored", "aaf/scored_unmapped")} \
        == {"flip-zoom"}
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
    # the same faces scored by a copy without an age map: a regression run fits none, so the same numbers
    for report in ("report", "aaf/report"):
        unmapped = json.loads((out / f"{report}_unmapped" / "metrics.json").read_text())
        mapped = json.loads((out / report / "metrics.json").read_text())
        assert unmapped["overall"]["mae"] == pytest.approx(mapped["overall"]["mae"], abs=1e-4)
    assert "## Ages read toward the mean" not in card  # no age map: no before/after section


def _metrics(groups, matched=None):
    """An evaluate metrics.json's parts the card reads: age_group slices of (name, count, bias, mae)."""
    slices = [{"slice": "age_group", "value": g, "count": n, "bias": b, "mae": m, "cs5": 0.5} for g, n, b, m in groups]
    overall = {"mae": sum(n * m for _, n, _, m in groups) / sum(n for _, n, _, _ in groups),
               "bias": sum(n * b for _, n, b, _ in groups) / sum(n for _, n, _, _ in groups), "cs5": 0.5}
    return {"slices": slices, "overall": overall, "rows": {"matched": matched or sum(n for _, n, _, _ in groups)}}


def test_a_cross_sets_mae_at_the_test_splits_age_mix():
    test = _metrics([("3-9", 100, 0.0, 2.0), ("20-29", 300, 0.0, 4.0), ("70+", 100, 0.0, 9.0)])
    # the other set is mostly 20-29, MAE 6 there: its own MAE is 6.5, at the test split's mix (1:3:1 of 3, 6, 12) 6.6
    held = _metrics([("3-9", 10, 0.0, 3.0), ("20-29", 170, 0.0, 6.0), ("70+", 20, 0.0, 12.0), ("80+", 5, 0, 20.0)])
    assert model_card.at_age_mix(held, test) == pytest.approx((100 * 3 + 300 * 6 + 100 * 12) / 500)
    assert model_card.at_age_mix(_metrics([("0-2", 9, 0.0, 1.0)]), test) is None  # no group in common
    line = next(x for x in model_card.cross_section([("held", held)], test) if x.startswith("| held"))
    assert line.endswith(f"| {6.6:.2f} ({6.6 / test['overall']['mae']:.2f}×) |")


def test_the_age_map_section_shows_bias_before_and_after_and_the_groups_off_the_goal():
    fitted = {"age_map": {"predicted": [5.0, 50.0], "age": [1.0, 60.0], "fitted_on_rows": 2157}}
    before = _metrics([("10-19", 146, 3.98, 6.1), ("70+", 109, -6.79, 9.08), ("80+", 12, -9.0, 11.0)])
    after = _metrics([("10-19", 146, 0.5, 6.3), ("70+", 109, -3.2, 8.7), ("80+", 12, -7.0, 10.0)])
    held_before = _metrics([("10-19", 597, 5.9, 8.0)])
    held_after = _metrics([("10-19", 597, 4.1, 7.0)])
    lines = model_card.age_map_section(fitted, [("test", before, after, 3.0), ("AAF", held_before, held_after, 5.0)])
    text = "\n".join(lines)
    assert "2157 faces, 2 knots" in text
    assert "| 10-19 | 146 | 3.98 | 0.50 | 6.10 | 6.30 |" in text
    # goal 3 years in-domain: 10-19 and 70+ before, 70+ after; the 12-face group never counts (under 30 faces)
    assert "before 10-19 (+4.0), 70+ (-6.8); after 70+ (-3.2)." in text
    assert "before 10-19 (+5.9); after none." in text  # goal 5 years on the other set
    assert model_card.age_map_section({"age_map": None}, [("test", before, after, 3.0)]) == []
    # each kind of map described as it was fitted: the inverse at its strength, the lowest-MAE map by its goal
    assert "the inverse of the mean predicted age per true age, applied at strength 1 " in text
    lowest = {**fitted["age_map"], "pivot": 29.0, "bias_goal": 3.0, "margin_se": 0.75}
    text = "\n".join(model_card.age_map_section({"age_map": lowest}, [("test", before, after, 3.0)]))
    assert "the lowest val MAE among those that bring every age group of 30+ val faces within 3 years (less 0.75 " \
        "standard error" in text  # the margin the map was fitted with, read from it
    assert "away from the val median (29)" in text and "inverse" not in text
    text = "\n".join(model_card.age_map_section({"age_map": {**lowest, "bias_goal": 7.0}}, [("t", before, after, 3.0)]))
    assert "within 7 years" in text and "without it" not in text  # a bundle from before the cost was recorded
    costed = {**lowest, "bias_goal": 5.0, "val_mae_unmapped": 7.1234, "val_mae_mapped": 7.35}
    text = "\n".join(model_card.age_map_section({"age_map": costed}, [("t", before, after, 3.0)]))
    assert "within 5 years" in text and "val MAE 7.12 without it, 7.35 with it" in text
    unreached = {"age_map": {**lowest, "bias_goal": None}}
    text = "\n".join(model_card.age_map_section(unreached, [("t", before, after, 3.0)]))
    assert "lowest val MAE (no map of its kind brings every age group of 30+ val faces within a bias goal)" in text
    # a bundle refitted after training (trainer.recalibrate --refit-on): its trainer's numbers are said to predate it
    note = model_card._refit_note({"rows": 2157})
    assert "fitted again" in note and "2157 faces" in note
    assert model_card._refit_note(None) == ""


@pytest.mark.parametrize("bad", ["no-equals-sign", "=folder", "name=", "name=s3:/bucket/report"])
def test_a_malformed_cross_report_is_one_line_before_anything_is_read(bad, tmp_path, capsys):
    assert model_card.main(["--run", str(tmp_path / "absent"), "--report", str(tmp_path / "absent"), "--command",
                            "x", "--output", str(tmp_path / "card.md"), "--cross", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--cross" in err and "Traceback" not in err
    assert not (tmp_path / "card.md").exists()


def test_a_moved_run_folder_carries_its_own_bundle_to_the_card_and_a_missing_one_is_one_line(bundles, tmp_path,
                                                                                              capsys):
    """The card reads the run's own model.pt wherever the run folder went (its summary.json still names where it
    was trained); with no bundle anywhere, one line and exit 2, no card."""
    import shutil

    plain, _ = bundles
    run = tmp_path / "moved" / "train"
    shutil.copytree(plain.parent, run)
    summary = json.loads((run / "summary.json").read_text())
    summary["bundle"] = str(tmp_path / "where-it-was-trained" / "model.pt")  # gone, as after a move
    (run / "summary.json").write_text(json.dumps(summary))
    report = tmp_path / "report"
    report.mkdir()
    metrics = _metrics([("20-29", 40, 0.5, 4.0)])
    metrics["overall"]["rmse"] = 5.0  # what evaluate.py writes besides what _metrics fills in
    (report / "metrics.json").write_text(json.dumps(metrics))
    argv = ["--run", str(run), "--report", str(report), "--command", "make recipe", "--output", str(tmp_path / "card.md")]
    assert model_card.main(argv) == 0
    card = (tmp_path / "card.md").read_text()
    assert f"input {summary['image_size']} px" in card and "| 4.00" in card
    (run / "model.pt").unlink()
    (tmp_path / "card.md").unlink()
    capsys.readouterr()
    assert model_card.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "where-it-was-trained" in err and "--bundle" in err and "Traceback" not in err
    assert not (tmp_path / "card.md").exists()
