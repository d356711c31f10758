"""Every stage against a real S3-compatible server on 127.0.0.1 (moto's server mode, tests/conftest.py).

The chain prepare (Spark, s3a://) -> train (Petastorm over the S3 table, bundle to S3) -> score (model and
photos on S3) -> evaluate (report to S3) must account for every file exactly as on local disk; and a
string that looks like a URI is never turned into a local folder."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, spark_submit, venv_env


def run_cli(args, cwd, timeout=900):
    proc = subprocess.run(args, cwd=cwd, env=venv_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=timeout)
    return proc


def s3_json(client, bucket, key):
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


# --------------------------------------------------------------------------- mistyped URIs stay URIs

CLIS = {  # each stage's CLI, run in this process: the check is argument parsing, before any Spark or torch work
    "prepare": ("spark_jobs.prepare", ["--input", "photos", "--output", "{out}"]),
    "train": ("trainer.train", ["--data", "prepared", "--output", "{out}"]),
    "tune": ("trainer.tune", ["--data", "prepared", "--output", "{out}"]),
    "score": ("spark_jobs.score", ["--model", "m.pt", "--input", "photos", "--output", "{out}"]),
    "evaluate": ("spark_jobs.evaluate", ["--predictions", "p", "--labels", "l", "--output", "{out}"]),
    "predict": ("spark_jobs.predict", ["--model", "{out}", "photo.jpg"]),
}


@pytest.mark.parametrize("stage", sorted(CLIS))
@pytest.mark.parametrize("bad", ["s3:/bucket/run", "s3a:bucket/run", "gs:/b/x"])
def test_a_mistyped_uri_is_refused_and_no_local_folder_appears(tmp_path, stage, bad, monkeypatch, capsys):
    import importlib

    module, args = CLIS[stage]
    monkeypatch.chdir(tmp_path)
    code = importlib.import_module(module).main([a.replace("{out}", bad) for a in args])
    printed = capsys.readouterr()
    out = printed.out + printed.err
    assert code == 2, out[-2000:]
    line = [x for x in out.splitlines() if "error:" in x]
    assert len(line) == 1 and line[0].startswith(f"{stage}: error:"), out[-2000:]
    assert "is not one" in line[0] and "://" in line[0], out[-2000:]
    assert os.listdir(tmp_path) == []  # no `s3:` / `s3a:bucket` / `gs:` folder, nothing at all


def test_uri_layer_reads_writes_and_renames_on_s3(s3_bucket):
    from shell import uri
    from shell.errors import UserError
    from shell.outputs import Outputs

    base = f"s3a://{s3_bucket}/out"
    fs = uri.fs_for(base)
    assert isinstance(fs, uri.RemoteFS) and not fs.exists(base)
    outputs = Outputs(fs, base, "test")
    outputs.check(["report"])
    fs.write_text(outputs.staging("report") + "/a.txt", "one")
    outputs.commit(["report"], folder_markers=["report"])
    outputs.finish()
    assert uri.read_text(f"s3://{s3_bucket}/out/report/a.txt") == "one"  # s3a:// and s3:// name one object
    assert fs.listdir(base) == ["_FACEAGE.json", "report"]
    # a foreign object under the output is never replaced
    fs.write_text(f"{base}/theirs/b.txt", "theirs")
    with pytest.raises(UserError, match="did not write"):
        Outputs(fs, base, "test").check(["theirs"])
    assert uri.check(f"s3://{s3_bucket}/x") == f"s3://{s3_bucket}/x"
    with pytest.raises(UserError, match="is not one"):
        uri.check("s3:/bucket/x")


# --------------------------------------------------------------------------- the whole chain on S3

@pytest.mark.slow
def test_prepare_train_score_evaluate_through_s3(s3_bucket, tmp_path):
    import boto3

    from photos.synthetic import write_demo_folder

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    photos = tmp_path / "photos"
    files = write_demo_folder(str(photos), count=60)
    for name in os.listdir(photos):
        client.upload_file(str(photos / name), s3_bucket, f"photos/{name}")
    root = f"s3a://{s3_bucket}"
    steps = [
        [spark_submit(), str(REPO / "spark_jobs/prepare.py"), "--input", f"{root}/photos", "--output",
         f"{root}/prepared", "--size", "48", "--format", "delta"],
        [sys.executable, "-m", "trainer.train", "--data", f"{root}/prepared", "--output", f"s3://{s3_bucket}/train",
         "--epochs", "1", "--batch-size", "16", "--image-size", "32", "--no-progress"],
        [spark_submit(), str(REPO / "spark_jobs/score.py"), "--model", f"s3://{s3_bucket}/train/model.pt",
         "--input", f"{root}/photos", "--output", f"{root}/scored"],
        [spark_submit(), str(REPO / "spark_jobs/evaluate.py"), "--predictions", f"{root}/scored", "--labels",
         f"{root}/prepared", "--split", "test", "--output", f"s3://{s3_bucket}/report"],
    ]
    for cmd in steps:
        proc = run_cli(cmd, cwd=tmp_path)
        assert proc.returncode == 0, " ".join(cmd[:3]) + "\n" + proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["photos"]  # nothing of the run landed on local disk

    prepared = s3_json(client, s3_bucket, "prepared/manifest.json")
    scored = s3_json(client, s3_bucket, "scored/score_manifest.json")
    summary = s3_json(client, s3_bucket, "train/summary.json")
    metrics = s3_json(client, s3_bucket, "report/metrics.json")
    # every file accounted for, exactly as the local e2e test reconciles them
    assert prepared["counts"]["inputs"] == files
    assert scored["counts"]["photos"] == prepared["counts"]["inputs"]
    assert scored["counts"]["photos_with_faces"] == prepared["counts"]["faces"]
    assert summary["rows"]["test"] == prepared["splits"]["test"] == metrics["rows"]["matched"]
    assert metrics["rows"]["labels_without_prediction"] == 0
    assert metrics["overall"]["mae"] == pytest.approx(summary["test_mae"], rel=1e-4)  # same crops, same model
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {"train/model.pt", "train/checkpoint.pt", "train/metrics.jsonl", "report/report.html"} <= keys
    assert not any("_faceage_staging_" in k for k in keys)  # staging folders removed after the commits
    assert any(k.startswith("prepared/faces/_delta_log/") for k in keys)


@pytest.mark.parametrize("stage", ["prepare-output", "prepare-input", "train-output", "score-model"])
def test_a_missing_bucket_is_one_line_for_every_stage(stage, s3_server, tables, tmp_path):
    root, _, _ = tables
    photos = tmp_path / "photos"
    photos.mkdir()
    missing = "no-such-bucket-faceage"
    cmd = {
        "prepare-output": [spark_submit(), str(REPO / "spark_jobs/prepare.py"), "--input", str(photos), "--output",
                           f"s3a://{missing}/prepared"],
        "prepare-input": [spark_submit(), str(REPO / "spark_jobs/prepare.py"), "--input", f"s3a://{missing}/photos",
                          "--output", str(tmp_path / "out")],
        "train-output": [sys.executable, "-m", "trainer.train", "--data", str(root / "pq"), "--output",
                         f"s3://{missing}/run", "--epochs", "1"],
        "score-model": [spark_submit(), str(REPO / "spark_jobs/score.py"), "--model", f"s3://{missing}/model.pt",
                        "--input", str(photos), "--output", str(tmp_path / "scored")],
    }[stage]
    proc = run_cli(cmd, cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    errors = [x for x in out.splitlines() if "error:" in x]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert missing in errors[0] and ("bucket does not exist" in errors[0] or "no such file" in errors[0])
    assert sorted(os.listdir(tmp_path)) == ["photos"]  # nothing written locally either


def test_the_s3_server_dying_mid_prepare_is_one_line_and_no_trace(tmp_path):
    """An S3 server of its own (moto), killed while prepare's tasks run (a test hook holds the first task):
    the job ends with one `prepare: error:` line naming the URI and exit 2, and no Java or Python trace
    (before: 166 lines of Java frames above the line)."""
    import signal
    import socket
    import time

    import boto3

    from conftest import S3_CREDENTIALS, _wait_http, encode, synthetic_face

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = venv_env(**S3_CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    try:
        assert _wait_http(endpoint + "/moto-api/")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket="dies")
        for i in range(20):
            s3.put_object(Bucket="dies", Key=f"photos/{20 + i}_0_0_2026010100{i:05d}.jpg",
                          Body=encode(synthetic_face(20 + i, seed=i, size=64)))
        pauses = tmp_path / "pauses"
        pauses.mkdir()
        env.update(FACEAGE_PAUSE_AT="prepare-task", FACEAGE_PAUSE_DIR=str(pauses), FACEAGE_PAUSE_SECONDS="120")
        job = subprocess.Popen([spark_submit(), "--master", "local[2]", str(REPO / "spark_jobs" / "prepare.py"),
                                "--input", "s3a://dies/photos", "--output", "s3a://dies/out", "--detector", "none"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while not list(pauses.glob("prepare-task-*")):
            assert job.poll() is None and time.time() < deadline, "prepare never reached its tasks"
            time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    (pauses / "release").write_text("")
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 2, out[-3000:]
    ours = [ln for ln in out.splitlines() if ln.startswith("prepare:")]
    assert len(ours) == 1 and ours[0].startswith("prepare: error: s3a://dies/out"), out[-3000:]
    assert "cannot reach the storage service" in ours[0]
    assert "Traceback" not in out and "\tat " not in out and "Py4J" not in out
    assert len(out.splitlines()) <= 10, out  # the JVM's own start-up lines at most, beside ours
