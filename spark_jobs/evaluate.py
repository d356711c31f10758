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
import sys
import time
from typing import Iterator, List, Optional

if __package__ in (None, ""):  # run as a file by spark-submit: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from schemas import layout  # noqa: E402
from schemas.cli import Parser, UserError, dumps, entry_points, new_run_id, non_negative_int, redact  # noqa: E402
from schemas.outputs import LocalFS, Outputs  # noqa: E402
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


REPORT_FILES = ("metrics.json", "slices.csv", "confusion.csv", "confusion.png", "mae_by_age.png",
                "pred_vs_true.png", "report.html")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("evaluate", prog="spark-submit spark_jobs/evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, help="score output folder (or its predictions/ table)")
    p.add_argument("--labels", required=True,
                   help="a prepare output / faces table (join on face_id), or a CSV/Parquet manifest with path "
                        "and age (join on source_path)")
    p.add_argument("--output", required=True,
                   help="local folder for metrics.json, CSVs, PNGs and report.html (only files faceage wrote "
                        "are ever replaced)")
    p.add_argument("--split", default=None, choices=SPLITS, help="faces-table labels: only this split")
    p.add_argument("--data-version", "--labels-version", dest="labels_version", type=non_negative_int,
                   default=None, help="Delta version of a faces-table labels input (default: latest)")
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

    path = layout.local_path(uri)
    if path and os.path.isfile(path):  # a manifest: path, age[, gender, race, dataset]
        if split or version is not None:
            raise UserError("--split and --data-version apply to faces-table labels, not a manifest file")
        df = label_manifest.read(spark, uri).mapInPandas(parse_manifest_labels, schema=LABELS_SCHEMA)
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
        from deltalake import DeltaTable

        version_read = version if version is not None else DeltaTable(layout.local_path(faces) or faces).version()
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
    """(usable predictions: status ok, face 0 for a source_path join, a finite age; how many ok rows had a
    non-finite age)."""
    from pyspark.sql import functions as sf

    ok = preds.where(sf.col("status") == "ok")
    if key == "source_path":
        ok = ok.where(sf.col("face_index") == 0)
    ok = ok.select(key, "predicted_age", "uncertainty", "model_id", "data_version")
    finite = sf.col("predicted_age").isNotNull() & ~sf.isnan("predicted_age") & \
        (sf.abs(sf.col("predicted_age")) < sf.lit(float("inf")))
    counts = {r["bad"]: r["count"] for r in ok.groupBy((~finite).alias("bad")).count().collect()}
    return ok.where(finite), int(counts.get(True, 0))


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
            sf.avg((sf.col("abs_err") <= 5).cast("double")).alias("cs5"), sf.avg("err").alias("bias")]
    overall = errors.agg(*aggs).first().asDict()
    slices = []
    for name in SLICES:
        for r in errors.groupBy(name).agg(*aggs).collect():
            value = r[name]
            if name == "gender" and value.isdigit():
                value = GENDERS.get(int(value), value)
            if name == "race" and value.isdigit():
                value = RACES.get(int(value), value)
            slices.append({"slice": name, "value": value, **{k: r[k] for k in ("count", "mae", "rmse", "cs5", "bias")}})
    order = {g: i for i, g in enumerate(group_names())}
    slices.sort(key=lambda s: (SLICES.index(s["slice"]), order.get(s["value"], 99), str(s["value"])))
    cells = errors.groupBy("age_group", "pred_group").count().collect()
    by_age = sorted((int(r["age"]), r["count"], r["mae"]) for r in
                    errors.groupBy("age").agg(sf.count("*").alias("count"), sf.avg("abs_err").alias("mae")).collect())
    density = [(int(r["a"]), int(r["p"]), r["count"]) for r in errors.groupBy(
        sf.floor("age").alias("a"), sf.floor(sf.greatest(sf.lit(0.0), "predicted_age")).alias("p")).count().collect()]
    return {"overall": overall, "slices": slices, "cells": cells, "by_age": by_age, "density": density}


def run(args) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as sf

    from spark_jobs.score import read_predictions
    from spark_jobs.session import get_spark

    started = time.time()
    out_path = layout.local_path(to_uri(args.output))
    if out_path is None:
        raise UserError(f"--output {args.output}: the report is written to a local folder; give a local path")
    outputs = Outputs(LocalFS(), os.path.abspath(out_path), "evaluate", new_run_id())
    outputs.check(REPORT_FILES)  # before any work: never replace files faceage did not write
    spark = get_spark("faceage-evaluate")
    try:
        preds = read_predictions(spark, to_uri(args.predictions))
        preds.schema  # noqa: B018 - resolve now: a missing or foreign table fails here, with its name
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--predictions {args.predictions}: not a score output ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    labels, key, label_info = load_labels(spark, to_uri(args.labels), args.split, args.labels_version)

    ok, non_finite = valid_predictions(preds, key)
    labels, invalid = valid_labels(labels)
    labels, duplicate_labels = dedupe_keys(labels, key, ["age", "gender", "race", "dataset"], f"--labels {args.labels}")
    ok, duplicate_predictions = dedupe_keys(ok, key, ["predicted_age", "model_id"],
                                            f"--predictions {args.predictions}")
    excluded = {"non_finite_prediction": non_finite, "invalid_label": invalid,
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
    cells, by_age, density = aggregated["cells"], aggregated["by_age"], aggregated["density"]

    staging = outputs.staging_root
    try:
        os.makedirs(staging, exist_ok=True)
        matrix, normalized = confusion(cells)
        plots = write_plots(staging, matrix, normalized, by_age, density)
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
            "overall": overall, "slices": slices,
            "confusion": {"labels": names, "counts": matrix.astype(int).tolist(),
                          "row_normalized": [[round(float(v), 4) for v in row] for row in normalized]},
            "plots": plots, "seconds": round(time.time() - started, 3),
            "spark": {"master": spark.sparkContext.master, "app_id": spark.sparkContext.applicationId},
        }
        with open(os.path.join(staging, "metrics.json"), "w") as f:
            f.write(redact(dumps(metrics, default=str)))
        write_html(os.path.join(staging, "report.html"), json.loads(redact(dumps(metrics, default=str))), staging)
        outputs.commit(REPORT_FILES)
    finally:
        outputs.finish()
    return metrics


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
        w = csv.DictWriter(f, fieldnames=["slice", "value", "count", "mae", "rmse", "cs5", "bias"])
        w.writeheader()
        w.writerows(rows)


