"""prepare's transforms: DataFrame -> DataFrame functions plus the per-partition face function.

`main()` in prepare.py wires them: list inputs -> read images -> faces per partition ->
reconcile (every listed file is a face or a reject) -> dedupe -> write.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence, Tuple

from schemas import fields as F
from schemas import layout
from schemas.tables import FACES, REJECTS
from spark_jobs import labels as L
from spark_jobs.faces import IMAGE_EXTENSIONS, CropSettings, Reject, crop_faces, get_detector
from spark_jobs.splits import assign_split, split_key

# Per-file result of the face function: every faces column (nullable, since a reject has none)
# plus the reject columns. Derived from the table definitions, never listed twice.
PROCESSED = tuple(replace(f, nullable=True) for f in FACES) + (
    F.Field("reason", "string", nullable=True),
    F.Field("detail", "string", nullable=True),
    F.Field("size_bytes", "int64", nullable=True),
)
LABEL_COLUMNS = ("label_age", "label_gender", "label_race", "label_subject_id")
EXTENSION_PATTERN = r"(?i)\.(" + "|".join(IMAGE_EXTENSIONS) + r")$"


@dataclass(frozen=True)
class PrepareSettings:
    """What the face function needs on the executors (pickled into each task)."""

    crop: CropSettings
    labels: str  # utkface | fgnet | manifest
    dataset: str
    fractions: tuple
    split_salt: str
    run_id: str


# ----------------------------------------------------------------------------- per file

def face_id(content_sha256: str, face_index: int = 0) -> str:
    return f"{content_sha256[:24]}-{face_index}"


def process_file(path: str, raw: bytes, settings: PrepareSettings, label_row: Optional[dict] = None,
                 detector=None) -> dict:
    """One input file -> one PROCESSED row (a face, or a reject with reason and detail)."""
    row = {f.name: None for f in PROCESSED}
    row.update(source_path=path, size_bytes=len(raw), dataset=settings.dataset, prepare_run_id=settings.run_id)
    row["content_sha256"] = hashlib.sha256(raw).hexdigest()
    try:
        if settings.labels == "manifest":
            label = L.label_from_manifest(path, **(label_row or {"age": None}))
        else:
            label = L.PARSERS[settings.labels](path)
    except L.LabelError as e:
        row.update(reason="bad_label", detail=str(e))
        return row
    try:
        crop = crop_faces(raw, settings.crop, detector)[0]
    except Reject as e:
        row.update(reason=e.reason, detail=e.detail)
        return row
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not kill the job
        row.update(reason="corrupt", detail=f"unexpected {type(e).__name__}: {e}")
        return row
    row.update(
        face_id=face_id(row["content_sha256"], crop.face_index),
        image=crop.image,
        image_size=settings.crop.size,
        age=label.age,
        gender=label.gender,
        race=label.race,
        subject_id=label.subject_id,
        bbox=crop.bbox,
        landmarks=crop.landmarks,
        det_score=crop.det_score,
        n_faces=crop.n_faces,
        source_width=crop.source_width,
        source_height=crop.source_height,
        split=assign_split(split_key(label.subject_id, row["content_sha256"]), settings.fractions,
                           settings.split_salt),
    )
    return row


def process_partition(batches: Iterator, settings: PrepareSettings) -> Iterator:
    """mapInPandas body: (path, content[, label_*]) batches -> PROCESSED batches."""
    import pandas as pd

    detector = get_detector(settings.crop.detector)
    names = [f.name for f in PROCESSED]
    for batch in batches:
        rows = []
        for rec in batch.itertuples(index=False):
            label_row = None
            if settings.labels == "manifest":
                label_row = {"age": rec.label_age, "gender": rec.label_gender, "race": rec.label_race,
                             "subject_id": rec.label_subject_id}
            rows.append(process_file(rec.path, bytes(rec.content), settings, label_row, detector))
        yield pd.DataFrame(rows, columns=names)


# ----------------------------------------------------------------------------- DataFrames

def is_hidden(relative_path: str) -> bool:
    """Spark's file listing skips names (files or folders) starting with '.' or '_'."""
    return any(part[:1] in (".", "_") for part in relative_path.split("/") if part)


