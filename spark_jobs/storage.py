"""Table and file I/O through Spark and Hadoop's FileSystem (local, s3a://, hdfs:// alike)."""
from __future__ import annotations

import os
from typing import Optional

from schemas import layout

FORMATS = ("parquet", "delta")
MODES = ("overwrite", "append")


def to_uri(path: str) -> str:
    """A local path -> file:/abs/path; URIs with a scheme stay as they are."""
    if "://" in path or path.startswith("file:"):
        return path.rstrip("/") if not path.endswith(":///") else path
    return "file:" + os.path.abspath(path)


def _hadoop_path(spark, uri: str):
    jvm = spark._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path, path.getFileSystem(spark._jsc.hadoopConfiguration())


def exists(spark, uri: str) -> bool:
    path, fs = _hadoop_path(spark, uri)
    return bool(fs.exists(path))


def write_text(spark, uri: str, text: str) -> None:
    """Write (replace) a small text file; parent folders are created."""
    path, fs = _hadoop_path(spark, uri)
    stream = fs.create(path, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()


def table_exists(spark, uri: str, fmt: str) -> bool:
    if fmt == "delta":
        return exists(spark, layout.join(uri, "_delta_log"))
    return exists(spark, layout.join(uri, "_SUCCESS"))


def read_table(spark, uri: str, fmt: str, version: Optional[int] = None):
    """A finished table as a DataFrame (Delta: latest version or `version`; Parquet: only with _SUCCESS)."""
    if fmt == "delta":
        reader = spark.read.format("delta")
        return (reader.option("versionAsOf", version) if version is not None else reader).load(uri)
    if version is not None:
        raise ValueError(f"{uri}: a version applies to Delta tables only")
    if not exists(spark, layout.join(uri, "_SUCCESS")):
        raise layout.IncompleteTableError(layout._incomplete_message(uri))
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
