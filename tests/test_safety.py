"""Do no harm: hostile and mistaken inputs against every stage (real Spark, real files, made at test time).

Class 1: never delete or replace what faceage did not write; nothing a reader accepts before every check.
Class 2: no silently wrong number (framing at scoring, duplicate keys, non-finite values, bad flags).
Class 3: one bad file name or label never stops a job.
Class 4: a user's mistake is one line `<stage>: error: ...` and exit 2, credentials redacted.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, encode, synthetic_face, synthetic_photo
from schemas import layout
from shell import cli, outputs
from spark_jobs import evaluate, prepare, score
from trainer.runtime import framing
from trainer import train, tune


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


def faces_folder(folder: Path, n: int = 6, start: int = 0) -> Path:
    """n aligned drawn faces (detector none) with UTKFace-style names."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        age = 20 + i
        (folder / f"{age}_0_0_2026010100{i:05d}.jpg").write_bytes(encode(synthetic_face(age, seed=500 + i, size=64)))
    return folder


NONE = ["--detector", "none", "--size", "32"]


def one_error_line(stderr: str, stage: str) -> str:
    """The job's own words on stderr are exactly one `<stage>: error: ...` line (a JVM starting inside the
    test may add its start-up lines around it), and no traceback."""
    ours = [line for line in stderr.splitlines() if line.startswith(("prepare:", "score:", "evaluate:", "train:",
                                                                     "tune:", "emr:", "predict:"))]
    assert len(ours) == 1 and ours[0].startswith(f"{stage}: error: "), stderr
    assert "Traceback" not in stderr and "Py4J" not in stderr
    return ours[0]


# ============================================================================ class 1: data loss

def test_overwrite_refuses_folders_faceage_did_not_write(spark, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "faces").mkdir(parents=True)
    (out / "faces" / "holiday-2019.jpg").write_bytes(b"precious photo")
    (out / "rejects").mkdir()
    (out / "rejects" / "letter.txt").write_text("precious letter")
    photos = faces_folder(tmp_path / "photos")
    assert prepare.main(["--input", str(photos), "--output", str(out)] + NONE) == 2
    line = one_error_line(capsys.readouterr().err, "prepare")
    assert "faces there is a folder of 1 entry (holiday-2019.jpg) that faceage did not write" in line
    assert (out / "faces" / "holiday-2019.jpg").read_bytes() == b"precious photo"
    assert (out / "rejects" / "letter.txt").read_text() == "precious letter"
    assert sorted(p.name for p in out.iterdir()) == ["faces", "rejects"]  # no staging, no manifest left behind


def test_a_users_manifest_json_is_not_replaced(spark, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"mine": true}')
    assert prepare.main(["--input", str(faces_folder(tmp_path / "p")), "--output", str(out)] + NONE) == 2
    assert "manifest.json there is a file that faceage did not write" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == '{"mine": true}'


def test_a_symlinked_input_inside_the_output_is_refused(spark, tmp_path, capsys):
    out = tmp_path / "out"
    photos = faces_folder(out / "faces")  # the user's photos happen to sit where the table would go
    link = tmp_path / "photos-link"
    link.symlink_to(photos)
    assert prepare.main(["--input", str(link), "--output", str(out)] + NONE) == 2
    line = one_error_line(capsys.readouterr().err, "prepare")
    assert "is inside --output" in line and "links resolved" in line
    assert len(list(photos.iterdir())) == 6
    # and an output that is a link into the input
    out_link = tmp_path / "out-link"
    out_link.symlink_to(photos)
    assert prepare.main(["--input", str(photos), "--output", str(out_link)] + NONE) == 2
    assert "is inside --input" in capsys.readouterr().err


