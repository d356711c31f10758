"""spark-submit spark_jobs/prepare.py: image folders -> faces table + rejects table + run manifest.

Reads image folders recursively (local paths, s3a://, hdfs://), detects, aligns and crops the
largest face of each image, parses its age label, assigns a deterministic split and writes
Parquet or Delta. Every input file ends up as exactly one face row or one reject row.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
import uuid
from typing import List, Optional

if __package__ in (None, ""):  # run as a script (spark-submit spark_jobs/prepare.py): make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from schemas import layout  # noqa: E402
from spark_jobs.faces import DETECTORS, CropSettings  # noqa: E402
from spark_jobs.splits import parse_fractions  # noqa: E402
from spark_jobs.storage import FORMATS, MODES, to_uri  # noqa: E402

DEMO_INPUT = os.path.join("demo_out", "synthetic_photos")
DEMO_OUTPUT = os.path.join("demo_out", "prepared")


# Image files are small and detection is slow: with Spark's defaults (4 MB "open cost" per file) a
# task holds one photo; with these, ~50 small photos (fewer big ones), so tasks are cheap to start
# yet short enough that 2 cores finish together. Arrow batches stay small (image bytes are big).
PREPARE_CONF = {
    "spark.sql.files.openCostInBytes": str(256 * 1024),
    "spark.sql.files.maxPartitionBytes": str(16 * 2**20),
    "spark.sql.execution.arrow.maxRecordsPerBatch": "64",
}


ROWS_PER_OUTPUT_FILE = 10_000  # ~70 MB of 128 px JPEG crops per Parquet file


class UsageError(Exception):
    """A flag or input a user must fix before anything runs."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spark-submit spark_jobs/prepare.py",
        description="Turn folders of face photos into a labelled faces table (Parquet or Delta), "
                    "a rejects table and a JSON run manifest.")
    p.add_argument("--input", action="append", metavar="URI",
                   help="image folder (local path, file:, s3a://, hdfs://); read recursively; repeatable")
    p.add_argument("--output", metavar="URI",
                   help="output root: writes faces/, rejects/, manifest.json and _runs/<run_id>.json under it")
    p.add_argument("--format", default="parquet", help=f"table format: {' | '.join(FORMATS)} (default parquet)")
    p.add_argument("--mode", default="overwrite",
                   help=f"{' | '.join(MODES)}: append adds rows and skips content already in the table")
    p.add_argument("--labels", default="utkface",
                   help="utkface (age_gender_race_date.jpg), fgnet (SSSAaa.JPG) or manifest:URI "
                        "(CSV/Parquet with path, age and optional gender, race, subject_id)")
    p.add_argument("--dataset", default=None, help="value of the dataset column (default: the label kind)")
    p.add_argument("--size", type=int, default=128, help="crop side in pixels (default 128)")
    p.add_argument("--margin", type=float, default=CropSettings.margin,
                   help=f"extra border per side as a fraction of the crop; 0 frames faces like UTKFace's "
                        f"aligned chips (default {CropSettings.margin})")
    p.add_argument("--detector", default="yunet",
                   help="yunet (CNN, 5 landmarks), hog (dlib, box only) or none (inputs are already "
                        "aligned crops: centre-square and resize)")
    p.add_argument("--min-score", type=float, default=CropSettings.min_score,
                   help=f"detector confidence threshold 0..1 (default {CropSettings.min_score})")
    p.add_argument("--min-face", type=int, default=CropSettings.min_face,
                   help=f"smallest face side in source pixels (default {CropSettings.min_face})")
    p.add_argument("--max-pixels", type=int, default=CropSettings.max_pixels,
                   help=f"decompression-bomb cap, width x height (default {CropSettings.max_pixels})")
    p.add_argument("--max-file-bytes", type=int, default=64 * 2**20,
                   help="files larger than this are rejected unread (default 64 MiB)")
    p.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test fractions (default 0.8,0.1,0.1)")
    p.add_argument("--split-salt", default="faceage-v1",
                   help="changes which subjects land in which split; keep it fixed across runs")
    p.add_argument("--demo", action="store_true",
                   help="generate a small SYNTHETIC sample (drawn faces, not real people) and prepare it; "
                        f"default input {DEMO_INPUT}, output {DEMO_OUTPUT}")
    p.add_argument("--demo-count", type=int, default=160, help="synthetic images for --demo (default 160)")
    return p


def _is_within(child: str, parent: str) -> bool:
    child, parent = child.rstrip("/") + "/", parent.rstrip("/") + "/"
    return child.startswith(parent)


