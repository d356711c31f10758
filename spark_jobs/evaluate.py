"""spark-submit spark_jobs/evaluate.py: how good and how fair a model's predictions are, at any size.

    spark-submit spark_jobs/evaluate.py --predictions scored/ --labels prepared/ --output report/ [--split test]

Joins predictions with labels in Spark (on face_id when the labels are a faces table, else on
source_path for face 0 of a photo) and computes every number with Spark aggregations; only
aggregates reach the driver. Writes metrics.json, slices.csv, confusion.csv, PNG plots and a
self-contained report.html. Unmatched rows (a prediction without a label, a label without a
prediction) and photos without a prediction are counted and reported.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from typing import List, Optional


from schemas import layout
from schemas.tables import SPLITS
from shell import scratch, uri as uri_io
from shell.cli import dumps, entry_points, log, new_run_id, non_negative_int, Parser, path_arg, redact
from shell.errors import UserError
from shell.outputs import check_overlap, Outputs, remove
from spark_jobs import evaluate_report as report
from spark_jobs import evaluate_steps as steps
from spark_jobs.storage import to_uri


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("evaluate", prog="spark-submit spark_jobs/evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, type=path_arg, help="score output folder (or its predictions/ table)")
    p.add_argument("--labels", required=True, type=path_arg,
                   help="a prepare output / faces table (join on face_id), or a CSV/Parquet manifest with path "
                        "and age (join on source_path)")
    p.add_argument("--output", required=True, type=path_arg,
                   help="folder (local or URI) for metrics.json, CSVs, PNGs and report.html (only files faceage wrote "
                        "are ever replaced)")
    p.add_argument("--split", default=None, choices=SPLITS, help="faces-table labels: only this split")
    p.add_argument("--data-version", "--labels-version", dest="labels_version", type=non_negative_int,
                   default=None, help="Delta version of a faces-table labels input (default: latest)")
    from trainer import tracking

    tracking.add_arguments(p)
    return p


def run(args) -> dict:
    """The job: read (predictions, labels) -> aggregate in Spark -> write the report, one commit."""
    started = time.time()
    # every input against the output, both ways, links resolved: before anything is written
    check_overlap([("--predictions", args.predictions), ("--labels", args.labels)], args.output)
    outputs = Outputs.at(args.output, "evaluate", new_run_id())
    outputs.begin()  # the output's lock; a killed run's leftovers finished or removed
    try:
        outputs.check(layout.EVAL_FILES)  # before any work: never replace files faceage did not write
        from spark_jobs.session import get_spark

        spark = get_spark("faceage-evaluate")
        metrics = measure(spark, args)
        metrics.update(seconds=round(time.time() - started, 3),
                       spark={"master": spark.sparkContext.master, "app_id": spark.sparkContext.applicationId})
        write_report(args, outputs, metrics)
        return metrics
    finally:
        outputs.finish()


def read_inputs(spark, args):
    """(predictions, labels, join key, what the labels are) as DataFrames; one line when either is not usable."""
    from spark_jobs.storage import read_predictions

    try:
        preds = read_predictions(spark, to_uri(args.predictions))
        preds.schema  # noqa: B018 - resolve now: a missing or foreign table fails here, with its name
    except (FileNotFoundError, layout.IncompleteTableError) as e:  # says what is wrong and what to run
        raise UserError(f"--predictions {args.predictions}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--predictions {args.predictions}: not a score output ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    labels, key, label_info = steps.load_labels(spark, to_uri(args.labels), args.split, args.labels_version)
    return preds, labels, key, label_info


def measure(spark, args) -> dict:
    """Every number of the report (metrics.json without its timings): only aggregates reach the driver."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as sf

    preds, labels, key, label_info = read_inputs(spark, args)
    ok, left_out = steps.valid_predictions(preds, key)
    labels, invalid = steps.valid_labels(labels)
    labels, duplicate_labels = steps.dedupe_keys(labels, key, ["age", "gender", "race", "dataset"],
                                                 f"--labels {args.labels}")
    ok, duplicate_predictions = steps.dedupe_keys(ok, key, ["predicted_age", "model_id"],
                                                  f"--predictions {args.predictions}")
    excluded = {**left_out, "invalid_label": invalid,
                "duplicate_label_key": duplicate_labels, "duplicate_prediction_key": duplicate_predictions}
    joined, bookkeeping = steps.join_labels(ok, labels, key)
    no_prediction = {r["status"]: r["count"] for r in preds.where(sf.col("status") != "ok")
                     .groupBy("status").count().collect()}
    models = preds.where(sf.col("status") == "ok").groupBy("model_id", "data_version").count().collect()
    if bookkeeping["matched"] == 0:
        raise UserError(f"no prediction matched a label (joined on {key}): {bookkeeping}, left out {excluded}; "
                        f"are these the predictions for this table (and --split)?")
    errors = steps.matched_errors(joined).persist(StorageLevel.MEMORY_AND_DISK)
    aggregated = steps.aggregate_metrics(errors)
    errors.unpersist()
    curves = steps.training_curves(to_uri(args.predictions))
    matrix, normalized = steps.confusion(aggregated["cells"])
    return {
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "predictions": to_uri(args.predictions), "labels": label_info, "join_key": key,
        "models": [{"model_id": r["model_id"], "data_version": r["data_version"], "faces": r["count"]}
                   for r in models],
        # the std's calibration the scoring applied (the bundle's, via the score run's manifest)
        "model_calibration": steps.score_manifest(to_uri(args.predictions)).get("model_calibration"),
        "rows": bookkeeping, "excluded": excluded, "no_prediction_by_reason": no_prediction,
        "overall": aggregated["overall"], "slices": aggregated["slices"], "uncertainty": aggregated["uncertainty"],
        "density": aggregated["density"], "curves": curves,
        "training_curve": [{k: r[k] for k in ("epoch", "train_loss", "val_mae")} for r in curves],
        "confusion": {"labels": steps.group_names(), "counts": matrix.astype(int).tolist(),
                      "row_normalized": [[round(float(v), 4) for v in row] for row in normalized]},
    }


