"""spark-submit spark_jobs/score.py: an age for every face in folders of photos, or in a faces table.

    spark-submit spark_jobs/score.py --model runs/train/model.pt --input photos/ --output scored/ \\
        [--format parquet|delta|csv] [--input-kind auto|photos|table] [--split test] [--data-version N] \\
        [--detector auto|yunet|hog|none | --aligned]

Photos (any size, any number of faces) go through prepare's own crop function, detected and aligned to
the framing the model was trained on (recorded in the bundle) - also when its training crops were
aligned chips prepared with --detector none; `--aligned` says the inputs are such chips already. A
prepared faces table (e.g. its test split) is scored from its crops. The bundle is shipped once with
SparkContext.addFile and loaded once per executor Python worker.
Output: OUTPUT/predictions (one row per face; photos with no face or unreadable files get one row with
a status instead) and OUTPUT/score_manifest.json, whose counts reconcile:
photos in = photos with faces + photos without a face + unreadable. The predictions are staged and
checked before they replace anything, and only predictions faceage wrote are ever replaced.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import time
from typing import List, Optional


from schemas import layout
from shell import scratch, uri as uri_io
from shell.cli import (dumps, entry_points, log, new_run_id, non_negative_int, Parser, path_arg, positive_int,
                       redact, redact_all)
from shell.errors import UserError
from schemas.crop import DETECTORS
from shell.outputs import check_overlap, looks_like_manifest
from schemas.tables import SPLITS
from spark_jobs.storage import MAX_FILE_BYTES, to_uri

NO_FACE = ("no_face", "face_too_small")  # a readable photo without a usable face


def get_args_parser() -> argparse.ArgumentParser:
    from trainer.runtime import TTA, TTA_HELP  # torch-free; imported here, where the flags are defined

    p = Parser("score", prog="spark-submit spark_jobs/score.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=path_arg,
                   help="model bundle written by python -m trainer.train, or an .onnx export (python -m trainer.export)")
    p.add_argument("--input", required=True, action="extend", nargs="+", metavar="URI", type=path_arg,
                   help="photo folders, or a prepare output / faces table: --input A B or --input A --input B")
    p.add_argument("--output", required=True, type=path_arg, help="folder for predictions/ and score_manifest.json")
    p.add_argument("--format", default="parquet", choices=layout.PREDICTION_FORMATS)
    p.add_argument("--mode", default="overwrite", choices=("overwrite", "error"),
                   help="if OUTPUT already holds predictions: overwrite replaces predictions faceage wrote (never "
                        "anything else); error refuses")
    p.add_argument("--input-kind", default="auto", choices=("auto", "photos", "table"),
                   help="auto: a folder holding faces/ (or a table) is a table, anything else photos")
    p.add_argument("--split", default=None, choices=SPLITS, help="table input: score only this split")
    p.add_argument("--data-version", "--version", dest="version", type=non_negative_int, default=None,
                   help="table input: Delta version to read (default: latest)")
    p.add_argument("--max-file-bytes", type=positive_int, default=MAX_FILE_BYTES,
                   help="photos larger than this are not read")
    p.add_argument("--batch-size", type=positive_int, default=64, help="faces per inference batch")
    p.add_argument("--tta", default=None, choices=TTA, help=TTA_HELP)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when an executor has one")
    framing = p.add_mutually_exclusive_group()
    framing.add_argument("--detector", default="auto", choices=("auto",) + DETECTORS,
                         help="photos: auto detects and aligns faces to the model's framing (the bundle's "
                              "detector, or yunet when it was trained on aligned chips); none: the inputs are "
                              "already aligned face chips")
    framing.add_argument("--aligned", action="store_true",
                         help="the photos are already aligned face chips (the same as --detector none)")
    return p


def _table_root(uri: str, explicit: bool = False) -> Optional[str]:
    """The faces table under `uri` when it is one (a prepare output or its faces/ folder). Remote
    URIs are not probed: with --input-kind table they are taken at their word."""
    candidates = [uri] if uri.rstrip("/").endswith("/" + layout.FACES_DIR) else [layout.faces_uri(uri), uri]
    for cand in candidates:
        fs = uri_io.fs_for(cand)
        if fs.exists(layout.join(cand, "_delta_log")) or fs.exists(layout.join(cand, "_SUCCESS")):
            return cand
    return candidates[0] if explicit and uri_io.is_remote(candidates[0]) else None


def validate(args) -> dict:
    from trainer import inference

    if args.aligned:
        args.detector = "none"
    model_path = args.model if uri_io.is_remote(args.model) else uri_io.local_path(args.model)
    try:  # refuses a bundle whose weights, head or crop settings don't fit; an .onnx export: its contract
        bundle = inference.describe(model_path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    inputs = [to_uri(i) for i in args.input]
    for uri in inputs:
        path = layout.local_path(uri)
        if path is not None and not os.path.exists(path):
            raise UserError(f"--input {uri}: no such file or folder")
    kind = args.input_kind
    table = _table_root(inputs[0], explicit=kind == "table") if len(inputs) == 1 else None
    if kind == "auto":
        kind = "table" if table else "photos"
    if kind == "table" and not table:
        raise UserError(f"--input-kind table: {inputs[0]} is not a finished faces table (no _delta_log or "
                        f"_SUCCESS); score photos with --input-kind photos")
    if kind == "photos" and (args.split or args.version is not None):
        raise UserError("--split and --data-version apply to a faces-table input only")
    if kind == "table" and args.detector not in ("auto",):
        raise UserError("--detector/--aligned apply to photos; a faces table's crops are scored as they are")
    output = to_uri(args.output)
    # every input (photo folders or the table, the model) against the output, both ways, links resolved
    check_overlap([("--input", u) for u in args.input] + [("--model", model_path)], args.output)
    return {"model": model_path, "bundle": bundle, "inputs": inputs, "kind": kind, "table": table,
            "output": output}


def run(args, resolved: dict) -> dict:
    from shell.outputs import Outputs
    from spark_jobs import storage
    from spark_jobs.session import PHOTO_JOB_CONF, apply_conf_defaults, get_spark

    started = time.time()
    spark = get_spark("faceage-score")
    apply_conf_defaults(spark, PHOTO_JOB_CONF)
    fs = storage.HadoopFS(spark)
    output = resolved["output"]
    outputs = Outputs(fs, output, "score", new_run_id(),
                      legacy=lambda name: looks_like_manifest(fs, layout.join(output, layout.SCORE_MANIFEST),
                                                              ("run_id", "model_id", "counts")))
    outputs.begin()  # the output's lock; a killed run's leftovers finished or removed
    resolved["ship_dir"] = scratch.scratch_dir("faceage-score-")  # a killed run's copy removed by the next
    try:
        if args.mode == "error" and outputs.exists(layout.PREDICTIONS_DIR):
            raise UserError(f"--output {output} already holds {layout.PREDICTIONS_DIR}/ (use --mode overwrite to "
                            f"replace predictions faceage wrote, or another --output)")
        outputs.check([layout.PREDICTIONS_DIR, layout.SCORE_MANIFEST])  # before any work
        return _score(spark, args, resolved, outputs, started)
    finally:
        outputs.finish()  # this run's staging folder and the lock
        shutil.rmtree(resolved["ship_dir"], ignore_errors=True)  # the copy shipped with addFile


def _score(spark, args, resolved: dict, outputs, started: float) -> dict:
    """ship the bundle -> read the input -> score and stage -> count and check -> manifest -> one commit."""
    from pyspark.sql import functions as sf

    from schemas import fields as schema_fields
    from schemas.tables import PREDICTIONS
    from spark_jobs import score_steps, storage
    from trainer import runtime

    bundle = resolved["bundle"]
    tta = runtime.announce_tta(bundle, args.tta, "score")  # by default the TTA the bundle's calibration was fitted under
    shipped, mid = ship_bundle(spark, resolved)
    faces, n_inputs, input_version = read_input(spark, args, resolved)
    settings = score_steps.ScoreSettings(
        bundle=os.path.basename(shipped), spark_file=True, model_id=mid,
        data_version=(bundle.get("data") or {}).get("version"), input_version=input_version, run_id=outputs.run_id,
        batch_size=args.batch_size, device=args.device, detector=args.detector, max_file_bytes=args.max_file_bytes,
        tta=tta)
    kind = resolved["kind"]
    scored = faces.mapInPandas(lambda it: score_steps.score_partition(it, settings, kind),
                               schema=schema_fields.spark_schema(PREDICTIONS))
    to_write = scored.withColumn("bbox", sf.to_json("bbox")) if args.format == "csv" else scored
    write = storage.TableWrite(spark, outputs, layout.PREDICTIONS_DIR, args.format, "overwrite", in_place_delta=False)
    write.stage(to_write)

    # Counts from the staged table, checked before the commit.
    staged = outputs.staging(layout.PREDICTIONS_DIR)
    counts, n_faces, reasons = count_photos(storage.read_predictions(spark, staged, args.format))
    photos = sum(counts.values())
    if n_inputs is not None and photos != n_inputs:
        raise RuntimeError(f"accounting error: {n_inputs} files listed but {photos} photos in the output; nothing "
                           f"was committed; please report this")
    manifest = new_manifest(args, resolved, outputs.run_id, settings, started)
    manifest.update(counts={"photos": photos, "faces": n_faces, "photos_with_faces": counts["with_faces"],
                            "photos_without_face": counts["without_face"], "unreadable": counts["unreadable"]},
                    no_prediction_by_reason=reasons, seconds=round(time.time() - started, 3),
                    spark={"master": spark.sparkContext.master, "app_id": spark.sparkContext.applicationId})
    outputs.stage_text(layout.SCORE_MANIFEST, redact(dumps(manifest)))
    outputs.commit([write.step(), layout.SCORE_MANIFEST], folder_markers=write.folder_markers())  # one commit
    return manifest


def ship_bundle(spark, resolved: dict):
    """(the local copy shipped to every executor, the model id). Shipped once per executor and loaded once per
    Python worker, under a name unique to its content: SparkContext refuses a second file of the same name
    with other bytes (two models, one session). An ONNX export travels with its contract beside it."""
    from trainer import runtime

    mid = runtime.model_id(resolved["model"])
    export = runtime.is_export(resolved["model"])
    shipped = os.path.join(resolved["ship_dir"], f"model-{mid}" + (layout.EXPORT_SUFFIXES["onnx"] if export
                                                                     else os.path.splitext(layout.MODEL)[1]))
    uri_io.get(resolved["model"], shipped)  # a local copy (downloaded when the bundle is on S3, ...)
    spark.sparkContext.addFile(shipped)
    if export:
        uri_io.get(layout.contract_path(resolved["model"]), layout.contract_path(shipped))
        spark.sparkContext.addFile(layout.contract_path(shipped))
    return shipped, mid


def read_input(spark, args, resolved: dict):
    """(rows to score, photos listed or None for a table, the Delta version read or None): a faces table's
    rows (--split, --data-version) or every listed photo as a file row."""
    from spark_jobs import photo_files

    if resolved["kind"] != "table":
        inventory = photo_files.list_files(spark, resolved["inputs"])
        if not inventory:
            raise UserError(f"no files under --input {' '.join(resolved['inputs'])}")
        return photo_files.file_rows(spark, resolved["inputs"], inventory, args.max_file_bytes), len(inventory), None
    from pyspark.sql import functions as sf

    from spark_jobs import storage

    table, input_version = resolved["table"], None
    fmt = "delta" if layout.is_delta(table) else "parquet"
    if fmt == "delta":
        input_version = args.version if args.version is not None else layout.delta_table(table).version()
        if args.version is not None:
            try:  # a version that does not exist, or whose files VACUUM removed: one line, before any task
                layout.table_files(table, args.version)
            except ValueError as e:
                raise UserError(f"--data-version {args.version}: {e}") from None
    elif args.version is not None:
        raise UserError(f"--data-version applies to Delta tables; {table} is Parquet")
    try:
        faces = storage.read_table(spark, table, fmt, args.version if fmt == "delta" else None)
    except layout.IncompleteTableError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - e.g. a Delta version that does not exist
        raise UserError(f"--input {table}: cannot read the faces table ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    if args.split:
        faces = faces.where(sf.col("split") == args.split)
        if faces.limit(1).count() == 0:
            raise UserError(f"--split {args.split}: {table} has no rows in that split; nothing to score")
    return faces.select("face_id", "source_path", "image", "bbox", "det_score", "n_faces"), None, input_version


def new_manifest(args, resolved: dict, run_id: str, settings, started: float) -> dict:
    """The score manifest's settings and provenance (the counts are added once they are checked)."""
    from trainer import runtime

    bundle, kind = resolved["bundle"], resolved["kind"]
    pred = runtime.crop_for(bundle, args.detector) if kind == "photos" else None
    return {
        "run_id": run_id, "status": "succeeded",
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "argv": redact_all(sys.argv[1:]), "model": resolved["model"], "model_id": settings.model_id,
        "mlflow_run_id": (bundle.get("params") or {}).get("mlflow_run_id"),
        "model_data": bundle.get("data"), "model_metrics": bundle.get("metrics"),
        "model_framing": runtime.framing(bundle), "model_calibration": bundle.get("calibration"), "tta": settings.tta,
        "photo_crop": pred.to_dict() if pred is not None else None,
        "input": {"uris": resolved["inputs"], "kind": kind, "split": args.split, "version": settings.input_version},
        "output": {"predictions": layout.join(resolved["output"], layout.PREDICTIONS_DIR), "format": args.format},
    }


