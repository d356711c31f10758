"""The one walker of local photo folders: each real folder once, links back skipped and accounted, bounded.

A link back to its own folder (`again -> .`) used to be walked ~40 levels deep (one photo became 42 inputs);
two such links made the walk exponential. prepare, score and predict list with the same walker."""
import json
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import encode, synthetic_face
from shell import cli
from photos import walk
from spark_jobs import predict, prepare, score

NONE = ["--detector", "none", "--size", "32"]


def looped_folder(root: Path) -> Path:
    """2 photos (one in sub/), two links back to the top, a link from sub/ to its parent, two paths to sub/."""
    (root / "sub").mkdir(parents=True)
    (root / "30_0_0_20260101000001.jpg").write_bytes(encode(synthetic_face(30, seed=1, size=64)))
    (root / "sub" / "40_0_0_20260101000002.jpg").write_bytes(encode(synthetic_face(40, seed=2, size=64)))
    os.symlink(".", root / "again")
    os.symlink(str(root), root / "absolute")
    os.symlink("..", root / "sub" / "up")
    os.symlink("sub", root / "sub2")
    return root


def test_each_real_folder_is_listed_once_and_each_link_back_is_one_skipped_entry(tmp_path):
    root = looped_folder(tmp_path / "p")
    t = time.monotonic()
    entries = list(walk.walk(str(root)))
    assert time.monotonic() - t < 10  # was exponential: bounded here by the test, never asserted as speed
    files = sorted(os.path.relpath(e.path, root) for e in entries if e.loop_of is None)
    loops = {os.path.relpath(e.path, root): e.loop_of for e in entries if e.loop_of is not None}
    assert files == ["30_0_0_20260101000001.jpg", "sub/40_0_0_20260101000002.jpg"]
    # sub/ is entered through its own name (first in name order); sub2 is a second path to it
    assert loops == {"absolute": str(root.resolve()), "again": str(root.resolve()),
                     "sub/up": str(root.resolve()), "sub2": str((root / "sub").resolve())}


def test_a_dangling_link_and_a_linked_file_are_still_listed(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"x" * 5)
    os.symlink("a.jpg", root / "b.jpg")
    os.symlink("gone.jpg", root / "c.jpg")
    entries = {os.path.basename(e.path): e for e in walk.walk(str(root))}
    assert entries["a.jpg"].length == 5 and entries["b.jpg"].length == 5 and entries["c.jpg"].length is None
    assert all(e.loop_of is None for e in entries.values())


def test_depth_and_entry_bounds_stop_with_one_line(tmp_path, monkeypatch):
    deep = tmp_path / "deep"
    (deep / "a" / "b" / "c").mkdir(parents=True)
    (deep / "a" / "b" / "c" / "x.jpg").write_bytes(b"x")
    monkeypatch.setenv("FACEAGE_MAX_DEPTH", "2")
    with pytest.raises(cli.UserError, match="more than 2 folders deep"):
        list(walk.walk(str(deep)))
    monkeypatch.setenv("FACEAGE_MAX_DEPTH", "3")
    assert len(list(walk.walk(str(deep)))) == 1
    for i in range(5):
        (deep / f"{i}.jpg").write_bytes(b"x")
    monkeypatch.setenv("FACEAGE_MAX_LISTED", "4")
    with pytest.raises(cli.UserError, match="more than 4 entries"):
        list(walk.walk(str(deep)))
    monkeypatch.setenv("FACEAGE_MAX_LISTED", "many")
    with pytest.raises(cli.UserError, match="not a whole number"):
        list(walk.walk(str(deep)))


def test_prepare_and_score_account_for_every_link_back_once(spark, bundles, tmp_path):
    root = looped_folder(tmp_path / "p")
    out = tmp_path / "out"
    assert prepare.main(["--input", str(root), "--output", str(out)] + NONE) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 6, "faces": 2, "rejects": 4}
    rejects = pd.concat(pq.read_table(p).to_pandas() for p in (out / "rejects").rglob("*.parquet"))
    assert sorted(rejects.reason) == ["link_loop"] * 4
    assert sorted(Path(p).name for p in rejects.source_path) == ["absolute", "again", "sub2", "up"]

    plain, _ = bundles
    scored = tmp_path / "scored"
    assert score.main(["--model", str(plain), "--input", str(root), "--output", str(scored), "--aligned"]) == 0
    rows = pd.concat(pq.read_table(p).to_pandas() for p in (scored / "predictions").glob("*.parquet"))
    assert len(rows) == 6 and (rows.status == "ok").sum() == 2 and (rows.status == "link_loop").sum() == 4

    found = predict.estimate_ages(str(root), str(plain), detector="none")
    assert sorted(r["status"] for r in found) == ["link_loop"] * 4 + ["ok"] * 2
