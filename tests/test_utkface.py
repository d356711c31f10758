"""Real faces: a slice of ../shared/data/utkface (skipped when the folder is absent).

Nothing derived from these images is written anywhere but pytest's temporary folders.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import encode
from schemas import layout
from spark_jobs import prepare
from schemas.crop import CropSettings
from photos.faces import crop_center_in_source, crop_faces, crop_transform
from photos.labels import parse_utkface
from photos.synthetic import paste_on_background

pytestmark = pytest.mark.utkface

MALFORMED = ["39_1_20170116174525125.jpg.chip.jpg", "61_1_20170109142408075.jpg.chip.jpg",
             "61_1_20170109150557335.jpg.chip.jpg"]


def sample(folder: Path, n: int, seed: int = 0):
    names = sorted(n for n in os.listdir(folder) if n not in MALFORMED)
    rng = np.random.default_rng(seed)
    return [names[i] for i in sorted(rng.choice(len(names), n, replace=False))]


def test_every_utkface_name_parses(utkface_dir):
    labels = [parse_utkface(n) for n in os.listdir(utkface_dir)]
    assert len(labels) > 20000
    assert all(1 <= lab.age <= 116 for lab in labels)
    assert sum(lab.gender is None for lab in labels) == sum(n in MALFORMED for n in os.listdir(utkface_dir))


def test_composited_utkface_faces_are_found_and_centred(utkface_dir):
    """The detector on real faces pasted into 640x480 scenes: recall and crop centring."""
    rng = np.random.default_rng(1)
    settings = CropSettings(size=64)
    found, errors = 0, []
    names = sample(utkface_dir, 40, seed=1)
    for name in names:
        face = Image.open(utkface_dir / name).convert("RGB")
        photo, (cx, cy, side) = paste_on_background(face, rng, (640, 480), float(rng.uniform(0.6, 1.6)))
        crop = crop_faces(encode(photo, quality=92), settings)[0]
        found += 1
        m = crop_transform(np.array(crop.landmarks).reshape(5, 2), settings.size, settings.margin)
        c = crop_center_in_source(m, settings.size)
        errors.append(np.hypot(c[0] - cx, c[1] - cy) / side)
    assert found == len(names)
    assert np.median(errors) < 0.1  # the crop sits on the pasted face


def test_prepare_a_utkface_slice_with_duplicates_and_malformed_names(spark, utkface_dir, tmp_path):
    photos = tmp_path / "utk"
    photos.mkdir()
    chosen = sample(utkface_dir, 60) + MALFORMED
    for name in chosen:
        shutil.copy(utkface_dir / name, photos / name)
    shutil.copy(utkface_dir / chosen[0], photos / ("copy_of_" + chosen[0]))  # bad label, and duplicate bytes
    shutil.copy(utkface_dir / chosen[1], photos / chosen[1].replace("2017", "2099", 1))  # duplicate bytes
    out = tmp_path / "out"
    assert prepare.main(["--input", str(photos), "--output", str(out), "--labels", "utkface",
                         "--detector", "none", "--size", "64", "--format", "delta"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    n = len(chosen) + 2
    assert manifest["counts"] == {"inputs": n, "faces": len(chosen), "rejects": 2}
    assert manifest["rejects_by_reason"] == {"bad_label": 1, "duplicate": 1}
    rows = [r for uri in layout.table_files(str(out / "faces"))
            for r in pq.read_table(uri[len("file://"):]).to_pylist()]
    assert len(rows) == len(chosen)
    by_name = {Path(r["source_path"]).name: r for r in rows}
    assert by_name[MALFORMED[0]]["age"] == 39 and by_name[MALFORMED[0]]["race"] is None
    for name in chosen[2:10]:
        label = parse_utkface(name)
        assert (by_name[name]["age"], by_name[name]["gender"], by_name[name]["race"]) == \
            (label.age, label.gender, label.race)


def test_evaluate_on_a_utkface_test_split_reports_real_slices(spark, utkface_dir, tmp_path):
    """prepare -> train (1 epoch) -> score the test split -> evaluate, on real UTKFace faces."""
    from spark_jobs import evaluate, score
    from trainer import data, train

    photos = tmp_path / "utk"
    photos.mkdir()
    for name in sample(utkface_dir, 240, seed=5):
        shutil.copy(utkface_dir / name, photos / name)
    prepared = tmp_path / "prepared"
    assert prepare.main(["--input", str(photos), "--output", str(prepared), "--labels", "utkface",
                         "--detector", "none", "--size", "64"]) == 0
    run = tmp_path / "run"
    assert train.main(["--data", str(prepared), "--output", str(run), "--epochs", "1", "--image-size", "32",
                      "--batch-size", "32", "--workers", "1", "--no-progress"]) == 0
    scored, report = tmp_path / "scored", tmp_path / "report"
    assert score.main(["--model", str(run / "model.pt"), "--input", str(prepared), "--split", "test",
                       "--output", str(scored)]) == 0
    assert evaluate.main(["--predictions", str(scored), "--labels", str(prepared), "--split", "test",
                          "--output", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    n = data.split_source(str(prepared), "test").rows
    assert metrics["rows"]["matched"] == n and metrics["overall"]["count"] == n
    values = {(s["slice"], s["value"]) for s in metrics["slices"]}
    assert {("gender", "male"), ("gender", "female"), ("race", "White"), ("dataset", "utkface")} <= values
    assert sum(s["count"] for s in metrics["slices"] if s["slice"] == "race") == n
    summary = json.loads((run / "summary.json").read_text())
    assert metrics["overall"]["mae"] == pytest.approx(summary["test_mae"], rel=1e-4)  # scoring = training's test pass
    for name in ("slices.csv", "confusion.csv", "confusion.png", "mae_by_age_group.png", "pred_vs_true.png", "report.html"):
        assert (report / name).stat().st_size > 100