def test_the_same_input_twice_is_read_once_and_nested_inputs_are_refused(spark, tmp_path, capsys):
    photos = faces_folder(tmp_path / "photos")
    faces_folder(photos / "sub", n=2, start=10)
    out = tmp_path / "out"
    assert prepare.main(["--input", str(photos), "--input", str(photos) + "/", "--output", str(out)] + NONE) == 0
    manifest = strict_json(out / "manifest.json")
    assert manifest["counts"] == {"inputs": 8, "faces": 8, "rejects": 0}
    assert prepare.main(["--input", str(photos), "--input", str(photos / "sub"), "--output",
                         str(tmp_path / "out2")] + NONE) == 2
    assert "is inside --input" in one_error_line(capsys.readouterr().err, "prepare")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_a_failed_check_leaves_the_previous_table_exactly_as_it_was(spark, tmp_path, monkeypatch, fmt):
    out = tmp_path / "out"
    assert prepare.main(["--input", str(faces_folder(tmp_path / "a", 4)), "--output", str(out),
                         "--format", fmt] + NONE) == 0
    snapshot = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    before = sorted(layout.table_files(str(out / "faces")))

    def broken(n_inputs, summary):
        raise RuntimeError("accounting error: simulated")
    monkeypatch.setattr(prepare, "check_accounting", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare.main(["--input", str(faces_folder(tmp_path / "b", 7, start=20)), "--output", str(out),
                      "--format", fmt] + NONE)
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == snapshot  # every file, byte for byte; no staging folder left
    assert sorted(layout.table_files(str(out / "faces"))) == before


def test_overwrite_replaces_faceages_own_table_and_parquet_append_commits_once(spark, tmp_path):
    out = tmp_path / "out"
    assert prepare.main(["--input", str(faces_folder(tmp_path / "a", 4)), "--output", str(out)] + NONE) == 0
    assert json.loads((out / "faces" / outputs.MARKER).read_text())["writer"] == "faceage"
    assert prepare.main(["--input", str(faces_folder(tmp_path / "b", 3, start=10)), "--output", str(out)]
                        + NONE) == 0
    rows = [r for uri in layout.table_files(str(out / "faces")) for r in pq.read_table(uri[7:]).to_pylist()]
    assert sorted(r["age"] for r in rows) == [30, 31, 32]  # replaced, not mixed
    assert prepare.main(["--input", str(faces_folder(tmp_path / "c", 2, start=40)), "--output", str(out),
                         "--mode", "append"] + NONE) == 0
    rows = [r for uri in layout.table_files(str(out / "faces")) for r in pq.read_table(uri[7:]).to_pylist()]
    assert sorted(r["age"] for r in rows) == [30, 31, 32, 60, 61]
    assert (out / "faces" / "_SUCCESS").exists() and not list(out.glob("_faceage_staging_*"))
    assert prepare.main(["--input", str(tmp_path / "c"), "--output", str(out), "--mode", "append",
                         "--format", "delta"] + NONE) == 2  # append in another format: refused


def test_score_and_evaluate_never_replace_a_users_files(bundles, tables, tmp_path, capsys):
    root, _, _ = tables
    plain, _ = bundles
    out = tmp_path / "scored"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "thesis.docx").write_bytes(b"years of work")
    assert score.main(["--model", str(plain), "--input", str(root / "pq"), "--split", "test", "--output", str(out),
                       "--mode", "overwrite"]) == 2
    assert "thesis.docx" in one_error_line(capsys.readouterr().err, "score")
    assert (out / "predictions" / "thesis.docx").read_bytes() == b"years of work"

    good = tmp_path / "scored-ok"
    assert score.main(["--model", str(plain), "--input", str(root / "pq"), "--split", "test",
                       "--output", str(good)]) == 0
    assert score.main(["--model", str(plain), "--input", str(root / "pq"), "--split", "test",
                       "--output", str(good), "--mode", "overwrite"]) == 0  # our own: replaced
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").write_text("<p>my own report</p>")
    (report / "notes.txt").write_text("keep me")
    assert evaluate.main(["--predictions", str(good), "--labels", str(root / "pq"), "--split", "test",
                          "--output", str(report)]) == 2
    assert "report.html there is a file that faceage did not write" in capsys.readouterr().err
    assert (report / "report.html").read_text() == "<p>my own report</p>"
    (report / "report.html").unlink()
    assert evaluate.main(["--predictions", str(good), "--labels", str(root / "pq"), "--split", "test",
                          "--output", str(report)]) == 0
    assert (report / "notes.txt").read_text() == "keep me"  # unrelated files stay
    assert evaluate.main(["--predictions", str(good), "--labels", str(root / "pq"), "--split", "test",
                          "--output", str(report)]) == 0  # its own report: replaced
    assert not [p for p in report.iterdir() if p.name.startswith("_faceage_staging_")]


