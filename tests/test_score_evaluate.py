"""spark_jobs/score.py and evaluate.py on real photos, a tiny trained bundle and real Spark."""
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import REPO, encode, spark_submit, synthetic_face, synthetic_photo, venv_env
from schemas import layout
from spark_jobs import evaluate, evaluate_steps, score, score_steps
from trainer import runtime
from trainer import data


def _mixed_folder(folder: Path) -> dict:
    """Photos with two faces, one face, no face, and files that are not usable images."""
    folder.mkdir()
    two = Image.new("RGB", (800, 480), (120, 140, 160))
    two.paste(synthetic_face(30, seed=9, size=160), (40, 200))
    two.paste(synthetic_face(70, seed=10, size=300), (420, 90))
    (folder / "two_faces.jpg").write_bytes(encode(two, quality=95))
    one, _ = synthetic_photo(40, seed=3)
    (folder / "sub").mkdir()
    (folder / "sub" / "one face.PNG").write_bytes(encode(one, "PNG"))
    noise = Image.fromarray(np.random.default_rng(8).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    (folder / "no_face.jpg").write_bytes(encode(noise))
    (folder / "truncated.jpg").write_bytes(encode(one)[:3000])
    (folder / "not_an_image.jpg").write_bytes(b"hello, not a JPEG")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("a text file")
    (folder / ".hidden.jpg").write_bytes(encode(one))
    return {"photos": 8, "with_faces": 2, "faces": 3, "without_face": 1, "unreadable": 5}


def _rows(out: Path) -> pd.DataFrame:
    return pd.concat(pq.read_table(p).to_pandas() for p in (out / "predictions").glob("*.parquet"))


def test_scoring_a_mixed_folder_accounts_for_every_photo(bundles, tmp_path):
    _, detecting = bundles
    expected = _mixed_folder(tmp_path / "photos")
    out = tmp_path / "scored"
    assert score.main(["--model", str(detecting), "--input", str(tmp_path / "photos"), "--output", str(out)]) == 0
    manifest = json.loads((out / layout.SCORE_MANIFEST).read_text())
    c = manifest["counts"]
    assert (c["photos"], c["photos_with_faces"], c["faces"], c["photos_without_face"], c["unreadable"]) == \
        (expected["photos"], expected["with_faces"], expected["faces"], expected["without_face"],
         expected["unreadable"])
    assert c["photos"] == c["photos_with_faces"] + c["photos_without_face"] + c["unreadable"]
    rows = _rows(out)
    by_name = {name: g for name, g in rows.groupby(rows.source_path.map(lambda p: Path(p).name))}
    assert len(by_name) == expected["photos"]  # every file has at least one row
    two = by_name["two_faces.jpg"].sort_values("face_index")
    assert two.face_index.tolist() == [0, 1] and (two.status == "ok").all()
    assert two.bbox.iloc[0][0] > 400 and two.bbox.iloc[1][0] < 400  # face 0 is the largest
    assert all(len(b) == 4 for b in two.bbox) and (two.det_score > 0.5).all()
    assert two.predicted_age.between(0, 120).all() and two.uncertainty.map(math.isfinite).all()
    assert by_name["one face.PNG"].status.tolist() == ["ok"]
    statuses = {name: g.status.iloc[0] for name, g in by_name.items()}
    assert statuses["no_face.jpg"] == "no_face"
    assert statuses["truncated.jpg"] == "corrupt" and statuses["not_an_image.jpg"] == "not_an_image"
    assert statuses["empty.jpg"] == "empty_file" and statuses["notes.txt"] == "unsupported_extension"
    assert statuses[".hidden.jpg"] == "hidden_file"
    no_pred = rows[rows.status != "ok"]
    assert no_pred.predicted_age.isna().all() and no_pred.face_index.isna().all() and no_pred.detail.notna().all()
    assert set(rows.model_id) == {runtime.model_id(str(detecting))}
    # --mode error refuses an output that holds predictions; the default replaces faceage's own
    assert score.main(["--model", str(detecting), "--input", str(tmp_path / "photos"), "--output", str(out),
                       "--mode", "error"]) == 2
    assert score.main(["--model", str(detecting), "--input", str(tmp_path / "photos"), "--output", str(out)]) == 0


def test_the_model_is_loaded_once_per_worker_process(bundles):
    plain, _ = bundles
    settings = score_steps.ScoreSettings(bundle=str(plain), model_id="x", data_version=None, input_version=None,
                                     run_id="r")
    before = score_steps._load.cache_info().misses
    first = score_steps.predictor(settings)
    assert score_steps.predictor(settings) is first and score_steps._load.cache_info().misses == before + 1


def test_score_a_table_split_then_evaluate_it(bundles, tables, tmp_path):
    root, manifest, _ = tables
    plain, _ = bundles
    out = tmp_path / "scored"
    assert score.main(["--model", str(plain), "--input", str(root / "delta"), "--split", "test",
                       "--output", str(out), "--format", "delta"]) == 0
    assert (out / "predictions" / "_delta_log").is_dir()
    m = json.loads((out / layout.SCORE_MANIFEST).read_text())
    n = data.split_source(str(root / "delta"), "test").rows  # the latest version's test split
    total = sum(data.split_source(str(root / "delta"), s).rows for s in ("train", "val", "test"))
    assert m["counts"]["faces"] == n and m["input"]["version"] == 1
    rows = _rows(out)
    assert (rows.status == "ok").all() and (rows.input_version == 1).all()

    report = tmp_path / "report"
    assert evaluate.main(["--predictions", str(out), "--labels", str(root / "delta"), "--split", "test",
                          "--output", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["rows"] == {"matched": n, "predictions_without_label": 0, "labels_without_prediction": 0}
    # the Spark aggregates equal the same numbers computed here from the rows
    labels = pd.concat(pq.read_table(layout.local_path(f)).to_pandas()
                       for f in layout.table_files(str(root / "delta" / "faces")) if "split=test" in f)
    joined = rows.merge(labels[["face_id", "age", "gender"]], on="face_id")
    err = joined.predicted_age - joined.age
    o = metrics["overall"]
    assert o["count"] == n and o["mae"] == pytest.approx(err.abs().mean(), rel=1e-5)
    assert o["rmse"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-5)
    assert o["cs5"] == pytest.approx((err.abs() <= 5).mean()) and o["bias"] == pytest.approx(err.mean(), rel=1e-5)
    slices = pd.read_csv(report / "slices.csv")
    for name in ("age_group", "gender", "race", "dataset"):
        assert slices[slices.slice == name]["count"].sum() == n
    female = slices[(slices.slice == "gender") & (slices.value == "female")]
    if len(female):
        assert female["mae"].iloc[0] == pytest.approx(err[joined.gender == 1].abs().mean(), rel=1e-5)
    assert np.array(metrics["confusion"]["counts"]).sum() == n
    true_groups = np.array(metrics["confusion"]["counts"]).sum(axis=1)
    assert true_groups.tolist() == [int(((joined.age >= lo) & (joined.age < hi)).sum()) for lo, hi in
                                    zip(evaluate_steps.AGE_GROUP_BOUNDS, evaluate_steps.AGE_GROUP_BOUNDS[1:] + (999,))]
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(metrics["plots"]) and runtime.model_id(str(plain)) in page
    assert {"confusion.png", "mae_by_age_group.png", "pred_vs_true.png", "uncertainty.png", "reliability.png",
            "risk_coverage.png", "training_curves.png"} == set(metrics["plots"])  # a std; its metrics.jsonl found
    assert 0 <= metrics["uncertainty"]["within_1sd"] <= metrics["uncertainty"]["within_2sd"] <= 1
    assert all(s["mae_low"] <= s["mae"] <= s["mae_high"] for s in metrics["slices"] if s["count"] > 1)
    assert "file:" not in page.split("<h2>")[1]  # the header shows paths, not raw URIs
    assert all((report / p).stat().st_size > 5000 for p in metrics["plots"])

    # without --split, the train and val labels have no prediction: counted, not dropped
    everything = tmp_path / "report-all"
    assert evaluate.main(["--predictions", str(out), "--labels", str(root / "delta"), "--output",
                          str(everything)]) == 0
    rows_all = json.loads((everything / "metrics.json").read_text())["rows"]
    assert rows_all["matched"] == n
    assert rows_all["labels_without_prediction"] == total - n


def test_spark_submit_score_to_csv_and_evaluate_against_a_manifest(bundles, tables, tmp_path):
    root, manifest, _ = tables
    plain, _ = bundles
    photos = root / "photos"  # the fixture's source photos: ages in their names
    out = tmp_path / "scored"
    proc = subprocess.run([spark_submit(), "--master", "local[2]", str(REPO / "spark_jobs" / "score.py"),
                           "--model", str(plain), "--input", str(photos), "--output", str(out), "--format", "csv",
                           "--aligned"],  # the fixture's photos are aligned chips
                          cwd=tmp_path, env=venv_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "80 photos = 80 with faces" in proc.stdout
    labels = tmp_path / "labels.csv"
    names = sorted(os.listdir(photos))
    # the same files in the three spellings users write: a plain path, file:/ and file:/// (all must match)
    spellings = ("{}", "file:{}", "file://{}")
    pd.DataFrame({"path": [spellings[i % 3].format(photos / n) for i, n in enumerate(names[:70])],
                  "age": [int(n.split("_")[0]) for n in names[:70]]}).to_csv(labels, index=False)
    report = tmp_path / "report"
    assert evaluate.main(["--predictions", str(out), "--labels", str(labels), "--output", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["join_key"] == "source_path"
    assert metrics["rows"] == {"matched": 70, "predictions_without_label": 10, "labels_without_prediction": 0}


def test_bad_inputs_are_refused_clearly(bundles, tmp_path, capsys):
    plain, _ = bundles
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    inputs = tmp_path / "in"  # beside the outputs, not above them (an output inside an input is refused first)
    inputs.mkdir()
    assert score.main(["--model", str(tmp_path / "junk.pt"), "--input", str(inputs), "--output",
                       str(tmp_path / "o")]) == 2
    assert "unreadable, corrupt" in capsys.readouterr().err
    assert score.main(["--model", str(plain), "--input", str(tmp_path / "missing"), "--output",
                       str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert evaluate.main(["--predictions", str(tmp_path / "missing"), "--labels", str(inputs),
                          "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no such table" in err and "spark_jobs/score.py" in err and "_SUCCESS" not in err, err
    # a score output whose write did not finish (no _SUCCESS): the job to rerun is score, not prepare
    half = tmp_path / "half" / "predictions"
    half.mkdir(parents=True)
    pd.DataFrame({"face_id": ["a"], "predicted_age": [30.0]}).to_parquet(half / "part-00000.parquet")
    assert evaluate.main(["--predictions", str(tmp_path / "half"), "--labels", str(inputs),
                          "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no _SUCCESS marker" in err and "Rerun spark_jobs/score.py" in err and "prepare" not in err, err
    assert len(err.strip().splitlines()) == 1
    # a folder of something else entirely is still named as not a score output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    (tmp_path / "other" / "_SUCCESS").write_text("")
    assert evaluate.main(["--predictions", str(tmp_path / "other"), "--labels", str(inputs),
                          "--output", str(tmp_path / "r")]) == 2
    assert "not a score output" in capsys.readouterr().err


def test_two_models_of_the_same_file_name_score_in_one_session(bundles, tables, tmp_path):
    """SparkContext.addFile refuses a second file of the same name with other bytes: each model ships
    under a name unique to its content."""
    import shutil

    root, _, _ = tables
    plain, _ = bundles
    other = torch.load(plain, weights_only=True)
    other["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in other["state_dict"].items()}
    for name, make in (("a", lambda p: shutil.copy(plain, p)), ("b", lambda p: torch.save(other, p))):
        (tmp_path / name).mkdir()
        make(tmp_path / name / "model.pt")
        assert score.main(["--model", str(tmp_path / name / "model.pt"), "--input", str(root / "pq"),
                           "--split", "val", "--output", str(tmp_path / f"scored-{name}")]) == 0
    a, b = _rows(tmp_path / "scored-a"), _rows(tmp_path / "scored-b")
    assert set(a.model_id) != set(b.model_id) and len(a) == len(b)
    assert not np.allclose(a.sort_values("face_id").predicted_age, b.sort_values("face_id").predicted_age)


def test_predict_without_spark_gives_the_numbers_score_gives(bundles, tmp_path):
    """spark_jobs.predict (no JVM) and spark_jobs/score.py on the same photos: the same faces, boxes and ages."""
    import subprocess
    import sys

    from spark_jobs import predict

    _, detecting = bundles
    folder = tmp_path / "photos"
    expected = _mixed_folder(folder)
    out = tmp_path / "scored"
    assert score.main(["--model", str(detecting), "--input", str(folder), "--output", str(out)]) == 0
    rows = _rows(out)
    scored = {(Path(r.source_path).name, r.face_index): (r.predicted_age, list(r.bbox))
              for r in rows.itertuples() if r.status == "ok"}
    predicted = predict.estimate_ages(str(folder), str(detecting))
    got = {(Path(r["source"]).name, r["face_index"]): (r["age"], r["bbox"]) for r in predicted if r["status"] == "ok"}
    assert got.keys() == scored.keys() and len(got) == expected["faces"]
    for key, (age, box) in got.items():
        assert age == pytest.approx(scored[key][0], abs=1e-3) and box == pytest.approx(scored[key][1], abs=1e-3)
    statuses = {Path(r["source"]).name: r["status"] for r in predicted if r["status"] != "ok"}
    assert statuses["no_face.jpg"] == "no_face" and statuses["not_an_image.jpg"] == "not_an_image"

    photo = Image.open(folder / "sub" / "one face.PNG")  # a PIL image and an array: the file's numbers
    from_file = predict.estimate_ages(str(folder / "sub" / "one face.PNG"), str(detecting))
    for given in (photo, np.asarray(photo.convert("RGB"))):
        again = predict.estimate_ages(given, str(detecting))
        assert [r["age"] for r in again] == pytest.approx([r["age"] for r in from_file], abs=1e-4)

    proc = subprocess.run([sys.executable, "-m", "spark_jobs.predict", str(folder / "two_faces.jpg"), "--model",
                           str(detecting), "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["face_index"] for r in lines] == [0, 1]
    assert [r["age"] for r in lines] == pytest.approx([scored[("two_faces.jpg", i)][0] for i in (0, 1)], abs=1e-3)
    assert "SparkContext" not in proc.stderr and "spark" not in proc.stderr.lower()  # no JVM started
