"""faceage.serve over real HTTP on 127.0.0.1: a server process started here, real requests, every wait bounded."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import queue
import re
import subprocess
import sys
import threading
import time

import pytest
import requests
from PIL import Image

from conftest import REPO, encode, synthetic_photo, venv_env
from spark_jobs import predict
from trainer import inference, runtime

pytestmark = pytest.mark.slow


def start_server(model, *flags, seconds: float = 180.0):
    """(process, base URL) of `python -m faceage.serve --model MODEL --port 0 FLAGS`, once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "faceage.serve", "--model", str(model), "--port", "0", *flags],
                            cwd=REPO, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline, seen = time.time() + seconds, []
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise AssertionError(f"the server did not start within {seconds} s: {''.join(seen)[-2000:]}")


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_photos")
    paths = []
    for i, age in enumerate((8, 35, 70)):
        photo, _ = synthetic_photo(age, seed=40 + i)
        paths.append(folder / f"p{i}.jpg")
        paths[-1].write_bytes(encode(photo))
    return paths


@pytest.fixture(scope="module")
def server(bundles):
    _, detecting = bundles
    proc, url = start_server(detecting, "--max-upload-mb", "4", "--max-images", "8")
    yield url, detecting
    stop(proc)


def _ages(body: dict):
    return [[face["age"] for face in image["faces"]] for image in body["images"]]


def test_the_service_gives_the_ages_predict_gives(server, photos):
    url, model = server
    want = predict.estimate_ages([str(p) for p in photos], str(model))
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    by_upload = requests.post(f"{url}/predict", files=files, timeout=60)
    assert by_upload.status_code == 200, by_upload.text
    body = by_upload.json()
    assert [image["name"] for image in body["images"]] == [p.name for p in photos]
    assert body["model_id"] == runtime.model_id(str(model))
    got = _ages(body)
    assert [len(faces) for faces in got] == [1, 1, 1]
    assert [faces[0] for faces in got] == pytest.approx([r["age"] for r in want], abs=1e-4)
    face = body["images"][0]["faces"][0]
    assert face["box"] == pytest.approx(want[0]["bbox"]) and len(face["landmarks"]) == 10
    assert face["alignment"] == "landmarks" and 0 < face["det_score"] <= 1
    assert face["uncertainty"] == pytest.approx(want[0]["uncertainty"], abs=1e-4)  # the distribution head's std

    as_json = requests.post(f"{url}/predict", timeout=60, json={"images": [
        {"name": "a", "data": base64.b64encode(photos[0].read_bytes()).decode()},
        base64.b64encode(photos[1].read_bytes()).decode()]})
    assert as_json.status_code == 200, as_json.text
    assert [faces[0] for faces in _ages(as_json.json())] == pytest.approx([r["age"] for r in want[:2]], abs=1e-4)
    one = requests.post(f"{url}/predict", timeout=60,
                        json={"image": base64.b64encode(photos[2].read_bytes()).decode()}).json()
    assert one["images"][0]["faces"][0]["age"] == pytest.approx(want[2]["age"], abs=1e-4)


def test_health_and_model_say_what_is_served(server):
    url, model = server
    assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok", "model_id": runtime.model_id(str(model))}
    info = requests.get(f"{url}/model", timeout=10).json()
    meta = inference.describe(str(model))
    assert info["model_id"] == runtime.model_id(str(model)) and info["format"] == "bundle"
    assert (info["head"], info["input_size"], info["crop"]) == (meta["head"], meta["input_size"], meta["crop"])
    assert info["data_version"] == (meta.get("data") or {}).get("version")
    assert info["photo_crop"]["detector"] == "yunet" and info["framing"] == runtime.framing(meta)


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    return buf.getvalue()