def test_train_never_overwrites_a_users_files(tables, tmp_path, capsys, s3_server, monkeypatch):
    root, _, _ = tables
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"my own model, not faceage's")
    assert train.main(["--data", str(root / "pq"), "--output", str(run), "--epochs", "1"]) == 2
    assert "model.pt there is a file that faceage did not write" in one_error_line(capsys.readouterr().err, "train")
    assert (run / "model.pt").read_bytes() == b"my own model, not faceage's"
    monkeypatch.chdir(tmp_path)
    # a URI is a URI: a bucket that is not there is one line, and no local folder named after the scheme
    assert train.main(["--data", str(root / "pq"), "--output", "s3://no-such-bucket/run", "--epochs", "1"]) == 2
    assert "the bucket does not exist" in one_error_line(capsys.readouterr().err, "train")
    assert not Path("s3:").exists()


# ============================================================================ class 2: wrong numbers

def test_a_model_trained_on_aligned_chips_detects_faces_in_photos(bundles, tmp_path):
    """The bundle records its framing; photos are detected and aligned to it even though its training
    crops came from --detector none. --aligned scores the whole image (chips)."""
    plain, _ = bundles
    bundle = torch.load(plain, weights_only=True)
    assert bundle["crop"]["detector"] == "none"
    assert "framing" not in bundle  # stored once, in the crop settings it is derived from
    assert framing(bundle)["template"] == "utkface-chip-5pt" and framing(bundle)["margin"] == 0.0
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, age in enumerate((25, 40, 61)):
        photo, _ = synthetic_photo(age, seed=40 + i)
        (photos / f"{age}_0_0_2026010100000{i}.jpg").write_bytes(encode(photo, quality=95))
    detected, whole = tmp_path / "detected", tmp_path / "whole"
    assert score.main(["--model", str(plain), "--input", str(photos), "--output", str(detected)]) == 0
    assert score.main(["--model", str(plain), "--input", str(photos), "--output", str(whole), "--aligned"]) == 0
    manifest = strict_json(detected / "score_manifest.json")
    assert manifest["photo_crop"]["detector"] == "yunet" and manifest["counts"]["photos_with_faces"] == 3
    a = pd.concat(pq.read_table(p).to_pandas() for p in (detected / "predictions").glob("*.parquet"))
    b = pd.concat(pq.read_table(p).to_pandas() for p in (whole / "predictions").glob("*.parquet"))
    boxes = np.stack(a[a.face_index == 0].bbox.to_numpy())
    assert ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) < 0.5 * 640 * 480).all()  # a face, not the photo
    whole_boxes = np.stack(b.bbox.to_numpy())
    assert np.allclose(whole_boxes[:, 2] - whole_boxes[:, 0], 480)  # centre square of the whole photo


def test_evaluate_counts_duplicates_and_non_finite_values_and_refuses_conflicts(spark, tmp_path, capsys):
    from schemas import fields as schema_fields
    from schemas.tables import PREDICTIONS

    n = 10
    paths = [f"file:/photos/{i}.jpg" for i in range(n)]
    rows = [{f.name: None for f in PREDICTIONS} for _ in range(n + 4)]
    for i, row in enumerate(rows[:n]):
        row.update(source_path=paths[i], face_index=0, predicted_age=31.5 + i, uncertainty=2.0, status="ok",
                   model_id="m", score_run_id="r")
    rows[n].update(source_path="file:/photos/nan.jpg", face_index=0, predicted_age=float("nan"), status="ok",
                   model_id="m", score_run_id="r")
    rows[n + 1].update(source_path="file:/photos/inf.jpg", face_index=0, predicted_age=float("inf"), status="ok",
                       model_id="m", score_run_id="r")
    for i, absurd in enumerate((1e30, -5.0)):  # finite, but no age a model may predict (0..120)
        rows[n + 2 + i].update(source_path=f"file:/photos/absurd{i}.jpg", face_index=0, predicted_age=absurd,
                               status="ok", model_id="m", score_run_id="r")
    preds = tmp_path / "scored" / "predictions"
    spark.createDataFrame(rows, schema_fields.spark_schema(PREDICTIONS)).write.parquet(str(preds))
    labels = tmp_path / "labels.csv"
    lines = ["path,age"] + [f"{p},{30 + i}" for i, p in enumerate(paths)]
    lines += [f"{paths[0]},30", f"{paths[1]},31", f"{paths[2]},32",  # 3 identical repeats
              "file:/photos/nan.jpg,44", "file:/photos/absurd0.jpg,40", "file:/photos/absurd1.jpg,3",
              "file:/photos/x.jpg,NaN", "file:/photos/y.jpg,abc", "file:/photos/z.jpg,"]
    labels.write_text("\n".join(lines) + "\n")
    report = tmp_path / "report"
    assert evaluate.main(["--predictions", str(tmp_path / "scored"), "--labels", str(labels),
                          "--output", str(report)]) == 0
    metrics = strict_json(report / "metrics.json")
    assert metrics["rows"] == {"matched": n, "predictions_without_label": 0, "labels_without_prediction": 3}
    assert metrics["excluded"] == {"non_finite_prediction": 2, "out_of_range_prediction": 2, "invalid_label": 3,
                                   "duplicate_label_key": 3, "duplicate_prediction_key": 0}
    assert metrics["overall"]["mae"] == pytest.approx(1.5) and metrics["overall"]["count"] == n
    assert np.array(metrics["confusion"]["counts"]).sum() == n

    labels.write_text(labels.read_text() + f"{paths[3]},70\n")  # the same key, another age
    assert evaluate.main(["--predictions", str(tmp_path / "scored"), "--labels", str(labels),
                          "--output", str(tmp_path / "r2")]) == 2
    line = one_error_line(capsys.readouterr().err, "evaluate")
    assert "appear more than once with different values" in line and "/photos/3.jpg" in line


