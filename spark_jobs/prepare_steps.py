"""prepare's transforms: DataFrame -> DataFrame functions plus the per-partition face function.

`run()` in prepare.py wires them: list inputs -> file rows (bytes, or why not read) -> faces per
file (every listed file is a face or a reject) -> dedupe -> check -> write.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, replace
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

from schemas import fields as schema_fields
from schemas import ids, layout
from schemas.tables import FACES, REJECTS
from spark_jobs import label_manifest, walk
from spark_jobs import labels as L
from schemas.crop import CropSettings
from spark_jobs.faces import IMAGE_EXTENSIONS, Reject, crop_faces, get_detector
from spark_jobs.splits import assign_split, split_key

# Per-file result of the face function: every faces column (nullable, since a reject has none)
# plus the reject columns. Derived from the table definitions, never listed twice.
PROCESSED = tuple(replace(f, nullable=True) for f in FACES) + (
    schema_fields.Field("reason", "string", nullable=True),
    schema_fields.Field("detail", "string", nullable=True),
    schema_fields.Field("size_bytes", "int64", nullable=True),
)
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
    row.update(size_bytes=len(raw), content_sha256=hashlib.sha256(raw).hexdigest())
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

    from schemas.cli import pause_point

    pause_point("prepare-task")
    detector = get_detector(settings.crop.detector)
    names = [f.name for f in PROCESSED]
    for batch in batches:
        rows = []
        for rec in batch.itertuples(index=False):
            content, skip = file_content(rec, settings.max_file_bytes)
            if skip is not None:
                rows.append(process_file(rec.path, None, settings,
                                         skipped=(skip[0], skip[1], _int_or_none(rec.size_bytes))))
                continue
            label_row = None
            if settings.labels == "manifest":
                if rec.label_conflict:
                    rows.append(process_file(rec.path, None, settings, skipped=(
                        "bad_label", f"{L.basename(rec.path)}: the label manifest lists this file more than once "
                                     f"with different labels ({rec.label_conflict}); keep one row per file",
                        _int_or_none(rec.size_bytes))))
                    continue
                label_row = {"age": rec.label_age, "gender": rec.label_gender, "race": rec.label_race,
                             "subject_id": rec.label_subject_id}
            rows.append(process_file(rec.path, content, settings, label_row, detector))
        yield pd.DataFrame(rows, columns=names)


def _int_or_none(value) -> Optional[int]:
    try:
        return None if value is None or value != value else int(value)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- DataFrames

def is_hidden(relative_path: str) -> bool:
    """Spark's file listing skips names (files or folders) starting with '.' or '_'."""
    return any(part[:1] in (".", "_") for part in relative_path.split("/") if part)


class Listed(NamedTuple):
    """One listed input: `skip` is (reason, detail) when the listing itself already knows it is not read."""
    path: str
    length: Optional[int]
    hidden: bool
    os_path: Optional[bytes]
    skip: Optional[Tuple[str, str]] = None


def _loop_skip(loop_of: Optional[str]) -> Optional[Tuple[str, str]]:
    if loop_of is None:
        return None
    return "link_loop", (f"a link to a folder already listed ({os.fsencode(loop_of).decode('utf-8', 'backslashreplace')}):"
                         f" not entered again")


def list_files(spark, inputs: Sequence[str]) -> List[Listed]:
    """Every file under the inputs as Listed(path, length, hidden, os_path, skip).

    Spark's own listing drops zero-byte files, dangling links and names starting with '.' or '_',
    and Hadoop's Path cannot even hold some legal names (a colon, for one), so it cannot be the
    inventory: local folders are walked here (a dangling link gets length None; `path` is the name
    as the user wrote it, bytes that are not UTF-8 shown as \\xNN; `os_path` the exact bytes to open).
    Hadoop URIs are listed with FileSystem.listFiles (os_path None). Local folders are walked by
    spark_jobs.walk: each real folder once, a link to one already listed is an entry skipped as link_loop.
    """
    found = []
    for uri in inputs:
        local = layout.local_path(uri)
        if local is not None:
            for entry in walk.walk(local):
                rel = os.path.relpath(entry.path, local).replace(os.sep, "/")
                raw = os.fsencode(os.path.abspath(entry.path))
                found.append(Listed("file:" + raw.decode("utf-8", "backslashreplace"), entry.length,
                                    is_hidden(rel), raw, _loop_skip(entry.loop_of)))
            continue
        found += [Listed(p, n, h, None) for p, n, h in list_hadoop(spark, uri)]
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


def inventory_frame(spark, inventory: List[tuple]):
    """list_files' result as a DataFrame: path, length (null when unreadable), hidden."""
    return spark.createDataFrame([tuple(r[:3]) for r in inventory], "path string, length long, hidden boolean")


# What every listed input is before the face function: a local file to read there (os_path), the bytes
# binaryFile read (content), or why it is not read at all (reason, detail).
FILE_ROWS = "path string, os_path binary, size_bytes long, hidden boolean, content binary, reason string, detail string"
FILES_PER_TASK = 48  # small photos per Spark task: cheap to start, short enough that the cores finish together