def list_files(spark, inputs: Sequence[str]) -> List[Tuple[str, Optional[int], bool]]:
    """Every file under the inputs as (path, length, hidden), in the path format binaryFile uses.

    Spark's own listing drops zero-byte files, dangling links and names starting with '.' or '_',
    so it cannot be the inventory: local folders are walked here (a dangling link gets length
    None), Hadoop URIs are listed with FileSystem.listFiles.
    """
    found = []
    for uri in inputs:
        local = layout.local_path(uri)
        if local is not None:
            for dirpath, dirnames, filenames in os.walk(local, followlinks=True):
                dirnames.sort()
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    try:
                        length = os.stat(full).st_size
                    except OSError:
                        length = None
                    rel = os.path.relpath(full, local).replace(os.sep, "/")
                    found.append(("file:" + os.path.abspath(full), length, is_hidden(rel)))
            continue
        found += list_hadoop(spark, uri)
    return found


def list_hadoop(spark, uri: str) -> List[Tuple[str, Optional[int], bool]]:
    """list_files for one Hadoop URI (s3a://, hdfs://, ...): FileSystem.listFiles, recursive."""
    root = spark._jvm.org.apache.hadoop.fs.Path(uri)
    fs = root.getFileSystem(spark._jsc.hadoopConfiguration())
    root = fs.makeQualified(root)
    prefix = root.toString().rstrip("/")
    found = []
    files = fs.listFiles(root, True)
    while files.hasNext():
        status = files.next()
        path = status.getPath().toString()
        found.append((path, int(status.getLen()), is_hidden(path[len(prefix):])))
    return found


def inventory_frame(spark, inventory: List[Tuple[str, Optional[int], bool]]):
    """list_files' result as a DataFrame: path, length (null when unreadable), hidden."""
    return spark.createDataFrame(inventory, "path string, length long, hidden boolean")


def read_images(spark, inputs: Sequence[str], max_file_bytes: int):
    """Image-named files with their bytes; over-size files are filtered before their bytes are read."""
    from pyspark.sql import functions as sf

    return (spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(list(inputs))
            .where((sf.col("length") <= max_file_bytes) & sf.col("path").rlike(EXTENSION_PATTERN))
            .select("path", "content"))


def read_manifest(spark, uri: str):
    """A label manifest (CSV with a header, or Parquet): path, age, optional gender/race/subject_id."""
    from pyspark.sql import functions as sf

    if uri.lower().endswith(".csv"):
        df = spark.read.option("header", "true").csv(uri)
    else:
        df = spark.read.parquet(uri)
    missing = {"path", "age"} - set(df.columns)
    if missing:
        raise ValueError(f"label manifest {uri} lacks column(s) {sorted(missing)}; it needs path and age "
                         f"(optional: gender, race, subject_id)")
    cols = [sf.col("path").alias("m_path"), sf.col("age").cast("double").alias("label_age")]
    for name in ("gender", "race"):
        cols.append((sf.col(name).cast("double") if name in df.columns else sf.lit(None).cast("double"))
                    .alias(f"label_{name}"))
    cols.append((sf.col("subject_id").cast("string") if "subject_id" in df.columns
                 else sf.lit(None).cast("string")).alias("label_subject_id"))
    return df.select(*cols)


def attach_manifest_labels(images, manifest, inputs: Sequence[str]):
    """Left-join manifest labels: a manifest path matches a file's full URI or its path under an input."""
    from pyspark.sql import functions as sf

    from spark_jobs.storage import to_uri

    manifest = manifest.withColumn("m_key", sf.regexp_replace(sf.regexp_replace("m_path", r"^\./", ""),
                                                              r"^(/|file:/+)", "file:/"))
    manifest = manifest.dropDuplicates(["m_key"])
    rel = sf.lit(None).cast("string")
    for root in inputs:
        prefix = to_uri(root).rstrip("/") + "/"
        prefix = prefix.replace("file:///", "file:/")
        rel = sf.when(sf.col("path").startswith(prefix), sf.expr(f"substring(path, {len(prefix) + 1})")) \
            .otherwise(rel)
    keyed = images.withColumn("rel_key", rel)
    labelled = [f"label_{n}" for n in ("age", "gender", "race", "subject_id")]
    by_full = manifest.select(sf.col("m_key").alias("full_key"), *[sf.col(c).alias("f_" + c) for c in labelled])
    by_rel = manifest.select(sf.col("m_key").alias("rel_key"), *[sf.col(c).alias("r_" + c) for c in labelled])
    joined = keyed.join(by_full, keyed.path == by_full.full_key, "left").join(by_rel, "rel_key", "left")
    return joined.select("path", "content",
                         *[sf.coalesce(sf.col("f_" + c), sf.col("r_" + c)).alias(c) for c in labelled])


