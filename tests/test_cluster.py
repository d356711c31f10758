"""A real Spark standalone cluster: a master and two worker JVMs on 127.0.0.1, started and stopped here.

The chain runs against --master spark://... with the code shipped as a cluster needs it (the `make dist` zip
through --py-files): prepare (Parquet and Delta) -> train with TorchDistributor local_mode=False (2 ranks on
the workers) -> score -> evaluate, and gives the same rows and numbers as local mode. A worker killed in the
middle of a prepare: Spark runs its tasks again on the other one, and the table is committed once.
"""
import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import REPO, TEST_JVM_OPTS, spark_submit, venv_env
from schemas import layout
from spark_jobs import distributed, emr, evaluate, prepare, score
from spark_jobs.local_cluster import Cluster
from photos.synthetic import write_demo_folder

pytestmark = pytest.mark.slow
# fp32: bf16 arithmetic (--precision auto on a CPU that has it) rounds differently with each thread count, and the
# workers' executors run other thread counts than local mode (in bf16 the two runs once ended 0.54 test MAE apart)
TRAIN = ["--epochs", "2", "--image-size", "32", "--batch-size", "8", "--workers", "1", "--no-progress",
         "--reader", "pyarrow", "--seed", "3", "--precision", "fp32"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("cluster"), workers=2, cores=1, memory="2g") as c:
        yield c


@pytest.fixture(scope="module")
def code_zip(tmp_path_factory):
    return emr.build(str(tmp_path_factory.mktemp("dist")))[emr.CODE_ZIP]


def submit(cluster, code_zip, script, args, timeout=600, conf=(), wait=True, cwd=None):
    """spark-submit against the cluster, the code shipped as a zip; the driver runs here, executors there."""
    cmd = [spark_submit(), "--master", cluster.url, "--py-files", code_zip, "--conf", "spark.executor.memory=1g",
           "--conf", f"spark.executor.extraJavaOptions={TEST_JVM_OPTS}"]
    for c in conf:
        cmd += ["--conf", c]
    cmd += [os.path.join(REPO, "spark_jobs", script), *args]
    if not wait:
        return subprocess.Popen(cmd, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, env=venv_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{script}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def faces_of(root):
    rows = []
    for f in sorted((root / layout.FACES_DIR).rglob("*.parquet")):
        t = pq.read_table(f, columns=["face_id", "content_sha256", "age"]).to_pylist()
        split = next(p.split("=", 1)[1] for p in f.parts if p.startswith("split="))
        rows += [(r["face_id"], r["content_sha256"], r["age"], split) for r in t]
    return sorted(rows)


def predictions_of(root):
    files = sorted((root / "predictions").rglob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f, columns=["source_path", "predicted_age"]).to_pylist()]
    return {r["source_path"]: r["predicted_age"] for r in rows if r["predicted_age"] is not None}


