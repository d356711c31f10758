"""The pure pieces on their own: DataFrame -> DataFrame transforms on the session's local Spark, the job
shell, the output rules, the contract readers, and the direction of imports."""
import argparse
import json
import math

import numpy as np
import pytest

from schemas import layout
from shell import cli, outputs
from schemas.crop import CropSettings
from spark_jobs import evaluate_steps, photo_files, prepare, prepare_steps, score

# ============================================================================ prepare's transforms


@pytest.mark.parametrize("path, length, hidden, expected", [
    ("file:/p/a.jpg", 10, False, None),
    ("file:/p/a.JPEG", 10, False, None),
    ("file:/p/a.jpg", None, False, "unreadable"),
    ("file:/p/.a.jpg", 10, True, "hidden_file"),
    ("file:/p/a.txt", 10, False, "unsupported_extension"),
    ("file:/p/a.jpg", 0, False, "empty_file"),
    ("file:/p/a.jpg", 101, False, "too_large"),
])
def test_classify_file(path, length, hidden, expected):
    got = photo_files.classify_file(path, length, hidden, max_file_bytes=100)
    assert (got[0] if got else None) == expected


def test_summarize_and_the_accounting_check():
    rows = [{"reason": None, "split": "train", "decade": 20, "count": 5},
            {"reason": None, "split": "test", "decade": 30, "count": 2},
            {"reason": "duplicate", "split": None, "decade": None, "count": 1},
            {"reason": "no_face", "split": None, "decade": None, "count": 3}]
    summary = prepare.summarize(rows)
    assert (summary["faces"], summary["rejects"], summary["rows"]) == (7, 4, 11)
    assert summary["by_reason"] == {"duplicate": 1, "no_face": 3} and summary["decades"] == {20: 5, 30: 2}
    prepare.check_accounting(11, summary)
    with pytest.raises(RuntimeError, match="accounting error: 12 inputs"):
        prepare.check_accounting(12, summary)


def test_mark_duplicates_keeps_the_smallest_path_and_flags_what_the_table_has(spark):
    rows = [("file:/b.jpg", "h1", None, None), ("file:/a.jpg", "h1", None, None), ("file:/c.jpg", "h2", None, None),
            ("file:/d.jpg", "h3", None, None), ("file:/e.txt", None, "unsupported_extension", "x")]
    results = spark.createDataFrame(rows, "source_path string, content_sha256 string, reason string, detail string")
    existing = spark.createDataFrame([("h3",)], "content_sha256 string")
    out = {r["source_path"]: (r["reason"], r["detail"]) for r in
           prepare_steps.mark_duplicates(results, existing).collect()}
    assert out["file:/a.jpg"] == (None, None)
    assert out["file:/b.jpg"] == ("duplicate", "same bytes as file:/a.jpg")
    assert out["file:/c.jpg"] == (None, None)
    assert out["file:/d.jpg"] == ("duplicate", "already in the faces table (--mode append)")
    assert out["file:/e.txt"] == ("unsupported_extension", "x")


def test_manifest_labels_join_by_full_or_relative_path_and_flag_conflicts(spark):
    files = spark.createDataFrame([("file:/in/a.jpg",), ("file:/in/sub/b.jpg",), ("file:/in/c.jpg",),
                                   ("file:/in/d.jpg",)], "path string")
    manifest = spark.createDataFrame([
        ("a.jpg", "25", "1", None, "p1"),
        ("/in/sub/b.jpg", "40", None, None, None), ("sub/b.jpg", "40", None, None, None),  # same label twice
        ("c.jpg", "30", None, None, None), ("file:///in/c.jpg", "70", None, None, None),  # conflict
    ], "m_path string, label_age string, label_gender string, label_race string, label_subject_id string")
    out = {r["path"]: r for r in prepare_steps.attach_manifest_labels(files, manifest, ["file:/in"]).collect()}
    assert (out["file:/in/a.jpg"]["label_age"], out["file:/in/a.jpg"]["label_subject_id"]) == ("25", "p1")
    assert out["file:/in/sub/b.jpg"]["label_age"] == "40" and out["file:/in/sub/b.jpg"]["label_conflict"] is None
    assert out["file:/in/c.jpg"]["label_age"] is None and "30" in out["file:/in/c.jpg"]["label_conflict"] \
        and "70" in out["file:/in/c.jpg"]["label_conflict"]
    assert out["file:/in/d.jpg"]["label_age"] is None and out["file:/in/d.jpg"]["label_conflict"] is None