def write_report(args, outputs, metrics: dict) -> None:
    """The report's files written in a local folder (the staging folder itself, or one uploaded to a remote
    one), then ONE commit: this report's files, and a file of an earlier report this one has not (e.g. no
    uncertainty plot now) removed, so the folder never mixes two reports."""
    density, curves = metrics.pop("density"), metrics.pop("curves")
    staging = scratch.scratch_dir("faceage-report-") if uri_io.is_remote(outputs.root) else outputs.staging_root
    try:
        os.makedirs(staging, exist_ok=True)
        metrics["plots"] = report.write_files(staging, metrics, density, curves)
        with open(os.path.join(staging, layout.EVAL_METRICS), "w") as f:
            f.write(redact(dumps(metrics, default=str)))
        report.write_html(os.path.join(staging, layout.EVAL_HTML), json.loads(redact(dumps(metrics, default=str))),
                          staging)
        written = [n for n in layout.EVAL_FILES if os.path.exists(os.path.join(staging, n))]
        if staging != outputs.staging_root:
            for name in written:
                uri_io.put(os.path.join(staging, name), outputs.staging(name))
        stale = [remove(n) for n in layout.EVAL_FILES if n not in written and outputs.exists(n) and outputs.owned(n)]
        outputs.commit(list(written) + stale)
        folder = staging if staging != outputs.staging_root else outputs.root
        track(args, metrics, [os.path.join(folder, n) for n in written])
    finally:
        if staging != outputs.staging_root:
            shutil.rmtree(staging, ignore_errors=True)


def track(args, metrics: dict, files: List[str]) -> None:
    """--mlflow / MLFLOW_TRACKING_URI: the metrics and report files on the scored model's MLflow run (its id
    is in the score manifest when the model was trained with tracking), else on a run of their own."""
    from trainer import tracking

    if not tracking.enabled(args):
        return
    model_run = steps.score_manifest(to_uri(args.predictions)).get("mlflow_run_id")
    models = metrics.get("models") or [{}]
    tracker = tracking.Run(args, "evaluate", tags={"faceage.model_id": models[0].get("model_id")}, run_id=model_run)
    split = metrics["labels"].get("split") or "all"
    overall = metrics["overall"]
    tracker.log_metrics({f"eval_{split}_{k}": v for k, v in overall.items()})
    for file in files:
        tracker.log_artifact(file, f"evaluation/{split}")
    if model_run is None:
        tracker.end()
    log.info(f"evaluate: logged to MLflow run {tracker.run_id}" + (" (the model's)" if model_run else ""))

def _job(argv: Optional[List[str]]) -> int:
    args = get_args_parser().parse_args(argv)
    metrics = run(args)
    o, r = metrics["overall"], metrics["rows"]
    left_out = {k: v for k, v in metrics["excluded"].items() if v}
    log.info(f"evaluate: {r['matched']} matched rows: MAE {o['mae']:.2f}, RMSE {o['rmse']:.2f}, CS@5 {o['cs5']:.3f}, "
          f"bias {o['bias']:+.2f}; unmatched: {r['predictions_without_label']} predictions, "
          f"{r['labels_without_prediction']} labels; left out {left_out or 'none'}; "
          f"report {os.path.join(args.output, layout.EVAL_HTML)}")
    return 0


main, console_main = entry_points("evaluate", _job)

if __name__ == "__main__":
    sys.exit(main())