def classify_file(path: str, length: Optional[int], hidden: bool, max_file_bytes: int
                  ) -> Optional[Tuple[str, str]]:
    """(reason, detail) for a listed file that is not read at all, or None when its bytes should be read."""
    if length is None:
        return "unreadable", "cannot stat the file (a dangling link, or no permission)"
    if hidden:
        return "hidden_file", "a file or folder name starting with '.' or '_' (hidden or metadata): not read"
    if not re.search(EXTENSION_PATTERN, path):
        return "unsupported_extension", f"not one of {', '.join(IMAGE_EXTENSIONS)} (any case)"
    if length == 0:
        return "empty_file", "the file has zero bytes"
    if length > max_file_bytes:
        return "too_large", f"{length} bytes is over --max-file-bytes {max_file_bytes}"
    return None


def file_content(rec, max_file_bytes: int) -> Tuple[Optional[bytes], Optional[Tuple[str, str]]]:
    """(bytes, None) or (None, (reason, detail)) for one FILE_ROWS record. A local file is read here, on
    the executor, with Python's open(): no Hadoop Path ever parses a user's file name (colons, '%', '#',
    bytes that are not UTF-8 all work), and the bytes never cross to the JVM and back."""
    if rec.reason is not None:
        return None, (rec.reason, rec.detail)
    if rec.content is not None:
        return bytes(rec.content), None
    length = _int_or_none(rec.size_bytes)
    skip = classify_file(rec.path, length, bool(rec.hidden), max_file_bytes)
    if skip is not None:
        return None, skip
    try:
        with open(bytes(rec.os_path), "rb") as f:
            content = f.read(max_file_bytes + 1)
    except OSError as e:
        return None, ("unreadable", f"listed but its bytes could not be read ({e.strerror or e})")
    if len(content) > max_file_bytes or not content:  # changed since it was listed
        return None, classify_file(rec.path, len(content), False, max_file_bytes) or \
            ("unreadable", "the file changed while the job ran")
    return content, None


def classify_partition(batches: Iterator, max_file_bytes: int) -> Iterator:
    """mapInPandas body: listed remote files binaryFile did not read (path, length, hidden) -> FILE_ROWS."""
    import pandas as pd

    for batch in batches:
        out = []
        for rec in batch.itertuples(index=False):
            length = _int_or_none(rec.length)
            skip = classify_file(rec.path, length, bool(rec.hidden), max_file_bytes) or (
                "unreadable", "listed but its bytes could not be read (deleted or moved during the run)")
            out.append({"path": rec.path, "os_path": None, "size_bytes": length, "hidden": bool(rec.hidden),
                        "content": None, "reason": skip[0], "detail": skip[1]})
        yield pd.DataFrame(out, columns=["path", "os_path", "size_bytes", "hidden", "content", "reason", "detail"])


def file_rows(spark, inputs: Sequence[str], inventory: List[tuple], max_file_bytes: int):
    """Every listed file as one FILE_ROWS row (see file_content for how its bytes are got).

    Local inputs: the listing itself, spread over tasks of FILES_PER_TASK files; the face function reads
    each file. Hadoop URIs (s3a://, hdfs://): Spark's binaryFile bytes, with the listed files it did not
    return (empty, hidden, odd names) classified by the same rule."""
    from pyspark.sql import functions as sf

    local = [r for r in inventory if r[3] is not None]
    remote_inputs = [u for u in inputs if layout.local_path(u) is None]
    frames = []
    if local:
        import pandas as pd

        slices = max(spark.sparkContext.defaultParallelism, math.ceil(len(local) / FILES_PER_TASK))
        listed = pd.DataFrame({"path": [r[0] for r in local], "os_path": [r[3] for r in local],
                               "size_bytes": pd.array([r[1] for r in local], dtype="Int64"),
                               "hidden": [bool(r[2]) for r in local]})
        listed["content"] = None
        listed["reason"] = [r.skip[0] if r.skip else None for r in local]
        listed["detail"] = [r.skip[1] if r.skip else None for r in local]
        # through Arrow into the JVM (no Python worker just to unpickle the listing), then spread over tasks
        frames.append(spark.createDataFrame(listed, FILE_ROWS).repartition(slices))
    if remote_inputs:
        remote = [r for r in inventory if r[3] is None]
        listing = inventory_frame(spark, remote)
        images = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(remote_inputs)
                  .where((sf.col("length") <= max_file_bytes) & (sf.col("length") > 0)
                         & sf.col("path").rlike(EXTENSION_PATTERN))
                  .select("path", sf.lit(None).cast("binary").alias("os_path"),
                          sf.col("length").alias("size_bytes"), sf.lit(False).alias("hidden"), "content",
                          sf.lit(None).cast("string").alias("reason"), sf.lit(None).cast("string").alias("detail")))
        skipped = listing.join(images.select("path"), "path", "left_anti")
        frames.append(images)
        frames.append(skipped.mapInPandas(lambda it: classify_partition(it, max_file_bytes), schema=FILE_ROWS))
    out = frames[0]
    for frame in frames[1:]:
        out = out.unionByName(frame)
    return out


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
