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
import base64
import csv
import datetime as dt
import html
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Iterator, List, Optional

if __package__ in (None, ""):  # run as a file by spark-submit: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from schemas import layout  # noqa: E402
from schemas.cli import (Parser, UserError, log, dumps, entry_points, new_run_id, non_negative_int,  # noqa: E402
                         path_arg, redact)
from schemas import uri as uri_io  # noqa: E402
from schemas.outputs import Outputs, check_overlap, remove  # noqa: E402
from schemas.tables import SPLITS  # noqa: E402
from spark_jobs.storage import to_uri  # noqa: E402

# Age groups: 0-2, 3-9, 10-19, ..., 60-69, 70+ (lower bounds).
AGE_GROUP_BOUNDS = (0, 3, 10, 20, 30, 40, 50, 60, 70)
GENDERS = {0: "male", 1: "female"}  # UTKFace coding
RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
SLICES = ("age_group", "gender", "race", "dataset")


def group_names() -> List[str]:
    names = []
    for i, low in enumerate(AGE_GROUP_BOUNDS):
        high = AGE_GROUP_BOUNDS[i + 1] - 1 if i + 1 < len(AGE_GROUP_BOUNDS) else None
        names.append(f"{low}-{high}" if high is not None else f"{low}+")
    return names


REPORT_FILES = ("metrics.json", "slices.csv", "confusion.csv", "confusion.png", "mae_by_age_group.png",
                "pred_vs_true.png", "uncertainty.png", "training_curves.png", "report.html")


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


def age_group(col):
    """Spark column: the age-group name of an age column."""
    from pyspark.sql import functions as sf

    names = group_names()
    expr = sf.lit(names[-1])
    for low, name in reversed(list(zip(AGE_GROUP_BOUNDS[1:], names[:-1]))):
        expr = sf.when(col < low, sf.lit(name)).otherwise(expr)
    return expr


def parse_manifest_labels(batches: Iterator) -> Iterator:
    """mapInPandas body: manifest rows (all strings) -> source_path, age, gender, race, dataset, label_error,
    through the one label parser prepare uses (a bad value is counted, never a failed cast)."""
    import pandas as pd

    from spark_jobs import labels as L

    for batch in batches:
        rows = []
        for rec in batch.itertuples(index=False):
            try:
                label = L.label_from_manifest(rec.path or "", rec.age, rec.gender, rec.race)
                rows.append((rec.path, label.age, label.gender, label.race, rec.dataset or "manifest", None))
            except L.LabelError as e:
                rows.append((rec.path, None, None, None, rec.dataset or "manifest", str(e)))
        yield pd.DataFrame(rows, columns=["source_path", "age", "gender", "race", "dataset", "label_error"])


LABELS_SCHEMA = "source_path string, age int, gender int, race int, dataset string, label_error string"


def load_labels(spark, uri: str, split: Optional[str], version: Optional[int]):
    """(labels DataFrame with label_error, join key, description) from a faces table or a manifest file."""
    from pyspark.sql import functions as sf

    from spark_jobs import label_manifest, storage

    if uri_io.isfile(uri):  # a manifest: path, age[, gender, race, dataset]
        if split or version is not None:
            raise UserError("--split and --data-version apply to faces-table labels, not a manifest file")
        df = label_manifest.read(spark, uri).mapInPandas(parse_manifest_labels, schema=LABELS_SCHEMA)
        # '/x', 'file:///x' and 's3a://' spell the same files as the predictions' 'file:/x' and 's3://'
        df = df.withColumn("source_path", label_manifest.path_key(sf.col("source_path")))
        return df, "source_path", {"uri": uri, "kind": "manifest"}
    faces = layout.faces_table(uri)
    fmt = "delta" if layout.is_delta(faces) else "parquet"
    if version is not None and fmt != "delta":
        raise UserError(f"--data-version applies to Delta tables; {faces} is Parquet")
    try:
        df = storage.read_table(spark, faces, fmt, version if fmt == "delta" else None)
    except layout.IncompleteTableError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a missing path or version surfaces as an AnalysisException
        raise UserError(f"--labels {uri}: cannot read a faces table at {faces} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]})") from None
    if split:
        df = df.where(sf.col("split") == split)
        if df.limit(1).count() == 0:
            raise UserError(f"--split {split}: {faces} has no rows in that split; nothing to evaluate")
    version_read = None
    if fmt == "delta":
        version_read = version if version is not None else layout.delta_table(faces).version()
    df = df.select("face_id", "age", "gender", "race", "dataset",
                   sf.when(sf.col("age").isNull(), sf.lit("no age")).alias("label_error"))
    return df, "face_id", {"uri": faces, "kind": f"faces table ({fmt})", "split": split, "version": version_read}