def count_photos(predictions):
    """(photos with faces / without a face / unreadable, faces scored, rows without a prediction by status)
    of a predictions table: two small aggregates, nothing collected row by row."""
    from pyspark.sql import functions as sf

    per_photo = (predictions.groupBy("source_path")
                 .agg(sf.sum((sf.col("status") == "ok").cast("int")).alias("faces"),
                      sf.first("status").alias("status"))
                 .groupBy(sf.when(sf.col("faces") > 0, sf.lit("with_faces"))
                          .when(sf.col("status").isin(*NO_FACE), sf.lit("without_face"))
                          .otherwise(sf.lit("unreadable")).alias("kind"))
                 .agg(sf.count("*").alias("photos"), sf.sum("faces").alias("faces")).collect())
    reasons = {r["status"]: r["count"] for r in predictions.where(sf.col("status") != "ok")
               .groupBy("status").count().collect()}
    counts = {k: 0 for k in ("with_faces", "without_face", "unreadable")}
    n_faces = 0
    for r in per_photo:
        counts[r["kind"]] = int(r["photos"])
        n_faces += int(r["faces"] or 0)
    return counts, n_faces, dict(sorted(reasons.items()))


def _job(argv: Optional[List[str]]) -> int:
    args = get_args_parser().parse_args(argv)
    manifest = run(args, validate(args))
    c = manifest["counts"]
    log.info(f"score: run {manifest['run_id']}: {c['photos']} photos = {c['photos_with_faces']} with faces "
          f"({c['faces']} faces) + {c['photos_without_face']} without a face + {c['unreadable']} unreadable "
          f"{manifest['no_prediction_by_reason']}; {manifest['seconds']:.1f}s; wrote {manifest['output']['predictions']}")
    return 0


main, console_main = entry_points("score", _job)

if __name__ == "__main__":
    sys.exit(main())
