"""Table and file I/O through Spark and Hadoop's FileSystem (local, s3a://, hdfs:// alike)."""
from __future__ import annotations

import json
from typing import Optional

from schemas import layout
from shell.uri import HadoopFS, to_uri  # Spark jobs reach both through storage

MODES = ("overwrite", "append", "error")  # what a job does with outputs already there
MAX_FILE_BYTES = 64 * 2**20  # input files larger than this are rejected unread (prepare and score alike)


def qualify(spark, uri: str) -> str:
    """`uri` as Hadoop resolves it (scheme, authority, absolute path): the form to compare URIs in."""
    return HadoopFS(spark).qualify(uri)


def exists(spark, uri: str) -> bool:
    return HadoopFS(spark).exists(uri)


def write_text(spark, uri: str, text: str) -> None:
    """Write (replace) a small text file; parent folders are created."""
    HadoopFS(spark).write_text(uri, text)


def table_exists(spark, uri: str, fmt: str) -> bool:
    if fmt == "delta":
        return exists(spark, layout.join(uri, "_delta_log"))
    return exists(spark, layout.join(uri, "_SUCCESS"))


def read_table(spark, uri: str, fmt: str, version: Optional[int] = None, writer: str = layout.PREPARE_JOB):
    """A finished table as a DataFrame (Delta: latest version or `version`; Parquet: only with _SUCCESS);
    never while a commit into the table's folder is unfinished (layout.check_no_pending_commit). A folder
    that is not there is FileNotFoundError; one without _SUCCESS IncompleteTableError (`writer`: the job
    whose table it is, named in both)."""
    layout.check_no_pending_commit(layout.parent(uri), lambda u: exists(spark, u))
    if not exists(spark, uri):
        raise FileNotFoundError(layout._missing_message(uri, writer))
    if fmt == "delta":
        reader = spark.read.format("delta")
        return (reader.option("versionAsOf", version) if version is not None else reader).load(uri)
    if version is not None:
        raise ValueError(f"{uri}: a version applies to Delta tables only")
    if not exists(spark, layout.join(uri, "_SUCCESS")):
        raise layout.IncompleteTableError(layout._incomplete_message(uri, writer))
    return spark.read.parquet(uri)


# Parquet row groups of ~4 MB (~800 crops of 128 px): the unit Petastorm hands to a reader thread and
# shuffles, so many small groups keep the loader's threads busy and its shuffling fine-grained.
ROW_GROUP_BYTES = 4 * 2**20


def write_table(df, uri: str, fmt: str, mode: str, partition_by: Optional[str] = None) -> None:
    writer = df.write.format(fmt).mode(mode).option("parquet.block.size", ROW_GROUP_BYTES)
    if fmt == "csv":
        writer = writer.option("header", "true")
    if partition_by:
        writer = writer.partitionBy(partition_by)
    writer.save(uri)


def delta_version(spark, uri: str) -> Optional[int]:
    """The latest committed version of a Delta table."""
    row = spark.sql(f"DESCRIBE HISTORY delta.`{uri}` LIMIT 1").select("version").first()
    return None if row is None else int(row[0])


def table_format(spark, uri: str) -> Optional[str]:
    """'delta', 'parquet' (a finished Spark write: _SUCCESS) or None (absent or something else)."""
    if exists(spark, layout.join(uri, "_delta_log")):
        return "delta"
    if exists(spark, layout.join(uri, "_SUCCESS")):
        return "parquet"
    return None