def test_prepare_conflicting_manifest_labels_become_bad_label_rejects(spark, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, age in (("a.jpg", 25), ("b.jpg", 40), ("c.jpg", 33), ("d.jpg", 50)):
        (photos / name).write_bytes(encode(synthetic_face(age, seed=age, size=64)))
    labels = tmp_path / "labels.csv"
    labels.write_text("path,age,gender\na.jpg,25,0\na.jpg,70,0\n"  # conflicting
                      f"b.jpg,40,1\n{photos}/b.jpg,40,1\n"  # the same label twice (relative and absolute)
                      "c.jpg,abc,0\nd.jpg,50,x\n")  # values no cast can take
    out = tmp_path / "out"
    assert prepare.main(["--input", str(photos), "--output", str(out), "--labels", f"manifest:{labels}"]
                        + NONE) == 0
    rejects = {Path(r["source_path"]).name: r for uri in layout.table_files(str(out / "rejects"))
               for r in pq.read_table(uri[7:]).to_pylist()}
    assert rejects["a.jpg"]["reason"] == "bad_label" and "more than once with different labels" in rejects["a.jpg"]["detail"]
    assert rejects["c.jpg"]["reason"] == "bad_label" and "'abc' is not a number" in rejects["c.jpg"]["detail"]
    assert rejects["d.jpg"]["reason"] == "bad_label" and "gender 'x'" in rejects["d.jpg"]["detail"]
    faces = [r for uri in layout.table_files(str(out / "faces")) for r in pq.read_table(uri[7:]).to_pylist()]
    assert [(Path(r["source_path"]).name, r["age"], r["gender"]) for r in faces] == [("b.jpg", 40, 1)]


@pytest.mark.parametrize("flags, message", [
    (["--splits", "nan,nan,nan"], "three finite, non-negative numbers"),
    (["--splits", "inf,0,0"], "three finite, non-negative numbers"),
    (["--min-score", "nan"], "argument --min-score: 'nan' is not a finite number"),
    (["--min-score", "1.5"], "must be <= 1"),
    (["--max-pixels", "-1"], "must be >= 1"),
    (["--size", "0"], "must be >= 16"),
    (["--margin", "inf"], "not a finite number"),
    (["--max-file-bytes", "1e3"], "is not a whole number"),
])
def test_numeric_flags_are_finite_and_in_range(tmp_path, flags, message):
    (tmp_path / "in").mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "spark_jobs" / "prepare.py"), "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "out"), *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in one_error_line(proc.stderr, "prepare")
    assert not (tmp_path / "out").exists()


