"""Benchmark: faces/s of spark_jobs/score.py (spark-submit, local[2]) vs a plain-Python loop, same photos,
same detector, same model, same run; and where the plain loop's time goes (decode, detect, align, infer).

The model is an untrained ResNet-18 bundle at 128 px with YuNet crop settings (inference cost does not
depend on the weights). Photos: the first --photos files of a folder (e.g. bench.prepare_bench's
UTKFace composites, kept outside the repository).

    python -m bench.score_bench --photos-dir /tmp/faceage-bench/composites-2000-0 --photos 400
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from schemas import layout
from bench.common import REPO  # noqa: E402


def make_bundle(path: str, size: int) -> None:
    from schemas.crop import CropSettings
    from trainer.bundle import Provenance, save_bundle
    from trainer.model import build_model

    save_bundle(path, build_model("distribution"), "distribution", size, CropSettings(size=size, detector="yunet")
                .to_dict(), Provenance({"uri": "bench", "version": None}, {}, {}))


def plain_loop(folder: str, bundle: str) -> dict:
    """One Python process: read each file, crop_faces (all faces), batched inference: no Spark."""
    from spark_jobs import score_steps

    settings = score_steps.ScoreSettings(bundle=bundle, model_id="bench", data_version=None, input_version=None,
                                     run_id="bench", batch_size=64)
    start = time.time()
    pred = score_steps.Predictor(bundle)  # default torch threads: all cores (trainer.bundle.Predictor)
    timings, rows = {"load_model": time.time() - start}, 0
    faces = 0
    names = sorted(os.listdir(folder))
    t = time.time()
    for i in range(0, len(names), 64):  # the same 64-photo batches Spark's Arrow batches hold
        records = []
        for name in names[i:i + 64]:
            with open(os.path.join(folder, name), "rb") as f:
                records.append((name, f.read()))
        out = score_steps.score_photos(records, pred, settings, timings=timings)
        rows += len(out)
        faces += sum(r["status"] == "ok" for r in out)
    seconds = time.time() - start
    return {"seconds": seconds, "loop_seconds": time.time() - t, "faces": faces, "rows": rows,
            "phases_s": {k: round(v, 2) for k, v in timings.items()}}


def spark_run(folder: str, bundle: str, out: str) -> dict:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    start = time.time()
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "spark-submit"), "--master", "local[2]",
                           str(REPO / "spark_jobs" / "score.py"), "--model", bundle, "--input", folder,
                           "--output", out, "--mode", "overwrite"], env=env, capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    manifest = json.loads(Path(out, layout.SCORE_MANIFEST).read_text())
    return {"seconds": seconds, "job_seconds": manifest["seconds"], "faces": manifest["counts"]["faces"],
            "photos": manifest["counts"]["photos"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos-dir", required=True)
    p.add_argument("--photos", type=int, default=400)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="faceage-score-bench-"))
    folder = work / "photos"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in sorted(os.listdir(args.photos_dir))[:args.photos]:
        shutil.copy(os.path.join(args.photos_dir, name), folder / name)
    bundle = str(work / layout.MODEL)
    make_bundle(bundle, args.size)
    # alternating, --repeats times each; this VM's speed drifts (another tenant's load shows up as minutes
    # of 2-3x slower runs), so each side's fastest run is compared and every run is reported
    sparks, plains = [], []
    for _ in range(args.repeats):
        sparks.append(spark_run(str(folder), bundle, str(work / "scored")))
        plains.append(plain_loop(str(folder), bundle))
    best_spark = min(sparks, key=lambda r: r["seconds"])
    plain = min(plains, key=lambda r: r["seconds"])
    import torch

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__} (CPU)",
        "photos": args.photos, "image_size": args.size,
        "plain_faces": plain["faces"], "spark_faces": best_spark["faces"],
        "plain_faces_per_s": round(plain["faces"] / plain["seconds"], 2),
        "spark_faces_per_s_end_to_end": round(best_spark["faces"] / best_spark["seconds"], 2),
        "spark_faces_per_s_job": round(best_spark["faces"] / best_spark["job_seconds"], 2),
        "ratio_end_to_end": round(plain["seconds"] / best_spark["seconds"], 3),
        "ratio_job": round(plain["seconds"] / best_spark["job_seconds"], 3),
        "plain_seconds": round(plain["seconds"], 1), "plain_phases_s": plain["phases_s"],
        "spark_runs_s": [round(r["seconds"], 1) for r in sparks],
        "spark_job_runs_s": [r["job_seconds"] for r in sparks],
        "plain_runs_s": [round(r["seconds"], 1) for r in plains],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
