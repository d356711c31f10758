"""spark-submit spark_jobs/prepare.py: image folders -> faces table + rejects table + run manifest.

Reads image folders recursively (local paths, s3a://, hdfs://), detects, aligns and crops the
largest face of each image, parses its age label, assigns a deterministic split and writes
Parquet or Delta. Every input file ends up as exactly one face row or one reject row; the tables
are committed only after that accounting (and every other check) passed, and only a table that
faceage wrote is ever replaced.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import os
import sys
import time
from typing import List, Optional


from schemas import layout
from shell.cli import (dumps, entry_points, fraction, log, new_run_id, number, Parser, path_arg, positive_int,
                       redact, redact_all)
from shell.errors import UserError
from shell.outputs import canonical_local, check_overlap, dedupe_inputs, looks_like_manifest
from schemas.crop import DEFAULT_SIZE, DETECTORS, CropSettings, pixel_size
from photos.splits import parse_fractions
from spark_jobs.storage import MAX_FILE_BYTES, MODES, to_uri

DEMO_INPUT = os.path.join("demo_out", "synthetic_photos")
DEMO_OUTPUT = os.path.join("demo_out", "prepared")
ROWS_PER_OUTPUT_FILE = 10_000  # ~70 MB of 128 px JPEG crops per Parquet file
OWN_ENTRIES = (layout.FACES_DIR, layout.REJECTS_DIR, layout.LATEST_MANIFEST)


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("prepare", prog="spark-submit spark_jobs/prepare.py",
               description="Turn folders of face photos into a labelled faces table (Parquet or Delta), "
                           "a rejects table and a JSON run manifest.")
    p.add_argument("--input", action="extend", nargs="+", metavar="URI", type=path_arg,
                   help="image folders (local path, file:, s3a://, hdfs://), read recursively: --input A B or "
                        "--input A --input B")
    p.add_argument("--output", metavar="URI", type=path_arg,
                   help="output root: writes faces/, rejects/, manifest.json and _runs/<run_id>.json under it")
    p.add_argument("--format", default="parquet", choices=layout.TABLE_FORMATS, help="table format")
    p.add_argument("--mode", default="overwrite", choices=MODES,
                   help="if OUTPUT already holds tables: overwrite replaces tables faceage wrote (never anything "
                        "else); append adds rows, skipping content already there; error refuses")
    p.add_argument("--labels", default="utkface",
                   help="utkface (age_gender_race_date.jpg), fgnet (SSSAaa.JPG) or manifest:URI "
                        "(CSV/Parquet with path, age and optional gender, race, subject_id)")
    p.add_argument("--dataset", default=None, help="value of the dataset column (default: the label kind)")
    p.add_argument("--size", type=pixel_size, default=DEFAULT_SIZE, help="crop side in pixels")
    p.add_argument("--margin", type=number(0.0, 2.0), default=CropSettings.margin,
                   help="extra border per side as a fraction of the crop; 0 frames faces like UTKFace's "
                        "aligned chips")
    p.add_argument("--detector", default="yunet", choices=DETECTORS,
                   help="yunet (CNN, 5 landmarks), hog (dlib, box only) or none (inputs are already "
                        "aligned crops: centre-square and resize)")
    p.add_argument("--min-score", type=fraction, default=CropSettings.min_score,
                   help="detector confidence threshold 0..1")
    p.add_argument("--min-face", type=positive_int, default=CropSettings.min_face,
                   help="smallest face side in source pixels")
    p.add_argument("--max-pixels", type=positive_int, default=CropSettings.max_pixels,
                   help="decompression-bomb cap, width x height")
    p.add_argument("--max-file-bytes", type=positive_int, default=MAX_FILE_BYTES,
                   help="files larger than this are rejected unread")
    p.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test fractions")
    p.add_argument("--split-salt", default="faceage-v1",
                   help="changes which subjects land in which split; keep it fixed across runs")
    p.add_argument("--demo", action="store_true",
                   help="generate a small SYNTHETIC sample (drawn faces, not real people) and prepare it; "
                        f"default input {DEMO_INPUT}, output {DEMO_OUTPUT}")
    p.add_argument("--demo-count", type=number(1, 100_000, integer=True), default=160,
                   help="synthetic images for --demo")
    return p


def validate(args) -> dict:
    """Check every flag before Spark starts; return the resolved settings or raise UserError."""
    if args.demo:
        args.input = args.input or [DEMO_INPUT]
        args.output = args.output or DEMO_OUTPUT
    if not args.input:
        raise UserError("--input is required: give an image folder (repeat --input for several)")
    if not args.output:
        raise UserError("--output is required: give a folder or URI for the faces table")
    try:
        fractions = parse_fractions(args.splits)
        crop = CropSettings(size=args.size, margin=args.margin, detector=args.detector,
                            min_score=args.min_score, min_face=args.min_face, max_pixels=args.max_pixels)
    except ValueError as e:
        raise UserError(str(e)) from None
    labels, manifest = args.labels, None
    if labels.startswith("manifest:"):
        labels, manifest = "manifest", labels[len("manifest:"):]
        if not manifest:
            raise UserError("--labels manifest:URI needs the manifest's location after the colon")
        local = layout.local_path(manifest)
        if local is not None and not os.path.isfile(local):
            raise UserError(f"--labels {args.labels}: no such manifest file {local}")
    elif labels not in ("utkface", "fgnet"):
        raise UserError(f"--labels {labels!r} is not supported: use utkface, fgnet or manifest:URI")
    for given in args.input:
        local = layout.local_path(to_uri(given))
        if local is not None and not args.demo and not os.path.isdir(local):
            raise UserError(f"--input {given}: no such folder (give a folder of images; files are read recursively)")
    given_inputs = list(args.input)
    if all(layout.local_path(to_uri(u)) is not None for u in given_inputs + [args.output]):
        given_inputs = dedupe_inputs(given_inputs, canonical_local)
        check_overlap(given_inputs + [("--labels", manifest)], args.output)
    return {"inputs": [to_uri(i) for i in given_inputs], "output": to_uri(args.output), "crop": crop,
            "fractions": fractions, "labels": labels, "manifest": manifest, "dataset": args.dataset or labels}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("pyspark", "delta-spark", "pyarrow", "numpy", "pandas", "pillow", "yuface", "dlib-bin"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def summarize(rows) -> dict:
    """Aggregated (reason, split, decade, count) rows -> counts by reason, split and age decade."""
    by_reason, splits, decades, total = {}, {}, {}, 0
    for r in rows:
        total += r["count"]
        if r["reason"] is not None:
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + r["count"]
        else:
            splits[r["split"]] = splits.get(r["split"], 0) + r["count"]
            decades[int(r["decade"])] = decades.get(int(r["decade"]), 0) + r["count"]
    return {"rows": total, "faces": sum(splits.values()), "rejects": sum(by_reason.values()),
            "by_reason": dict(sorted(by_reason.items())), "splits": splits, "decades": decades}


def check_accounting(n_inputs: int, summary: dict) -> None:
    """Every listed input is exactly one face or one reject; anything else is a bug, caught before any
    table is written."""
    if summary["rows"] != n_inputs or summary["faces"] + summary["rejects"] != n_inputs:
        raise RuntimeError(f"accounting error: {n_inputs} inputs but {summary['faces']} faces + "
                           f"{summary['rejects']} rejects ({summary['rows']} result rows); nothing was written "
                           f"(the previous table is unchanged); please report this")


def run(args, resolved: dict) -> dict:
    """The job: returns the run manifest it wrote."""
    from shell.outputs import Outputs
    from spark_jobs import storage
    from spark_jobs.session import DELTA_PACKAGE, PHOTO_JOB_CONF, apply_conf_defaults, delta_available, get_spark

    started = time.time()
    timings = {}
    run_id = new_run_id()
    spark = get_spark("faceage-prepare")
    apply_conf_defaults(spark, PHOTO_JOB_CONF)
    if args.format == "delta" and not delta_available(spark):
        raise UserError(f"Delta classes are not on Spark's classpath: run `make install` (it configures "
                        f"spark-defaults.conf) or pass --packages {DELTA_PACKAGE} to spark-submit")
    timings["spark_start"] = round(time.time() - started, 3)

    inputs, output, fmt = resolved["inputs"], resolved["output"], args.format
    if any(layout.local_path(u) is None for u in inputs + [output]):  # Hadoop URIs: compare qualified
        inputs = dedupe_inputs(inputs, lambda u: storage.qualify(spark, u))
        check_overlap(inputs, output, lambda u: storage.qualify(spark, u))
    fs = storage.HadoopFS(spark)
    outputs = Outputs(fs, output, "prepare", run_id,
                      legacy=lambda name: looks_like_manifest(fs, layout.join(output, layout.LATEST_MANIFEST),
                                                              ("run_id", "counts", "output", "format")),
                      appliers=storage.delta_applier(spark))
    outputs.begin()  # the output's lock; a killed run's leftovers finished or removed
    try:
        if args.mode == "error" and (outputs.exists(layout.FACES_DIR) or outputs.exists(layout.REJECTS_DIR)):
            raise UserError(f"--output {output} already holds tables (--mode error); use --mode overwrite or "
                            f"append, or another --output")
        outputs.check(OWN_ENTRIES)  # before any work: never replace what faceage did not write
        faces_write = storage.TableWrite(spark, outputs, layout.FACES_DIR, fmt, args.mode, partition_by="split")
        rejects_write = storage.TableWrite(spark, outputs, layout.REJECTS_DIR, fmt, args.mode)
        return _prepare(PrepareRun(spark, args, resolved, inputs, outputs, faces_write, rejects_write, started,
                                   timings))
    finally:
        outputs.finish()  # the staging folder (on failure the previous tables are untouched) and the lock


@dataclasses.dataclass
class PrepareRun:
    """One prepare run as it goes: its session, flags and resolved inputs, its output and the two table writes."""

    spark: object
    args: argparse.Namespace
    resolved: dict  # validate()'s: inputs, output, crop settings, labels, fractions, ...
    inputs: List[str]
    outputs: object  # shell.outputs.Outputs
    faces_write: object  # spark_jobs.storage.TableWrite
    rejects_write: object
    started: float
    timings: dict

    @property
    def run_id(self) -> str:
        return self.outputs.run_id


def run_manifest(p: PrepareRun, n_inputs: int, summary: dict, versions: dict) -> dict:
    """The run manifest (schemas.tables.MANIFEST_KEYS) of a finished run."""
    args, resolved, spark = p.args, p.resolved, p.spark
    output = resolved["output"]
    splits, decades = summary["splits"], summary["decades"]
    return {
        "run_id": p.run_id,
        "status": "succeeded",
        "started_at": dt.datetime.fromtimestamp(p.started, dt.timezone.utc).isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "argv": redact_all(sys.argv[1:]),
        "settings": {"crop": resolved["crop"].to_dict(), "labels": resolved["labels"],
                     "label_manifest": resolved["manifest"], "dataset": resolved["dataset"],
                     "splits": dict(zip(("train", "val", "test"), resolved["fractions"])),
                     "split_salt": args.split_salt, "max_file_bytes": args.max_file_bytes,
                     "synthetic_demo": bool(args.demo)},
        "inputs": {"uris": p.inputs, "files": n_inputs},
        "output": {"root": output, "faces": layout.faces_uri(output), "rejects": layout.rejects_uri(output)},
        "format": args.format,
        "mode": args.mode,
        "counts": {"inputs": n_inputs, "faces": summary["faces"], "rejects": summary["rejects"]},
        "rejects_by_reason": summary["by_reason"],
        "splits": {s: splits.get(s, 0) for s in ("train", "val", "test")},
        "age_histogram": {f"{d}-{d + 9}": decades[d] for d in sorted(decades)},
        "timings_s": p.timings,
        "table_versions": versions,
        "spark": {"master": spark.sparkContext.master, "app_id": spark.sparkContext.applicationId,
                  "default_parallelism": spark.sparkContext.defaultParallelism},
        "versions": _versions(),
    }


def _prepare(p: PrepareRun) -> dict:
    """list -> read -> faces -> dedupe -> summarise and check -> stage -> commit -> manifest."""
    from pyspark.sql import functions as sf

    n_inputs, processed, results = find_faces(p)
    t = time.time()
    # One small aggregate job; every count below is derived from its rows, and checked before any write.
    summary = summarize(results.groupBy("reason", "split", (sf.floor(sf.col("age") / 10) * 10).alias("decade"))
                        .count().collect())
    check_accounting(n_inputs, summary)
    p.timings["summarise"] = round(time.time() - t, 3)
    versions = stage_tables(p, results, summary)
    p.timings["total"] = round(time.time() - p.started, 3)
    manifest = run_manifest(p, n_inputs, summary, versions)
    text = redact(dumps(manifest))  # a credential inside a URI never reaches the manifest
    run_file = f"{layout.RUNS_DIR}/{p.run_id}.json"
    p.outputs.stage_text(run_file, text)
    p.outputs.stage_text(layout.LATEST_MANIFEST, text)
    # ONE commit: both tables, this run's record and the manifest readers take the crop settings from
    p.outputs.commit([p.faces_write.step(), p.rejects_write.step(), run_file, layout.LATEST_MANIFEST],
                     folder_markers=p.faces_write.folder_markers() + p.rejects_write.folder_markers())
    results.unpersist()
    processed.unpersist()
    return manifest


def find_faces(p: PrepareRun):
    """(inputs listed, every file's face-or-reject rows cached, the same with duplicates marked)."""
    from pyspark import StorageLevel

    from spark_jobs import photo_files, prepare_steps, storage

    args, resolved, spark = p.args, p.resolved, p.spark
    settings = prepare_steps.PrepareSettings(crop=resolved["crop"], labels=resolved["labels"],
                                             dataset=resolved["dataset"], fractions=resolved["fractions"],
                                             split_salt=args.split_salt, run_id=p.run_id,
                                             max_file_bytes=args.max_file_bytes)
    t = time.time()
    inventory = photo_files.list_files(spark, p.inputs)
    if not inventory:
        raise UserError(f"no files under --input {' '.join(p.inputs)}: nothing to prepare (is it the right folder?)")
    p.timings["list"] = round(time.time() - t, 3)
    files = photo_files.file_rows(spark, p.inputs, inventory, args.max_file_bytes)
    if resolved["labels"] == "manifest":
        manifest = prepare_steps.read_manifest(spark, resolved["manifest"])
        files = prepare_steps.attach_manifest_labels(files, manifest, p.inputs)
    t = time.time()
    processed = prepare_steps.faces_per_file(files, settings).persist(StorageLevel.MEMORY_AND_DISK)
    n_processed = processed.count()  # run detection once, here; every later step reads the cached rows
    p.timings["detect"] = round(time.time() - t, 3)
    # Many small partitions suit detection; for writing, a few big ones (fewer tasks and files).
    partitions = max(spark.sparkContext.defaultParallelism, math.ceil(n_processed / ROWS_PER_OUTPUT_FILE))
    existing, faces_uri = None, layout.faces_uri(resolved["output"])
    if args.mode == "append" and storage.table_exists(spark, faces_uri, args.format):
        # Snapshot the hashes: writing the table invalidates any cached plan that still reads it,
        # which would re-run detection and see this run's own rows as "already present".
        existing = storage.read_table(spark, faces_uri, args.format).select("content_sha256").distinct() \
            .localCheckpoint(eager=True)
    results = prepare_steps.mark_duplicates(processed.coalesce(partitions), existing) \
        .persist(StorageLevel.MEMORY_AND_DISK)
    return len(inventory), processed, results


def stage_tables(p: PrepareRun, results, summary: dict) -> dict:
    """Both tables written into staging and their row counts checked; the Delta versions the commit makes."""
    from spark_jobs import prepare_steps

    t = time.time()
    p.faces_write.stage(prepare_steps.faces_rows(results))
    p.rejects_write.stage(prepare_steps.rejects_rows(results))
    for write, expected in ((p.faces_write, summary["faces"]), (p.rejects_write, summary["rejects"])):
        staged = write.staged_rows()
        if staged != expected:
            raise RuntimeError(f"staged {write.name} table holds {staged} rows, expected {expected}; nothing was "
                               f"committed (the previous table is unchanged); please report this")
    p.timings["write_staged"] = round(time.time() - t, 3)
    if p.args.format != "delta":
        return {}
    # what the commit makes current (the lock keeps other writers out meanwhile)
    return {"faces": p.faces_write.version_after_commit(), "rejects": p.rejects_write.version_after_commit()}


def _job(argv: Optional[List[str]]) -> int:
    args = get_args_parser().parse_args(argv)
    resolved = validate(args)
    if args.demo:
        from photos.synthetic import write_demo_folder

        folder = layout.local_path(resolved["inputs"][0])
        if folder is None:
            raise UserError("--demo writes its sample to a local folder: give a local --input (or none)")
        try:
            n = write_demo_folder(folder, args.demo_count)
        except ValueError as e:
            raise UserError(str(e)) from None
        log.info(f"SYNTHETIC DEMO: wrote {n} generated files to {folder} (drawn faces with made-up ages, plus a "
              f"few broken files to show the rejects table; not real people). For real data, see README.")
    manifest = run(args, resolved)
    c = manifest["counts"]
    log.info(f"prepare: run {manifest['run_id']}: {c['inputs']} inputs = {c['faces']} faces + {c['rejects']} rejects "
          f"{manifest['rejects_by_reason']}; splits {manifest['splits']}; "
          f"{manifest['timings_s']['total']:.1f}s; wrote {manifest['output']['root']} ({manifest['format']})")
    if args.demo:
        log.info("SYNTHETIC DEMO finished: the faces above are generated drawings. Next: prepare real photos, "
              "e.g. --input ../shared/data/utkface --labels utkface --detector none (see README).")
    return 0


main, console_main = entry_points("prepare", _job)

if __name__ == "__main__":
    sys.exit(main())
