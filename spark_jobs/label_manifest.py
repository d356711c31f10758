"""The one label-manifest reader (prepare's `--labels manifest:URI` and evaluate's CSV labels).

A manifest is a CSV with a header or a Parquet file with `path` and `age` columns and optional
`gender`, `race`, `subject_id`, `dataset`. Every value is read as a string: no cast runs in Spark, so
a value such as `abc` or `NaN` can never fail the whole job; labels.label_from_manifest decides
per row (a bad_label reject in prepare, an `invalid_label` count in evaluate).
"""
from __future__ import annotations

from shell.errors import UserError

REQUIRED = ("path", "age")
OPTIONAL = ("gender", "race", "subject_id", "dataset")


def path_key(column):
    """A path column in the one spelling both sides of a path join use: `./a` -> `a`, `/x` and `file:///x` ->
    `file:/x` (Spark's and prepare's spelling of local files), `s3a://b/k` -> `s3://b/k` (the same object)."""
    from pyspark.sql import functions as sf

    key = sf.regexp_replace(column, r"^\./", "")
    key = sf.regexp_replace(key, r"^(/|file:/+)", "file:/")
    return sf.regexp_replace(key, r"^s3a://", "s3://")


def read(spark, uri: str):
    """DataFrame path, age, gender, race, subject_id, dataset: all strings (missing columns null)."""
    from pyspark.sql import functions as sf

    try:
        if uri.lower().endswith(".parquet") or not uri.lower().endswith((".csv", ".txt")):
            try:
                df = spark.read.parquet(uri)
            except Exception:  # noqa: BLE001 - not Parquet: try CSV below
                if uri.lower().endswith(".parquet"):
                    raise
                df = spark.read.option("header", "true").option("inferSchema", "false").csv(uri)
        else:
            df = spark.read.option("header", "true").option("inferSchema", "false").csv(uri)
    except Exception as e:  # noqa: BLE001 - AnalysisException for a missing/unreadable file
        raise UserError(f"label manifest {uri}: cannot read it as CSV or Parquet "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    columns = {c.strip().lower(): c for c in df.columns}
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise UserError(f"label manifest {uri} lacks column(s) {missing}; it needs path and age "
                        f"(optional: {', '.join(OPTIONAL)}); it has {df.columns[:8]}")
    cols = []
    for name in REQUIRED + OPTIONAL:
        col = sf.col(f"`{columns[name]}`").cast("string") if name in columns else sf.lit(None).cast("string")
        cols.append(sf.trim(col).alias(name) if name != "path" else col.alias(name))
    return df.select(*cols)