def dedupe_keys(df, key: str, value_cols: List[str], what: str):
    """(one row per key, extra identical copies dropped). Keys that repeat with different values are
    refused: no metric can say which one is right."""
    from pyspark.sql import functions as sf

    per_key = df.groupBy(key).agg(sf.count("*").alias("_n"),
                                  sf.countDistinct(sf.to_json(sf.struct(*value_cols))).alias("_distinct"),
                                  sf.collect_set(sf.to_json(sf.struct(*value_cols))).alias("_values"))
    stats = per_key.where("_n > 1").agg(
        sf.sum(sf.col("_n") - 1).alias("extra"), sf.sum((sf.col("_distinct") > 1).cast("int")).alias("conflicts"),
        sf.first(sf.when(sf.col("_distinct") > 1, sf.struct(sf.col(key).alias("k"), sf.col("_values").alias("v"))),
                 ignorenulls=True).alias("example")).first()
    extra, conflicts = int(stats["extra"] or 0), int(stats["conflicts"] or 0)
    if conflicts:
        example = stats["example"]
        raise UserError(f"{what}: {conflicts} key(s) appear more than once with different values, e.g. {key} "
                        f"{example['k']}: {' vs '.join(sorted(example['v']))[:200]}; keep one row per {key}")
    return df.dropDuplicates([key]), extra


# ----------------------------------------------------------------------------- transforms (DataFrame -> DataFrame)

def valid_predictions(preds, key: str):
    """(usable predictions: status ok, face 0 for a source_path join, a finite age inside the ages a model may
    predict (schemas.tables MIN_AGE..MAX_AGE); {"non_finite_prediction": n, "out_of_range_prediction": n}
    counting the ok rows left out)."""
    from pyspark.sql import functions as sf

    from schemas.tables import MAX_AGE, MIN_AGE

    ok = preds.where(sf.col("status") == "ok")
    if key == "source_path":
        ok = ok.where(sf.col("face_index") == 0)
    if key == "source_path":  # the spelling label manifests are brought to (label_manifest.path_key)
        from spark_jobs.label_manifest import path_key

        ok = ok.withColumn("source_path", path_key(sf.col("source_path")))
    ok = ok.select(key, "predicted_age", "uncertainty", "model_id", "data_version")
    age = sf.col("predicted_age")
    finite = age.isNotNull() & ~sf.isnan(age) & (sf.abs(age) < sf.lit(float("inf")))
    inside = (age >= sf.lit(float(MIN_AGE))) & (age <= sf.lit(float(MAX_AGE)))
    kind = sf.when(~finite, "non_finite_prediction").when(~inside, "out_of_range_prediction")
    counts = {r["kind"]: r["count"] for r in ok.groupBy(kind.alias("kind")).count().collect()}
    left_out = {name: int(counts.get(name, 0)) for name in ("non_finite_prediction", "out_of_range_prediction")}
    return ok.where(finite & inside), left_out


def valid_labels(labels):
    """(labels with a usable age, without the label_error column; how many were not usable)."""
    from pyspark.sql import functions as sf

    usable = sf.col("label_error").isNull() & sf.col("age").isNotNull()
    counts = {r["ok"]: r["count"] for r in labels.groupBy(usable.alias("ok")).count().collect()}
    return labels.where(usable).drop("label_error"), int(counts.get(False, 0))


