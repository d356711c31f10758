"""spark_jobs/prepare.py end to end on a local SparkSession and generated folders."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO, encode, spark_submit, synthetic_photo, venv_env
from schemas import layout
from schemas.tables import MANIFEST_KEYS
from spark_jobs import prepare


def write(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def read_faces(output: Path, fmt: str):
    """Rows of the faces table through the reader path (Delta log / _SUCCESS check), split included."""
    files = layout.table_files(str(output / "faces"))
    rows = []
    for uri in files:
        table = pq.read_table(uri[len("file://"):]).to_pylist()
        split = uri.split("split=")[1].split("/")[0]
        rows += [dict(r, split=split) for r in table]
    return rows


def read_rejects(output: Path):
    files = layout.table_files(str(output / "rejects"))
    return [r for uri in files for r in pq.read_table(uri[len("file://"):]).to_pylist()]


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """A folder with good photos and every kind of bad input the job must account for."""
    root = tmp_path_factory.mktemp("messy") / "photos"
    good = {}
    for i, age in enumerate([3, 17, 25, 33, 48, 61, 75, 88]):
        photo, _ = synthetic_photo(age, seed=100 + i)
        name = f"sub{i % 2}/{age}_{i % 2}_{i % 5}_2026010100000{i}.JPG" if i % 3 else f"{age}_0_1_2026010100000{i}.jpg"
        good[name] = write(root / name, encode(photo, quality=92))
    first = next(iter(good.values()))
    write(root / "dup" / "3_0_1_20260101999999999.jpg", first.read_bytes())  # byte-identical copy
    photo, _ = synthetic_photo(44, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 8
    write(root / "44_1_2_20260102000000001.jpeg",
          encode(photo.transpose(Image.Transpose.ROTATE_270), quality=92, exif=exif.tobytes()))
    write(root / "odd names" / "62_0_4_x y %41#[1]é.jpg", encode(synthetic_photo(62, seed=15)[0]))
    write(root / "52_0_0_20260102000000002.png", encode(synthetic_photo(52, seed=8)[0].convert("RGBA"), "PNG"))
    write(root / "27_1_0_20260102000000003.png",
          encode(Image.fromarray(np.asarray(synthetic_photo(27, seed=9)[0].convert("L"), np.uint16) * 257, "I;16"),
                 "PNG"))
    write(root / "36_0_3_20260102000000004.jpg", encode(synthetic_photo(36, seed=10)[0].convert("CMYK")))
    write(root / "29_1_0_20260103000000009.jpg", b"")
    write(root / "30_0_0_20260103000000000.jpg", b"")  # zero bytes, good name
    write(root / "31_0_0_20260103000000001.jpg", b"text pretending to be a JPEG\n")
    whole = encode(synthetic_photo(32, seed=11)[0])
    write(root / "32_0_0_20260103000000002.jpg", whole[: len(whole) // 3])
    write(root / "33_0_0_20260103000000003.png", encode(Image.new("L", (9000, 9000)), "PNG"))
    rng = np.random.default_rng(0)
    write(root / "34_0_0_20260103000000004.jpg",
          encode(Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))))
    write(root / "130_0_0_20260103000000005.jpg", encode(synthetic_photo(40, seed=12)[0]))
    write(root / "grandma.jpg", encode(synthetic_photo(80, seed=13)[0]))
    write(root / "README.txt", b"not an image")
    write(root / ".DS_Store", b"\0\0\0\1Bud1")
    write(root / "_tmp" / "45_0_0_20260103000000007.jpg", encode(synthetic_photo(45, seed=14)[0]))
    os.symlink(root / "gone.jpg", root / "35_0_0_20260103000000006.jpg")  # dangling link: unreadable
    expected = {
        "faces": len(good) + 5,
        "rejects": {"duplicate": 1, "empty_file": 2, "not_an_image": 1, "corrupt": 1, "too_large": 1,
                    "no_face": 1, "bad_label": 2, "unsupported_extension": 1, "unreadable": 1,
                    "hidden_file": 2},
    }
    return root, expected


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_every_input_is_a_face_or_a_reject(spark, messy_folder, tmp_path, fmt, capsys):
    root, expected = messy_folder
    out = tmp_path / "prepared"
    code = prepare.main(["--input", str(root), "--output", str(out), "--format", fmt, "--size", "48"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    n_files = sum(1 for p in root.rglob("*") if p.is_file() or p.is_symlink())
    assert manifest["counts"] == {"inputs": n_files, "faces": expected["faces"],
                                  "rejects": sum(expected["rejects"].values())}
    assert manifest["rejects_by_reason"] == expected["rejects"]
    assert manifest["counts"]["inputs"] == manifest["counts"]["faces"] + manifest["counts"]["rejects"]
    assert (out / "_runs" / f"{manifest['run_id']}.json").exists()

    faces = read_faces(out, fmt)
    rejects = read_rejects(out)
    assert len(faces) == expected["faces"] and len(rejects) == sum(expected["rejects"].values())
    listed = {Path(p).as_posix() for p in (str(x) for x in root.rglob("*")) if not Path(p).is_dir()}
    seen = {r["source_path"].replace("file:", "", 1) for r in faces + rejects}
    assert seen == listed  # nothing lost, nothing invented
    assert all(Image.open(__import__("io").BytesIO(r["image"])).size == (48, 48) for r in faces)
    by_name = {Path(r["source_path"]).name: r for r in faces}
    assert by_name["44_1_2_20260102000000001.jpeg"]["age"] == 44
    assert by_name["44_1_2_20260102000000001.jpeg"]["source_width"] == 640  # EXIF applied: upright
    assert {r["split"] for r in faces} <= {"train", "val", "test"}
    assert sum(manifest["splits"].values()) == expected["faces"]
    reasons = {Path(r["source_path"]).name: r for r in rejects}
    assert reasons["130_0_0_20260103000000005.jpg"]["reason"] == "bad_label"
    assert "outside 0..120" in reasons["130_0_0_20260103000000005.jpg"]["detail"]
    assert reasons["3_0_1_20260101999999999.jpg"]["reason"] == "duplicate"
    assert reasons["35_0_0_20260103000000006.jpg"]["reason"] == "unreadable"
    if fmt == "delta":
        assert manifest["table_versions"] == {"faces": 0, "rejects": 0}
    assert "prepare: run" in capsys.readouterr().out


def test_append_skips_content_already_present(spark, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    shared = encode(synthetic_photo(30, seed=20)[0])
    write(first / "30_0_0_20260101000000001.jpg", shared)
    write(first / "41_1_1_20260101000000002.jpg", encode(synthetic_photo(41, seed=21)[0]))
    write(second / "30_0_0_20260201000000001.jpg", shared)  # same bytes, new name
    write(second / "57_0_2_20260201000000002.jpg", encode(synthetic_photo(57, seed=22)[0]))
    out = tmp_path / "table"
    base = ["--output", str(out), "--format", "delta", "--size", "32"]
    assert prepare.main(["--input", str(first)] + base) == 0
    assert prepare.main(["--input", str(second), "--mode", "append"] + base) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 2, "faces": 1, "rejects": 1}
    assert manifest["rejects_by_reason"] == {"duplicate": 1}
    assert manifest["table_versions"]["faces"] == 1
    ages = sorted(r["age"] for r in read_faces(out, "delta"))
    assert ages == [30, 41, 57]
    assert len(list((out / "_runs").glob("*.json"))) == 2


def test_manifest_labels_and_fgnet_names(spark, tmp_path):
    photos = tmp_path / "appa"
    write(photos / "train" / "000001.jpg", encode(synthetic_photo(23, seed=30)[0]))
    write(photos / "train" / "000002.jpg", encode(synthetic_photo(67, seed=31)[0]))
    write(photos / "valid" / "000003.jpg", encode(synthetic_photo(12, seed=32)[0]))
    labels = tmp_path / "labels.csv"
    labels.write_text("path,age,gender,subject_id\n"
                      "train/000001.jpg,23,1,p1\n"
                      f"{photos}/train/000002.jpg,67,,p2\n"
                      "train/missing.jpg,50,0,p3\n")
    out = tmp_path / "out"
    assert prepare.main(["--input", str(photos), "--output", str(out), "--labels", f"manifest:{labels}",
                         "--size", "32", "--dataset", "appa-real"]) == 0
    faces = {Path(r["source_path"]).name: r for r in read_faces(out, "parquet")}
    assert (faces["000001.jpg"]["age"], faces["000001.jpg"]["gender"], faces["000001.jpg"]["subject_id"]) == \
        (23, 1, "p1")
    assert (faces["000002.jpg"]["age"], faces["000002.jpg"]["gender"]) == (67, None)
    assert faces["000001.jpg"]["dataset"] == "appa-real"
    rejects = read_rejects(out)
    assert [(Path(r["source_path"]).name, r["reason"]) for r in rejects] == [("000003.jpg", "bad_label")]

    fgnet = tmp_path / "fgnet"
    for name, age in [("001A02.JPG", 2), ("001A15.JPG", 15), ("002A30a.JPG", 30)]:
        write(fgnet / name, encode(synthetic_photo(age, seed=age)[0]))
    out2 = tmp_path / "out2"
    assert prepare.main(["--input", str(fgnet), "--output", str(out2), "--labels", "fgnet", "--size", "32"]) == 0
    rows = read_faces(out2, "parquet")
    by_subject = {}
    for r in rows:
        by_subject.setdefault(r["subject_id"], set()).add(r["split"])
    assert set(by_subject) == {"fgnet:001", "fgnet:002"}
    assert all(len(s) == 1 for s in by_subject.values())  # nobody in two splits


def test_demo_never_touches_a_folder_of_other_files(tmp_path, capsys):
    photos = tmp_path / "mine"
    write(photos / "holiday.jpg", b"precious")
    assert prepare.main(["--demo", "--input", str(photos), "--output", str(tmp_path / "out")]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert (photos / "holiday.jpg").read_bytes() == b"precious"


def test_empty_input_folder_is_a_clear_error(spark, tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code = prepare.main(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "no files under --input" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_hadoop_listing_matches_the_local_walk(spark, messy_folder):
    """The s3a/hdfs code path (Hadoop FileSystem.listFiles) run on a file: URI: same inventory, except the
    dangling link, which only a local walk can see."""
    from spark_jobs.photo_files import list_files, list_hadoop

    root, _ = messy_folder
    local = list_files(spark, [str(root)])
    hadoop = list_hadoop(spark, "file:" + str(root))
    assert sorted(hadoop) == sorted(tuple(row[:3]) for row in local if row[1] is not None)
    assert any(hidden for _, _, hidden in hadoop) and len(hadoop) == len(local) - 1


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "spark_jobs" / "prepare.py"), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--output", "x"], "--input is required"),
    (["--input", "{tmp}/nope", "--output", "{tmp}/o"], "no such folder"),
    (["--input", "{tmp}", "--output", "{tmp}/o", "--format", "csv"], "invalid choice: 'csv'"),
    (["--input", "{tmp}", "--output", "{tmp}/o"], "is inside --input"),
    (["--input", "{tmp}/in", "--output", "{tmp}"], "is inside --output"),
    (["--input", "{tmp}", "--output", "/x", "--splits", "0.5,0.5,0.5"], "add up to 1.5"),
    (["--input", "{tmp}", "--output", "/x", "--labels", "imdb"], "--labels 'imdb' is not supported"),
    (["--input", "{tmp}", "--output", "/x", "--labels", "manifest:/no/such.csv"], "no such manifest"),
    (["--input", "{tmp}", "--output", "/x", "--detector", "mtcnn"], "invalid choice: 'mtcnn'"),
])
def test_bad_flags_stop_before_spark(tmp_path, args, message):
    (tmp_path / "in").mkdir()
    result = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.startswith("prepare: error:")
    assert "Traceback" not in result.stderr and "SparkContext" not in result.stderr + result.stdout


def test_spark_submit_entry_point_and_demo(tmp_path):
    """The README's first command: spark-submit on the built-in synthetic sample (Delta via spark-defaults)."""
    out = tmp_path / "demo"
    result = subprocess.run([spark_submit(), "--master", "local[1]", str(REPO / "spark_jobs" / "prepare.py"),
                             "--demo", "--demo-count", "24", "--input", str(tmp_path / "synthetic"), "--output", str(out),
                             "--format", "delta", "--size", "32"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=venv_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SYNTHETIC DEMO" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["inputs"] == 27 and manifest["settings"]["synthetic_demo"] is True
    assert manifest["spark"]["master"] == "local[1]"  # spark-submit's --master wins over our defaults
    assert sorted(manifest) == sorted(MANIFEST_KEYS)
    assert manifest["counts"]["faces"] >= 18  # drawn faces: the detector finds most, not all
    assert manifest["rejects_by_reason"].get("not_an_image") == 1 and manifest["rejects_by_reason"].get("corrupt") == 1