class TableWrite:
    """One table of a run, written so that readers see it only after every check passed.

    stage(df) writes into the run's staging folder (nothing a reader looks at); `step()` is its part of the
    run's one commit (shell.outputs): a rename for a new or replaced table, a merge of the staged part
    files for a Parquet append, or ONE Delta write in place when the target already is a Delta table
    (overwrite = a new version; the previous versions stay readable), made from the staged rows and
    idempotent by its transaction id (txnAppId = the run id), so a commit rolled forward after a kill never
    writes it twice. Only a target that faceage wrote is ever replaced (shell.outputs)."""

    def __init__(self, spark, outputs, name: str, fmt: str, mode: str, partition_by: Optional[str] = None,
                 in_place_delta: bool = True):
        from shell.errors import UserError

        self.spark, self.outputs, self.name, self.fmt, self.mode = spark, outputs, name, fmt, mode
        self.partition_by = partition_by
        self.target = layout.join(outputs.root, name)
        existing = table_format(spark, self.target) if exists(spark, self.target) else None
        if mode == "append" and existing is not None and existing != (fmt if fmt != "csv" else "parquet"):
            raise UserError(f"--mode append: {self.target} is a {existing} table, not {fmt}; append in its own "
                            f"format (--format {existing}) or overwrite it")
        if fmt == "delta" and existing == "delta" and in_place_delta:
            self.how = "delta"
        elif mode == "append" and existing is not None:
            self.how = "merge"
        else:
            self.how = "replace"
        self.columns: Optional[list] = None
        self.schema_json: Optional[str] = None

    @property
    def staged_format(self) -> str:
        return "parquet" if self.how == "delta" else self.fmt  # a Delta write in place is made from Parquet

    def stage(self, df) -> None:
        self.columns, self.schema_json = list(df.columns), df.schema.json()
        write_table(df, self.outputs.staging(self.name), self.staged_format, "overwrite", self.partition_by)

    def staged_rows(self) -> int:
        """Rows in the staged table."""
        fmt = self.staged_format
        reader = self.spark.read.format("delta") if fmt == "delta" else (
            self.spark.read.option("header", "true").format("csv") if fmt == "csv" else self.spark.read.format("parquet"))
        if fmt != "delta":  # no rows, partitioned: Spark writes no file to infer a schema from
            reader = reader.schema(_schema(self.schema_json))
        return reader.load(self.outputs.staging(self.name)).count()

    def version_after_commit(self) -> Optional[int]:
        """The Delta version readers will see once the run committed (None for Parquet)."""
        if self.fmt != "delta":
            return None
        return delta_version(self.spark, self.target) + 1 if self.how == "delta" else 0

    def step(self) -> dict:
        from shell import outputs as out

        if self.how == "delta":
            return {"how": "delta", "name": self.name, "mode": self.mode, "partition_by": self.partition_by,
                    "columns": self.columns, "schema": self.schema_json, "txn": self.outputs.run_id, "kind": self.outputs.kind}
        return out.merge(self.name) if self.how == "merge" else out.replace(self.name)

    def folder_markers(self) -> list:
        return [self.name] if self.how == "replace" else []


def _schema(text: str):
    from pyspark.sql.types import StructType

    return StructType.fromJson(json.loads(text))


def delta_applier(spark):
    """The commit step `delta` (TableWrite.step) for shell.outputs: the staged Parquet rows written to the
    Delta table in one transaction, skipped when that transaction (txnAppId, txnVersion) already committed."""
    from shell.outputs import MARKER, marker_text

    def apply(step: dict, staged: str, target: str) -> None:
        if exists(spark, staged):
            df = spark.read.schema(_schema(step["schema"])).option("basePath", to_uri(staged)).parquet(to_uri(staged))
            if step.get("columns"):
                df = df.select(*step["columns"])
            writer = df.write.format("delta").mode(step["mode"]).option("txnAppId", step["txn"]) \
                .option("txnVersion", 0).option("parquet.block.size", ROW_GROUP_BYTES)
            if step.get("partition_by"):
                writer = writer.partitionBy(step["partition_by"])
            writer.save(target)
        write_text(spark, to_uri(layout.join(target, MARKER)), marker_text(step.get("kind", "prepare"), step["txn"]))

    return {"delta": apply}


def read_predictions(spark, uri: str, fmt: Optional[str] = None):
    """A predictions table written by score (Parquet, Delta or CSV; `uri` the table or the score output
    holding it), bbox as an array. Refused while a score run's commit there is unfinished."""
    from pyspark.sql import functions as sf

    from schemas import fields as schema_fields
    from schemas.tables import PREDICTIONS

    fs = HadoopFS(spark)  # local, s3a://, hdfs:// alike
    if uri.rstrip("/").split("/")[-1] != layout.PREDICTIONS_DIR and fs.isdir(layout.join(uri, layout.PREDICTIONS_DIR)):
        uri = layout.join(uri, layout.PREDICTIONS_DIR)
    layout.check_no_pending_commit(layout.parent(uri), fs.exists)  # never half of one score run
    if fmt is None:
        if fs.exists(layout.join(uri, "_delta_log")):
            fmt = "delta"
        elif fs.isdir(uri) and any(n.endswith(".csv") for n in fs.listdir(uri)):
            fmt = "csv"
        else:
            fmt = "parquet"
    if fmt == "delta":
        return read_table(spark, uri, "delta", writer=layout.SCORE_JOB)
    if fmt == "csv":
        csv_fields = [f if f.name != "bbox" else schema_fields.Field("bbox", "string", nullable=True) for f in PREDICTIONS]
        df = spark.read.option("header", "true").schema(schema_fields.spark_schema(csv_fields)).csv(uri)
        return df.withColumn("bbox", sf.from_json("bbox", "array<float>"))
    return read_table(spark, uri, "parquet", writer=layout.SCORE_JOB)