def _bad_requests(good: bytes):
    """(what, requests.post keyword arguments, the status wanted): every bad input the issue names, and more."""
    big = os.urandom(5 * 2**20)  # over --max-upload-mb 4
    return [
        ("no file", {"files": {"comment": (None, "hello")}}, 400),
        ("no part at all", {"data": b"--x--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
         400),
        ("not an image", {"files": {"file": ("a.jpg", b"this is text, not a photo")}}, 422),
        ("a truncated JPEG", {"files": {"file": ("t.jpg", good[: len(good) // 3])}}, 422),
        ("a 20,000 x 20,000 PNG", {"files": {"file": ("bomb.png", _png((20000, 20000)))}}, 413),
        ("a 7,000 x 7,000 PNG (over --max-pixels, under Pillow's cap)",
         {"files": {"file": ("wide.png", _png((7000, 7000)))}}, 413),
        ("an oversized upload", {"files": {"file": ("big.jpg", big)}}, 413),
        ("a wrong field", {"files": {"photo": ("a.jpg", good)}}, 400),
        ("100 images at once", {"files": [("files", (f"{i}.jpg", good)) for i in range(100)]}, 413),
        ("an empty file", {"files": {"file": ("e.jpg", b"")}}, 422),
        ("a form, not multipart", {"data": {"file": "x"}}, 415),
        ("JSON without images", {"json": {"photos": []}}, 400),
        ("JSON with bad base64", {"json": {"images": ["%%%not base64"]}}, 400),
        ("JSON that does not parse", {"data": b"{nope", "headers": {"Content-Type": "application/json"}}, 400),
        ("JSON with no images", {"json": {"images": []}}, 400),
    ]


def test_every_bad_input_gets_a_4xx_with_one_line_and_the_server_keeps_serving(server, photos):
    url, model = server
    good = photos[0].read_bytes()
    for what, kwargs, status in _bad_requests(good):
        r = requests.post(f"{url}/predict", timeout=60, **kwargs)
        assert r.status_code == status, (what, r.status_code, r.text)
        error = r.json()["error"]
        assert error and "\n" not in error and "Traceback" not in error, (what, error)
    assert requests.get(f"{url}/nowhere", timeout=10).status_code == 404
    assert "error" in requests.get(f"{url}/predict", timeout=10).json()  # 405, one line too
    after = requests.post(f"{url}/predict", files={"file": ("p.jpg", good)}, timeout=60)
    assert after.status_code == 200 and after.json()["images"][0]["status"] == "ok"


def test_a_photo_without_a_face_is_an_answer_not_an_error(server):
    url, _ = server
    blank = encode(Image.new("RGB", (320, 240), (120, 120, 120)), "PNG")
    r = requests.post(f"{url}/predict", files={"file": ("blank.png", blank)}, timeout=60)
    assert r.status_code == 200
    image = r.json()["images"][0]
    assert image["status"] == "no_face" and image["faces"] == [] and image["detail"]


def test_a_concurrent_burst_with_bad_images_among_good_ones(server, photos):
    """4 clients, 24 requests, every third one a bad image: each good request gets its own photo's age."""
    url, model = server
    want = {p.name: r["age"] for p, r in zip(photos, predict.estimate_ages([str(p) for p in photos], str(model)))}

    def ask(i):
        if i % 3 == 2:
            return "bad", requests.post(f"{url}/predict", files={"file": ("x.jpg", b"not an image")}, timeout=120)
        photo = photos[i % len(photos)]
        return photo.name, requests.post(f"{url}/predict", files={"file": (photo.name, photo.read_bytes())},
                                         timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(24)))
    for name, r in answers:
        if name == "bad":
            assert r.status_code == 422, r.text
        else:
            assert r.status_code == 200, r.text
            assert r.json()["images"][0]["faces"][0]["age"] == pytest.approx(want[name], abs=1e-4)


def test_an_onnx_export_is_served_with_the_bundles_ages(bundles, photos, tmp_path):
    from trainer import export

    _, detecting = bundles
    onnx = tmp_path / "model.onnx"
    assert export.main(["--model", str(detecting), "--format", "onnx", "--output", str(onnx)]) == 0
    want = [r["age"] for r in predict.estimate_ages([str(p) for p in photos], str(detecting))]
    proc, url = start_server(onnx)
    try:
        r = requests.post(f"{url}/predict", files=[("files", (p.name, p.read_bytes())) for p in photos], timeout=60)
        assert r.status_code == 200, r.text
        assert [faces[0] for faces in _ages(r.json())] == pytest.approx(want, abs=1e-3)
        assert requests.get(f"{url}/model", timeout=10).json()["format"] == "onnx"
    finally:
        stop(proc)


def test_a_server_that_cannot_start_says_why_in_one_line(bundles, tmp_path):
    plain, _ = bundles
    missing = subprocess.run([sys.executable, "-m", "faceage.serve", "--model", str(tmp_path / "none.pt")],
                             cwd=REPO, env=venv_env(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert missing.stderr.startswith("serve: error:") and "no such model file" in missing.stderr
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "faceage.serve", "--model", str(plain), "--port", str(port)],
                              cwd=REPO, env=venv_env(), capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2 and "cannot listen on 127.0.0.1" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr + busy.stdout