# ============================================================================ score's and evaluate's transforms

def test_count_photos(spark):
    rows = [("p1", "ok"), ("p1", "ok"), ("p2", "ok"), ("p3", "no_face"), ("p4", "face_too_small"), ("p5", "corrupt")]
    preds = spark.createDataFrame(rows, "source_path string, status string")
    counts, faces, reasons = score.count_photos(preds)
    assert counts == {"with_faces": 2, "without_face": 2, "unreadable": 1} and faces == 3
    assert reasons == {"corrupt": 1, "face_too_small": 1, "no_face": 1}


def test_evaluation_transforms_match_numpy(spark):
    rng = np.random.default_rng(0)
    n = 200
    ages = rng.integers(1, 90, n)
    predicted = np.clip(ages + rng.normal(0, 6, n), 0, 120)  # a model's ages are clipped into 0..120
    preds = [(f"f{i}", 0, float(p), 1.0, "m", None, "ok") for i, p in enumerate(predicted)]
    preds += [("fnan", 0, float("nan"), None, "m", None, "ok"), ("f0", 1, 99.0, None, "m", None, "ok"),
              ("x", None, None, None, "m", None, "no_face")]
    pred_df = spark.createDataFrame(preds, "face_id string, face_index int, predicted_age float, uncertainty float, "
                                           "model_id string, data_version long, status string")
    labels = [(f"f{i}", int(a), i % 2, i % 5, "utk", None) for i, a in enumerate(ages)]
    labels += [("f0", int(ages[0]), 0, 0, "utk", None), ("bad", None, None, None, "utk", "age 'abc'")]
    label_df = spark.createDataFrame(labels, "face_id string, age int, gender int, race int, dataset string, "
                                             "label_error string")
    ok, left_out = evaluate_steps.valid_predictions(pred_df, "face_id")
    assert left_out == {"non_finite_prediction": 1, "out_of_range_prediction": 0}
    ok, dup_preds = evaluate_steps.dedupe_keys(ok.where("face_id != 'f0' or predicted_age < 99"), "face_id",
                                         ["predicted_age"], "p")
    good, invalid = evaluate_steps.valid_labels(label_df)
    assert invalid == 1
    good, dup_labels = evaluate_steps.dedupe_keys(good, "face_id", ["age", "gender", "race", "dataset"], "l")
    assert (dup_preds, dup_labels) == (0, 1)
    joined, book = evaluate_steps.join_labels(ok, good, "face_id")
    assert book == {"matched": n, "predictions_without_label": 0, "labels_without_prediction": 0}
    agg = evaluate_steps.aggregate_metrics(evaluate_steps.matched_errors(joined))
    err = predicted.astype(np.float32).astype(np.float64) - ages
    o = agg["overall"]
    assert o["count"] == n and o["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-6)
    assert o["rmse"] == pytest.approx(math.sqrt((err ** 2).mean()), rel=1e-6)
    assert o["cs5"] == pytest.approx((np.abs(err) <= 5).mean()) and o["bias"] == pytest.approx(err.mean(), rel=1e-5)
    female = next(s for s in agg["slices"] if s["slice"] == "gender" and s["value"] == "female")
    assert female["count"] == n // 2 and female["mae"] == pytest.approx(np.abs(err[1::2]).mean(), rel=1e-6)
    assert agg["uncertainty"]["within_1sd"] == pytest.approx((np.abs(err) <= 1.0).mean())
    assert agg["uncertainty"]["corr_abs_error_std"] is None  # every std the same: no correlation, no crash
    matrix, _ = evaluate_steps.confusion(agg["cells"])
    assert matrix.sum() == n and sum(c for _, c, _ in agg["by_age"]) == n

    conflicting = spark.createDataFrame([("k", 1), ("k", 2)], "face_id string, age int")
    with pytest.raises(cli.UserError, match="1 key.*different values"):
        evaluate_steps.dedupe_keys(conflicting, "face_id", ["age"], "--labels x")


# ============================================================================ the job shell

def test_numbers_are_finite_and_in_range():
    convert = cli.number(0, 1)
    assert convert("0.5") == 0.5
    for bad in ("nan", "inf", "-0.1", "2", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            convert(bad)
    assert cli.positive_int("3") == 3
    for bad in ("0", "1.5", "1e3", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.positive_int(bad)


def test_parser_errors_are_one_line_and_exit_2(capsys):
    parser = cli.Parser("demo", prog="demo")
    parser.add_argument("--n", type=cli.positive_int, default=1, help="how many")
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--n", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "demo: error: argument --n: '0' must be >= 1 (see --help)\n"
    assert "(default: 1)" in parser.format_help()


def test_run_main_is_the_error_boundary(capsys):
    def user_mistake():
        raise cli.UserError("bad --storage postgresql://me:hunter2@db/x")
    assert cli.run_main("demo", user_mistake) == 2
    assert capsys.readouterr().err == "demo: error: bad --storage postgresql://me:***@db/x\n"

    def bug():
        raise KeyError("internal")
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.run_main("demo", bug)


# ============================================================================ output rules

def test_outputs_replace_only_their_own_entries(tmp_path):
    fs = outputs.LocalFS()
    root = tmp_path / "out"
    out = outputs.Outputs(fs, str(root), "demo", "run1")
    out.check(["a", "b.json"])  # nothing there yet
    fs.write_text(out.staging("b.json"), "{}")
    fs.mkdirs(out.staging("a"))
    fs.write_text(out.staging("a") + "/part", "1")
    out.commit(["a", "b.json"], folder_markers=["a"])
    out.finish()
    assert sorted(p.name for p in root.iterdir()) == ["_FACEAGE.json", "a", "b.json"]
    again = outputs.Outputs(fs, str(root), "demo", "run2")
    again.check(["a", "b.json"])  # ours: fine
    (root / "mine.txt").write_text("x")
    again.check(["a"])  # unrelated files beside are fine
    with pytest.raises(cli.UserError, match="mine.txt there is a file that faceage did not write"):
        again.check(["mine.txt"])
    (root / "c").mkdir()
    (root / "c" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(cli.UserError, match=r"c there is a folder of 1 entry \(photo.jpg\)"):
        again.check(["c"])


def test_dedupe_inputs_resolves_links(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert outputs.dedupe_inputs([str(tmp_path / "a"), str(tmp_path / "link")], outputs.canonical_local) == \
        [str(tmp_path / "a")]
    with pytest.raises(cli.UserError, match="is inside --input"):
        outputs.dedupe_inputs([str(tmp_path / "link"), str(tmp_path / "a" / "b")], outputs.canonical_local)


# ============================================================================ the contract readers

def test_the_prepare_manifest_reader_works_for_any_fsspec_uri_and_fails_loudly(tmp_path):
    import fsspec

    crop = CropSettings(size=48, detector="none").to_dict()
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/prepared/manifest.json", json.dumps({"run_id": "r", "settings": {"crop": crop}}).encode())
    assert layout.table_crop_settings("memory://bucket/prepared/faces") == CropSettings(size=48, detector="none")
    with pytest.raises(cli.UserError, match="no prepare run manifest"):
        layout.table_crop_settings("memory://bucket/elsewhere")
    fs.pipe("/bucket/broken/manifest.json", b'{"run_id": "r", "settings": {}}')
    with pytest.raises(cli.UserError, match="not a prepare run manifest"):
        layout.read_prepare_manifest("memory://bucket/broken")
    (tmp_path / "manifest.json").write_text(json.dumps({"settings": {"crop": {**crop, "margin": 9}}}))
    with pytest.raises(cli.UserError, match="crop settings not usable: margin 9"):
        layout.table_crop_settings("file://" + str(tmp_path))


def test_a_bundle_trained_through_a_file_uri_keeps_the_tables_crop_settings(tables, tmp_path):
    from trainer import bundle, train

    root, manifest, _ = tables
    out = tmp_path / "run"
    assert train.main(["--data", "file://" + str(root / "pq"), "--output", str(out), "--epochs", "1",
                      "--image-size", "32", "--batch-size", "16", "--workers", "1", "--reader", "pyarrow",
                      "--no-progress"]) == 0
    _, saved = bundle.load_bundle(str(out / "model.pt"))
    assert saved["crop"] == manifest["settings"]["crop"] and saved["crop"]["detector"] == "none"
