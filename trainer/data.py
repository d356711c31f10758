"""Petastorm readers over the faces table -> PyTorch batches for train / val / test.

Batches are {"image": uint8 N x 3 x H x W, "age": float32 N}; `normalize` turns images into the
model's float input on whatever device they were moved to.

The table's live files come from schemas.layout.table_files (the Delta log for a version, or a
Parquet directory only with _SUCCESS). JPEG crops are decoded (and, for training, augmented) in
Petastorm's reader workers via a TransformSpec. Every epoch's row count is checked against the
split's size: a short epoch is an error, never silent.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import numpy as np

from schemas import layout
from schemas.tables import SPLITS

# ImageNet statistics: torchvision's ResNet weights expect them, and they do no harm from scratch.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


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
    files: List[str]  # URIs of the split's live Parquet files
    rows: int
    version: Optional[int]  # Delta version read, None for Parquet


def split_source(data_uri: str, split: str, version: Optional[int] = None) -> SplitSource:
    """The live files of one split and their row count (from Parquet footers, no data read)."""
    import pyarrow.parquet as pq

    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {SPLITS}")
    faces = data_uri if data_uri.rstrip("/").endswith("/" + layout.FACES_DIR) else layout.faces_uri(data_uri)
    files = [f for f in layout.table_files(faces, version) if f"/split={split}/" in f]
    if layout.is_delta(faces) and version is None:
        from deltalake import DeltaTable

        version = DeltaTable(faces).version()
    rows = 0
    for uri in files:
        path = layout.local_path(uri)
        if path is not None:
            rows += pq.ParquetFile(path).metadata.num_rows
        else:
            import fsspec

            with fsspec.open(uri, "rb") as f:
                rows += pq.ParquetFile(f).metadata.num_rows
    if not files:
        raise ValueError(f"{faces} has no rows in split {split!r}")
    return SplitSource(split, files, rows, version)


# ----------------------------------------------------------------------------- decoding and augmentation

def decode(jpeg: bytes, size: int) -> np.ndarray:
    """JPEG bytes -> HxWx3 uint8 at size x size."""
    from PIL import Image

    im = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im)


def augment(pixels: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random shift/scale crop, horizontal flip and colour jitter; strength 0 returns the input."""
    if strength <= 0:
        return pixels
    from PIL import Image

    size = pixels.shape[0]
    im = Image.fromarray(pixels)
    scale = 1.0 + rng.uniform(-0.15, 0.15) * strength
    shift = rng.uniform(-0.08, 0.08, 2) * strength * size
    side = size / scale
    x0 = (size - side) / 2 + shift[0]
    y0 = (size - side) / 2 + shift[1]
    im = im.transform((size, size), Image.Transform.EXTENT, (x0, y0, x0 + side, y0 + side),
                      resample=Image.Resampling.BILINEAR)
    out = np.asarray(im, dtype=np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    brightness = 1.0 + rng.uniform(-0.3, 0.3) * strength
    contrast = 1.0 + rng.uniform(-0.3, 0.3) * strength
    saturation = 1.0 + rng.uniform(-0.3, 0.3) * strength
    mean = out.mean()
    out = (out - mean) * contrast + mean
    grey = out.mean(axis=2, keepdims=True)
    out = (out - grey) * saturation + grey
    return np.clip(out * brightness, 0, 255).astype(np.uint8)


def to_chw(pixels: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> normalised 3xHxW float32 (one image; the loader normalises whole batches)."""
    return ((pixels.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1).copy()


def normalize(images):
    """A uint8 N x 3 x H x W torch batch (as the loader yields it) -> normalised float32, on its device.

    Done per batch after the loader (on the GPU when there is one) instead of per row in the reader:
    Petastorm round-trips every transformed row through pandas and Arrow, and float32 arrays cost
    4x the bytes of uint8 there.
    """
    import torch

    mean = torch.as_tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.as_tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


# A row's pixels travel as bytes plus this marker: numpy's fixed-width bytes type drops trailing NULs.
_END = b"\x01"


def transform_spec(size: int, strength: float, seed: int):
    """Petastorm TransformSpec: JPEG -> (augmented) raw HxWx3 uint8 pixels as bytes; age -> float32.

    Raw bytes are a flat Arrow binary column, cheap for Petastorm's pandas/Arrow round trip, where
    arrays of shape (3, H, W) become slow nested lists.
    """
    from petastorm import TransformSpec

    rng = np.random.default_rng(seed)

    def transform(frame):
        frame["image"] = [augment(decode(b, size), rng, strength).tobytes() + _END for b in frame["image"]]
        frame["age"] = frame["age"].astype(np.float32)
        return frame

    return TransformSpec(transform,
                         edit_fields=[("image", np.bytes_, (), False), ("age", np.float32, (), False)],
                         selected_fields=["image", "age"])


def to_tensors(batch, size: int):
    """One Petastorm row-group batch -> (uint8 N x 3 x H x W images, float32 N ages) tensors."""
    import torch

    n, length = len(batch.image), size * size * 3
    pixels = np.empty((n, length), dtype=np.uint8)
    for i, row in enumerate(batch.image):  # one contiguous copy per row (a transposing copy is 10x slower)
        pixels[i] = np.frombuffer(row, dtype=np.uint8, count=length)
    # N x 3 x H x W as a view: channels-last memory, which convolutions take as it is
    return torch.from_numpy(pixels.reshape(n, size, size, 3)).permute(0, 3, 1, 2), torch.tensor(batch.age)


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


def pyarrow_row_groups(source: SplitSource, size: int, strength: float, seed: int, workers: int,
                       shuffle: bool) -> Iterator:
    """The same (images, ages) row-group tensors as the Petastorm path, read with pyarrow alone.

    A thread pool decodes up to 2 x workers row groups ahead (bounded memory), in a seeded order.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq
    import torch

    jobs = []
    for uri in source.files:
        path = layout.local_path(uri)
        if path is None:
            raise ValueError(f"--reader pyarrow reads local tables only; {uri} is remote (use petastorm)")
        jobs += [(path, group) for group in range(pq.ParquetFile(path).num_row_groups)]
    if shuffle:
        np.random.default_rng(seed).shuffle(jobs)

    def load(job):
        path, group = job
        rng = np.random.default_rng([seed, group, len(path)])
        table = pq.ParquetFile(path).read_row_group(group, columns=["image", "age"])
        pixels = np.stack([augment(decode(b, size), rng, strength) for b in table.column("image").to_pylist()])
        ages = table.column("age").to_numpy().astype(np.float32)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.from_numpy(ages)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending = deque()
        for job in jobs:
            pending.append(pool.submit(load, job))
            if len(pending) >= 2 * max(1, workers):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------- loaders

READERS = ("petastorm", "pyarrow")


@dataclass
class LoaderSettings:
    batch_size: int = 64
    image_size: int = 128
    augment_strength: float = 1.0  # training only
    shuffle_buffer: int = 1024  # rows mixed across row groups (training only)
    workers: int = 2
    seed: int = 0
    reader: str = "petastorm"  # or "pyarrow": no Petastorm needed (e.g. a GPU box without it)


class SplitLoader:
    """Iterate one epoch at a time over a split; each epoch must yield exactly `source.rows` rows."""

    def __init__(self, source: SplitSource, settings: LoaderSettings, train: bool):
        self.source = source
        self.settings = settings
        self.train = train
        self.epoch = 0

    def __len__(self) -> int:
        return -(-self.source.rows // self.settings.batch_size)

    def __iter__(self) -> Iterator[Dict[str, "object"]]:
        import torch

        s = self.settings
        if s.reader not in READERS:
            raise ValueError(f"reader {s.reader!r}: use one of {READERS}")
        if s.reader == "petastorm":
            from petastorm import make_batch_reader

            patch_petastorm()
        seed = s.seed * 1000 + self.epoch
        self.epoch += 1
        generator = torch.Generator().manual_seed(seed)
        strength = s.augment_strength if self.train else 0.0
        reader = None
        if s.reader == "pyarrow":
            groups = pyarrow_row_groups(self.source, s.image_size, strength, seed, s.workers, self.train)
        else:
            reader = make_batch_reader(
                self.source.files, num_epochs=1, workers_count=s.workers,
                shuffle_row_groups=self.train, seed=seed if self.train else None,
                transform_spec=transform_spec(s.image_size, strength, seed), schema_fields=["image", "age"])
            # Petastorm's torch adapters refuse byte columns (and its DataLoader re-collates single rows
            # in Python), so row groups become tensors here and are mixed in our own buffer.
            groups = (to_tensors(group, s.image_size) for group in reader)
        seen = 0
        try:
            for batch in batches(groups, s.batch_size, s.shuffle_buffer if self.train else 0, generator):
                seen += len(batch["age"])
                yield batch
        finally:
            if reader is not None:
                reader.stop()
                reader.join()
        if seen != self.source.rows:
            raise ShortEpochError(f"split {self.source.split!r}: an epoch yielded {seen} rows, the split has "
                                  f"{self.source.rows}; refusing to train or evaluate on a partial epoch")


def make_loaders(data_uri: str, settings: LoaderSettings, version: Optional[int] = None) -> Dict[str, SplitLoader]:
    """{'train', 'val', 'test'} -> SplitLoader over the faces table under `data_uri` (a prepare output)."""
    return {split: SplitLoader(split_source(data_uri, split, version), settings, train=(split == "train"))
            for split in SPLITS}