def join_labels(predictions, labels, key: str):
    """(full outer join with a `matched` column; counts of matched rows and of rows on one side only)."""
    from pyspark.sql import functions as sf

    joined = predictions.join(labels, key, "full_outer").withColumn(
        "matched", sf.col("predicted_age").isNotNull() & sf.col("age").isNotNull())
    book = joined.groupBy(sf.col("predicted_age").isNotNull().alias("has_pred"),
                          sf.col("age").isNotNull().alias("has_label")).count().collect()
    bookkeeping = {"matched": 0, "predictions_without_label": 0, "labels_without_prediction": 0}
    for r in book:
        side = "matched" if r["has_pred"] and r["has_label"] else (
            "predictions_without_label" if r["has_pred"] else "labels_without_prediction")
        bookkeeping[side] += r["count"]
    return joined, bookkeeping


def matched_errors(joined):
    """Matched rows -> age, prediction, signed and absolute error, age groups and the slice columns."""
    from pyspark.sql import functions as sf

    err = sf.col("predicted_age") - sf.col("age")
    return (joined.where("matched")
            .select("age", "predicted_age", "uncertainty", err.alias("err"), sf.abs(err).alias("abs_err"),
                    age_group(sf.col("age")).alias("age_group"),
                    age_group(sf.col("predicted_age")).alias("pred_group"),
                    sf.coalesce(sf.col("gender").cast("string"), sf.lit("unknown")).alias("gender"),
                    sf.coalesce(sf.col("race").cast("string"), sf.lit("unknown")).alias("race"),
                    sf.coalesce("dataset", sf.lit("unknown")).alias("dataset")))


def aggregate_metrics(errors) -> dict:
    """matched_errors' rows -> overall and per-slice count/MAE/RMSE/CS@5/bias, confusion cells, MAE by
    true age and the (true, predicted) density: Spark aggregations, only aggregates reach the driver."""
    from pyspark.sql import functions as sf

    aggs = [sf.count("*").alias("count"), sf.avg("abs_err").alias("mae"),
            sf.sqrt(sf.avg(sf.col("err") * sf.col("err"))).alias("rmse"),
            sf.avg((sf.col("abs_err") <= 5).cast("double")).alias("cs5"), sf.avg("err").alias("bias"),
            sf.stddev_samp("abs_err").alias("sd_abs")]
    overall = with_interval(errors.agg(*aggs).first().asDict())
    slices = []
    for name in SLICES:
        for r in errors.groupBy(name).agg(*aggs).collect():
            value = r[name]
            if name == "gender" and value.isdigit():
                value = GENDERS.get(int(value), value)
            if name == "race" and value.isdigit():
                value = RACES.get(int(value), value)
            slices.append(with_interval({"slice": name, "value": value,
                                         **{k: r[k] for k in ("count", "mae", "rmse", "cs5", "bias", "sd_abs")}}))
    order = {g: i for i, g in enumerate(group_names())}
    slices.sort(key=lambda s: (SLICES.index(s["slice"]), order.get(s["value"], 99), str(s["value"])))
    cells = errors.groupBy("age_group", "pred_group").count().collect()
    by_age = sorted((int(r["age"]), r["count"], r["mae"]) for r in
                    errors.groupBy("age").agg(sf.count("*").alias("count"), sf.avg("abs_err").alias("mae")).collect())
    density = [(int(r["a"]), int(r["p"]), r["count"]) for r in errors.groupBy(
        sf.floor("age").alias("a"), sf.floor(sf.greatest(sf.lit(0.0), "predicted_age")).alias("p")).count().collect()]
    return {"overall": overall, "slices": slices, "cells": cells, "by_age": by_age, "density": density,
            "uncertainty": uncertainty_calibration(errors)}


SMALL_SLICE = 30  # slices with fewer faces are flagged: their MAE moves a lot with a few faces
UNCERTAINTY_BINS = (0, 2, 4, 6, 8, 10, 15)  # lower edges, years of predicted std


