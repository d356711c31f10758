"""spark-submit spark_jobs/score.py: an age for every face in folders of photos, or in a faces table.

    spark-submit spark_jobs/score.py --model runs/train/model.pt --input photos/ --output scored/ \\
        [--format parquet|delta|csv] [--input-kind auto|photos|table] [--split test] [--version N]

Photos (any size, any number of faces) go through prepare's own crop function with the crop settings
stored in the model bundle; a prepared faces table (e.g. its test split) is scored from its crops.
The bundle is shipped once with SparkContext.addFile and loaded once per executor Python worker.
Output: OUTPUT/predictions (one row per face; photos with no face or unreadable files get one row with
a status instead) and OUTPUT/score_manifest.json, whose counts reconcile:
photos in = photos with faces + photos without a face + unreadable.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import List, Optional

if __package__ in (None, ""):  # run as a file by spark-submit: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from schemas import layout  # noqa: E402
from spark_jobs.storage import to_uri  # noqa: E402

PREDICTIONS_DIR = "predictions"
SCORE_MANIFEST = "score_manifest.json"
FORMATS = ("parquet", "delta", "csv")
NO_FACE = ("no_face", "face_too_small")  # a readable photo without a usable face

SCORE_CONF = {  # as prepare: many small photo partitions, small Arrow batches
    "spark.sql.files.openCostInBytes": str(256 * 1024),
    "spark.sql.files.maxPartitionBytes": str(16 * 2**20),
    "spark.sql.execution.arrow.maxRecordsPerBatch": "64",
}


class UsageError(Exception):
    """A flag or input a user must fix before anything runs."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spark-submit spark_jobs/score.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model bundle written by python -m trainer.train")
    p.add_argument("--input", required=True, nargs="+", help="photo folders, or a prepare output / faces table")
    p.add_argument("--output", required=True, help="folder for predictions/ and score_manifest.json")
    p.add_argument("--format", default="parquet", choices=FORMATS)
    p.add_argument("--mode", default="error", choices=("error", "overwrite"), help="if the output exists")
    p.add_argument("--input-kind", default="auto", choices=("auto", "photos", "table"),
                   help="auto: a folder holding faces/ (or a table) is a table, anything else photos")
    p.add_argument("--split", default=None, help="table input: score only this split (e.g. test)")
    p.add_argument("--version", type=int, default=None, help="table input: Delta version to read")
    p.add_argument("--max-file-bytes", type=int, default=50 * 2**20)
    p.add_argument("--batch-size", type=int, default=64, help="faces per inference batch")
    p.add_argument("--device", default="auto", help="auto (CUDA when an executor has one) | cpu | cuda")
    return p


def _table_root(uri: str, explicit: bool = False) -> Optional[str]:
    """The faces table under `uri` when it is one (a prepare output or its faces/ folder). Remote
    URIs are not probed: with --input-kind table they are taken at their word."""
    candidates = [uri] if uri.rstrip("/").endswith("/" + layout.FACES_DIR) else [layout.faces_uri(uri), uri]
    for cand in candidates:
        path = layout.local_path(cand)
        if path is None:
            return candidates[0] if explicit else None
        if os.path.isdir(os.path.join(path, "_delta_log")) or os.path.exists(os.path.join(path, "_SUCCESS")):
            return cand
    return None


def validate(args) -> dict:
    from trainer import model as M

    model_path = os.path.abspath(args.model)
    try:
        _, bundle = M.load_bundle(model_path)
    except (FileNotFoundError, M.BundleError) as e:
        raise UsageError(str(e)) from None
    inputs = [to_uri(i) for i in args.input]
    for uri in inputs:
        path = layout.local_path(uri)
        if path is not None and not os.path.exists(path):
            raise UsageError(f"--input {uri}: no such file or folder")
    kind = args.input_kind
    table = _table_root(inputs[0], explicit=kind == "table") if len(inputs) == 1 else None
    if kind == "auto":
        kind = "table" if table else "photos"
    if kind == "table" and not table:
        raise UsageError(f"--input-kind table: {inputs[0]} is not a finished faces table (no _delta_log or "
                         f"_SUCCESS); score photos with --input-kind photos")
    if kind == "photos" and (args.split or args.version is not None):
        raise UsageError("--split and --version apply to a faces-table input only")
    output = to_uri(args.output)
    out_path = layout.local_path(output)
    if out_path and args.mode == "error" and os.path.exists(os.path.join(out_path, PREDICTIONS_DIR)):
        raise UsageError(f"--output {output} already holds predictions (use --mode overwrite)")
    return {"model": model_path, "bundle": bundle, "inputs": inputs, "kind": kind, "table": table,
            "output": output}


