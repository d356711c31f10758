"""Benchmark: prepare through Spark vs a plain-Python multiprocessing baseline, same run, same images.

1. Composites N UTKFace chips onto 640x480 backgrounds (random position and scale; the paste
   box is the ground truth) in a work folder outside the repo.
2. Baseline: multiprocessing.Pool(workers) runs the very same per-file function
   (spark_jobs.prepare_steps.process_file: label, decode, detect, align, crop) and writes Parquet
   with pyarrow.
3. Spark: `spark-submit spark_jobs/prepare.py` over the same folder (local[workers]).
4. Reports images/s of both and their ratio, detection recall, and the median distance from the
   crop's centre (mapped back to the photo) to the pasted face's centre.

    python -m bench.prepare_bench --utkface ../shared/data/utkface --n 2000
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from schemas import layout
from bench.common import REPO  # noqa: E402

from schemas.crop import CropSettings  # noqa: E402
from photos.faces import crop_center_in_source, crop_transform  # noqa: E402
from spark_jobs.prepare_steps import PROCESSED, PrepareSettings, process_file  # noqa: E402


def make_composites(utkface: Path, folder: Path, n: int, seed: int) -> Path:
    """Write n composites and truth.csv (name, cx, cy, side); reuse them when already there."""
    from PIL import Image

    from photos.synthetic import jpeg_bytes, paste_on_background

    truth = folder / "truth.csv"
    if truth.exists() and sum(1 for _ in open(truth)) == n + 1:
        return truth
    folder.mkdir(parents=True, exist_ok=True)
    photos = folder / "photos"
    photos.mkdir(exist_ok=True)
    names = sorted(os.listdir(utkface))
    rng = np.random.default_rng(seed)
    chosen = [names[i] for i in sorted(rng.choice(len(names), n, replace=False))]
    with open(truth, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["name", "cx", "cy", "side"])
        for name in chosen:
            face = Image.open(utkface / name).convert("RGB")
            im, (cx, cy, side) = paste_on_background(face, rng, (640, 480), float(rng.uniform(0.6, 1.6)))
            target = name.replace(".jpg.chip.jpg", ".jpg")
            (photos / target).write_bytes(jpeg_bytes(im, 92))
            out.writerow([target, f"{cx:.1f}", f"{cy:.1f}", f"{side:.1f}"])
    return truth


_SETTINGS = None


def _init(settings):
    global _SETTINGS
    os.environ["OMP_NUM_THREADS"] = "1"
    _SETTINGS = settings


def _one(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read()
    return process_file("file:" + path, raw, _SETTINGS)


def baseline(photos: Path, out: Path, workers: int, settings: PrepareSettings) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas.fields import arrow_schema

    start = time.time()
    paths = sorted(str(p) for p in photos.iterdir() if p.is_file())
    with mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(settings,)) as pool:
        rows = pool.map(_one, paths, chunksize=16)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=arrow_schema(PROCESSED))
    pq.write_table(table, out / "part-0.parquet")
    seconds = time.time() - start
    faces = sum(r["reason"] is None for r in rows)
    return {"seconds": seconds, "images": len(paths), "faces": faces, "img_per_s": len(paths) / seconds}


def spark_run(photos: Path, out: Path, workers: int, extra_args) -> dict:
    env = dict(os.environ, FACEAGE_SPARK_MASTER=f"local[{workers}]")
    spark_submit = Path(sys.executable).parent / "spark-submit"
    cmd = [str(spark_submit), "--master", f"local[{workers}]", str(REPO / "spark_jobs" / "prepare.py"),
           "--input", str(photos), "--output", str(out), "--format", "parquet", *extra_args]
    start = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.time() - start
    manifest = json.loads((out / layout.LATEST_MANIFEST).read_text())
    job = manifest["timings_s"]["total"] - manifest["timings_s"]["spark_start"]
    n = manifest["counts"]["inputs"]
    return {"seconds": seconds, "job_seconds": job, "images": n, "faces": manifest["counts"]["faces"],
            "img_per_s": n / seconds, "job_img_per_s": n / job, "manifest": manifest}


def centre_errors(table_dir: Path, truth_csv: Path, settings: CropSettings):
    import pyarrow.parquet as pq

    from schemas.layout import table_files

    truth = {r["name"]: r for r in csv.DictReader(open(truth_csv))}
    px, rel = [], []
    for uri in table_files(str(table_dir)):
        for row in pq.read_table(uri[len("file://"):], columns=["source_path", "landmarks"]).to_pylist():
            t = truth[Path(row["source_path"]).name]
            m = crop_transform(np.array(row["landmarks"]).reshape(5, 2), settings.size, settings.margin)
            c = crop_center_in_source(m, settings.size)
            d = float(np.hypot(c[0] - float(t["cx"]), c[1] - float(t["cy"])))
            px.append(d)
            rel.append(d / float(t["side"]))
    return float(np.median(px)), float(np.median(rel)), len(px)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--utkface", type=Path, default=REPO.parent / "shared" / "data" / "utkface")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/faceage-bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    if not args.utkface.is_dir():
        sys.exit(f"bench: {args.utkface} is absent; pass --utkface FOLDER")
    truth = make_composites(args.utkface, args.workdir / f"composites-{args.n}-{args.seed}", args.n, args.seed)
    photos = truth.parent / "photos"
    crop = CropSettings(size=args.size)
    settings = PrepareSettings(crop=crop, labels="utkface", dataset="utkface", fractions=(0.8, 0.1, 0.1),
                               split_salt="faceage-v1", run_id="bench")
    base = baseline(photos, args.workdir / "baseline_out", args.workers, settings)
    spark = spark_run(photos, args.workdir / "spark_out", args.workers, ["--size", str(args.size)])
    med_px, med_rel, matched = centre_errors(args.workdir / "spark_out" / "faces", truth, crop)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "n": args.n, "workers": args.workers,
        "baseline_img_per_s": round(base["img_per_s"], 1),
        "spark_img_per_s": round(spark["img_per_s"], 1),
        "spark_job_img_per_s": round(spark["job_img_per_s"], 1),
        "ratio_end_to_end": round(spark["img_per_s"] / base["img_per_s"], 3),
        "ratio_job_only": round(spark["job_img_per_s"] / base["img_per_s"], 3),
        "baseline_s": round(base["seconds"], 1), "spark_s": round(spark["seconds"], 1),
        "spark_job_s": round(spark["job_seconds"], 1),
        "recall": round(spark["faces"] / spark["images"], 4),
        "baseline_recall": round(base["faces"] / base["images"], 4),
        "rejects_by_reason": spark["manifest"]["rejects_by_reason"],
        "median_centre_error_px": round(med_px, 1), "median_centre_error_frac_of_face": round(med_rel, 3),
    }
    print(json.dumps(result, indent=2))
    (args.workdir / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