def with_interval(row: dict) -> dict:
    """`row` plus a 95 % t-interval of its MAE (mae_low, mae_high) and `small` (n < SMALL_SLICE)."""
    from scipy import stats

    n, sd = row.get("count") or 0, row.pop("sd_abs", None)
    half = float(stats.t.ppf(0.975, n - 1) * sd / n ** 0.5) if n > 1 and sd is not None else None
    row["mae_low"] = None if half is None else max(0.0, row["mae"] - half)  # an MAE is never negative
    row["mae_high"] = None if half is None else row["mae"] + half
    row["small"] = n < SMALL_SLICE
    return row


def uncertainty_calibration(errors) -> dict:
    """How honest the predicted std is: coverage of |error| <= 1 and 2 std (0.68 / 0.95 for a Gaussian),
    and mean |error| against mean std in bins of std. Empty when no row has a finite std (regression)."""
    from pyspark.sql import functions as sf

    rows = errors.where(sf.col("uncertainty").isNotNull() & ~sf.isnan("uncertainty"))
    bin_expr = sf.lit(UNCERTAINTY_BINS[-1])
    for low, high in reversed(list(zip(UNCERTAINTY_BINS, UNCERTAINTY_BINS[1:]))):
        bin_expr = sf.when(sf.col("uncertainty") < high, sf.lit(low)).otherwise(bin_expr)
    total = rows.agg(sf.count("*").alias("n"),
                     sf.avg((sf.col("abs_err") <= sf.col("uncertainty")).cast("double")).alias("within_1sd"),
                     sf.avg((sf.col("abs_err") <= 2 * sf.col("uncertainty")).cast("double")).alias("within_2sd"),
                     # corr() divides by a std that is 0 when every std is the same: NULL then, never an error
                     sf.try_divide(sf.covar_samp("abs_err", "uncertainty"),
                                   sf.stddev_samp("abs_err") * sf.stddev_samp("uncertainty")).alias("corr")).first()
    if not total["n"]:
        return {}
    bins = sorted((int(r["b"]), r["n"], r["std"], r["mae"]) for r in rows.groupBy(bin_expr.alias("b")).agg(
        sf.count("*").alias("n"), sf.avg("uncertainty").alias("std"), sf.avg("abs_err").alias("mae")).collect())
    return {"rows": total["n"], "within_1sd": total["within_1sd"], "within_2sd": total["within_2sd"],
            "corr_abs_error_std": total["corr"],
            "bins": [{"std_from": b, "count": n, "mean_std": sd, "mae": m} for b, n, sd, m in bins]}


def run(args) -> dict:
    started = time.time()
    # every input against the output, both ways, links resolved: before anything is written
    check_overlap([("--predictions", args.predictions), ("--labels", args.labels)], args.output)
    outputs = Outputs.at(args.output, "evaluate", new_run_id())
    outputs.begin()  # the output's lock; a killed run's leftovers finished or removed
    try:
        return _run(args, outputs, started)
    finally:
        outputs.finish()


