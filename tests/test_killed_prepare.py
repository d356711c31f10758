"""A prepare killed mid-write leaves nothing a reader would take for a finished table."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from conftest import REPO, encode, spark_submit, synthetic_photo, venv_env
from schemas import layout


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    """200 distinct photos (distinct bytes), enough that detection keeps the write busy for seconds."""
    root = tmp_path_factory.mktemp("many")
    base = [encode(synthetic_photo(20 + i, seed=200 + i)[0], quality=90) for i in range(10)]
    for i in range(200):
        # bytes after JPEG's end marker are ignored by decoders but change the content hash
        (root / f"{20 + i % 10}_0_0_2026010100{i:05d}.jpg").write_bytes(base[i % 10] + i.to_bytes(4, "big"))
    return root


def live_rows(table: Path) -> int:
    """Rows in the table's live files, read the way the trainer reads them (the Delta log)."""
    return sum(pq.ParquetFile(uri[len("file://"):]).metadata.num_rows for uri in layout.table_files(str(table)))


def start_prepare(inputs: Path, output: Path, fmt: str) -> subprocess.Popen:
    return subprocess.Popen([spark_submit(), "--master", "local[2]", str(REPO / "spark_jobs" / "prepare.py"),
                             "--input", str(inputs), "--output", str(output), "--format", fmt, "--size", "32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=venv_env())


def kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "prepare finished before it could be killed mid-write"
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("prepare never reached its write phase")


def _small_folder(tmp_path: Path) -> Path:
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        (small / f"{30 + i}_1_0_20260101000{i:05d}.jpg").write_bytes(encode(synthetic_photo(30 + i, seed=i)[0]))
    return small


def _prepare_here(inputs: Path, output: Path, fmt: str) -> None:
    """The first, unkilled prepare: in this process, on the suite's Spark session (only a killed job needs a
    process of its own)."""
    from spark_jobs import prepare

    assert prepare.main(["--input", str(inputs), "--output", str(output), "--format", fmt, "--size", "32"]) == 0


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_parquet_prepare_keeps_the_previous_table(many_photos, spark, tmp_path):
    """The new rows are written to a staging folder; a kill there leaves the previous table byte for byte."""
    out = tmp_path / "out"
    _prepare_here(_small_folder(tmp_path), out, "parquet")
    before = _snapshot(out / "faces")
    assert live_rows(out / "faces") == 3
    proc = start_prepare(many_photos, out, "parquet")  # overwrite with 200 photos
    kill_when(proc, lambda: any(out.glob("_faceage_staging_*/faces/_temporary")))
    assert _snapshot(out / "faces") == before  # same files, same bytes, _SUCCESS included
    assert live_rows(out / "faces") == 3


def test_killed_first_parquet_prepare_leaves_no_table(many_photos, tmp_path):
    out = tmp_path / "out"
    proc = start_prepare(many_photos, out, "parquet")
    kill_when(proc, lambda: any(out.glob("_faceage_staging_*/faces/_temporary")))
    assert not (out / "faces").exists() and not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="no such table"):
        layout.table_files(str(out / "faces"))


def test_killed_delta_prepare_keeps_the_previous_version(many_photos, spark, tmp_path):
    small = _small_folder(tmp_path)
    out = tmp_path / "out"
    _prepare_here(small, out, "delta")
    faces = out / "faces"
    v0_rows = live_rows(faces)
    assert v0_rows == 3

    def data_files():
        return sum(1 for p in faces.rglob("*.parquet"))

    before = data_files()
    proc = start_prepare(many_photos, out, "delta")  # overwrite with 200 photos
    kill_when(proc, lambda: data_files() > before)  # the Delta write of the commit has begun, not ended
    table = DeltaTable(str(faces))
    assert table.version() == 0
    assert sum(pq.ParquetFile(u).metadata.num_rows for u in table.file_uris()) == v0_rows  # half-written: not live
    assert data_files() > len(table.file_uris())
    # the run's commit had begun (its journal is there): the project's readers wait for a writer to finish it
    with pytest.raises(layout.IncompleteTableError, match="killed while it committed"):
        layout.table_files(str(faces))
