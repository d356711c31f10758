"""evaluate's steps: labels read and checked, predictions joined to them, every number aggregated in Spark
(DataFrame -> DataFrame functions and the aggregates that reach the driver), the confusion matrix, and
what the score run and the scored model's training left beside the predictions.

spark_jobs/evaluate.py wires them (parse -> run -> write); spark_jobs/evaluate_report.py draws the report.
"""
from __future__ import annotations

import json
from typing import Iterator, List, Optional

from schemas import layout
from schemas.tables import AGE_GROUP_BOUNDS, age_group_names
from shell import uri as uri_io
from shell.errors import UserError

GENDERS = {0: "male", 1: "female"}  # UTKFace coding
RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
SLICES = ("age_group", "gender", "race", "dataset")


group_names = age_group_names  # the age groups' names (schemas.tables: shared with the trainer and the card)




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

    from photos.labels import LabelError, label_from_manifest

    for batch in batches:
        rows = []
        for rec in batch.itertuples(index=False):
            try:
                label = label_from_manifest(rec.path or "", rec.age, rec.gender, rec.race)
                rows.append((rec.path, label.age, label.gender, label.race, rec.dataset or "manifest", None))
            except LabelError as e:
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
            "bins": [{"std_from": b, "count": n, "mean_std": sd, "mae": m} for b, n, sd, m in bins],
            "reliability": reliability(rows), "risk_coverage": risk_coverage(rows, total["n"])}


RELIABILITY_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
RISK_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def reliability(rows) -> list:
    """For each nominal level p: the share of |error| inside the Gaussian's central p interval, z_p x std
    (a calibrated std gives p back). One aggregation."""
    from pyspark.sql import functions as sf
    from scipy import stats

    z = {p: float(stats.norm.ppf((1 + p) / 2)) for p in RELIABILITY_LEVELS}
    got = rows.agg(*[sf.avg((sf.col("abs_err") <= z[p] * sf.col("uncertainty")).cast("double")).alias(f"p{i}")
                     for i, p in enumerate(RELIABILITY_LEVELS)]).first()
    return [{"nominal": p, "z": z[p], "observed": got[f"p{i}"]} for i, p in enumerate(RELIABILITY_LEVELS)]


def risk_coverage(rows, n: int) -> list:
    """The MAE of the most confident faces: for each fraction x, the faces whose std is at most the x-quantile
    of the stds (Spark's percentile_approx, exact up to 1/10,000 of the rows), their share and their MAE.
    A useful std makes the curve rise from left to right: confident faces are the accurate ones."""
    from pyspark.sql import functions as sf

    cuts = rows.agg(sf.percentile_approx("uncertainty", list(RISK_FRACTIONS), 10000).alias("q")).first()["q"]
    got = rows.agg(*[agg for i, cut in enumerate(cuts) for agg in (
        sf.sum((sf.col("uncertainty") <= cut).cast("long")).alias(f"n{i}"),
        sf.avg(sf.when(sf.col("uncertainty") <= cut, sf.col("abs_err"))).alias(f"m{i}"))]).first()
    return [{"fraction": x, "max_std": float(cut), "coverage": got[f"n{i}"] / n, "mae": got[f"m{i}"]}
            for i, (x, cut) in enumerate(zip(RISK_FRACTIONS, cuts))]


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


def score_manifest(predictions_uri: str) -> dict:
    """The score run's manifest beside its predictions/ table ({} when there is none)."""
    root = predictions_uri.rstrip("/")
    if uri_io.basename(root) == layout.PREDICTIONS_DIR:
        root = uri_io.parent(root)
    try:
        data = json.loads(uri_io.read_text(layout.join(root, layout.SCORE_MANIFEST)))
    except (OSError, ValueError, UserError):
        return {}
    return data if isinstance(data, dict) else {}


def training_curves(predictions_uri: str) -> list:
    """The scored model's per-epoch metrics (metrics.jsonl beside its bundle, found through the score run's
    manifest), or [] when they are not at hand."""
    try:
        model = score_manifest(predictions_uri).get("model") or ""
        text = uri_io.read_text(layout.join(uri_io.parent(model), layout.METRICS_LOG))
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, UserError):
        return []
    return [r for r in rows if all(k in r for k in ("epoch", "val_mae", "train_loss"))]