def validate(args) -> dict:
    """Check every flag before Spark starts; return the resolved settings or raise UsageError."""
    if args.demo:
        args.input = args.input or [DEMO_INPUT]
        args.output = args.output or DEMO_OUTPUT
    if not args.input:
        raise UsageError("--input is required: give an image folder (repeat --input for several)")
    if not args.output:
        raise UsageError("--output is required: give a folder or URI for the faces table")
    if args.format not in FORMATS:
        raise UsageError(f"--format {args.format!r} is not supported: use parquet or delta")
    if args.mode not in MODES:
        raise UsageError(f"--mode {args.mode!r} is not supported: use overwrite or append")
    if args.detector not in DETECTORS:
        raise UsageError(f"--detector {args.detector!r} is not supported: use yunet, hog or none")
    try:
        fractions = parse_fractions(args.splits)
        crop = CropSettings(size=args.size, margin=args.margin, detector=args.detector,
                            min_score=args.min_score, min_face=args.min_face, max_pixels=args.max_pixels)
    except ValueError as e:
        raise UsageError(str(e)) from None
    labels, manifest = args.labels, None
    if labels.startswith("manifest:"):
        labels, manifest = "manifest", labels[len("manifest:"):]
        if not manifest:
            raise UsageError("--labels manifest:URI needs the manifest's location after the colon")
        local = layout.local_path(manifest)
        if local is not None and not os.path.isfile(local):
            raise UsageError(f"--labels {args.labels}: no such manifest file {local}")
    elif labels not in ("utkface", "fgnet"):
        raise UsageError(f"--labels {labels!r} is not supported: use utkface, fgnet or manifest:URI")
    inputs = [to_uri(i) for i in args.input]
    output = to_uri(args.output)
    for given, uri in zip(args.input, inputs):
        local = layout.local_path(uri)
        if local is not None and not args.demo and not os.path.isdir(local):
            raise UsageError(f"--input {given}: no such folder (give a folder of images; files are read recursively)")
        if _is_within(output, uri):
            raise UsageError(f"--output {args.output} is inside --input {given}: the job would read its own "
                             f"output next time; choose an output folder outside the input")
        if _is_within(uri, output):
            raise UsageError(f"--input {given} is inside --output {args.output}: --mode overwrite would delete "
                             f"the input; choose an output folder outside the input")
    if args.max_file_bytes < 1:
        raise UsageError("--max-file-bytes must be positive")
    return {"inputs": inputs, "output": output, "crop": crop, "fractions": fractions, "labels": labels,
            "manifest": manifest, "dataset": args.dataset or labels}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("pyspark", "delta-spark", "pyarrow", "numpy", "pandas", "pillow", "yuface", "dlib-bin"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run(args, resolved: dict) -> dict:
    """The job: returns the run manifest it wrote."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as sf

    from spark_jobs import pipeline, storage
    from spark_jobs.session import DELTA_PACKAGE, delta_available, get_spark

    started = time.time()
    timings = {}
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    spark = get_spark("faceage-prepare")
    for key, value in PREPARE_CONF.items():  # defaults only: a --conf given to spark-submit wins
        if spark.conf.get(key, None) is None:
            spark.conf.set(key, value)
    if args.format == "delta" and not delta_available(spark):
        raise UsageError(f"Delta classes are not on Spark's classpath: run `make install` (it configures "
                         f"spark-defaults.conf) or pass --packages {DELTA_PACKAGE} to spark-submit")
    timings["spark_start"] = round(time.time() - started, 3)

    settings = pipeline.PrepareSettings(crop=resolved["crop"], labels=resolved["labels"],
                                        dataset=resolved["dataset"], fractions=resolved["fractions"],
                                        split_salt=args.split_salt, run_id=run_id)
    inputs, output, fmt = resolved["inputs"], resolved["output"], args.format
    faces_uri, rejects_uri = layout.faces_uri(output), layout.rejects_uri(output)

    t = time.time()
    inventory = pipeline.list_files(spark, inputs)
    n_inputs = len(inventory)
    if n_inputs == 0:
        raise UsageError(f"no files under --input {' '.join(inputs)}: nothing to prepare (is it the right folder?)")
    listing = pipeline.inventory_frame(spark, inventory)
    timings["list"] = round(time.time() - t, 3)

    images = pipeline.read_images(spark, inputs, args.max_file_bytes)
    if resolved["labels"] == "manifest":
        manifest = pipeline.read_manifest(spark, resolved["manifest"])
        images = pipeline.attach_manifest_labels(images, manifest, inputs)
    t = time.time()
    processed = pipeline.faces_per_file(images, settings).persist(StorageLevel.MEMORY_AND_DISK)
    n_processed = processed.count()  # run detection once, here; every later step reads the cached rows
    timings["detect"] = round(time.time() - t, 3)
    # Many small partitions suit detection; for writing, a few big ones (fewer tasks and files).
    partitions = max(spark.sparkContext.defaultParallelism, math.ceil(n_processed / ROWS_PER_OUTPUT_FILE))
    results = pipeline.reconcile(listing, processed.coalesce(partitions), args.max_file_bytes,
                                 resolved["dataset"], run_id)
    existing = None
    if args.mode == "append" and storage.table_exists(spark, faces_uri, fmt):
        # Snapshot the hashes: writing the table invalidates any cached plan that still reads it,
        # which would re-run detection and see this run's own rows as "already present".
        existing = storage.read_table(spark, faces_uri, fmt).select("content_sha256").distinct() \
            .localCheckpoint(eager=True)
    results = pipeline.mark_duplicates(results, existing).persist(StorageLevel.MEMORY_AND_DISK)

    t = time.time()
    storage.write_table(pipeline.faces_rows(results), faces_uri, fmt, args.mode, partition_by="split")
    timings["write_faces"] = round(time.time() - t, 3)
    t = time.time()
    storage.write_table(pipeline.rejects_rows(results), rejects_uri, fmt, args.mode)
    timings["write_rejects"] = round(time.time() - t, 3)

    t = time.time()
    # One small aggregate job; the numbers below are all derived from its rows.
    summary = (results.groupBy("reason", "split", (sf.floor(sf.col("age") / 10) * 10).alias("decade"))
               .count().collect())
    timings["summarise"] = round(time.time() - t, 3)
    by_reason, splits, decades, total_rows = {}, {}, {}, 0
    for r in summary:
        total_rows += r["count"]
        if r["reason"] is not None:
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + r["count"]
        else:
            splits[r["split"]] = splits.get(r["split"], 0) + r["count"]
            decades[int(r["decade"])] = decades.get(int(r["decade"]), 0) + r["count"]
    n_faces = sum(splits.values())
    n_rejects = int(sum(by_reason.values()))
    if total_rows != n_inputs or n_faces + n_rejects != n_inputs:
        raise RuntimeError(f"accounting error: {n_inputs} inputs but {n_faces} faces + {n_rejects} rejects "
                           f"({total_rows} result rows); nothing should vanish, please report this")
    versions = {}
    if fmt == "delta":
        versions = {"faces": storage.delta_version(spark, faces_uri),
                    "rejects": storage.delta_version(spark, rejects_uri)}
    timings["total"] = round(time.time() - started, 3)
    manifest = {
        "run_id": run_id,
        "status": "succeeded",
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "argv": sys.argv[1:],
        "settings": {"crop": resolved["crop"].to_dict(), "labels": resolved["labels"],
                     "label_manifest": resolved["manifest"], "dataset": resolved["dataset"],
                     "splits": dict(zip(("train", "val", "test"), resolved["fractions"])),
                     "split_salt": args.split_salt, "max_file_bytes": args.max_file_bytes,
                     "synthetic_demo": bool(args.demo)},
        "inputs": {"uris": inputs, "files": n_inputs},
        "output": {"root": output, "faces": faces_uri, "rejects": rejects_uri},
        "format": fmt,
        "mode": args.mode,
        "counts": {"inputs": n_inputs, "faces": n_faces, "rejects": n_rejects},
        "rejects_by_reason": dict(sorted(by_reason.items())),
        "splits": {s: splits.get(s, 0) for s in ("train", "val", "test")},
        "age_histogram": {f"{d}-{d + 9}": decades[d] for d in sorted(decades)},
        "timings_s": timings,
        "table_versions": versions,
        "spark": {"master": spark.sparkContext.master, "app_id": spark.sparkContext.applicationId,
                  "default_parallelism": spark.sparkContext.defaultParallelism},
        "versions": _versions(),
    }
    text = json.dumps(manifest, indent=2)
    storage.write_text(spark, layout.join(output, layout.RUNS_DIR, f"{run_id}.json"), text)
    storage.write_text(spark, layout.join(output, layout.LATEST_MANIFEST), text)
    results.unpersist()
    processed.unpersist()
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        resolved = validate(args)
        if args.demo:
            from spark_jobs.synthetic import write_demo_folder

            folder = layout.local_path(resolved["inputs"][0])
            if folder is None:
                raise UsageError("--demo writes its sample to a local folder: give a local --input (or none)")
            try:
                n = write_demo_folder(folder, args.demo_count)
            except ValueError as e:
                raise UsageError(str(e)) from None
            print(f"SYNTHETIC DEMO: wrote {n} generated files to {folder} (drawn faces with made-up ages, plus a "
                  f"few broken files to show the rejects table; not real people). For real data, see README.")
        manifest = run(args, resolved)
    except UsageError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"prepare: run {manifest['run_id']}: {c['inputs']} inputs = {c['faces']} faces + {c['rejects']} rejects "
          f"{manifest['rejects_by_reason']}; splits {manifest['splits']}; "
          f"{manifest['timings_s']['total']:.1f}s; wrote {manifest['output']['root']} ({manifest['format']})")
    if args.demo:
        print("SYNTHETIC DEMO finished: the faces above are generated drawings. Next: prepare real photos, "
              "e.g. --input ../shared/data/utkface --labels utkface --detector none (see README).")
    return 0


def console_main() -> None:
    """`faceage-prepare ...`: the same job, started without spark-submit (local Spark)."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
