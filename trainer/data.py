"""Petastorm readers over the faces table -> PyTorch batches for train / val / test.

Batches are {"image": uint8 N x 3 x H x W, "age": float32 N}; trainer.bundle.normalize turns images into
the model's float input on whatever device they were moved to.

The table's live files come from schemas.layout.table_files (the Delta log for a version, or a
Parquet directory only with _SUCCESS). Petastorm reads, shuffles and shards row groups of JPEG bytes;
a pool of decode workers beside it decodes them at the training size (`decode_ahead`: a
TransformSpec made Petastorm round-trip every decoded row through pandas and Arrow, a third of the
feed rate). Ranks of a distributed run read disjoint shards of the row groups (`shard_row_groups`,
Petastorm's own rule). Every epoch's row count is checked against the split's (or shard's) size:
a short epoch is an error, never silent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from schemas import layout
from schemas.crop import DEFAULT_SIZE
from schemas.tables import SPLITS
from trainer.runtime import decode_image

class ShortEpochError(RuntimeError):
    """An epoch yielded a different number of rows than its split holds."""


# ----------------------------------------------------------------------------- petastorm race fix

def _get_results_fixed(self):
    """petastorm 0.13.1 ThreadPool.get_results with its end-of-data check in a safe order.

    Upstream tests all_workers_done() and then ventilator.completed(): if the ventilator hands out
    its last items between the two checks, "everything handed out is done" was measured before
    those items existed, and the epoch ends early (even at 0 rows). Checking completed() first
    means no item can be ventilated after the workers are found idle.
    """
    import queue

    from petastorm.workers_pool import EmptyResultError, VentilatedItemProcessedMessage

    use_non_blocking_get = self._shuffle_rows and (self._seed is None or self._seed == 0)
    while True:
        ventilation_over = not self._ventilator or self._ventilator.completed()
        if ventilation_over and self.all_workers_done():
            raise EmptyResultError()
        if self.current_worker_done(self._get_results_worker_id):
            self._get_results_worker_id = (self._get_results_worker_id + 1) % self.workers_count
            continue
        try:
            result = self._results_queues[self._get_results_worker_id].get(
                block=not use_non_blocking_get, timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(result, VentilatedItemProcessedMessage):
            self._ventilated_items_processed_by_worker[self._get_results_worker_id] += 1
            if self._ventilator:
                self._ventilator.processed_item()
            self._get_results_worker_id = (self._get_results_worker_id + 1) % self.workers_count
            continue
        if isinstance(result, Exception):
            self.stop()
            self.join()
            raise result
        return result


_UPSTREAM_GET_RESULTS = None  # kept so a test can show the bug the fix removes


def patch_petastorm() -> None:
    """Install the race fix (idempotent)."""
    global _UPSTREAM_GET_RESULTS
    import warnings

    from petastorm.workers_pool.thread_pool import ThreadPool

    # petastorm 0.13.1 uses pyarrow's legacy dataset API on purpose (the reason for the pyarrow pin)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\..*")
    warnings.filterwarnings("ignore", message="schema_fields behavior has changed")

    if ThreadPool.get_results is not _get_results_fixed:
        _UPSTREAM_GET_RESULTS = ThreadPool.get_results
        ThreadPool.get_results = _get_results_fixed


# ----------------------------------------------------------------------------- the split's files

@dataclass(frozen=True)
class SplitSource:
    split: str
    files: List[str]  # URIs of the split's live Parquet files, sorted
    rows: int
    version: Optional[int]  # Delta version read, None for Parquet
    group_rows: Tuple[Tuple[int, ...], ...] = ()  # rows of each row group, per file (footers)

    def row_groups(self) -> List[Tuple[str, int, int]]:
        """(file URI, row-group index, rows) in file order: the order Petastorm numbers them in."""
        return [(uri, g, n) for uri, groups in zip(self.files, self.group_rows) for g, n in enumerate(groups)]


def shard_row_groups(source: SplitSource, cur_shard: Optional[int], shard_count: Optional[int],
                     seed: Optional[int]) -> List[Tuple[str, int, int]]:
    """The row groups one rank reads: Petastorm's own rule (shuffle the row-group indexes with the
    seed when there is one, then keep index % shard_count == cur_shard), so the expected row count
    of a Petastorm shard is known before reading it. Without sharding: all row groups."""
    groups = source.row_groups()
    if shard_count is None and cur_shard is None:
        return groups
    if not isinstance(shard_count, int) or not isinstance(cur_shard, int) or not 0 <= cur_shard < shard_count:
        raise ValueError(f"shard {cur_shard} of {shard_count}: need 0 <= cur_shard < shard_count (both ints)")
    if len(groups) < shard_count:
        raise ValueError(f"split {source.split!r} has {len(groups)} row groups, fewer than {shard_count} shards: "
                         f"some ranks would get no data (use fewer processes or re-prepare with smaller row groups)")
    indexes = list(range(len(groups)))
    if seed is not None:
        import random

        random.Random(seed).shuffle(indexes)
    return [groups[i] for i in indexes if i % shard_count == cur_shard]


def open_input(uri: str):
    """A binary file object for a local path, file: URI or remote URI (shell.uri's one I/O layer)."""
    from shell import uri as uris

    path = uris.local_path(uri)
    if path is not None:
        return open(path, "rb")
    fs, inner = uris.filesystem(uri)
    return fs.open(inner, "rb")


def petastorm_filesystem(uri: str):
    """None for local files (Petastorm's own), else the remote filesystem of shell.uri in the legacy
    pyarrow wrapper Petastorm 0.13 reads through (with a plain fsspec object pyarrow 14 takes its new
    dataset API, which Petastorm's arguments break)."""
    from shell import uri as uris

    if not uris.is_remote(uri):
        return None
    import pyarrow.filesystem as pafs

    fs, _ = uris.filesystem(uri)
    return pafs.S3FSWrapper(fs) if uris.fsspec_protocol(uri) == "s3" else pafs.DaskFileSystem(fs)


def split_source(data_uri: str, split: str, version: Optional[int] = None) -> SplitSource:
    """The live files of one split and their row count (from Parquet footers, no data read)."""
    import pyarrow.parquet as pq

    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {SPLITS}")
    faces = data_uri if data_uri.rstrip("/").endswith("/" + layout.FACES_DIR) else layout.faces_uri(data_uri)
    files = sorted(f for f in layout.table_files(faces, version) if f"/split={split}/" in f)
    if layout.is_delta(faces) and version is None:
        version = layout.delta_table(faces).version()
    group_rows = []
    for uri in files:
        with open_input(uri) as f:
            meta = pq.ParquetFile(f).metadata
        group_rows.append(tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups)))
    if not files:
        raise ValueError(f"{faces} has no rows in split {split!r}")
    return SplitSource(split, files, sum(map(sum, group_rows)), version, tuple(group_rows))


