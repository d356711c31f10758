"""Distributed training (2 CPU ranks, gloo) through TorchDistributor and torchrun; 2-worker tuning on Spark."""
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, venv_env
from schemas import layout
from spark_jobs import distributed
from trainer import data, train

TINY = ["--image-size", "32", "--workers", "1", "--no-progress", "--plateau-patience", "20", "--seed", "1"]


@pytest.fixture(scope="module")
def sharded_table(tables, tmp_path_factory):
    """The fixture's Parquet table rewritten with small row groups, so 2 ranks get several each."""
    root, _, _ = tables
    out = tmp_path_factory.mktemp("sharded")
    for split in ("train", "val", "test"):
        source = data.split_source(str(root / "pq"), split)
        table = pa.concat_tables(pq.read_table(layout.local_path(f)) for f in source.files)
        folder = out / "faces" / f"split={split}"
        folder.mkdir(parents=True)
        pq.write_table(table, folder / "part-0.parquet", row_group_size=6)
    (out / "faces" / "_SUCCESS").write_text("")
    shutil.copy(root / "pq" / "manifest.json", out / "manifest.json")
    return out


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_torchdistributor_two_ranks_train_like_one(spark, sharded_table, tmp_path):
    single, dist = tmp_path / "single", tmp_path / "dist"
    epochs = ["--epochs", "3"]
    assert train.main(["--data", str(sharded_table), "--output", str(single), "--batch-size", "16", *epochs, *TINY]) == 0
    assert distributed.main(["train", "--num-processes", "2", "--data", str(sharded_table), "--output", str(dist),
                             "--batch-size", "8", *epochs, *TINY]) == 0
    rows = _metrics(dist)
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # one line per epoch: only rank 0 writes
    assert all(r["world_size"] == 2 for r in rows)
    total = data.split_source(str(sharded_table), "train").rows
    shard0 = [sum(n for _, _, n in data.shard_row_groups(data.split_source(str(sharded_table), "train"), 0, 2,
                                                         1 * 1000 + e)) for e in range(3)]
    assert [r["train_rows"] for r in rows] == shard0 and all(0 < n < total for n in shard0)
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((dist / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["test_rows"] == s1["test_rows"]
    # same data, same global batch (2 x 8 vs 16), same epochs: within this tiny run's noise
    assert abs(s2["test_mae"] - s1["test_mae"]) < max(4.0, 0.35 * s1["test_mae"])
    assert (dist / "model.pt").exists() and not list(dist.glob("*.tmp-*"))


def test_torchrun_two_ranks(sharded_table, tmp_path):
    out = tmp_path / "torchrun"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29631", "-m", "trainer.train",
                           "--data", str(sharded_table), "--output", str(out), "--epochs", "2", "--batch-size", "8",
                           *TINY], cwd=REPO, env=venv_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["world_size"] for r in _metrics(out)] == [2, 2]
    assert proc.stdout.count("train: test MAE") == 1  # rank 0 reports and writes the bundle; rank 1 does not


def test_two_tune_workers_as_spark_tasks_share_one_postgres_study(spark, tables, tmp_path):
    import uuid

    from test_tune import _postgres_url, _trials

    url = _postgres_url()
    root, _, _ = tables
    study = f"spark-workers-{uuid.uuid4().hex[:8]}"
    assert distributed.main(["tune", "--data", str(root / "pq"), "--study", study, "--storage", url,
                             "--output", str(tmp_path / "t"), "--n-trials", "4", "--epochs", "2", "--workers", "2",
                             "--train-args", "--image-size 32 --workers 1 --reader pyarrow"]) == 0
    trials = _trials(url, study)
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"} and 4 <= len(trials) <= 5
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2  # two Spark tasks ran trials side by side
    assert os.getpid() not in {t.user_attrs["worker_pid"] for t in trials}


def test_a_failed_rank_says_its_own_error_on_the_drivers_one_line(spark, tmp_path, capfd):
    """Every rank fails on data it cannot read (the driver only checks flags): the driver's line carries
    each rank's own error, not TorchDistributor's 'An error occurred while calling ...'."""
    missing = tmp_path / "no_table"
    missing.mkdir()
    code = distributed.main(["train", "--num-processes", "2", "--data", str(missing), "--output",
                             str(tmp_path / "out"), "--epochs", "1", *TINY])
    err = capfd.readouterr()
    lines = [line for line in (err.out + err.err).splitlines() if line.startswith("distributed: error:")]
    assert code == 2 and len(lines) == 1, err.out[-3000:] + err.err[-3000:]
    assert "a training rank failed: rank 0: TrainError:" in lines[0] and "rank 1: TrainError:" in lines[0], lines[0]
    assert str(missing) in lines[0]