def write_plots(folder: str, matrix, normalized, by_age, density) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = group_names()
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
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "confusion.png"), dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ages = [a for a, _, _ in by_age]
    ax.bar(ages, [c for _, c, _ in by_age], color="#dddddd", label="faces")
    ax.set(xlabel="true age", ylabel="faces")
    ax2 = ax.twinx()
    ax2.plot(ages, [e for _, _, e in by_age], color="#c0392b", marker=".", label="MAE")
    ax2.set_ylabel("MAE (years)")
    ax.set_title("MAE by true age")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "mae_by_age.png"), dpi=90)
    plt.close(fig)

    grid = np.zeros((121, 121))
    for a, p, c in density:
        grid[min(p, 120), min(a, 120)] += c
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(np.log1p(grid), origin="lower", cmap="viridis", extent=(0, 121, 0, 121))
    ax.plot([0, 120], [0, 120], color="white", lw=0.8, ls="--")
    ax.set(xlabel="true age", ylabel="predicted age", title="Predicted vs true (log count)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "pred_vs_true.png"), dpi=90)
    plt.close(fig)
    return ["confusion.png", "mae_by_age.png", "pred_vs_true.png"]


def write_html(path: str, metrics: dict, folder: str) -> None:
    """One self-contained page: the images are embedded, nothing else is fetched."""
    def img(name):
        with open(os.path.join(folder, name), "rb") as f:
            data = base64.b64encode(f.read()).decode()
        return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    o, rows = metrics["overall"], metrics["rows"]
    models = ", ".join(f"{m['model_id']} (training data version {m['data_version']}, {m['faces']} faces)"
                       for m in metrics["models"]) or "none"
    slice_rows = "".join(
        f"<tr><td>{html.escape(s['slice'])}</td><td>{html.escape(str(s['value']))}</td>"
        + "".join(f"<td>{fmt(s[k])}</td>" for k in ("count", "mae", "rmse", "cs5", "bias")) + "</tr>"
        for s in metrics["slices"])
    label = metrics["labels"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>faceage evaluation</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>Age estimation: evaluation report</h1>
<p>Model: {html.escape(models)}.<br>Predictions: {html.escape(metrics['predictions'])}.<br>
Labels: {html.escape(str(label.get('uri')))} ({html.escape(label.get('kind', ''))}, split {html.escape(str(label.get('split')))},
version {html.escape(str(label.get('version')))}), joined on {html.escape(metrics['join_key'])}.<br>
Rows: {rows['matched']} matched; {rows['predictions_without_label']} predictions without a label in these labels
(e.g. faces of other splits); {rows['labels_without_prediction']} labels without a prediction; photos without a prediction by reason:
{html.escape(json.dumps(metrics['no_prediction_by_reason']))}; rows left out of every metric by reason:
{html.escape(json.dumps(metrics.get('excluded', {})))}. Created {html.escape(metrics['created_at'])}.</p>
<h2>Overall</h2><table><tr><th>count</th><th>MAE</th><th>RMSE</th><th>CS@5</th><th>bias (mean signed error)</th></tr>
<tr><td>{o['count']}</td><td>{o['mae']:.3f}</td><td>{o['rmse']:.3f}</td><td>{o['cs5']:.3f}</td><td>{o['bias']:.3f}</td></tr></table>
<h2>Slices</h2><table><tr><th>slice</th><th>value</th><th>count</th><th>MAE</th><th>RMSE</th><th>CS@5</th><th>bias</th></tr>
{slice_rows}</table>
<h2>Age-group confusion matrix</h2>{img('confusion.png')}
<h2>MAE by true age</h2>{img('mae_by_age.png')}
<h2>Predicted vs true</h2>{img('pred_vs_true.png')}
</body></html>"""
    with open(path, "w") as f:
        f.write(page)


def _job(argv: Optional[List[str]]) -> int:
    args = get_args_parser().parse_args(argv)
    metrics = run(args)
    o, r = metrics["overall"], metrics["rows"]
    left_out = {k: v for k, v in metrics["excluded"].items() if v}
    print(f"evaluate: {r['matched']} matched rows: MAE {o['mae']:.2f}, RMSE {o['rmse']:.2f}, CS@5 {o['cs5']:.3f}, "
          f"bias {o['bias']:+.2f}; unmatched: {r['predictions_without_label']} predictions, "
          f"{r['labels_without_prediction']} labels; left out {left_out or 'none'}; "
          f"report {os.path.join(args.output, 'report.html')}")
    return 0


main, console_main = entry_points("evaluate", _job)

if __name__ == "__main__":
    sys.exit(main())