def _run(args, outputs, started: float) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as sf

    from spark_jobs.score import read_predictions
    from spark_jobs.session import get_spark

    outputs.check(REPORT_FILES)  # before any work: never replace files faceage did not write
    spark = get_spark("faceage-evaluate")
    try:
        preds = read_predictions(spark, to_uri(args.predictions))
        preds.schema  # noqa: B018 - resolve now: a missing or foreign table fails here, with its name
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--predictions {args.predictions}: not a score output ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    labels, key, label_info = load_labels(spark, to_uri(args.labels), args.split, args.labels_version)

    ok, left_out = valid_predictions(preds, key)
    labels, invalid = valid_labels(labels)
    labels, duplicate_labels = dedupe_keys(labels, key, ["age", "gender", "race", "dataset"], f"--labels {args.labels}")
    ok, duplicate_predictions = dedupe_keys(ok, key, ["predicted_age", "model_id"],
                                            f"--predictions {args.predictions}")
    excluded = {**left_out, "invalid_label": invalid,
                "duplicate_label_key": duplicate_labels, "duplicate_prediction_key": duplicate_predictions}
    joined, bookkeeping = join_labels(ok, labels, key)
    no_prediction = {r["status"]: r["count"] for r in preds.where(sf.col("status") != "ok")
                     .groupBy("status").count().collect()}
    models = preds.where(sf.col("status") == "ok").groupBy("model_id", "data_version").count().collect()
    if bookkeeping["matched"] == 0:
        raise UserError(f"no prediction matched a label (joined on {key}): {bookkeeping}, left out {excluded}; "
                        f"are these the predictions for this table (and --split)?")
    m = matched_errors(joined).persist(StorageLevel.MEMORY_AND_DISK)
    aggregated = aggregate_metrics(m)
    m.unpersist()
    overall, slices = aggregated["overall"], aggregated["slices"]
    cells, density, uncertainty = aggregated["cells"], aggregated["density"], aggregated["uncertainty"]
    curves = training_curves(to_uri(args.predictions))

    # the report is written in a local folder: the staging folder itself, or one uploaded to a remote one
    staging = tempfile.mkdtemp(prefix="faceage-report-") if uri_io.is_remote(outputs.root) else outputs.staging_root
    try:
        os.makedirs(staging, exist_ok=True)
        matrix, normalized = confusion(cells)
        plots = write_plots(staging, matrix, normalized, slices, density, uncertainty, curves)
        write_csv(os.path.join(staging, "slices.csv"), slices)
        names = group_names()
        with open(os.path.join(staging, "confusion.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted"] + names)
            for name, row in zip(names, matrix):
                w.writerow([name] + [int(v) for v in row])
        metrics = {
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "predictions": to_uri(args.predictions), "labels": label_info, "join_key": key,
            "models": [{"model_id": r["model_id"], "data_version": r["data_version"], "faces": r["count"]}
                       for r in models],
            "rows": bookkeeping, "excluded": excluded, "no_prediction_by_reason": no_prediction,
            "overall": overall, "slices": slices, "uncertainty": uncertainty,
            "training_curve": [{k: r[k] for k in ("epoch", "train_loss", "val_mae")} for r in curves],
            "confusion": {"labels": names, "counts": matrix.astype(int).tolist(),
                          "row_normalized": [[round(float(v), 4) for v in row] for row in normalized]},
            "plots": plots, "seconds": round(time.time() - started, 3),
            "spark": {"master": spark.sparkContext.master, "app_id": spark.sparkContext.applicationId},
        }
        with open(os.path.join(staging, "metrics.json"), "w") as f:
            f.write(redact(dumps(metrics, default=str)))
        write_html(os.path.join(staging, "report.html"), json.loads(redact(dumps(metrics, default=str))), staging)
        written = [n for n in REPORT_FILES if os.path.exists(os.path.join(staging, n))]
        if staging != outputs.staging_root:
            for name in written:
                uri_io.put(os.path.join(staging, name), outputs.staging(name))
        # ONE commit: this report's files, and a plot of an earlier report this one has not (e.g. no
        # uncertainty now) removed, so the folder never mixes two reports
        stale = [remove(n) for n in REPORT_FILES if n not in written and outputs.exists(n) and outputs.owned(n)]
        outputs.commit(list(written) + stale)
        folder = staging if staging != outputs.staging_root else outputs.root
        track(args, metrics, [os.path.join(folder, n) for n in written])
    finally:
        if staging != outputs.staging_root:
            shutil.rmtree(staging, ignore_errors=True)
    return metrics


def track(args, metrics: dict, files: List[str]) -> None:
    """--mlflow / MLFLOW_TRACKING_URI: the metrics and report files on the scored model's MLflow run (its id
    is in the score manifest when the model was trained with tracking), else on a run of their own."""
    from trainer import tracking

    if not tracking.enabled(args):
        return
    model_run = score_manifest(to_uri(args.predictions)).get("mlflow_run_id")
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


