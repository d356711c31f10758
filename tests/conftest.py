"""Shared fixtures: one local SparkSession for the run, synthetic face photos, the UTKFace folder."""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
UTKFACE = Path(os.environ.get("FACEAGE_UTKFACE", REPO.parent / "shared" / "data" / "utkface"))
# JVM options for the short Spark jobs of the suite (drivers, and executors/daemons of the standalone cluster)
TEST_JVM_OPTS = "-XX:TieredStopAtLevel=1"


def restore_environ(saved: dict) -> None:
    """Put back the environment variables `saved` recorded ({name: value, None where it was unset})."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def scratch_inside_the_session(tmp_path_factory):
    """Every temp file of the run, the jobs' own and those of Spark and torch, in the session's folder rather than
    /tmp: what a process the tests SIGKILL cannot remove goes with the session's folder (pytest keeps the last 2
    sessions' folders, and removes a passed session's)."""
    import tempfile

    root = tmp_path_factory.mktemp("scratch", numbered=False)
    saved = {k: os.environ.get(k)
             for k in ("TMPDIR", "SPARK_LOCAL_DIRS", "SPARK_SUBMIT_OPTS", "SPARK_DAEMON_JAVA_OPTS")}
    os.environ["TMPDIR"] = os.environ["SPARK_LOCAL_DIRS"] = str(root)
    # a driver JVM's own temp files (native libraries it unpacks, Spark's artifacts folder) too; and the client
    # compiler only (JIT tier 1): the suite starts ~100 driver JVMs for jobs of seconds, where C2's compiling
    # costs more than it saves (a 3-photo prepare: 31-34 s -> 23-26 s on a 2-core AVX2 VM, BENCHMARKS.md)
    os.environ["SPARK_SUBMIT_OPTS"] = \
        f"{saved['SPARK_SUBMIT_OPTS'] or ''} -Djava.io.tmpdir={root} {TEST_JVM_OPTS}".strip()
    os.environ["SPARK_DAEMON_JAVA_OPTS"] = f"{saved['SPARK_DAEMON_JAVA_OPTS'] or ''} {TEST_JVM_OPTS}".strip()
    tempfile.tempdir = None  # this process's tempfile reads TMPDIR again
    yield root
    restore_environ(saved)
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def spark():
    os.environ.setdefault("FACEAGE_SPARK_MASTER", "local[2]")
    from spark_jobs.session import get_spark

    session = get_spark("faceage-tests", {"spark.sql.shuffle.partitions": "4",
                                          "spark.default.parallelism": "2"})
    yield session
    session.stop()


@pytest.fixture(scope="session")
def utkface_dir():
    if not UTKFACE.is_dir():
        pytest.skip(f"UTKFace folder {UTKFACE} is absent")
    return UTKFACE


def venv_env(**extra) -> dict:
    """Environment for a child spark-submit: the venv first on PATH, as after `source .venv/bin/activate`."""
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def spark_submit() -> str:
    return os.path.join(os.path.dirname(sys.executable), "spark-submit")


def synthetic_face(age: int = 35, seed: int = 0, size: int = 200) -> Image.Image:
    from photos.synthetic import draw_face

    return draw_face(age, np.random.default_rng(seed), size)


def synthetic_photo(age: int = 35, seed: int = 0, scale: float = 1.0, canvas=(640, 480)):
    """(photo, (cx, cy, side)) - a drawn face pasted on a 640x480 background."""
    from photos.synthetic import paste_on_background

    rng = np.random.default_rng(seed + 1000)
    return paste_on_background(synthetic_face(age, seed), rng, canvas, scale)


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tables(spark, tmp_path_factory):
    """A prepared Parquet table and a Delta table with two versions (60 then 80 faces)."""
    from spark_jobs import prepare

    root = tmp_path_factory.mktemp("tables")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(80):
        age = int(rng.integers(1, 90))
        (photos / f"{age}_0_0_2026010100{i:05d}.jpg").write_bytes(encode(synthetic_face(age, seed=i, size=64)))
    first = root / "first"
    first.mkdir()
    for p in sorted(photos.iterdir())[:60]:
        shutil.copy(p, first / p.name)
    common = ["--detector", "none", "--size", "32", "--splits", "0.6,0.2,0.2"]
    assert prepare.main(["--input", str(photos), "--output", str(root / "pq")] + common) == 0
    assert prepare.main(["--input", str(first), "--output", str(root / "delta"), "--format", "delta"] + common) == 0
    v0 = json.loads((root / "delta" / "manifest.json").read_text())
    assert prepare.main(["--input", str(photos), "--output", str(root / "delta"), "--format", "delta",
                         "--mode", "append"] + common) == 0
    pq_manifest = json.loads((root / "pq" / "manifest.json").read_text())
    return root, pq_manifest, v0


@pytest.fixture(scope="session")
def bundles(tables, tmp_path_factory):
    """A bundle trained 1 epoch on the fixture table (crops by --detector none), and a copy whose crop
    settings use the YuNet detector (for photos)."""
    import torch

    from schemas.crop import CropSettings
    from trainer import train

    root, _, _ = tables
    out = tmp_path_factory.mktemp("bundle")
    assert train.main(["--data", str(root / "pq"), "--output", str(out), "--epochs", "1", "--image-size", "32",
                      "--batch-size", "16", "--workers", "1", "--reader", "pyarrow", "--no-progress"]) == 0
    plain = out / "model.pt"
    bundle = torch.load(plain, weights_only=True)
    bundle["crop"] = CropSettings(size=32, detector="yunet").to_dict()
    detecting = out / "model-yunet.pt"
    torch.save(bundle, detecting)
    return plain, detecting


# ----------------------------------------------------------------------------- a local S3 server

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAFACEAGELOCAL0001", "AWS_SECRET_ACCESS_KEY": "local-server-secret-0001",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


def _wait_http(url: str, seconds: float = 20.0) -> bool:
    import time
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server on 127.0.0.1 (moto's server mode): the one .ci/s3.sh started
    ($FACEAGE_TEST_S3), else one started here for the session. The AWS environment points every
    client at it (boto3, s3fs, Spark's S3A and child processes alike), with throwaway credentials."""
    import socket
    import subprocess

    endpoint, proc = os.environ.get("FACEAGE_TEST_S3"), None
    if not endpoint:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(tmp_path_factory.mktemp("s3") / "moto.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        endpoint = f"http://127.0.0.1:{port}"
    if not _wait_http(endpoint + "/moto-api/"):
        pytest.fail(f"no S3 server answers at {endpoint}")
    saved = {k: os.environ.get(k) for k in [*S3_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    restore_environ(saved)
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the local S3 server; yields its name."""
    import re

    import boto3

    name = "faceage-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    yield name