def test_filters_that_match_nothing_are_errors(bundles, spark, tmp_path, capsys):
    plain, _ = bundles
    photos = faces_folder(tmp_path / "photos", 3)
    out = tmp_path / "only-train"
    assert prepare.main(["--input", str(photos), "--output", str(out), "--splits", "1,0,0"] + NONE) == 0
    assert score.main(["--model", str(plain), "--input", str(out), "--split", "test",
                       "--output", str(tmp_path / "s")]) == 2
    assert "no rows in that split" in one_error_line(capsys.readouterr().err, "score")
    assert score.main(["--model", str(plain), "--input", str(out), "--split", "testing",
                       "--output", str(tmp_path / "s")]) == 2
    assert "invalid choice: 'testing'" in one_error_line(capsys.readouterr().err, "score")
    assert not (tmp_path / "s").exists()


# ============================================================================ class 3: one bad entry

def test_hostile_file_names_become_rows_not_crashes(spark, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["25_0_0_2026-01-01 12:00:00.jpg", "26_0_0_100%.jpg", "27_0_0_#1.jpg", "28_0_0_why?.jpg",
             "29_0_0_naïve café 東京.jpg", "30_0_0_a:b:c.png"]
    for i, name in enumerate(names):
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        (photos / name).write_bytes(encode(synthetic_face(25 + i, seed=600 + i, size=64), fmt))
    raw_name = os.fsencode(str(photos)) + b"/31_0_0_\xff\xfe-latin1-\xe9.jpg"  # not UTF-8
    with open(raw_name, "wb") as f:
        f.write(encode(synthetic_face(31, seed=700, size=64)))
    (photos / "notes: todo.txt").write_text("not an image")
    out = tmp_path / "out"
    assert prepare.main(["--input", str(photos), "--output", str(out)] + NONE) == 0
    manifest = strict_json(out / "manifest.json")
    assert manifest["counts"] == {"inputs": 8, "faces": 7, "rejects": 1}
    faces = {Path(r["source_path"]).name: r["age"] for uri in layout.table_files(str(out / "faces"))
             for r in pq.read_table(uri[7:]).to_pylist()}
    assert {n: faces[n] for n in names} == {n: 25 + i for i, n in enumerate(names)}  # names as written
    assert faces["31_0_0_\\xff\\xfe-latin1-\\xe9.jpg"] == 31  # undecodable bytes shown as \xNN


# ============================================================================ class 4: mistakes -> one line

@pytest.fixture(scope="module")
def trained_run(tables, tmp_path_factory):
    root, _, _ = tables
    run = tmp_path_factory.mktemp("train") / "run"
    assert train.main(["--data", str(root / "pq"), "--output", str(run), "--epochs", "1", "--image-size", "32",
                      "--batch-size", "16", "--workers", "1", "--reader", "pyarrow", "--no-progress"]) == 0
    return run


TINY = ["--epochs", "2", "--image-size", "32", "--batch-size", "16", "--workers", "1", "--reader", "pyarrow",
        "--no-progress"]


def test_resume_refuses_other_settings_and_broken_checkpoints(tables, trained_run, tmp_path, capsys):
    root, _, _ = tables
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    base = ["--data", str(root / "pq"), "--output", str(run), "--resume"] + TINY
    assert train.main(base + ["--head", "regression"]) == 2
    assert "--head 'distribution' then, 'regression' now" in one_error_line(capsys.readouterr().err, "train")
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])  # truncated
    assert train.main(base) == 2
    assert "not a readable checkpoint" in one_error_line(capsys.readouterr().err, "train")

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    torch.save({"model": Payload()}, ckpt)
    assert train.main(base) == 2
    assert "holding code that will not be run" in one_error_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "pwned").exists()


def test_resuming_a_onecycle_run_for_more_epochs_is_one_line_and_keeps_the_checkpoint(tables, trained_run,
                                                                                   tmp_path, capsys):
    """OneCycle is planned over --epochs: going on past them used to step the scheduler past its end (a
    39-line ValueError). Now one line says how; the checkpoint is as it was."""
    root, _, _ = tables
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "checkpoint.pt").read_bytes()
    assert train.main(["--data", str(root / "pq"), "--output", str(run), "--resume"] + TINY) == 2  # 1 -> 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "OneCycle schedule planned over --epochs 1" in line and "--epochs 2" in line
    assert (run / "checkpoint.pt").read_bytes() == before
    assert train.main(["--data", str(root / "pq"), "--output", str(run), "--resume", "--schedule", "cyclic_plateau"]
                      + TINY) == 2  # the schedule must match too: said the usual way
    assert "--schedule 'onecycle' then, 'cyclic_plateau' now" in one_error_line(capsys.readouterr().err, "train")


