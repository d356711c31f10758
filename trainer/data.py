"""Petastorm readers over the faces table -> PyTorch batches for train / val / test.

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
    """HxWx3 uint8 -> normalised 3xHxW float32."""
    return ((pixels.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1).copy()


def transform_spec(size: int, strength: float, seed: int):
    """Petastorm TransformSpec: image bytes -> 3 x size x size float32, age -> float32."""
    from petastorm import TransformSpec

    rng = np.random.default_rng(seed)

    def transform(frame):
        images = [decode(b, size) for b in frame["image"]]
        frame["image"] = [to_chw(augment(im, rng, strength)) for im in images]
        frame["age"] = frame["age"].astype(np.float32)
        return frame

    return TransformSpec(transform,
                         edit_fields=[("image", np.float32, (3, size, size), False),
                                      ("age", np.float32, (), False)],
                         selected_fields=["image", "age"])


# ----------------------------------------------------------------------------- loaders

@dataclass
class LoaderSettings:
    batch_size: int = 64
    image_size: int = 128
    augment_strength: float = 1.0  # training only
    shuffle_buffer: int = 1024  # rows mixed across row groups (training only)
    workers: int = 2
    seed: int = 0


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
        from petastorm import make_batch_reader
        from petastorm.pytorch import DataLoader

        patch_petastorm()
        s = self.settings
        seed = s.seed * 1000 + self.epoch
        self.epoch += 1
        reader = make_batch_reader(
            self.source.files, num_epochs=1, workers_count=s.workers,
            shuffle_row_groups=self.train, seed=seed if self.train else None,
            transform_spec=transform_spec(s.image_size, s.augment_strength if self.train else 0.0, seed),
            schema_fields=["image", "age"])
        seen = 0
        with DataLoader(reader, batch_size=s.batch_size,
                        shuffling_queue_capacity=s.shuffle_buffer if self.train else 0) as loader:
            for batch in loader:
                seen += len(batch["age"])
                yield batch
        if seen != self.source.rows:
            raise ShortEpochError(f"split {self.source.split!r}: an epoch yielded {seen} rows, the split has "
                                  f"{self.source.rows}; refusing to train or evaluate on a partial epoch")


def make_loaders(data_uri: str, settings: LoaderSettings, version: Optional[int] = None) -> Dict[str, SplitLoader]:
    """{'train', 'val', 'test'} -> SplitLoader over the faces table under `data_uri` (a prepare output)."""
    return {split: SplitLoader(split_source(data_uri, split, version), settings, train=(split == "train"))
            for split in SPLITS}