def confusion(cells):
    """Age-group confusion matrix (counts, row-normalised) with scikit-learn, from aggregated cells."""
    import numpy as np
    from sklearn.metrics import confusion_matrix

    names = group_names()
    if not cells:
        return np.zeros((len(names), len(names))), np.zeros((len(names), len(names)))
    y_true = [r["age_group"] for r in cells]
    y_pred = [r["pred_group"] for r in cells]
    weights = [r["count"] for r in cells]
    counts = confusion_matrix(y_true, y_pred, labels=names, sample_weight=weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    return counts, normalized


def write_csv(path: str, rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["slice", "value", "count", "mae", "mae_low", "mae_high", "rmse", "cs5",
                                          "bias", "small"])
        w.writeheader()
        w.writerows(rows)


def write_plots(folder: str, matrix, normalized, slices, density, uncertainty, curves) -> List[str]:
    """The report's PNGs; uncertainty and training curves only when there is something to show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = group_names()
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=90)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if matrix[i][j]:
                ax.text(j, i, f"{int(matrix[i][j])}", ha="center", va="center", fontsize=7,
                        color="white" if normalized[i][j] > 0.5 else "black")
    ax.set(xlabel="predicted age group", ylabel="true age group", title="Age-group confusion (row-normalised colour, counts)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    save(fig, "confusion.png")

    groups = [s for s in slices if s["slice"] == "age_group"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(groups))
    maes = [g["mae"] for g in groups]
    low = [g["mae"] - g["mae_low"] if g["mae_low"] is not None else 0 for g in groups]
    high = [g["mae_high"] - g["mae"] if g["mae_high"] is not None else 0 for g in groups]
    colours = ["#bbbbbb" if g["small"] else "#2e86c1" for g in groups]
    ax.bar(x, maes, color=colours, yerr=[low, high], capsize=4, ecolor="#333333")
    for i, g in enumerate(groups):
        ax.text(i, 0, f"n={g['count']}", ha="center", va="bottom", fontsize=7, color="white" if not g["small"] else "black")
    ax.set_xticks(x, [g["value"] for g in groups], rotation=30)
    ax.set(xlabel="true age group", ylabel="MAE (years)",
           title=f"MAE by age group, 95 % interval (grey: fewer than {SMALL_SLICE} faces)")
    save(fig, "mae_by_age_group.png")

    fig, ax = plt.subplots(figsize=(6, 5))
    if density:
        a, p, c = (np.array(v, dtype=float) for v in zip(*density))
        order = np.argsort(c)  # the densest cells drawn last, on top
        points = ax.scatter(a[order] + 0.5, p[order] + 0.5, c=np.log10(c[order]), s=8 + 10 * np.log10(c[order] + 1),
                            cmap="viridis", vmin=0, vmax=max(1.0, float(np.log10(c.max()))), edgecolors="none")
        fig.colorbar(points, ax=ax, fraction=0.046, label="log10 faces per 1-year cell")
        top = max(a.max(), p.max()) + 2
        ax.plot([0, top], [0, top], color="#c0392b", lw=0.8, ls="--")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
    ax.set(xlabel="true age", ylabel="predicted age", title="Predicted vs true (every 1-year cell with a face)")
    save(fig, "pred_vs_true.png")

    if uncertainty:
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = uncertainty["bins"]
        ax.plot([b["mean_std"] for b in bins], [b["mae"] for b in bins], marker="o", label="mean |error|")
        for b in bins:
            ax.annotate(f"n={b['count']}", (b["mean_std"], b["mae"]), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
        top = max(max(b["mean_std"] for b in bins), max(b["mae"] for b in bins)) * 1.1
        ax.plot([0, top], [0, top * 0.798], color="#999999", ls="--", label="Gaussian: E|e| = 0.8 std")
        ax.set(xlabel="predicted std (years)", ylabel="mean |error| (years)",
               title=f"Uncertainty: {uncertainty['within_1sd']:.0%} within 1 std, {uncertainty['within_2sd']:.0%} within 2")
        ax.legend(fontsize=8)
        save(fig, "uncertainty.png")

    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = [r["epoch"] for r in curves]
        ax.plot(epochs, [r["val_mae"] for r in curves], marker="o", label="val MAE")
        ax.set(xlabel="epoch", ylabel="val MAE (years)", title="Training curve of the scored model")
        ax2 = ax.twinx()
        ax2.plot(epochs, [r["train_loss"] for r in curves], color="#999999", ls="--", label="train loss")
        ax2.set_ylabel("train loss")
        ax.legend(loc="upper right", fontsize=8)
        save(fig, "training_curves.png")
    return written


def score_manifest(predictions_uri: str) -> dict:
    """The score run's manifest beside its predictions/ table ({} when there is none)."""
    root = predictions_uri.rstrip("/")
    if uri_io.basename(root) == "predictions":
        root = uri_io.parent(root)
    try:
        data = json.loads(uri_io.read_text(layout.join(root, "score_manifest.json")))
    except (OSError, ValueError, UserError):
        return {}
    return data if isinstance(data, dict) else {}


def training_curves(predictions_uri: str) -> list:
    """The scored model's per-epoch metrics (metrics.jsonl beside its bundle, found through the score run's
    manifest), or [] when they are not at hand."""
    try:
        model = score_manifest(predictions_uri).get("model") or ""
        text = uri_io.read_text(layout.join(uri_io.parent(model), "metrics.jsonl"))
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, UserError):
        return []
    return [r for r in rows if all(k in r for k in ("epoch", "val_mae", "train_loss"))]


