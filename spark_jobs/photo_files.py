"""The photos a job is given: every file under its input folders listed (local folders walked here, Hadoop
URIs through FileSystem.listFiles), each classified (read, or why not: hidden, not an image, empty, too
large, unreadable) and its bytes read on the executors. Shared by prepare, score and predict.

`list_files` -> `file_rows` (a DataFrame of FILE_ROWS) -> `file_content` per row inside a task.
"""
from __future__ import annotations

import math
import os
import re
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

from schemas import layout
from photos import walk
from photos.faces import IMAGE_EXTENSIONS

EXTENSION_PATTERN = r"(?i)\.(" + "|".join(IMAGE_EXTENSIONS) + r")$"


def int_or_none(value) -> Optional[int]:
    try:
        return None if value is None or value != value else int(value)
    except (TypeError, ValueError):
        return None


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
    photos.walk: each real folder once, a link to one already listed is an entry skipped as link_loop.
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
    length = int_or_none(rec.size_bytes)
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
            length = int_or_none(rec.length)
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