@pytest.mark.parametrize("params, message", [
    ({"epochs": "1"}, "epochs must be a whole number, not \"1\""),
    ({"head": "vgg16"}, "head \"vgg16\" is not one of ['regression', 'distribution']"),
    ({"lr": None}, "lr is null"),
    (None, "holds a JSON NoneType"),
    ({"batch_size": 0}, "batch_size: 0 must be >= 1"),
    ({"epochs": 1.5}, "is not a whole number"),
    ({"no_such_flag": 1}, "unknown keys ['no_such_flag']"),
])
def test_params_files_go_through_the_flag_validation(tables, tmp_path, capsys, params, message):
    root, _, _ = tables
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    assert train.main(["--data", str(root / "pq"), "--output", str(tmp_path / "run"), "--params", str(path)]) == 2
    assert message in one_error_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "run").exists()


def test_train_mistakes_are_one_line(tables, tmp_path, capsys):
    root, _, _ = tables
    assert train.main(["--data", str(root / "pq"), "--batch-size", "0"]) == 2
    assert "argument --batch-size: '0' must be >= 1" in one_error_line(capsys.readouterr().err, "train")
    assert train.main(["--data", str(root / "delta"), "--data-version", "99", "--output", str(tmp_path / "r")]
                     + TINY) == 2
    assert "Delta version 99 does not exist (versions 0..1)" in one_error_line(capsys.readouterr().err, "train")


def test_a_diverging_run_stops_at_once_and_says_so(tables, tmp_path, capsys):
    root, _, _ = tables
    out = tmp_path / "run"
    code = train.main(["--data", str(root / "pq"), "--output", str(out), "--optimizer", "sgd", "--lr", "1000",
                      "--schedule", "constant", "--weight-decay", "0"] + TINY)
    assert code == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "training diverged" in line and "Lower --lr" in line
    assert not (out / "metrics.jsonl").read_text().strip()  # no epoch was recorded as if it were fine
    assert not (out / "model.pt").exists()


def test_a_run_whose_finite_loss_explodes_stops_and_keeps_the_last_good_checkpoint(tables, tmp_path, capsys):
    # the default optimizer and schedule at --lr 1000: the loss stays finite (~1e7) while the val MAE in eval
    # mode looks ordinary (~25): the training ages left 0..120
    root, _, _ = tables
    out = tmp_path / "run"
    assert train.main(["--data", str(root / "pq"), "--output", str(out), "--lr", "1000"] + TINY) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "training diverged" in line and "after epoch 1" in line and "Lower --lr" in line, line
    assert not (out / "metrics.jsonl").read_text().strip() and not (out / "model.pt").exists()