def describe_uri(uri) -> str:
    """A URI as a person reads it: local paths without file:, others as they are."""
    text = str(uri or "")
    return layout.local_path(text) if text.startswith("file:") else text


def write_html(path: str, metrics: dict, folder: str) -> None:
    """One self-contained page: the images are embedded, nothing else is fetched."""
    def img(name, alt):
        if not os.path.exists(os.path.join(folder, name)):
            return ""
        with open(os.path.join(folder, name), "rb") as f:
            data = base64.b64encode(f.read()).decode()
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'

    def num(v, digits=2):
        return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v)))

    def plural(n, word):
        return f"{n:,} {word}{'' if n == 1 else 's'}"

    o, rows, label, excluded = metrics["overall"], metrics["rows"], metrics["labels"], metrics.get("excluded", {})
    models = "; ".join(f"<code>{html.escape(str(m['model_id']))}</code> trained on data version "
                       f"{'(Parquet, unversioned)' if m['data_version'] is None else m['data_version']}, "
                       f"{plural(m['faces'], 'face')} scored" for m in metrics["models"]) or "none"
    version = label.get("version")
    label_text = (f"{html.escape(describe_uri(label.get('uri')))} ({html.escape(label.get('kind', ''))}"
                  + (f", split <b>{html.escape(str(label['split']))}</b>" if label.get("split") else "")
                  + (f", Delta version {version}" if version is not None else "") + ")")
    reasons = ", ".join(f"{html.escape(k.replace('_', ' '))}: {v:,}" for k, v in metrics["no_prediction_by_reason"].items())
    left_out = ", ".join(f"{html.escape(k.replace('_', ' '))}: {v:,}" for k, v in excluded.items() if v)
    slice_rows = "".join(
        f"<tr{' class=small' if s['small'] else ''}><td>{html.escape(s['slice'])}</td><td>{html.escape(str(s['value']))}</td>"
        f"<td>{s['count']:,}{' ⚠' if s['small'] else ''}</td><td>{num(s['mae'])}</td>"
        f"<td>{num(s['mae_low'])} – {num(s['mae_high'])}</td><td>{num(s['rmse'])}</td><td>{num(s['cs5'], 3)}</td>"
        f"<td>{num(s['bias'])}</td></tr>" for s in metrics["slices"])
    u = metrics.get("uncertainty") or {}
    uncertainty = (f"<p>{u['rows']:,} predictions carry a std. {u['within_1sd']:.1%} of errors lie within 1 std and "
                   f"{u['within_2sd']:.1%} within 2 (a calibrated Gaussian: 68 % and 95 %); the correlation of |error| "
                   f"with the std is {num(u['corr_abs_error_std'])}.</p>{img('uncertainty.png', 'mean error by predicted std')}"
                   if u else "<p>This model gives no uncertainty (regression head).</p>")
    curves = (img("training_curves.png", "training curve") if metrics.get("training_curve")
              else "<p>The model's training metrics (metrics.jsonl beside its bundle) were not found.</p>")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>faceage evaluation</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;line-height:1.4}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}tr.small td{{color:#888}}
code{{background:#f4f4f4;padding:0 3px}}</style></head><body>
<h1>Age estimation: evaluation report</h1>
<p><b>Model</b> {models}.<br><b>Labels</b> {label_text}, joined on <code>{html.escape(metrics['join_key'])}</code>.<br>
<b>Predictions</b> {html.escape(describe_uri(metrics['predictions']))}.</p>
<p><b>{plural(rows['matched'], 'face')}</b> have both a prediction and a label: every number below is computed
from them. {plural(rows['predictions_without_label'], 'prediction')} had no label here (e.g. faces of other splits),
{plural(rows['labels_without_prediction'], 'label')} had no prediction.
{('Photos without a prediction — ' + reasons + '.') if reasons else 'Every photo got a prediction.'}
{('Left out of every metric — ' + left_out + '.') if left_out else 'No row was left out as invalid or duplicate.'}
Created {html.escape(metrics['created_at'][:19].replace('T', ' '))} UTC.</p>
<h2>Overall</h2><table><tr><th>faces</th><th>MAE</th><th>95 % interval</th><th>RMSE</th><th>CS@5</th><th>bias (mean signed error)</th></tr>
<tr><td>{o['count']:,}</td><td>{num(o['mae'])}</td><td>{num(o['mae_low'])} – {num(o['mae_high'])}</td><td>{num(o['rmse'])}</td>
<td>{num(o['cs5'], 3)}</td><td>{num(o['bias'])}</td></tr></table>
<h2>MAE by age group</h2>{img('mae_by_age_group.png', 'MAE by age group')}
<h2>Slices</h2><p>Grey rows and ⚠: fewer than {SMALL_SLICE} faces, read their numbers with care. Interval: 95 % t-interval of the MAE.</p>
<table><tr><th>slice</th><th>value</th><th>faces</th><th>MAE</th><th>95 % interval</th><th>RMSE</th><th>CS@5</th><th>bias</th></tr>
{slice_rows}</table>
<h2>Predicted vs true</h2>{img('pred_vs_true.png', 'predicted vs true age')}
<h2>Age-group confusion matrix</h2>{img('confusion.png', 'age-group confusion matrix')}
<h2>Uncertainty</h2>{uncertainty}
<h2>Training</h2>{curves}
</body></html>"""
    with open(path, "w") as f:
        f.write(page)


def _job(argv: Optional[List[str]]) -> int:
    args = get_args_parser().parse_args(argv)
    metrics = run(args)
    o, r = metrics["overall"], metrics["rows"]
    left_out = {k: v for k, v in metrics["excluded"].items() if v}
    log.info(f"evaluate: {r['matched']} matched rows: MAE {o['mae']:.2f}, RMSE {o['rmse']:.2f}, CS@5 {o['cs5']:.3f}, "
          f"bias {o['bias']:+.2f}; unmatched: {r['predictions_without_label']} predictions, "
          f"{r['labels_without_prediction']} labels; left out {left_out or 'none'}; "
          f"report {os.path.join(args.output, 'report.html')}")
    return 0


main, console_main = entry_points("evaluate", _job)

if __name__ == "__main__":
    sys.exit(main())
