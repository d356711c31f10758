"""python -m spark_jobs.emr: request shapes checked against boto3's real EMR/S3 service models (Stubber)."""
import json
import subprocess
import sys
import zipfile

import boto3
import pytest
from botocore.stub import ANY, Stubber
from botocore.validate import validate_parameters

from conftest import REPO, venv_env
from spark_jobs import emr

STEPS = ["--step", "prepare", "--input s3a://b/photos --output s3a://b/prepared --format delta",
         "--step", "train", "--num-processes 2 --data s3a://b/prepared --epochs 3",
         "--step", "score", "--model s3://b/model.pt --input s3a://b/new --output s3a://b/scored",
         "--step", "evaluate", "--predictions s3a://b/scored --labels s3a://b/prepared --output /tmp/r",
         "--step", "tune", "--data s3a://b/prepared --storage postgresql://u@db/optuna --n-trials 20"]


def _client(name):
    return boto3.client(name, region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x")


def _args(tmp_path, *extra):
    return emr.get_args_parser().parse_args(["--code", "s3://b/faceage/v1", "--dist", str(tmp_path / "dist"),
                                             *STEPS, *extra])


def test_dry_run_prints_valid_requests_for_every_job(tmp_path):
    out = subprocess.run([sys.executable, "-m", "spark_jobs.emr", "--dry-run", "--code", "s3://b/faceage/v1",
                          "--cluster-id", "j-ABC", "--dist", str(tmp_path / "dist"), *STEPS], cwd=REPO,
                         env=venv_env(), capture_output=True, text=True, check=True).stdout
    planned = json.loads(out)
    assert planned["operation"] == "AddJobFlowSteps"
    model = _client("emr").meta.service_model
    validate_parameters(planned["request"], model.operation_model("AddJobFlowSteps").input_shape)  # raises if wrong
    steps = planned["request"]["Steps"]
    assert [s["Name"] for s in steps] == [f"faceage {j}" for j in ("prepare", "train", "score", "evaluate", "tune")]
    for s, (job, args) in zip(steps, zip(STEPS[1::3], STEPS[2::3])):
        argv = s["HadoopJarStep"]["Args"]
        assert s["HadoopJarStep"]["Jar"] == "command-runner.jar" and argv[0] == "spark-submit"
        assert argv[argv.index("--py-files") + 1] == "s3://b/faceage/v1/faceage_code.zip"
        script = "s3://b/faceage/v1/" + emr.JOBS[job][0]
        # the job's sub-command (distributed train/tune), then its own arguments, intact and in order
        assert argv[argv.index(script) + 1:] == emr.JOBS[job][2] + args.split()
        assert f"spark.pyspark.python={emr.VENV_PYTHON}" in argv
    assert "s3://b/faceage/v1/emr_bootstrap.sh" in planned["uploads"]


def test_the_bundle_holds_the_code_and_pins(tmp_path):
    files = emr.build(str(tmp_path / "dist"))
    with zipfile.ZipFile(files[emr.CODE_ZIP]) as z:
        names = set(z.namelist())
    assert {"schemas/tables.py", "spark_jobs/faces.py", "trainer/train.py", "trainer/data.py"} <= names
    assert not any("__pycache__" in n or "/tests/" in n for n in names)
    lock = (tmp_path / "dist" / "requirements.lock").read_text()
    assert "torch==2.14.1" in lock and "pyarrow==14.0.2" in lock
    for script, _, _ in emr.JOBS.values():
        assert (tmp_path / "dist" / script).read_text() == (REPO / script).read_text()


def test_submit_to_a_running_cluster_uploads_then_adds_steps(tmp_path):
    args = _args(tmp_path, "--cluster-id", "j-ABC")
    s3, client = _client("s3"), _client("emr")
    expected_uploads = sorted(emr.build(str(tmp_path / "dist")))
    with Stubber(s3) as s3_stub, Stubber(client) as emr_stub:
        for name in expected_uploads:
            s3_stub.add_response("put_object", {"ETag": '"1"'},
                                 {"Bucket": "b", "Key": f"faceage/v1/{name}", "Body": ANY})
        emr_stub.add_response("add_job_flow_steps", {"StepIds": [f"s-{i}" for i in range(5)]},
                              {"JobFlowId": "j-ABC", "Steps": ANY})
        result = emr.submit(args, emr=client, s3=s3)
        s3_stub.assert_no_pending_responses()
        emr_stub.assert_no_pending_responses()
    assert result["response"]["StepIds"] == [f"s-{i}" for i in range(5)]
    assert len(result["request"]["Steps"]) == 5


def test_transient_cluster_request_matches_the_service_model(tmp_path):
    args = _args(tmp_path, "--create-cluster", "--log-uri", "s3://b/logs", "--subnet", "subnet-1")
    s3, client = _client("s3"), _client("emr")
    with Stubber(s3) as s3_stub, Stubber(client) as emr_stub:
        for _ in emr.build(str(tmp_path / "dist")):
            s3_stub.add_response("put_object", {}, {"Bucket": "b", "Key": ANY, "Body": ANY})
        emr_stub.add_response("run_job_flow", {"JobFlowId": "j-NEW", "ClusterArn": "arn:aws:elasticmapreduce:eu-west-1:123456789012:cluster/j-NEW"}, None)
        result = emr.submit(args, emr=client, s3=s3)
    req = result["request"]
    assert result["response"]["JobFlowId"] == "j-NEW"
    assert req["ReleaseLabel"] == "emr-spark-8.0.0" and req["Instances"]["KeepJobFlowAliveWhenNoSteps"] is False
    assert req["BootstrapActions"][0]["ScriptBootstrapAction"]["Path"] == "s3://b/faceage/v1/emr_bootstrap.sh"
    assert {"Name": "Delta"} in req["Applications"] and req["Instances"]["Ec2SubnetId"] == "subnet-1"


@pytest.mark.parametrize("bad, message", [
    (["--code", "b/faceage", "--cluster-id", "j-1", "--step", "prepare", ""], "s3://"),
    (["--code", "s3://b/x", "--cluster-id", "j-1"], "at least one --step"),
    (["--code", "s3://b/x", "--step", "prepare", ""], "--cluster-id"),
    (["--code", "s3://b/x", "--cluster-id", "j-1", "--step", "deploy", ""], "use one of"),
])
def test_bad_requests_are_refused_before_any_call(bad, message, tmp_path, capsys):
    assert emr.main(["--dry-run", "--dist", str(tmp_path / "d"), *bad]) == 2
    assert message in capsys.readouterr().err


def test_the_wheel_carries_every_data_file_the_code_reads(tmp_path, monkeypatch):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("faceage-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"spark_jobs/log4j2.properties", "spark_jobs/emr_bootstrap.sh"} <= names
    assert any(n.endswith(".data/data/share/faceage/requirements.lock") for n in names)
    # installed from that wheel, the code finds the pins under the environment's prefix
    prefix = tmp_path / "prefix"
    (prefix / "share" / "faceage").mkdir(parents=True)
    (prefix / "share" / "faceage" / "requirements.lock").write_text("torch==2.14.1\n")
    monkeypatch.setattr(emr, "REPO", str(tmp_path / "no-checkout"))
    monkeypatch.setattr(sys, "prefix", str(prefix))
    assert emr.requirements_lock() == str(prefix / "share" / "faceage" / "requirements.lock")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))
    with pytest.raises(emr.EmrError, match="requirements.lock not found"):
        emr.requirements_lock()
