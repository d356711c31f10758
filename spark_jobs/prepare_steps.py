"""prepare's transforms: DataFrame -> DataFrame functions plus the per-partition face function.

`run()` in prepare.py wires them: list inputs -> file rows (bytes, or why not read; both in
spark_jobs.photo_files, which score and predict share) -> faces per file (every listed file is a face
or a reject) -> dedupe -> check -> write.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence, Tuple

from schemas import fields as schema_fields
from schemas import ids
from schemas.crop import CropSettings
from schemas.tables import FACES, REJECTS
from spark_jobs import label_manifest
from photos.faces import Reject, crop_faces, get_detector
from photos.labels import LabelError, PARSERS, basename, label_from_manifest
from spark_jobs.photo_files import file_content, int_or_none
from photos.splits import assign_split, split_key

# Per-file result of the face function: every faces column (nullable, since a reject has none)
# plus the reject columns. Derived from the table definitions, never listed twice.
PROCESSED = tuple(replace(f, nullable=True) for f in FACES) + (
    schema_fields.Field("reason", "string", nullable=True),
    schema_fields.Field("detail", "string", nullable=True),
    schema_fields.Field("size_bytes", "int64", nullable=True),
)


@dataclass(frozen=True)
class PrepareSettings:
    """What the face function needs on the executors (pickled into each task)."""

    crop: CropSettings
    labels: str  # utkface | fgnet | manifest
    dataset: str
    fractions: tuple
    split_salt: str
    run_id: str
    max_file_bytes: int = 64 * 2**20


# ----------------------------------------------------------------------------- per file

def process_file(path: str, raw: Optional[bytes], settings: PrepareSettings, label_row: Optional[dict] = None,
                 detector=None, skipped: Optional[Tuple[str, str, Optional[int]]] = None) -> dict:
    """One input file -> one PROCESSED row (a face, or a reject with reason and detail).

    `skipped` = (reason, detail, size) for a listed file whose bytes were never read (see classify_file)."""
    row = {f.name: None for f in PROCESSED}
    row.update(source_path=path, dataset=settings.dataset, prepare_run_id=settings.run_id)
    if skipped is not None:
        row.update(reason=skipped[0], detail=skipped[1], size_bytes=skipped[2])
        return row
    row.update(size_bytes=len(raw), content_sha256=ids.content_sha256(raw))
    try:
        if settings.labels == "manifest":
            label = label_from_manifest(path, **(label_row or {"age": None}))
        else:
            label = PARSERS[settings.labels](path)
    except LabelError as e:
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
        face_id=ids.face_id(row["content_sha256"], crop.face_index),
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
    """mapInPandas body: FILE_ROWS batches (+ label_* columns with a manifest) -> PROCESSED batches."""
    import pandas as pd

    from shell.cli import pause_point

    pause_point("prepare-task")
    detector = get_detector(settings.crop.detector)
    names = [f.name for f in PROCESSED]
    for batch in batches:
        rows = []
        for rec in batch.itertuples(index=False):
            content, skip = file_content(rec, settings.max_file_bytes)
            if skip is not None:
                rows.append(process_file(rec.path, None, settings,
                                         skipped=(skip[0], skip[1], int_or_none(rec.size_bytes))))
                continue
            label_row = None
            if settings.labels == "manifest":
                if rec.label_conflict:
                    rows.append(process_file(rec.path, None, settings, skipped=(
                        "bad_label", f"{basename(rec.path)}: the label manifest lists this file more than once "
                                     f"with different labels ({rec.label_conflict}); keep one row per file",
                        int_or_none(rec.size_bytes))))
                    continue
                label_row = {"age": rec.label_age, "gender": rec.label_gender, "race": rec.label_race,
                             "subject_id": rec.label_subject_id}
            rows.append(process_file(rec.path, content, settings, label_row, detector))
        yield pd.DataFrame(rows, columns=names)


def read_manifest(spark, uri: str):
    """A label manifest (CSV with a header, or Parquet): path, age, optional gender/race/subject_id.

    Every value stays a string here (no cast can fail on a bad value and kill the job); the one label
    parser (labels.label_from_manifest) turns them into a Label or a bad_label reject per file."""
    from pyspark.sql import functions as sf

    df = label_manifest.read(spark, uri)
    cols = [sf.col("path").alias("m_path"), sf.col("age").alias("label_age")]
    for name in ("gender", "race", "subject_id"):
        cols.append(sf.col(name).alias(f"label_{name}"))
    return df.select(*cols)


def attach_manifest_labels(files, manifest, inputs: Sequence[str]):
    """Left-join manifest labels: a manifest path matches a file's full URI or its path under an input.

    A file the manifest lists more than once with different labels gets `label_conflict` (a bad_label
    reject later); identical repeats are one label."""
    from pyspark.sql import functions as sf

    from spark_jobs.storage import to_uri

    labelled = [f"label_{n}" for n in ("age", "gender", "race", "subject_id")]
    manifest = manifest.withColumn("m_key", label_manifest.path_key(sf.col("m_path")))
    rel = sf.lit(None).cast("string")
    for root in inputs:
        prefix = to_uri(root).rstrip("/") + "/"
        prefix = prefix.replace("file:///", "file:/")
        rel = sf.when(sf.col("path").startswith(prefix), sf.expr(f"substring(path, {len(prefix) + 1})")) \
            .otherwise(rel)
    keyed = files.withColumn("rel_key", rel)
    by_full = manifest.select(sf.col("m_key").alias("key"), *labelled)
    joined_full = keyed.select("path", label_manifest.path_key(sf.col("path")).alias("key")).join(by_full, "key")
    joined_rel = keyed.where(sf.col("rel_key").isNotNull()).select("path", sf.col("rel_key").alias("key")) \
        .join(by_full, "key")
    # every label row that names a file, by either key; distinct label tuples per file
    label_text = sf.concat_ws("/", *[sf.coalesce(sf.col(c).cast("string"), sf.lit("")) for c in labelled])
    per_file = (joined_full.unionByName(joined_rel).select("path", *labelled, label_text.alias("_text")).distinct()
                .groupBy("path")
                .agg(sf.count("*").alias("_n"), sf.first(sf.struct(*labelled)).alias("_label"),
                     sf.concat_ws(" vs ", sf.sort_array(sf.collect_set("_text"))).alias("_texts")))
    per_file = per_file.select(
        "path", *[sf.when(sf.col("_n") == 1, sf.col("_label." + c)).alias(c) for c in labelled],
        sf.when(sf.col("_n") > 1, sf.concat(sf.lit("age/gender/race/subject "), sf.col("_texts")))
        .alias("label_conflict"))
    return files.join(per_file, "path", "left")


def faces_per_file(files, settings: PrepareSettings):
    """Run the face function over every listed file (one PROCESSED row per file)."""
    if settings.labels != "manifest":
        files = files.select("path", "os_path", "size_bytes", "hidden", "content", "reason", "detail")
    schema = schema_fields.spark_schema(PROCESSED)
    return files.mapInPandas(lambda it: process_partition(it, settings), schema=schema)


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
