"""MLflow tracking against a local store (sqlite, in the test's folder): train, tune and evaluate appear as
runs with params, metrics and artifacts; the registered pyfunc model scores the ages score.py writes."""
import json
import os

import numpy as np
import pytest

from spark_jobs import evaluate, score
from trainer import train, tune

TINY = "--image-size 32 --batch-size 16 --workers 1 --reader pyarrow --no-progress"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A local tracking store; artifacts land under the test folder (the sqlite store's ./mlruns)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_untracked_runs_never_touch_mlflow(tables, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root, _, _ = tables
    assert train.main(["--data", str(root / "pq"), "--output", "run", "--epochs", "1", *TINY.split()]) == 0
    bundle = __import__("torch").load(tmp_path / "run" / "model.pt", weights_only=True)
    assert bundle["params"]["mlflow_run_id"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no mlflow.db, no mlruns/


@pytest.mark.slow
def test_train_tune_evaluate_are_tracked_and_the_pyfunc_scores_like_score(tables, spark, store, tmp_path,
                                                                          monkeypatch):
    import mlflow

    root, _, _ = tables
    # train: params, one metric row per epoch, the bundle as a registered pyfunc model
    assert train.main(["--data", str(root / "pq"), "--output", str(tmp_path / "run"), "--epochs", "2",
                       "--mlflow", store, "--register-model", "faceage-test", *TINY.split()]) == 0
    # the job's store stays the job's: MLflow exports its URI to the environment, which would track every later
    # job of this process (the API, a notebook) into it
    assert "MLFLOW_TRACKING_URI" not in os.environ
    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name("faceage")
    (run,) = client.search_runs([exp.experiment_id], "tags.`faceage.stage` = 'train'")
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "2" and run.data.params["lr"] == "0.003"
    history = client.get_metric_history(run.info.run_id, "val_mae")
    assert [m.step for m in history] == [1, 2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert run.data.metrics["test_mae"] == pytest.approx(summary["test_mae"])
    bundle = __import__("torch").load(tmp_path / "run" / "model.pt", weights_only=True)
    assert bundle["params"]["mlflow_run_id"] == run.info.run_id
    (version,) = client.search_model_versions("name = 'faceage-test'")
    assert version.run_id == run.info.run_id

    # tune: the study is a parent run, every trial a nested run under it
    assert tune.main(["--data", str(root / "pq"), "--study", "tracked", "--output", str(tmp_path / "tune"),
                      "--n-trials", "2", "--epochs", "1", "--train-args", TINY, "--mlflow", store]) == 0
    (parent,) = client.search_runs([exp.experiment_id], "tags.`faceage.stage` = 'tune'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.data.tags["faceage.stage"] == "train" for c in children)
    report = json.loads((tmp_path / "tune" / "report.json").read_text())
    assert parent.data.metrics["best_val_mae"] == pytest.approx(report["best"]["val_mae"])
    assert "report.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # score a table, evaluate with tracking: the metrics land on the model's own run
    scored = tmp_path / "scored"
    assert score.main(["--model", str(tmp_path / "run" / "model.pt"), "--input", str(root / "pq"), "--split",
                       "test", "--output", str(scored)]) == 0
    assert evaluate.main(["--predictions", str(scored), "--labels", str(root / "pq"), "--split", "test",
                          "--output", str(tmp_path / "report"), "--mlflow", store]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    tracked = client.get_run(run.info.run_id)
    assert tracked.data.metrics["eval_test_mae"] == pytest.approx(metrics["overall"]["mae"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/test")}
    assert "evaluation/test/metrics.json" in logged and "evaluation/test/report.html" in logged

    # the registered pyfunc model as a Spark UDF over the faces table: the ages score.py wrote
    from pyspark.sql import functions as sf

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # what set_tracking_uri exports, undone after the test
    mlflow.set_tracking_uri(store)
    udf = mlflow.pyfunc.spark_udf(spark, "models:/faceage-test/1", result_type="double", env_manager="local")
    faces = spark.read.parquet(str(root / "pq" / "faces")).where("split = 'test'")
    mine = faces.select("face_id", udf(sf.struct("image")).alias("age")).toPandas().set_index("face_id")
    theirs = spark.read.parquet(str(scored / "predictions")).toPandas().set_index("face_id")
    joined = mine.join(theirs["predicted_age"], how="inner")
    assert len(joined) == len(theirs) == len(mine) > 0
    assert np.allclose(joined["age"], joined["predicted_age"], atol=1e-3)
    # from pandas, the param tta reaches the model (its signature declares it): the Predictor's ages in that mode
    from trainer.bundle import Predictor
    from trainer.runtime import decode_image

    loaded = mlflow.pyfunc.load_model("models:/faceage-test/1")
    frame = faces.select("image").limit(8).toPandas()
    predictor = Predictor(str(tmp_path / "run" / "model.pt"))
    pixels = np.stack([decode_image(bytes(raw), predictor.size) for raw in frame["image"]])
    by_mode = {mode: predictor.predict(pixels, tta=mode)[0] for mode in ("none", "flip")}
    assert not np.allclose(by_mode["none"], by_mode["flip"], atol=1e-3)  # the modes differ on these faces
    for mode, ages in by_mode.items():
        assert np.allclose(loaded.predict(frame, params={"tta": mode}), ages, atol=1e-3)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tables, out, uri: str, **env):
    import subprocess
    import sys

    from conftest import REPO, venv_env

    root, _, _ = tables
    return subprocess.run([sys.executable, "-m", "trainer.train", "--data", str(root / "pq"), "--output", str(out),
                           "--epochs", "1", "--mlflow", uri, *TINY.split()], cwd=REPO,
                          env=venv_env(PYTHONPATH=str(REPO), **env), capture_output=True, text=True, timeout=600)


def test_a_password_in_the_tracking_uri_reaches_no_line_and_no_file(tables, tmp_path):
    """A tracking server on loopback (real `mlflow server`), given as http://alice:<password>@host: the run is
    tracked, and the password is in no console line, and in no byte of any file the run or the server wrote
    (model.pt, checkpoint.pt, summary.json, the logged bundle, the server's store). An unreachable server: one
    line, within the stated bound, the password redacted."""
    import os
    import subprocess
    import time
    import urllib.request

    secret = "pw-Xq7-in-no-file"
    port = _free_port()
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server = subprocess.Popen([os.path.join(os.path.dirname(__import__("sys").executable), "mlflow"), "server",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{server_dir / 'store.db'}",
                               "--artifacts-destination", str(server_dir / "artifacts")],
                              cwd=server_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        run = _train(tables, tmp_path / "run", f"http://alice:{secret}@127.0.0.1:{port}")
        assert run.returncode == 0, run.stderr[-3000:]
        assert secret not in run.stdout + run.stderr
        import mlflow

        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        runs = client.search_runs([client.get_experiment_by_name("faceage").experiment_id])
        assert len(runs) == 1 and runs[0].data.params["mlflow"] == f"http://alice:***@127.0.0.1:{port}"
        written = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert any(p.name == "model.pt" for p in written) and any(p.name == "checkpoint.pt" for p in written)
        assert len([p for p in written if p.is_relative_to(server_dir / "artifacts")]) >= 2  # the logged bundle
        leaking = [str(p.relative_to(tmp_path)) for p in written if secret.encode() in p.read_bytes()]
        assert leaking == []
    finally:
        os.killpg(server.pid, 9)
        server.wait(timeout=30)

    dead = _train(tables, tmp_path / "run2", f"http://alice:{secret}@127.0.0.1:{_free_port()}",
                  FACEAGE_MLFLOW_TIMEOUT="3")
    assert dead.returncode == 2
    lines = [ln for ln in (dead.stdout + dead.stderr).splitlines() if ln.startswith("train:")]
    assert len(lines) == 1 and lines[0].startswith("train: error: --mlflow http://alice:***@127.0.0.1:"), lines
    assert "did not answer within 3 s" in lines[0] and "Traceback" not in dead.stderr
    assert secret not in dead.stdout + dead.stderr


def test_mlflow_models_serve_answers_with_the_bundles_ages(tables, store, tmp_path):
    """`mlflow models serve` of the logged pyfunc (a real uvicorn on loopback): face crops sent as base64 in a
    JSON request get the ages the bundle gives the same crops."""
    import base64
    import os
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd
    import pyarrow.parquet as pq
    import requests

    from conftest import venv_env
    from trainer.bundle import Predictor
    from trainer.runtime import decode_image

    root, _, _ = tables
    assert train.main(["--data", str(root / "pq"), "--output", str(tmp_path / "run"), "--epochs", "1",
                       "--mlflow", store, "--register-model", "faceage-served", *TINY.split()]) == 0
    port = _free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve", "-m",
                               "models:/faceage-served/1", "--env-manager", "local", "-h", "127.0.0.1", "-p",
                               str(port)], cwd=tmp_path, env=venv_env(MLFLOW_TRACKING_URI=store),  # uvicorn on PATH
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"),
                              start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and time.time() < deadline, \
                "mlflow models serve did not start: " + (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        crops = pd.concat(pq.read_table(p, columns=["image"]).to_pandas()
                          for p in sorted((root / "pq" / "faces").rglob("*.parquet")))["image"][:5].map(bytes)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(c).decode()] for c in crops]}}
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert r.status_code == 200, r.text[:500]
        served = r.json()["predictions"]
        reference = Predictor(str(tmp_path / "run" / "model.pt"), device="cpu")
        want, _ = reference.predict(np.stack([decode_image(c, reference.size) for c in crops]))
        assert np.allclose(served, want, atol=1e-3) and len(served) == 5
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