def faces_per_file(images, settings: PrepareSettings):
    """Run the face function over every image file (one PROCESSED row per file)."""
    if settings.labels != "manifest":
        images = images.select("path", "content")
    schema = F.spark_schema(PROCESSED)
    return images.mapInPandas(lambda it: process_partition(it, settings), schema=schema)


def skip_reason(max_file_bytes: int):
    """(reason, detail) columns for a listed file (path, length, hidden) that the face function never
    saw: why binaryFile or our filters left it out."""
    from pyspark.sql import functions as sf

    hidden = sf.col("hidden")
    reason = (sf.when(sf.col("length").isNull(), sf.lit("unreadable"))
              .when(hidden, sf.lit("hidden_file"))
              .when(~sf.col("path").rlike(EXTENSION_PATTERN), sf.lit("unsupported_extension"))
              .when(sf.col("length") == 0, sf.lit("empty_file"))
              .when(sf.col("length") > max_file_bytes, sf.lit("too_large"))
              .otherwise(sf.lit("unreadable")))
    detail = (sf.when(reason == "hidden_file",
                      sf.lit("a file or folder name starting with '.' or '_' (hidden or metadata): not read"))
              .when(reason == "unsupported_extension",
                    sf.lit(f"not one of {', '.join(IMAGE_EXTENSIONS)} (any case)"))
              .when(reason == "empty_file", sf.lit("the file has zero bytes"))
              .when(reason == "too_large",
                    sf.concat(sf.col("length").cast("string"), sf.lit(f" bytes is over --max-file-bytes {max_file_bytes}")))
              .when(sf.col("length").isNull(), sf.lit("cannot stat the file (a dangling link, or no permission)"))
              .otherwise(sf.lit("listed but its bytes could not be read (deleted or moved during the run)")))
    return reason, detail


def reconcile(listing, processed, max_file_bytes: int, dataset: str, run_id: str):
    """Listed files that never reached the face function become rejects, so inputs = faces + rejects."""
    from pyspark.sql import functions as sf

    names = [f.name for f in PROCESSED]
    skipped = listing.join(processed.select(sf.col("source_path").alias("path")), "path", "left_anti")
    reason, detail = skip_reason(max_file_bytes)
    extra = {"source_path": sf.col("path"), "size_bytes": sf.col("length"), "reason": reason, "detail": detail,
             "dataset": sf.lit(dataset), "prepare_run_id": sf.lit(run_id)}
    schema = {f.name: f for f in PROCESSED}
    skipped_rows = skipped.select(*[
        (extra[n] if n in extra else sf.lit(None)).cast(F.spark_schema([schema[n]])[0].dataType).alias(n)
        for n in names])
    return processed.unionByName(skipped_rows)


def mark_duplicates(results, existing_hashes=None):
    """Keep one face per content hash (the smallest source_path); the other copies, and faces whose
    hash is already in the table (append), become 'duplicate' rejects.

    Only (path, hash) pairs are shuffled; the decisions, one row per duplicate, are broadcast back,
    so the crops never move.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as sf

    keys = results.where(sf.col("reason").isNull()).select("source_path", "content_sha256")
    order = Window.partitionBy("content_sha256").orderBy("source_path")
    copies = (keys.withColumn("_rank", sf.row_number().over(order))
              .withColumn("_keeper", sf.first("source_path").over(
                  order.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)))
              .where(sf.col("_rank") > 1)
              .select("source_path", sf.concat(sf.lit("same bytes as "), sf.col("_keeper")).alias("_dup")))
    if existing_hashes is not None:
        present = existing_hashes.select("content_sha256").distinct()
        already = keys.join(present, "content_sha256").select(
            "source_path", sf.lit("already in the faces table (--mode append)").alias("_dup"))
        copies = already.unionByName(copies).dropDuplicates(["source_path"])
    out = results.join(sf.broadcast(copies), "source_path", "left")
    return (out.withColumn("reason", sf.when(sf.col("_dup").isNotNull(), sf.lit("duplicate"))
                           .otherwise(sf.col("reason")))
            .withColumn("detail", sf.coalesce(sf.col("_dup"), sf.col("detail")))
            .drop("_dup"))


def faces_rows(results):
    from pyspark.sql import functions as sf

    return results.where(sf.col("reason").isNull()).select(*[f.name for f in FACES])


def rejects_rows(results):
    from pyspark.sql import functions as sf

    return results.where(sf.col("reason").isNotNull()).select(*[f.name for f in REJECTS])