def test_the_chain_on_a_standalone_cluster_matches_local_mode(cluster, code_zip, tmp_path):
    photos = tmp_path / "photos"
    write_demo_folder(str(photos), 48)
    common = ["--input", str(photos), "--size", "32", "--splits", "0.6,0.2,0.2"]
    # prepare: on the cluster (Parquet and Delta) and in local mode, from the same photos
    submit(cluster, code_zip, "prepare.py", [*common, "--output", str(tmp_path / "pq")])
    submit(cluster, code_zip, "prepare.py", [*common, "--output", str(tmp_path / "delta"), "--format", "delta"])
    assert prepare.main([*common, "--output", str(tmp_path / "local_pq")]) == 0
    on_cluster = json.loads((tmp_path / "pq" / "manifest.json").read_text())
    local = json.loads((tmp_path / "local_pq" / "manifest.json").read_text())
    assert on_cluster["spark"]["master"] == cluster.url and local["spark"]["master"].startswith("local")
    assert on_cluster["counts"] == local["counts"] and on_cluster["counts"]["inputs"] == 51  # 48 + 3 broken
    assert faces_of(tmp_path / "pq") == faces_of(tmp_path / "local_pq")  # the same faces, crops, splits
    delta = json.loads((tmp_path / "delta" / "manifest.json").read_text())
    assert delta["counts"] == on_cluster["counts"] and delta["table_versions"]["faces"] == 0

    # train: TorchDistributor on the workers (local_mode=False), 2 ranks, paths relative to the driver's folder
    # (the ranks run in the executors' folders); and the same in local mode
    proc = submit(cluster, code_zip, "distributed.py", ["train", "--num-processes", "2", "--local-mode", "false",
                                                        "--data", "pq", "--output", "train", *TRAIN], cwd=tmp_path)
    # the ranks ran the shipped code, in the workers' folders, not this checkout
    ran = proc.stdout.rsplit("rank 0 ran ", 1)[-1].strip()
    assert emr.CODE_ZIP in ran and not ran.startswith(str(REPO)), ran
    assert distributed.main(["train", "--num-processes", "2", "--data", str(tmp_path / "pq"), "--output",
                             str(tmp_path / "train_local"), *TRAIN]) == 0  # local mode, on this process's session
    dist = json.loads((tmp_path / "train" / "summary.json").read_text())
    same = json.loads((tmp_path / "train_local" / "summary.json").read_text())
    assert dist["world_size"] == same["world_size"] == 2 and dist["rows"] == same["rows"]
    per_epoch = [[json.loads(line)[k] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                 for run in ("train", "train_local") for k in ("train_rows",)]
    assert per_epoch[0] == per_epoch[1]  # each rank read the same shards
    assert dist["test_mae"] == pytest.approx(same["test_mae"], abs=0.5)

    # score and evaluate on the cluster (the bundle shipped to the executors) vs local mode
    bundle = str(tmp_path / "train" / "model.pt")
    submit(cluster, code_zip, "score.py", ["--model", bundle, "--input", str(photos), "--output",
                                           str(tmp_path / "scored")])
    assert score.main(["--model", bundle, "--input", str(photos), "--output", str(tmp_path / "scored_local")]) == 0
    got, want = predictions_of(tmp_path / "scored"), predictions_of(tmp_path / "scored_local")
    assert got.keys() == want.keys() and len(got) == on_cluster["counts"]["faces"]
    assert all(abs(got[k] - want[k]) < 1e-3 for k in got)
    submit(cluster, code_zip, "evaluate.py", ["--predictions", str(tmp_path / "scored"), "--labels",
                                              str(tmp_path / "pq"), "--split", "test", "--output",
                                              str(tmp_path / "report")])
    assert evaluate.main(["--predictions", str(tmp_path / "scored_local"), "--labels", str(tmp_path / "pq"),
                          "--split", "test", "--output", str(tmp_path / "report_local")]) == 0
    m1 = json.loads((tmp_path / "report" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "report_local" / "metrics.json").read_text())
    assert m1["rows"] == m2["rows"] and m1["rows"]["matched"] == on_cluster["splits"]["test"]
    assert m1["overall"]["mae"] == pytest.approx(m2["overall"]["mae"], abs=1e-3)


def test_a_rank_that_fails_on_a_worker_says_its_own_error_on_the_drivers_line(cluster, code_zip, tmp_path):
    """Each rank fails on the workers (no table where --data says); the driver's one line carries their own
    errors, streamed back from the executors, not only Spark's 'An error occurred while calling ...'."""
    (tmp_path / "no_table").mkdir()
    cmd = [spark_submit(), "--master", cluster.url, "--py-files", code_zip, "--conf", "spark.executor.memory=1g",
           os.path.join(REPO, "spark_jobs", "distributed.py"), "train", "--num-processes", "2", "--local-mode",
           "false", "--data", "no_table", "--output", "out", *TRAIN]
    proc = subprocess.run(cmd, env=venv_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("distributed: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0: TrainError:" in lines[0] and "rank 1: TrainError:" in lines[0], lines[0]
    assert str(tmp_path / "no_table") in lines[0]  # the path made absolute for the workers, named as they saw it


def test_a_worker_killed_during_prepare_the_job_completes_and_commits_once(cluster, code_zip, tmp_path):
    photos, pauses, out = tmp_path / "photos", tmp_path / "pauses", tmp_path / "out"
    write_demo_folder(str(photos), 40)
    pauses.mkdir()
    # every task stops at its start until released (at most 120 s), so both workers are mid-task when one dies
    hook = ["spark.executorEnv.FACEAGE_PAUSE_AT=prepare-task", f"spark.executorEnv.FACEAGE_PAUSE_DIR={pauses}",
            "spark.executorEnv.FACEAGE_PAUSE_SECONDS=120", "spark.sql.files.maxPartitionBytes=65536"]
    job = submit(cluster, code_zip, "prepare.py", ["--input", str(photos), "--output", str(out), "--size", "32"],
                 conf=hook, wait=False)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len({p.read_text() for p in pauses.glob("prepare-task-*")}) < 2:
            assert job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.5)
        folders = {p.read_text() for p in pauses.glob("prepare-task-*")}
        assert len(folders) >= 2, "the two executors never both ran a task"
        victim = 0 if any(f"{os.sep}worker-0{os.sep}" in f for f in folders) else 1
        cluster.kill_worker(victim)
        (pauses / "release").write_text("")
        stdout, stderr = job.communicate(timeout=600)
    finally:
        (pauses / "release").write_text("")
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["inputs"] == 43 and manifest["counts"]["faces"] + manifest["counts"]["rejects"] == 43
    faces = faces_of(out)
    assert len(faces) == manifest["counts"]["faces"] and len({f[0] for f in faces}) == len(faces)  # no row twice
    assert [p.name for p in (out / layout.FACES_DIR).glob("_SUCCESS")] == ["_SUCCESS"]
    assert len(list((out / layout.RUNS_DIR).glob("*.json"))) == 1
    assert not [p for p in out.iterdir() if p.name.startswith("_faceage_staging")]
    assert "Traceback" not in stderr and "\tat " not in stderr


def test_the_start_command_prints_only_the_master_url_and_stop_ends_the_daemons(tmp_path):
    folder = tmp_path / "c"
    cli = [sys.executable, "-m", "spark_jobs.local_cluster"]
    proc = subprocess.run([*cli, "start", "--dir", str(folder), "--workers", "1"], cwd=REPO, env=venv_env(),
                          capture_output=True, text=True, timeout=300)
    try:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().startswith("spark://127.0.0.1:") and len(proc.stdout.split()) == 1  # MASTER=$(...)
        pids = json.loads((folder / "cluster.json").read_text())["pids"]
        assert len(pids) == 2 and all(os.path.exists(f"/proc/{p}") for p in pids)  # outlived the command
        again = subprocess.run([*cli, "start", "--dir", str(folder)], cwd=REPO, env=venv_env(), capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 2 and "stop it first" in again.stderr
    finally:
        stop = subprocess.run([*cli, "stop", "--dir", str(folder)], cwd=REPO, env=venv_env(), capture_output=True,
                              text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.5)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
