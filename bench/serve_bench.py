"""Benchmark: the HTTP service (faceage.serve) vs calling the predict path in a loop in one process, and an ONNX
export in ONNX Runtime vs the bundle in torch - same photos, same model, same run.

One-face photos (synthetic faces pasted into 640x480 scenes, found by YuNet) scored:
- in-process: faceage.Estimator.predict(photo bytes), one photo per call (the baseline);
- over HTTP on 127.0.0.1: POST /predict with one photo per request, from 1 and from 4 concurrent clients
  (requests/s, p50 and p95 latency);
- with the .onnx export (trainer.export) in the same in-process loop, and the model alone on a batch of crops
  (torch vs ONNX Runtime, faces/s).
The model is an untrained ResNet-18 bundle with YuNet crop settings at --size px (inference cost does not depend
on the weights), or --model.

    python -m bench.serve_bench --photos 40 --size 64
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import REPO, env_with_venv, machine
from schemas import layout


def make_photos(n: int):
    import io

    import numpy as np

    from photos.synthetic import draw_face, paste_on_background

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        scene, _ = paste_on_background(draw_face(int(rng.integers(5, 80)), rng, 200), rng, (640, 480), 1.0)
        buf = io.BytesIO()
        scene.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_bundle(path: str, size: int) -> None:
    from schemas.crop import CropSettings
    from trainer.bundle import Provenance, save_bundle
    from trainer.model import build_model

    save_bundle(path, build_model("distribution").eval(), "distribution", size,
                CropSettings(size=size, detector="yunet").to_dict(), Provenance({}, {}, {}))


def latencies(work, items, clients: int):
    """(seconds in all, per-item latencies) of work(item) over `items` from `clients` threads."""
    def timed(item):
        t0 = time.perf_counter()
        work(item)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        each = list(pool.map(timed, items))
    return time.perf_counter() - t0, each


def row(name: str, seconds: float, each, n: int) -> dict:
    cuts = statistics.quantiles(each, n=20) if len(each) > 1 else each * 19
    return {"mode": name, "requests": n, "seconds": round(seconds, 3), "per_s": round(n / seconds, 2),
            "p50_ms": round(statistics.median(each) * 1000, 1), "p95_ms": round(cuts[18] * 1000, 1)}


def start(model: str):
    import re

    proc = subprocess.Popen([sys.executable, "-m", "faceage.serve", "--model", model, "--port", "0"], cwd=REPO,
                            env=env_with_venv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    for line in proc.stdout:  # bounded: the server prints this line within seconds, or exits
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return proc, found.group(1)
        if time.time() > deadline:
            break
    proc.kill()
    raise SystemExit("serve_bench: the server did not start")


def http_rows(model: str, photos, clients_list) -> list:
    import requests

    proc, url = start(model)
    try:
        local = threading.local()  # one keep-alive connection per client thread

        def post(photo):
            if not hasattr(local, "session"):
                local.session = requests.Session()
            r = local.session.post(f"{url}/predict", files={"file": ("p.jpg", photo)}, timeout=120)
            assert r.status_code == 200 and r.json()["images"][0]["status"] == "ok", r.text

        post(photos[0])  # warm
        out = []
        for clients in clients_list:
            seconds, each = latencies(post, photos, clients)
            out.append(row(f"HTTP, {clients} client{'s' if clients > 1 else ''}", seconds, each, len(photos)))
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def model_rows(bundle: str, onnx: str, size: int, n: int = 256) -> list:
    import numpy as np

    from trainer import inference

    crops = np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    out = []
    for name, path in (("model alone, torch (bundle)", bundle), ("model alone, ONNX Runtime (export)", onnx)):
        predictor = inference.load_predictor(path, "cpu")
        predictor.predict(crops[:64])  # warm
        t0 = time.perf_counter()
        predictor.predict(crops, batch_size=64)
        seconds = time.perf_counter() - t0
        out.append({"mode": name, "faces": n, "seconds": round(seconds, 3), "per_s": round(n / seconds, 1)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=40)
    p.add_argument("--size", type=int, default=64, help="model input size (the recipe's: 64)")
    p.add_argument("--model", help="a bundle (default: an untrained one at --size)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "faceage-serve-bench"))
    args = p.parse_args(argv)
    from faceage import Estimator
    from trainer import export

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = args.model or str(work / layout.MODEL)
    if not args.model:
        make_bundle(bundle, args.size)
    onnx = str(work / "model.onnx")
    export.export(bundle, "onnx", onnx)
    photos = make_photos(args.photos)
    results = []
    for name, path in (("in-process loop, torch (baseline)", bundle), ("in-process loop, ONNX Runtime", onnx)):
        est = Estimator.load(path)
        est.predict(photos[0])  # warm
        seconds, each = latencies(est.predict, photos, 1)
        results.append(row(name, seconds, each, len(photos)))
    results += http_rows(bundle, photos, (1, 4))
    results += model_rows(bundle, onnx, Estimator.load(bundle).predictor.size)
    base = results[0]["per_s"]
    for r in results[:4]:
        r["vs_baseline"] = round(r["per_s"] / base, 2)
    print(json.dumps({"machine": machine(), "photos": args.photos, "size": args.size, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
