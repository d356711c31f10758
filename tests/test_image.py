"""The runtime image, built for real without a registry (docker/rootfs.sh: Debian's mmdebstrap + the locked
wheels) and used from inside its own filesystem (docker/run-in-image.sh: unshare + chroot, as a container):
a 4-photo prepare, a score run with an ONNX export, the HTTP service answering a photo over loopback."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import REPO, encode, synthetic_photo, venv_env

pytestmark = pytest.mark.slow
RUN = ["bash", str(REPO / "docker" / "run-in-image.sh")]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The image folder: $FACEAGE_IMAGE_ROOT when it names one make image built, else built here."""
    given = os.environ.get("FACEAGE_IMAGE_ROOT")
    if given and (Path(given) / ".faceage-image").exists():
        yield Path(given)
        return
    missing = [tool for tool in ("mmdebstrap", "unshare", "chroot") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        why = f"needs root and {', '.join(missing) or 'mmdebstrap'} (.ci/run installs Debian's mmdebstrap)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI builds the runtime image: {why}")
        pytest.skip(why)
    out = tmp_path_factory.mktemp("image") / "root"
    t0 = time.time()
    proc = subprocess.run(["bash", str(REPO / "docker" / "rootfs.sh"), str(out)], cwd=REPO, env=venv_env(),
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    print(f"image built in {time.time() - t0:.0f} s: {proc.stdout.strip().splitlines()[-1]}")
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)  # 2.4 GB: not left behind in pytest's folders


@pytest.fixture(scope="module")
def inside(image):
    """A fresh folder inside the image: (its host path, its path in the image)."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    host = image / "tmp" / name
    host.mkdir(parents=True)
    yield host, f"/tmp/{name}"
    shutil.rmtree(host, ignore_errors=True)


@pytest.fixture(scope="module")
def onnx_inside(bundles, inside):
    from trainer import export

    _, detecting = bundles
    host, path = inside
    assert export.main(["--model", str(detecting), "--output", str(host / "model.onnx")]) == 0
    photos = host / "photos"
    photos.mkdir()
    for i, age in enumerate((14, 29, 47, 73)):
        photo, _ = synthetic_photo(age, seed=120 + i)
        (photos / f"{age}_0_0_2026010100{i:05d}.jpg").write_bytes(encode(photo))
    return host, path


def run_inside(image, *command, timeout=600):
    return subprocess.run([*RUN, str(image), *command], capture_output=True, text=True, timeout=timeout)


def test_the_image_holds_the_runtime_and_no_torch_cuda_or_test_tools(image):
    site = next((image / "opt" / "faceage" / "venv" / "lib").glob("python3*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.iterdir()}
    assert {"pyspark", "onnxruntime", "fastapi", "uvicorn", "faceage", "spark_jobs"} <= installed
    assert not {n for n in installed if n.startswith(("torch", "nvidia", "triton", "pytest", "moto", "ipykernel"))}
    version = run_inside(image, "java", "-version")
    assert version.returncode == 0 and "17." in version.stderr
    which = run_inside(image, "python", "-c", "import sys, faceage; print(sys.version_info[:2], 'torch' in sys.modules)")
    assert which.returncode == 0 and which.stdout.strip() == "(3, 11) False", which.stderr[-1000:]
    size = subprocess.run(["du", "-sm", str(image)], capture_output=True, text=True).stdout.split()[0]
    print(f"image size: {size} MB")


def test_a_four_photo_prepare_and_an_onnx_score_run_inside_the_image(image, onnx_inside):
    from spark_jobs import predict

    host, path = onnx_inside
    prepared = run_inside(image, "faceage-prepare", "--input", f"{path}/photos", "--output", f"{path}/prepared",
                          "--size", "32")
    assert prepared.returncode == 0, (prepared.stdout + prepared.stderr)[-3000:]
    manifest = json.loads((host / "prepared" / "manifest.json").read_text())
    assert manifest["counts"]["faces"] == 4 and sum(manifest["splits"].values()) == 4
    scored = run_inside(image, "faceage-score", "--model", f"{path}/model.onnx", "--input", f"{path}/photos",
                        "--output", f"{path}/scored")
    assert scored.returncode == 0, (scored.stdout + scored.stderr)[-3000:]
    import pandas as pd
    import pyarrow.parquet as pq

    rows = pd.concat(pq.read_table(p).to_pandas() for p in (host / "scored" / "predictions").glob("*.parquet"))
    got = {os.path.basename(r.source_path): r.predicted_age for r in rows.itertuples()}
    want = {os.path.basename(r["source"]): r["age"] for r in predict.estimate_ages(str(host / "photos"),
                                                                                   str(host / "model.onnx"))}
    assert got.keys() == want.keys() and len(got) == 4
    assert all(abs(got[k] - want[k]) <= 1e-3 for k in got)


def test_the_service_inside_the_image_answers_a_photo_over_loopback(image, onnx_inside):
    from spark_jobs import predict

    host, path = onnx_inside
    t0 = time.time()
    proc = subprocess.Popen([*RUN, str(image), "faceage-serve", "--model", f"{path}/model.onnx", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = None
        for line in proc.stdout:  # the server prints its address within seconds, or exits (then the loop ends)
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if found:
                url = found.group(1)
                break
            assert time.time() - t0 < 180, "no address within 180 s"
        assert url, "the service exited before listening"
        deadline = time.time() + 60
        while requests.get(f"{url}/health", timeout=5).status_code != 200:
            assert time.time() < deadline
            time.sleep(0.2)
        print(f"service answered /health {time.time() - t0:.2f} s after the command started")
        photo = sorted((host / "photos").iterdir())[0]
        r = requests.post(f"{url}/predict", files={"file": (photo.name, photo.read_bytes())}, timeout=60)
        assert r.status_code == 200, r.text
        want = predict.estimate_ages(str(photo), str(host / "model.onnx"))[0]["age"]
        assert abs(r.json()["images"][0]["faces"][0]["age"] - want) <= 1e-3
        bad = requests.post(f"{url}/predict", files={"file": ("x.jpg", b"not a photo")}, timeout=60)
        assert bad.status_code == 422 and "\n" not in bad.json()["error"]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