def run(args, resolved: dict) -> dict:
    from pyspark.sql import functions as sf

    from schemas import fields as F
    from schemas.tables import PREDICTIONS
    from spark_jobs import pipeline, scoring, storage
    from spark_jobs.session import get_spark

    started = time.time()
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    spark = get_spark("faceage-score")
    for key, value in SCORE_CONF.items():
        if spark.conf.get(key, None) is None:
            spark.conf.set(key, value)
    bundle = resolved["bundle"]
    # Shipped once per executor and loaded once per Python worker, under a name unique to its content:
    # SparkContext refuses a second file of the same name with other bytes (two models, one session).
    mid = scoring.model_id(resolved["model"])
    resolved["ship_dir"] = tempfile.mkdtemp(prefix="faceage-score-")
    shipped = os.path.join(resolved["ship_dir"], f"model-{mid}.pt")
    shutil.copyfile(resolved["model"], shipped)
    spark.sparkContext.addFile(shipped)
    input_version = None
    schema = F.spark_schema(PREDICTIONS)
    if resolved["kind"] == "table":
        table = resolved["table"]
        fmt = "delta" if layout.is_delta(table) else "parquet"
        if fmt == "delta":
            from deltalake import DeltaTable

            input_version = args.version if args.version is not None else DeltaTable(
                layout.local_path(table) or table).version()
        faces = storage.read_table(spark, table, fmt, args.version if fmt == "delta" else None)
        if args.split:
            faces = faces.where(sf.col("split") == args.split)
        faces = faces.select("face_id", "source_path", "image", "bbox", "det_score", "n_faces")
        n_inputs = None
    else:
        inventory = pipeline.list_files(spark, resolved["inputs"])
        if not inventory:
            raise UsageError(f"no files under --input {' '.join(resolved['inputs'])}")
        n_inputs = len(inventory)
        listing = pipeline.inventory_frame(spark, inventory)
        faces = pipeline.read_images(spark, resolved["inputs"], args.max_file_bytes)
    settings = scoring.ScoreSettings(
        bundle=os.path.basename(shipped), spark_file=True, model_id=mid,
        data_version=(bundle.get("data") or {}).get("version"), input_version=input_version, run_id=run_id,
        batch_size=args.batch_size, device=args.device)
    kind = resolved["kind"]
    scored = faces.mapInPandas(lambda it: scoring.score_partition(it, settings, kind), schema=schema)
    if kind == "photos":  # listed files binaryFile never read (empty, hidden, odd names...) get their row
        # against binaryFile's paths (content not selected, so not read), never against `scored`, which
        # would run the scoring a second time
        skipped = listing.join(faces.select("path"), "path", "left_anti")
        reason, detail = pipeline.skip_reason(args.max_file_bytes)
        extra = {"source_path": sf.col("path"), "status": reason, "detail": detail,
                 "model_id": sf.lit(settings.model_id), "data_version": sf.lit(settings.data_version),
                 "input_version": sf.lit(None), "score_run_id": sf.lit(run_id)}
        by_name = {f.name: f for f in PREDICTIONS}
        scored = scored.unionByName(skipped.select(*[
            (extra[n] if n in extra else sf.lit(None)).cast(F.spark_schema([by_name[n]])[0].dataType).alias(n)
            for n in by_name]))
    out_uri = layout.join(resolved["output"], PREDICTIONS_DIR)
    to_write = scored
    if args.format == "csv":
        to_write = scored.withColumn("bbox", sf.to_json("bbox"))
    storage.write_table(to_write, out_uri, args.format, "overwrite" if args.mode == "overwrite" else "error")

    # Counts from the written table: one small aggregate, nothing collected row by row.
    written = read_predictions(spark, out_uri)
    per_photo = (written.groupBy("source_path")
                 .agg(sf.sum((sf.col("status") == "ok").cast("int")).alias("faces"),
                      sf.first("status").alias("status"))
                 .groupBy(sf.when(sf.col("faces") > 0, sf.lit("with_faces"))
                          .when(sf.col("status").isin(*NO_FACE), sf.lit("without_face"))
                          .otherwise(sf.lit("unreadable")).alias("kind"))
                 .agg(sf.count("*").alias("photos"), sf.sum("faces").alias("faces")).collect())
    reasons = {r["status"]: r["count"] for r in written.where(sf.col("status") != "ok")
               .groupBy("status").count().collect()}
    counts = {k: 0 for k in ("with_faces", "without_face", "unreadable")}
    n_faces = 0
    for r in per_photo:
        counts[r["kind"]] = int(r["photos"])
        n_faces += int(r["faces"] or 0)
    photos = sum(counts.values())
    if n_inputs is not None and photos != n_inputs:
        raise RuntimeError(f"accounting error: {n_inputs} files listed but {photos} photos in the output")
    manifest = {
        "run_id": run_id, "status": "succeeded",
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "argv": sys.argv[1:], "model": resolved["model"], "model_id": settings.model_id,
        "model_data": bundle.get("data"), "model_metrics": bundle.get("metrics"),
        "input": {"uris": resolved["inputs"], "kind": kind, "split": args.split, "version": input_version},
        "output": {"predictions": out_uri, "format": args.format},
        "counts": {"photos": photos, "faces": n_faces, "photos_with_faces": counts["with_faces"],
                   "photos_without_face": counts["without_face"], "unreadable": counts["unreadable"]},
        "no_prediction_by_reason": dict(sorted(reasons.items())),
        "seconds": round(time.time() - started, 3),
        "spark": {"master": spark.sparkContext.master, "app_id": spark.sparkContext.applicationId},
    }
    storage.write_text(spark, layout.join(resolved["output"], SCORE_MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def read_predictions(spark, uri: str):
    """A predictions table written by score (Parquet, Delta or CSV), bbox as an array."""
    from pyspark.sql import functions as sf

    from schemas import fields as F
    from schemas.tables import PREDICTIONS
    from spark_jobs import storage

    path = layout.local_path(uri)
    if uri.rstrip("/").split("/")[-1] != PREDICTIONS_DIR and path and os.path.isdir(os.path.join(path, PREDICTIONS_DIR)):
        uri, path = layout.join(uri, PREDICTIONS_DIR), os.path.join(path, PREDICTIONS_DIR)
    if path and os.path.isdir(os.path.join(path, "_delta_log")):
        return storage.read_table(spark, uri, "delta")
    if path and any(n.endswith(".csv") for n in os.listdir(path)):
        csv_fields = [f if f.name != "bbox" else F.Field("bbox", "string", nullable=True) for f in PREDICTIONS]
        df = spark.read.option("header", "true").schema(F.spark_schema(csv_fields)).csv(uri)
        return df.withColumn("bbox", sf.from_json("bbox", "array<float>"))
    return storage.read_table(spark, uri, "parquet")


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        resolved = validate(args)
        try:
            manifest = run(args, resolved)
        finally:  # the copy shipped with addFile (its jobs are done or failed by now)
            shutil.rmtree(resolved.get("ship_dir") or "", ignore_errors=True)
    except UsageError as e:
        print(f"score: error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"score: run {manifest['run_id']}: {c['photos']} photos = {c['photos_with_faces']} with faces "
          f"({c['faces']} faces) + {c['photos_without_face']} without a face + {c['unreadable']} unreadable "
          f"{manifest['no_prediction_by_reason']}; {manifest['seconds']:.1f}s; wrote {manifest['output']['predictions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
