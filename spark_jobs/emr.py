"""python -m spark_jobs.emr: ship the code to S3 and run prepare / score / evaluate / train / tune as EMR steps.

    # build the code bundle only (dist/: faceage_code.zip for --py-files, job scripts, requirements.lock,
    # the bootstrap script)
    python -m spark_jobs.emr build
    # print the exact requests, touch nothing
    python -m spark_jobs.emr --dry-run --code s3://bucket/faceage --cluster-id j-XXXX \\
        --step prepare "--input s3a://bucket/photos --output s3a://bucket/prepared --format delta" \\
        --step train "--num-processes 2 --data s3a://bucket/prepared --epochs 30"
    # a transient cluster that runs the steps and terminates
    python -m spark_jobs.emr --code s3://bucket/faceage --create-cluster --log-uri s3://bucket/logs --step ...
    # the whole chain prepare -> train -> score -> evaluate, every hand-off on S3, waiting for each step
    python -m spark_jobs.emr chain --code s3://bucket/faceage --photos s3://bucket/photos \
        --run s3://bucket/runs/r1 --create-cluster --log-uri s3://bucket/logs --wait

On a cluster every hand-off goes through S3 (or HDFS): a step's input or output given as a local
path would name one node's disk, so it is refused before anything is submitted.

Target: the EMR release label emr-spark-8.0.0 (Spark 4.0.2, Delta 4.0.0, Python 3.11-3.13, JDK 17 by
default), the first EMR release whose Spark matches this project's pins (pyspark 4.0.x, which Petastorm's
pyarrow <= 14 cap requires). EMR 7.x ships Spark 3.5 and cannot run these jobs. Delta comes from EMR's
own jars (delta-defaults), not --packages. The bootstrap action builds /opt/faceage/venv on every node
from the pinned requirements.lock, and Spark's Python is pointed at it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import zipfile
from typing import Dict, List, Optional


from shell.cli import entry_points, log, Parser, positive_int
from shell.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE_LABEL = "emr-spark-8.0.0"
VENV_PYTHON = "/opt/faceage/venv/bin/python"
CODE_ZIP = "faceage_code.zip"
BOOTSTRAP = "emr_bootstrap.sh"
PACKAGES = ("photos", "schemas", "shell", "spark_jobs", "trainer")
JOBS = {  # job -> (entry script inside the bundle, spark-submit deploy mode, leading arguments)
    "prepare": ("spark_jobs/prepare.py", "cluster", []),
    "score": ("spark_jobs/score.py", "cluster", []),
    "evaluate": ("spark_jobs/evaluate.py", "cluster", []),  # its report goes to S3 (shell.uri) like every output
    # TorchDistributor ranks / Spark-task tune workers, started from the driver
    "train": ("spark_jobs/distributed.py", "client", ["train"]),
    "tune": ("spark_jobs/distributed.py", "client", ["tune"]),
}
SPARK_CONF = {
    "spark.pyspark.python": VENV_PYTHON,
    "spark.pyspark.driver.python": VENV_PYTHON,
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    "spark.executorEnv.OMP_NUM_THREADS": "1",
}


class EmrError(UserError):
    """A problem a user can fix."""


# ----------------------------------------------------------------------------- the code bundle

def requirements_lock() -> str:
    """The pinned environment: beside the code in a checkout, or where the wheel installed it
    (share/faceage/requirements.lock under the environment's prefix)."""
    for candidate in (os.path.join(REPO, "requirements.lock"),
                      os.path.join(sys.prefix, "share", "faceage", "requirements.lock")):
        if os.path.isfile(candidate):
            return candidate
    raise EmrError("requirements.lock not found beside the code or under share/faceage: reinstall faceage "
                   "(make install, or the wheel from make dist)")


def build(out_dir: str) -> Dict[str, str]:
    """dist/: the zip for --py-files, each job's entry script, requirements.lock and the bootstrap script."""
    os.makedirs(out_dir, exist_ok=True)
    zip_path = os.path.join(out_dir, CODE_ZIP)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for package in PACKAGES:
            for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, package)):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                for name in sorted(filenames):
                    if name.endswith(".py"):
                        full = os.path.join(dirpath, name)
                        z.write(full, os.path.relpath(full, REPO))
    files = {CODE_ZIP: zip_path}
    for script, _, _ in JOBS.values():
        target = os.path.join(out_dir, script)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(os.path.join(REPO, script), "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
        files[script] = target
    for name, src in (("requirements.lock", requirements_lock()),
                      (BOOTSTRAP, os.path.join(REPO, "spark_jobs", BOOTSTRAP))):
        target = os.path.join(out_dir, name)
        with open(src, "rb") as s, open(target, "wb") as d:
            d.write(s.read())
        files[name] = target
    return files


def split_s3(uri: str):
    if not uri.startswith("s3://"):
        raise EmrError(f"--code {uri}: use an s3://bucket/prefix URI")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise EmrError(f"--code {uri}: no bucket")
    return bucket, prefix.strip("/")


def upload(s3, files: Dict[str, str], code_uri: str) -> List[str]:
    """put_object every bundle file under code_uri (small files: one request each)."""
    bucket, prefix = split_s3(code_uri)
    keys = []
    for name, path in sorted(files.items()):
        key = f"{prefix}/{name}" if prefix else name
        with open(path, "rb") as f:
            s3.put_object(Bucket=bucket, Key=key, Body=f.read())
        keys.append(f"s3://{bucket}/{key}")
    return keys


# ----------------------------------------------------------------------------- steps and clusters

# the flags whose values are data locations (inputs and outputs of every job)
PATH_FLAGS = ("--input", "--output", "--data", "--model", "--labels", "--predictions", "--bundle", "--params",
              "--init-weights")


def check_paths(job: str, words: List[str]) -> None:
    """Refuse a local path for any data location of a cluster step (it would be one node's disk)."""
    from shell import uri

    for i, word in enumerate(words):
        flag, _, value = word.partition("=")
        if flag not in PATH_FLAGS:
            continue
        values = [value] if value else []
        for nxt in words[i + 1:] if not value else []:
            if nxt.startswith("--"):
                break
            values.append(nxt)
        for v in values:
            if not uri.is_remote(v):
                raise EmrError(f"--step {job}: {flag} {v} is a local path; on EMR every input and output goes "
                               f"through S3 (s3://bucket/...) or HDFS, or the next step (on another node) "
                               f"cannot find it")


def step(job: str, args: str, code_uri: str, action_on_failure: str = "CONTINUE") -> dict:
    """One EMR step: command-runner.jar running spark-submit on the job's entry script."""
    if job not in JOBS:
        raise EmrError(f"--step {job}: use one of {sorted(JOBS)}")
    script, mode, leading = JOBS[job]
    words = shlex.split(args)
    check_paths(job, words)
    code = code_uri.rstrip("/")
    argv = ["spark-submit", "--deploy-mode", mode, "--py-files", f"{code}/{CODE_ZIP}"]
    for key, value in SPARK_CONF.items():
        argv += ["--conf", f"{key}={value}"]
    argv += [f"{code}/{script}"] + leading + words
    return {"Name": f"faceage {job}", "ActionOnFailure": action_on_failure,
            "HadoopJarStep": {"Jar": "command-runner.jar", "Args": argv}}


# YARN GPU scheduling and Spark's GPU discovery on EMR (what TorchDistributor's use_gpu needs): EMR's documented
# settings for GPU instance groups. Written from the EMR docs; not run on a real cluster from here.
GPU_CONFIGURATIONS = [
    {"Classification": "yarn-site", "Properties": {
        "yarn.nodemanager.resource-plugins": "yarn.io/gpu",
        "yarn.resource-types": "yarn.io/gpu",
        "yarn.nodemanager.resource-plugins.gpu.allowed-gpu-devices": "auto",
        "yarn.nodemanager.resource-plugins.gpu.path-to-discovery-executables": "/usr/bin",
        "yarn.nodemanager.linux-container-executor.cgroups.mount": "true",
        "yarn.nodemanager.linux-container-executor.cgroups.mount-path": "/sys/fs/cgroup",
        "yarn.nodemanager.linux-container-executor.cgroups.hierarchy": "yarn",
        "yarn.nodemanager.container-executor.class":
            "org.apache.hadoop.yarn.server.nodemanager.LinuxContainerExecutor"}},
    {"Classification": "container-executor", "Configurations": [
        {"Classification": "gpu", "Properties": {"module.enabled": "true"}},
        {"Classification": "cgroups", "Properties": {"root": "/sys/fs/cgroup", "yarn-hierarchy": "yarn"}}],
     "Properties": {}},
    {"Classification": "capacity-scheduler", "Properties": {
        "yarn.scheduler.capacity.resource-calculator":
            "org.apache.hadoop.yarn.util.resource.DominantResourceCalculator"}},
]
GPU_SPARK_CONF = {
    "spark.executor.resource.gpu.amount": "1",
    "spark.task.resource.gpu.amount": "1",
    "spark.executor.resource.gpu.discoveryScript": "/usr/lib/spark/scripts/gpu/getGpusResources.sh",
}


@dataclasses.dataclass(frozen=True)
class ClusterShape:
    """What a transient cluster is made of (the --create-cluster flags)."""

    instance_type: str
    core_count: int
    subnet: Optional[str] = None
    release: str = RELEASE_LABEL
    gpu_instance_type: Optional[str] = None  # the core nodes' type when they are GPU instances

    @classmethod
    def from_args(cls, args) -> "ClusterShape":
        return cls(args.instance_type, args.core_count, args.subnet, args.release_label, args.gpu_instance_type)


def cluster_request(name: str, steps: List[dict], code_uri: str, log_uri: Optional[str], shape: ClusterShape) -> dict:
    """RunJobFlow request for a transient cluster that runs `steps` and terminates. With a GPU instance type
    the core nodes are GPU instances (the trainer's ranks each take one GPU; the bootstrap installs the
    CUDA build of torch there, the CPU build elsewhere)."""
    code = code_uri.rstrip("/")
    instance_type, gpu_instance_type = shape.instance_type, shape.gpu_instance_type
    instances = {
        "InstanceGroups": [
            {"Name": "master", "InstanceRole": "MASTER", "InstanceType": instance_type, "InstanceCount": 1},
            {"Name": "core", "InstanceRole": "CORE", "InstanceType": gpu_instance_type or instance_type,
             "InstanceCount": shape.core_count},
        ],
        "KeepJobFlowAliveWhenNoSteps": False,
        "TerminationProtected": False,
    }
    if shape.subnet:
        instances["Ec2SubnetId"] = shape.subnet
    request = {
        "Name": name,
        "ReleaseLabel": shape.release,
        "Applications": [{"Name": "Spark"}, {"Name": "Delta"}],
        "Instances": instances,
        "Steps": steps,
        "BootstrapActions": [{"Name": "faceage pinned Python stack",
                              "ScriptBootstrapAction": {"Path": f"{code}/{BOOTSTRAP}", "Args": [code]}}],
        "Configurations": [
            {"Classification": "delta-defaults", "Properties": {"delta.enabled": "true"}},
            {"Classification": "spark-defaults",
             "Properties": {**SPARK_CONF, **(GPU_SPARK_CONF if gpu_instance_type else {})}},
            *(GPU_CONFIGURATIONS if gpu_instance_type else []),
        ],
        "JobFlowRole": "EMR_EC2_DefaultRole",
        "ServiceRole": "EMR_DefaultRole",
        "VisibleToAllUsers": True,
        "Tags": [{"Key": "app", "Value": "faceage"}],
    }
    if log_uri:
        request["LogUri"] = log_uri
    return request


# ----------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("emr", prog="python -m spark_jobs.emr", description=__doc__.splitlines()[0],
               epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("command", nargs="?", default="submit", choices=("submit", "chain", "build"),
                   help="submit: the --step jobs; chain: prepare -> train -> score -> evaluate through --run; "
                        "build: only the code bundle")
    p.add_argument("--code", help="s3://bucket/prefix for the code bundle")
    p.add_argument("--dist", default=os.path.join(REPO, "dist"), help="local folder for the built bundle")
    p.add_argument("--step", nargs=2, action="append", metavar=("JOB", "ARGS"), default=[],
                   help=f"a job ({', '.join(JOBS)}) and its arguments as one string; repeatable, run in order")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cluster-id", help="add the steps to this running cluster (j-...)")
    where.add_argument("--create-cluster", action="store_true", help="a transient cluster that runs the steps")
    p.add_argument("--name", default="faceage")
    p.add_argument("--release-label", default=RELEASE_LABEL)
    p.add_argument("--instance-type", default="m5.2xlarge", help="master (and core, without a GPU type)")
    p.add_argument("--gpu-instance-type", default=None, metavar="TYPE",
                   help="core nodes of this GPU type (e.g. g5.2xlarge): the chain's train step runs on their GPUs "
                        "(--device cuda); without it training runs on the CPU cores")
    p.add_argument("--core-count", type=positive_int, default=2)
    p.add_argument("--subnet", default=None)
    p.add_argument("--log-uri", default=None)
    p.add_argument("--region", default=None)
    p.add_argument("--action-on-failure", default="CONTINUE", choices=("CONTINUE", "CANCEL_AND_WAIT", "TERMINATE_CLUSTER"))
    p.add_argument("--dry-run", action="store_true", help="print the requests as JSON; no AWS call")
    p.add_argument("--wait", action="store_true",
                   help="wait for every step (boto3's step_complete waiter), printing each step's state and log URI")
    p.add_argument("--wait-minutes", type=positive_int, default=24 * 60, help="give up waiting after this long")
    chain = p.add_argument_group("chain (prepare -> train -> score -> evaluate, every hand-off under --run)")
    chain.add_argument("--photos", help="s3://... folder of labelled photos (UTKFace-style names) to prepare")
    chain.add_argument("--run", help="s3://bucket/prefix for the chain's outputs: prepared/, train/, scored/, report/")
    chain.add_argument("--score-photos", default=None,
                       help="s3://... photos to score (default: the prepared table's test split)")
    chain.add_argument("--train-processes", type=positive_int, default=2, help="TorchDistributor ranks")
    chain.add_argument("--prepare-args", default="--format delta", help="extra prepare flags")
    chain.add_argument("--train-args", default="--epochs 30 --no-progress", help="extra trainer flags")
    chain.add_argument("--score-args", default="", help="extra score flags")
    chain.add_argument("--evaluate-args", default="", help="extra evaluate flags")
    return p


def chain_steps(args) -> List[List[str]]:
    """[job, args] for prepare -> train -> score -> evaluate, each reading what the one before wrote on S3."""
    from shell import uri

    for flag, value in (("--photos", args.photos), ("--run", args.run)):
        if not value:
            raise EmrError(f"chain: {flag} s3://... is required")
        if not uri.is_remote(value):
            raise EmrError(f"chain: {flag} {value} is a local path; the chain's steps run on other nodes: give "
                           f"an s3:// URI")
    run = args.run.rstrip("/")
    prepared, train, scored = f"{run}/prepared", f"{run}/train", f"{run}/scored"
    device = " --device cuda" if args.gpu_instance_type else " --device cpu"
    score_input = f"--input {args.score_photos}" if args.score_photos else f"--input {prepared} --split test"
    return [
        ["prepare", f"--input {args.photos} --output {prepared} {args.prepare_args}".strip()],
        ["train", f"--num-processes {args.train_processes} --data {prepared} --output {train}{device} "
                  f"{args.train_args}".strip()],
        ["score", f"--model {train}/model.pt {score_input} --output {scored} {args.score_args}".strip()],
        ["evaluate", f"--predictions {scored} --labels {prepared} --split test --output {run}/report "
                     f"{args.evaluate_args}".strip()],
    ]


def plan(args) -> dict:
    """The requests this invocation makes: uploads, then AddJobFlowSteps or RunJobFlow."""
    if not args.code:
        raise EmrError("--code s3://bucket/prefix is required")
    split_s3(args.code)
    if args.command == "chain":
        if args.step:
            raise EmrError("chain builds its own steps: leave out --step (or use submit)")
        args.step = chain_steps(args)
        if args.action_on_failure == "CONTINUE":  # a later step needs the earlier one's output
            args.action_on_failure = "CANCEL_AND_WAIT"
    if not args.step:
        raise EmrError("give at least one --step JOB \"ARGS\"")
    if not (args.cluster_id or args.create_cluster):
        raise EmrError("say where the steps run: --cluster-id j-... or --create-cluster")
    steps = [step(job, job_args, args.code, args.action_on_failure) for job, job_args in args.step]
    if args.cluster_id:
        return {"operation": "AddJobFlowSteps", "request": {"JobFlowId": args.cluster_id, "Steps": steps}}
    return {"operation": "RunJobFlow",
            "request": cluster_request(args.name, steps, args.code, args.log_uri, ClusterShape.from_args(args))}


def submit(args, emr=None, s3=None) -> dict:
    """Build, upload, submit. Clients may be passed in (tests pass stubbed ones)."""
    planned = plan(args)
    files = build(args.dist)
    if args.dry_run:
        bucket, prefix = split_s3(args.code)
        planned["uploads"] = [f"s3://{bucket}/{prefix + '/' if prefix else ''}{name}" for name in sorted(files)]
        return planned
    import boto3

    emr = emr or boto3.client("emr", region_name=args.region)
    s3 = s3 or boto3.client("s3", region_name=args.region)
    planned["uploads"] = upload(s3, files, args.code)
    if planned["operation"] == "AddJobFlowSteps":
        planned["response"] = emr.add_job_flow_steps(**planned["request"])
        cluster, step_ids = args.cluster_id, planned["response"]["StepIds"]
    else:
        planned["response"] = emr.run_job_flow(**planned["request"])
        cluster = planned["response"]["JobFlowId"]
        step_ids = [s["Id"] for s in reversed(emr.list_steps(ClusterId=cluster)["Steps"])]  # newest first
    planned["cluster_id"], planned["step_ids"] = cluster, step_ids
    if args.wait:
        planned["steps"] = wait(emr, cluster, step_ids, args.wait_minutes)
    return planned


def step_log_uri(emr, cluster: str, step_id: str) -> Optional[str]:
    """Where EMR puts a step's stdout/stderr/controller logs (the cluster's LogUri), or None without one."""
    log_uri = emr.describe_cluster(ClusterId=cluster)["Cluster"].get("LogUri")
    if not log_uri:
        return None
    return f"{log_uri.replace('s3n://', 's3://').rstrip('/')}/{cluster}/steps/{step_id}/"


def wait(emr, cluster: str, step_ids: List[str], minutes: int, delay: int = 30) -> List[dict]:
    """Wait for each step in order with boto3's step_complete waiter; print its state and log URI. A step
    that fails or is cancelled ends the wait with EmrError naming its logs."""
    from botocore.exceptions import WaiterError

    waiter = emr.get_waiter("step_complete")
    done = []
    for step_id in step_ids:
        try:
            waiter.wait(ClusterId=cluster, StepId=step_id,
                        WaiterConfig={"Delay": delay, "MaxAttempts": max(1, minutes * 60 // delay)})
        except WaiterError:
            pass  # the state below says what happened
        status = emr.describe_step(ClusterId=cluster, StepId=step_id)["Step"]
        state = status["Status"]["State"]
        logs = step_log_uri(emr, cluster, step_id)
        row = {"id": step_id, "name": status.get("Name"), "state": state, "logs": logs}
        done.append(row)
        log.info(f"emr: {row['name']} ({step_id}): {state}" + (f"; logs {logs}" if logs else ""))
        if state != "COMPLETED":
            reason = (status["Status"].get("FailureDetails") or {}).get("Message") or \
                (status["Status"].get("StateChangeReason") or {}).get("Message") or ""
            raise EmrError(f"step {row['name']} ({step_id}) on {cluster} ended {state}"
                           + (f": {reason}" if reason else "") + (f"; logs: {logs}" if logs else
                                                                  "; no --log-uri, so EMR kept no step logs"))
    return done


def _job(argv: Optional[List[str]]) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "build":
        print(json.dumps(build(args.dist), indent=2))
        return 0
    if args.wait and args.dry_run:
        raise EmrError("--wait needs a submission; leave out --dry-run")
    result = submit(args)
    result.get("response", {}).pop("ResponseMetadata", None)
    print(json.dumps(result, indent=2, default=str))
    return 0


main, console_main = entry_points("emr", _job)

if __name__ == "__main__":
    sys.exit(main())