def split_ages(source: SplitSource) -> np.ndarray:
    """Every row's age label of one split (the age column alone is read)."""
    import pyarrow.parquet as pq

    parts = []
    for uri in source.files:
        with open_input(uri) as f:
            parts.append(pq.read_table(f, columns=["age"]).column("age").to_numpy())
    return np.concatenate(parts) if parts else np.array([], dtype=np.int64)


# ----------------------------------------------------------------------------- decoding (augmentation: trainer.augment)

def batches(row_groups, batch_size: int, shuffle_buffer: int, generator=None):
    """Row-group tensors -> {"image", "age"} batches; with shuffle_buffer > 0, rows are mixed across
    row groups in a pool of at least that many rows (shuffled whole, half emitted, half kept)."""
    import torch

    pool_x = pool_y = None
    for x, y in row_groups:
        pool_x = x if pool_x is None else torch.cat([pool_x, x])
        pool_y = y if pool_y is None else torch.cat([pool_y, y])
        if shuffle_buffer > 0 and len(pool_y) < shuffle_buffer:
            continue
        if shuffle_buffer > 0:
            perm = torch.randperm(len(pool_y), generator=generator)
            pool_x, pool_y = pool_x[perm], pool_y[perm]
            emit = (len(pool_y) - shuffle_buffer // 2) // batch_size * batch_size
        else:
            emit = len(pool_y) // batch_size * batch_size
        for i in range(0, emit, batch_size):
            yield {"image": pool_x[i:i + batch_size], "age": pool_y[i:i + batch_size]}
        pool_x, pool_y = pool_x[emit:], pool_y[emit:]
    if pool_y is not None and len(pool_y):
        if shuffle_buffer > 0:
            perm = torch.randperm(len(pool_y), generator=generator)
            pool_x, pool_y = pool_x[perm], pool_y[perm]
        for i in range(0, len(pool_y), batch_size):
            yield {"image": pool_x[i:i + batch_size], "age": pool_y[i:i + batch_size]}


class DecodedGroup:
    """A row group already decoded at the training size (from the --cache), in place of its JPEG bytes."""

    __slots__ = ("pixels",)

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels  # uint8 N x H x W x 3


def decode_ahead(raw_groups, size: int, workers: int, keep: Optional[list] = None) -> Iterator:
    """(JPEG bytes or DecodedGroup, ages) row groups -> (uint8 N x 3 x H x W images, float32 N ages) tensors.

    A pool of `workers` threads decodes whole row groups straight at the training size (JPEG draft mode),
    up to 2 x workers groups ahead of the consumer (bounded memory), yielded in arrival order. PIL releases
    the GIL while it decodes, so the threads run beside the training loop. Augmentation is not done here:
    the training loop applies it to whole batches on its device (trainer.augment). With `keep`, every
    group's decoded pixels are appended to it (the --cache's first pass).
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import torch

    def work(index, images, ages):
        if isinstance(images, DecodedGroup):
            decoded = images.pixels
        else:
            decoded = np.stack([decode_image(b, size) for b in images])
            if keep is not None:  # with its arrival index: the cache's order does not depend on thread timing
                keep.append((index, DecodedGroup(decoded), np.asarray(ages, dtype=np.float32)))
        pixels = decoded
        # N x 3 x H x W as a view: channels-last memory, which convolutions take as it is
        return torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.from_numpy(np.asarray(ages, dtype=np.float32))

    workers = max(1, workers)
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for index, (images, ages) in enumerate(raw_groups):
            pending.append(pool.submit(work, index, images, ages))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def cache_bytes(rows: int, size: int) -> int:
    """Memory the --cache of a split needs: its crops decoded at the training size."""
    return rows * size * size * 3


def pyarrow_groups(groups: List[Tuple[str, int, int]], seed: int, shuffle: bool) -> Iterator:
    """(JPEG bytes, ages) of each row group read with pyarrow alone, in a seeded order when shuffling."""
    import pyarrow.parquet as pq

    jobs = [(uri, group) for uri, group, _ in groups]
    if shuffle:
        np.random.default_rng(seed).shuffle(jobs)
    for uri, group in jobs:
        with open_input(uri) as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=["image", "age"])
        yield table.column("image").to_pylist(), table.column("age").to_numpy()


# ----------------------------------------------------------------------------- loaders

READERS = ("petastorm", "pyarrow")


@dataclass
class LoaderSettings:
    batch_size: int = 64
    image_size: int = DEFAULT_SIZE
    shuffle_buffer: int = 1024  # rows mixed across row groups (training only)
    workers: int = 2
    seed: int = 0
    reader: str = "petastorm"  # or "pyarrow": no Petastorm needed (e.g. a GPU box without it)
    cur_shard: Optional[int] = None  # this rank's shard of the row groups (distributed training)
    shard_count: Optional[int] = None
    cache: bool = False  # keep the decoded crops after the first pass; later epochs decode nothing


class SplitLoader:
    """Iterate one epoch at a time over a split; each epoch must yield exactly `source.rows` rows."""

    def __init__(self, source: SplitSource, settings: LoaderSettings, train: bool):
        self.source = source
        self.settings = settings
        self.train = train
        self.epoch = 0
        self._cache: Optional[list] = None  # [(DecodedGroup, ages)] once a whole pass was kept
        if settings.cache and settings.shard_count is not None:
            raise ValueError("--cache keeps one process's whole split; a sharded rank reads other row groups each "
                             "epoch: leave out --cache for distributed training")
        if settings.cache:
            import psutil

            need, free = cache_bytes(source.rows, settings.image_size), psutil.virtual_memory().available
            if need > free // 2:
                raise ValueError(f"--cache needs {need / 2**20:.0f} MiB for the {source.split} split at "
                                 f"{settings.image_size} px but only {free / 2**20:.0f} MiB are free; leave out "
                                 f"--cache or lower --image-size")

    def __len__(self) -> int:
        """Batches per epoch (a shard's share of the split when sharded: exact size varies by epoch)."""
        rows = self.source.rows // (self.settings.shard_count or 1)
        return max(1, -(-rows // self.settings.batch_size))

    def epoch_groups(self, epoch: int) -> List[Tuple[str, int, int]]:
        """The row groups epoch `epoch` reads (this rank's shard of them when sharded)."""
        s = self.settings
        seed = s.seed * 1000 + epoch if self.train else None
        return shard_row_groups(self.source, s.cur_shard, s.shard_count, seed)

    def __iter__(self) -> Iterator[Dict[str, "object"]]:
        import torch

        s = self.settings
        if s.reader not in READERS:
            raise ValueError(f"reader {s.reader!r}: use one of {READERS}")
        if s.reader == "petastorm":
            from petastorm import make_batch_reader

            patch_petastorm()
        seed = s.seed * 1000 + self.epoch
        mine = self.epoch_groups(self.epoch)
        expected = sum(n for _, _, n in mine)
        self.epoch += 1
        generator = torch.Generator().manual_seed(seed)
        reader = None
        keep = [] if s.cache and self._cache is None else None  # the first pass of a --cache loader
        if self._cache is not None:  # a whole pass is in memory: its groups, in this epoch's order
            order = np.arange(len(self._cache))
            if self.train:
                np.random.default_rng(seed).shuffle(order)
            raw = (self._cache[i] for i in order)
        elif s.reader == "pyarrow":
            raw = pyarrow_groups(mine, seed, self.train)
        else:
            # Petastorm reads, shuffles and shards row groups of JPEG bytes; decoding happens in our
            # pool (decode_ahead), not in a TransformSpec: Petastorm round-trips transformed rows
            # through pandas and Arrow, which cost a third of the feed rate (BENCHMARKS.md).
            reader = make_batch_reader(
                self.source.files, num_epochs=1, workers_count=max(1, s.workers // 2),
                shuffle_row_groups=self.train, seed=seed if self.train else None,
                cur_shard=s.cur_shard, shard_count=s.shard_count, schema_fields=["image", "age"],
                filesystem=petastorm_filesystem(self.source.files[0]))
            raw = ((group.image, group.age) for group in reader)
        groups = decode_ahead(raw, s.image_size, s.workers, keep)
        seen = 0
        try:
            for batch in batches(groups, s.batch_size, s.shuffle_buffer if self.train else 0, generator):
                seen += len(batch["age"])
                yield batch
        finally:
            if reader is not None:
                reader.stop()
                reader.join()
        if seen != expected:
            what = "the split has" if s.shard_count is None else f"shard {s.cur_shard}/{s.shard_count} has"
            raise ShortEpochError(f"split {self.source.split!r}: an epoch yielded {seen} rows, {what} "
                                  f"{expected}; refusing to train or evaluate on a partial epoch")
        if keep is not None:  # a complete, checked pass: later epochs read it from memory
            self._cache = [(group, ages) for _, group, ages in sorted(keep, key=lambda item: item[0])]
