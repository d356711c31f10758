"""python -m spark_jobs.emr: request shapes checked against boto3's real EMR/S3 service models (Stubber)."""
import json
import subprocess
import sys
import zipfile

import boto3
import pytest
from botocore.stub import ANY, Stubber
from botocore.validate import validate_parameters

from conftest import REPO, spark_submit, venv_env
from spark_jobs import emr

STEPS = ["--step", "prepare", "--input s3a://b/photos --output s3a://b/prepared --format delta",
         "--step", "train", "--num-processes 2 --data s3a://b/prepared --epochs 3",
         "--step", "score", "--model s3://b/model.pt --input s3a://b/new --output s3a://b/scored",
         "--step", "evaluate", "--predictions s3a://b/scored --labels s3a://b/prepared --output s3://b/report",
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
    assert {"schemas/tables.py", "photos/faces.py", "trainer/train.py", "trainer/data.py"} <= names
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
        emr_stub.add_response("list_steps", {"Steps": [{"Id": f"s-{i}"} for i in reversed(range(5))]},
                              {"ClusterId": "j-NEW"})
        result = emr.submit(args, emr=client, s3=s3)
    req = result["request"]
    assert result["response"]["JobFlowId"] == "j-NEW" and result["step_ids"] == [f"s-{i}" for i in range(5)]
    assert req["ReleaseLabel"] == "emr-spark-8.0.0" and req["Instances"]["KeepJobFlowAliveWhenNoSteps"] is False
    assert req["BootstrapActions"][0]["ScriptBootstrapAction"]["Path"] == "s3://b/faceage/v1/emr_bootstrap.sh"
    assert {"Name": "Delta"} in req["Applications"] and req["Instances"]["Ec2SubnetId"] == "subnet-1"


@pytest.mark.parametrize("bad, message", [
    (["--code", "b/faceage", "--cluster-id", "j-1", "--step", "prepare", ""], "s3://"),
    (["--code", "s3://b/x", "--cluster-id", "j-1"], "at least one --step"),
    (["--code", "s3://b/x", "--step", "prepare", ""], "--cluster-id"),
    (["--code", "s3://b/x", "--cluster-id", "j-1", "--step", "deploy", ""], "use one of"),
    # a local path on a cluster names one node's disk: refused for every data flag, = form too
    (["--code", "s3://b/x", "--cluster-id", "j-1", "--step", "train", "--data s3://b/p --output runs/t"],
     "--output runs/t is a local path"),
    (["--code", "s3://b/x", "--cluster-id", "j-1", "--step", "prepare", "--input s3://b/a /data/photos --output s3://b/o"],
     "--input /data/photos is a local path"),
    (["--code", "s3://b/x", "--cluster-id", "j-1", "--step", "score", "--model=model.pt --input s3://b/i"],
     "--model model.pt is a local path"),
    (["chain", "--code", "s3://b/x", "--cluster-id", "j-1", "--photos", "photos", "--run", "s3://b/r"],
     "--photos photos is a local path"),
    (["chain", "--code", "s3://b/x", "--cluster-id", "j-1", "--photos", "s3://b/p"], "--run s3://... is required"),
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


# --------------------------------------------------------------------------- the chain

CHAIN = ["chain", "--code", "s3://b/faceage/v1", "--photos", "s3://b/photos", "--run", "s3://b/runs/r1"]


def _step_argv(step):
    """The job's own arguments of a planned step (after its entry script and sub-command)."""
    argv = step["HadoopJarStep"]["Args"]
    script = next(a for a in argv if a.endswith(".py"))
    rest = argv[argv.index(script) + 1:]
    return dict(zip(rest[::1], rest[1::1]))


def test_the_chain_hands_every_output_to_the_next_step_on_s3(tmp_path):
    args = emr.get_args_parser().parse_args([*CHAIN, "--create-cluster", "--dist", str(tmp_path / "d"),
                                             "--gpu-instance-type", "g5.2xlarge"])
    planned = emr.plan(args)
    model = _client("emr").meta.service_model
    validate_parameters(planned["request"], model.operation_model("RunJobFlow").input_shape)
    steps = planned["request"]["Steps"]
    assert [s["Name"] for s in steps] == ["faceage prepare", "faceage train", "faceage score", "faceage evaluate"]
    assert {s["ActionOnFailure"] for s in steps} == {"CANCEL_AND_WAIT"}  # a failed step stops the ones after it
    prepare, train, score, evaluate = map(_step_argv, steps)
    assert prepare["--input"] == "s3://b/photos" and prepare["--output"] == "s3://b/runs/r1/prepared"
    assert train["--data"] == prepare["--output"] and train["--output"] == "s3://b/runs/r1/train"
    assert train["--device"] == "cuda"  # the GPU core nodes train
    assert score["--model"] == train["--output"] + "/model.pt" and score["--input"] == prepare["--output"]
    assert evaluate["--predictions"] == score["--output"] and evaluate["--labels"] == prepare["--output"]
    assert evaluate["--output"].startswith("s3://b/runs/r1/")
    core = planned["request"]["Instances"]["InstanceGroups"][1]
    assert core["InstanceType"] == "g5.2xlarge"
    classes = {c["Classification"] for c in planned["request"]["Configurations"]}
    assert {"yarn-site", "container-executor", "capacity-scheduler"} <= classes


def test_wait_reports_each_step_and_names_the_logs_of_a_failed_one(tmp_path, capsys):
    client = _client("emr")
    cluster = {"Cluster": {"Id": "j-1", "Name": "faceage", "Status": {"State": "RUNNING"},
                           "LogUri": "s3n://b/logs/"}}

    def step_state(step_id, state, **status):
        return {"Step": {"Id": step_id, "Name": f"faceage {step_id}", "Status": {"State": state, **status},
                         "Config": {"Jar": "command-runner.jar"}, "ActionOnFailure": "CANCEL_AND_WAIT"}}

    with Stubber(client) as stub:
        stub.add_response("describe_step", step_state("s-1", "COMPLETED"), {"ClusterId": "j-1", "StepId": "s-1"})
        stub.add_response("describe_step", step_state("s-1", "COMPLETED"), {"ClusterId": "j-1", "StepId": "s-1"})
        stub.add_response("describe_cluster", cluster, {"ClusterId": "j-1"})
        stub.add_response("describe_step", step_state("s-2", "FAILED", FailureDetails={"Message": "exit 2"}),
                          {"ClusterId": "j-1", "StepId": "s-2"})  # the waiter sees a failure state
        stub.add_response("describe_step", step_state("s-2", "FAILED", FailureDetails={"Message": "exit 2"}),
                          {"ClusterId": "j-1", "StepId": "s-2"})
        stub.add_response("describe_cluster", cluster, {"ClusterId": "j-1"})
        with pytest.raises(emr.EmrError) as failed:
            emr.wait(client, "j-1", ["s-1", "s-2"], minutes=1, delay=1)
    assert "faceage s-1 (s-1): COMPLETED; logs s3://b/logs/j-1/steps/s-1/" in capsys.readouterr().out
    assert "ended FAILED: exit 2; logs: s3://b/logs/j-1/steps/s-2/" in str(failed.value)


@pytest.mark.slow
def test_the_chain_is_accepted_by_moto_and_runs_on_local_spark_through_s3(s3_bucket, tmp_path):
    """moto's EMR accepts the cluster and its steps and its S3 holds the uploaded bundle (read back here);
    then each accepted step's own spark-submit line runs on local Spark (EMR's command-runner, emulated:
    its script and code zip swapped for this checkout's), every hand-off through the local S3 server."""
    import boto3

    from photos.synthetic import write_demo_folder

    endpoint = __import__("os").environ["AWS_ENDPOINT_URL"]
    s3 = boto3.client("s3", endpoint_url=endpoint)
    photos = tmp_path / "photos"
    files = write_demo_folder(str(photos), count=40)
    for p in photos.iterdir():
        s3.upload_file(str(p), s3_bucket, f"photos/{p.name}")
    proc = subprocess.run(
        [sys.executable, "-m", "spark_jobs.emr", "chain", "--code", f"s3://{s3_bucket}/code", "--photos",
         f"s3://{s3_bucket}/photos", "--run", f"s3://{s3_bucket}/runs/r1", "--create-cluster", "--log-uri",
         f"s3://{s3_bucket}/logs", "--dist", str(tmp_path / "dist"), "--region", "us-east-1",
         "--train-processes", "1", "--prepare-args", "--format delta --size 48",
         "--train-args", "--epochs 1 --image-size 32 --batch-size 16 --no-progress"],
        cwd=REPO, env=venv_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    client = boto3.client("emr", endpoint_url=endpoint, region_name="us-east-1")
    listed = client.list_steps(ClusterId=result["cluster_id"])["Steps"][::-1]
    assert [s["Id"] for s in listed] == result["step_ids"] and len(listed) == 4
    bundle = tmp_path / "code.zip"
    s3.download_file(s3_bucket, f"code/{emr.CODE_ZIP}", str(bundle))
    assert "trainer/train.py" in zipfile.ZipFile(bundle).namelist()

    for s in listed:  # what EMR would run, in order, on this machine's Spark
        argv = s["Config"]["Args"]
        local = [a for a in argv]
        for flag in ("--deploy-mode", "--py-files"):
            i = local.index(flag)
            del local[i:i + 2]
        local = [a for i, a in enumerate(local) if not (a == "--conf" and local[i + 1].startswith("spark.pyspark"))
                 and not (i > 0 and local[i - 1] == "--conf" and a.startswith("spark.pyspark"))]
        script = next(a for a in local if a.endswith(".py"))
        local[local.index(script)] = str(REPO / script.split("/code/", 1)[1])
        local[0] = spark_submit()
        run = subprocess.run(local, cwd=tmp_path, env=venv_env(), capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, s["Name"] + "\n" + run.stdout[-2000:] + run.stderr[-3000:]
    prepared = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/r1/prepared/manifest.json")["Body"].read())
    metrics = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/r1/report/metrics.json")["Body"].read())
    assert prepared["counts"]["inputs"] == files
    assert metrics["rows"]["matched"] == prepared["splits"]["test"] and metrics["rows"]["labels_without_prediction"] == 0