def test_tune_checks_data_before_creating_a_study_and_redacts_passwords(tables, tmp_path, capsys, s3_server,
                                                                       monkeypatch):
    root, _, _ = tables
    out = tmp_path / "tune"
    assert tune.main(["--data", str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert "--data" in one_error_line(capsys.readouterr().err, "tune")
    assert not out.exists()  # no study database left to confuse the rerun
    monkeypatch.chdir(tmp_path)
    assert tune.main(["--data", str(root / "pq"), "--output", "s3://no-such-bucket/tune", "--n-trials", "1",
                      "--epochs", "1", "--train-args", "--image-size 32 --batch-size 16 --reader pyarrow"]) == 2
    assert "the bucket does not exist" in one_error_line(capsys.readouterr().err, "tune")
    assert not os.path.exists("s3:")
    assert tune.main(["--data", str(root / "pq"), "--output", str(out), "--n-trials", "1",
                     "--storage", "postgresql+psycopg://faceage:S3cretPassw0rd@127.0.0.1:1/optuna"]) == 2
    line = one_error_line(capsys.readouterr().err, "tune")
    assert "S3cretPassw0rd" not in line and "faceage:***@127.0.0.1" in line


def test_a_bundle_with_numbers_no_model_can_mean_is_refused_at_load(bundles, tmp_path, capsys):
    from spark_jobs import predict

    plain, _ = bundles
    photo = tmp_path / "30_0_0_20260101000001.jpg"
    photo.write_bytes(encode(synthetic_face(30, seed=3, size=64)))
    assert predict.main([str(photo), "--model", str(plain), "--aligned"]) == 0  # the bundle itself is fine
    capsys.readouterr()
    for change, words in ((lambda b: b["state_dict"]["fc.weight"].fill_(float("nan")), "NaN or infinite"),
                          (lambda b: b["state_dict"]["conv1.weight"].view(-1)[0].fill_(float("inf")), "NaN or infinite"),
                          (lambda b: b["normalize"].update(std=[0.2, 0.0, 0.2]), "std above 0")):
        bundle = torch.load(plain, weights_only=True)
        change(bundle)
        broken = tmp_path / "broken.pt"
        torch.save(bundle, broken)
        assert predict.main([str(photo), "--model", str(broken), "--aligned"]) == 2
        captured = capsys.readouterr()
        assert words in one_error_line(captured.err, "predict") and "age nan" not in captured.out


def test_score_refuses_a_bundle_whose_weights_do_not_fit_its_head(bundles, tmp_path, capsys):
    plain, _ = bundles
    bundle = torch.load(plain, weights_only=True)
    bundle["head"] = "regression"  # distribution weights, regression head
    bad = tmp_path / "bad.pt"
    torch.save(bundle, bad)
    assert score.main(["--model", str(bad), "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "weights do not fit a ResNet-18 with the regression head" in \
        one_error_line(capsys.readouterr().err, "score")
    bundle = torch.load(plain, weights_only=True)
    bundle["crop"] = {"size": 32, "detector": "mtcnn"}
    torch.save(bundle, bad)
    assert score.main(["--model", str(bad), "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "crop settings not usable" in one_error_line(capsys.readouterr().err, "score")


def test_redaction_covers_urls_keys_and_secret_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY")
    text = ("cannot open postgresql://bob:hunter2@db/x; s3a://AKIA:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY@b/p; "
            "--conf spark.hadoop.fs.s3a.secret.key=abc123 password=pw1 token: tk9")
    out = cli.redact(text)
    for secret in ("hunter2", "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY", "abc123", "pw1", "tk9"):
        assert secret not in out
    assert "postgresql://bob:***@db/x" in out
    assert cli.dumps({"a": float("nan"), "b": [float("inf"), 1.0]}) == '{\n  "a": null,\n  "b": [\n    null,\n    1.0\n  ]\n}'


def test_inputs_in_one_flag_or_repeated_and_mode_error(spark, tmp_path, capsys):
    a, b = faces_folder(tmp_path / "a", 2), faces_folder(tmp_path / "b", 3, start=10)
    out = tmp_path / "out"
    assert prepare.main(["--input", str(a), str(b), "--output", str(out)] + NONE) == 0  # nargs form
    assert strict_json(out / "manifest.json")["counts"]["inputs"] == 5
    before = sorted(layout.table_files(str(out / "faces")))
    assert prepare.main(["--input", str(a), "--input", str(b), "--output", str(out), "--mode", "error"] + NONE) == 2
    assert "already holds tables (--mode error)" in one_error_line(capsys.readouterr().err, "prepare")
    assert sorted(layout.table_files(str(out / "faces"))) == before


def test_score_refuses_an_output_inside_its_photo_folder(bundles, tmp_path, capsys):
    _, detecting = bundles
    photos = faces_folder(tmp_path / "photos", 2)
    assert score.main(["--model", str(detecting), "--input", str(photos), "--output", str(photos / "scored")]) == 2
    assert "is inside --input" in one_error_line(capsys.readouterr().err, "score")
    link = tmp_path / "out-link"
    link.symlink_to(photos)
    assert score.main(["--model", str(detecting), "--input", str(photos), "--output", str(link)]) == 2
    assert "is inside --input" in one_error_line(capsys.readouterr().err, "score")
    assert not (photos / "scored").exists() and len(list(photos.iterdir())) == 2  # nothing written into the input


def test_every_stage_refuses_an_output_that_overlaps_an_input_both_ways(tables, bundles, tmp_path, capsys):
    """One overlap rule for every stage and every input (tables, label files, the model), links resolved:
    nothing is written into the input, and each refusal is one line."""
    root, _, _ = tables
    plain, _ = bundles
    data = root / "pq"
    before = sorted(p.name for p in (data / "faces").iterdir())
    link = tmp_path / "data-link"
    link.symlink_to(data)
    scored = tmp_path / "scored"
    cases = [
        (evaluate.main, "evaluate", ["--predictions", str(scored), "--labels", str(data), "--output",
                                     str(data / "faces")], "is inside --labels"),
        (evaluate.main, "evaluate", ["--predictions", str(scored), "--labels", str(data / "faces"), "--output",
                                     str(link)], "is inside --output"),
        (evaluate.main, "evaluate", ["--predictions", str(data), "--labels", str(tmp_path / "l.csv"), "--output",
                                     str(link / "report")], "is inside --predictions"),
        (train.main, "train", ["--data", str(data), "--output", str(link / "faces" / "run"), "--epochs", "1"],
         "is inside --data"),
        (train.main, "train", ["--data", str(data), "--output", str(tmp_path / "run"), "--bundle",
                               str(data / "model.pt"), "--epochs", "1"], "--bundle"),
        (tune.main, "tune", ["--data", str(data), "--output", str(data / "study"), "--n-trials", "1"],
         "is inside --data"),
        (score.main, "score", ["--model", str(plain), "--input", str(data / "faces"), "--output",
                               str(data / "faces" / "scored")], "is inside --input"),
        (score.main, "score", ["--model", str(plain), "--input", str(data / "faces"), "--output", str(link)],
         "is inside --output"),
        (score.main, "score", ["--model", str(plain), "--input", str(data / "faces"), "--output",
                               str(plain.parent)], "--model"),
    ]
    for main, stage, argv, words in cases:
        assert main(argv) == 2, argv
        assert words in one_error_line(capsys.readouterr().err, stage), argv
    assert sorted(p.name for p in (data / "faces").iterdir()) == before  # no lock, no report, no run inside
    assert not (data / "study").exists() and not (data / "model.pt").exists()


def test_a_vacuumed_delta_version_is_one_line_naming_the_oldest_whole_one(spark, tables, tmp_path, capsys):
    """train/score --data-version N after VACUUM removed N's files: one line saying so and which version to
    give (before: `[Errno 2] No such file or directory: .../part-00000-...parquet`)."""
    root, _, _ = tables
    data = tmp_path / "delta"
    shutil.copytree(root / "delta", data)  # versions 0 and 1 (an append)
    faces = data / "faces"
    rows = spark.read.format("delta").load(str(faces)).localCheckpoint(eager=True)
    rows.write.format("delta").mode("overwrite").partitionBy("split").save(str(faces))  # version 2
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    spark.sql(f"VACUUM delta.`{faces}` RETAIN 0 HOURS")
    assert len(layout.table_files(str(faces), 2)) > 0  # the latest reads
    with pytest.raises(ValueError, match="removed by VACUUM .* the oldest version still whole is 2"):
        layout.table_files(str(faces), 0)
    assert train.main(["--data", str(data), "--output", str(tmp_path / "run"), "--data-version", "0"] + TINY) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "version 0's data files were removed by VACUUM" in line and "--data-version 2" in line


@pytest.fixture
def full_disk(tmp_path):
    """A 16 MB tmpfs with about 100 KB left (root only; skipped with the reason where mounting is refused)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {(done.stderr or done.stdout).strip()[:120]}")
    try:
        (mnt / "filler").write_bytes(b"\1" * (shutil.disk_usage(mnt).free - 100_000))
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_is_one_line_with_its_own_exit_code(spark, tables, full_disk, capsys):
    """prepare (the JVM's IOException) and train (torch.save's `basic_ios::clear: iostream error`) on a disk
    that fills up: exit 5, one line saying so, no staging folder or lock left behind; before, a 269-line
    Py4J trace and a 40-line traceback."""
    root, _, _ = tables
    out = full_disk / "out"
    assert prepare.main(["--input", str(root / "photos"), "--output", str(out), "--detector", "none",
                         "--size", "128"]) == cli.DISK_FULL_EXIT
    assert "no space left on the device" in one_error_line(capsys.readouterr().err, "prepare")
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith("_faceage_")]
    run = full_disk / "run"
    assert train.main(["--data", str(root / "pq"), "--output", str(run), "--epochs", "1", "--image-size", "32",
                       "--batch-size", "16", "--workers", "1", "--reader", "pyarrow", "--no-progress"]) \
        == cli.DISK_FULL_EXIT
    assert "no space left on the device" in one_error_line(capsys.readouterr().err, "train")
    assert not (run / "model.pt").exists() and not (run / outputs.LOCK).exists()
