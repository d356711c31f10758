"""score's steps: the per-partition work of spark_jobs/score.py, shared with the plain-Python benchmark loop.

A predictor holds one loaded model (a bundle in torch, or an ONNX export in ONNX Runtime: trainer.runtime);
`predictor()` caches it per Python process (a Spark executor's reused Python worker), keyed by the model
file, so a model is loaded once per worker, never per batch. Photos go through photos.faces.crop_faces with the bundle's crop settings (the
exact function prepare used), every face is kept, and the crops are decoded exactly as the trainer's
loader decodes them before batched inference.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional

import numpy as np

from schemas import ids
from schemas.tables import PREDICTIONS
from photos.faces import Reject, crop_faces, get_detector
from trainer.inference import load_predictor  # no torch import here: an ONNX export runs without it
from trainer.runtime import decode_image

NAMES = [f.name for f in PREDICTIONS]


@dataclass(frozen=True)
class ScoreSettings:
    """What the scoring function needs on the executors (pickled into each task)."""

    bundle: str  # a local path, or a SparkFiles name resolved on the executor
    model_id: str
    data_version: Optional[int]
    input_version: Optional[int]
    run_id: str
    batch_size: int = 64
    device: str = "auto"
    torch_threads: int = 1  # Spark runs one task per core: one torch thread each
    spark_file: bool = False
    detector: str = "auto"  # photos: auto (detect + align to the bundle's framing) | yunet | hog | none (chips)
    max_file_bytes: int = 64 * 2**20
    tta: Optional[str] = None  # trainer.runtime.TTA ("flip": each face and its mirror; "flip-zoom": 6 views), averaged;
    # None: the mode the bundle's calibration was fitted under (trainer.runtime.resolve_tta)


@functools.lru_cache(maxsize=8)  # once per Python worker and model: Spark reuses its workers across tasks
def _load(path: str, model_id: str, device: str, threads: Optional[int], detector: str):
    return load_predictor(path, device, threads, detector)


def predictor(settings: ScoreSettings):
    """The loaded bundle of `settings` (shipped to the executors when spark_file), loaded once per process."""
    path = settings.bundle
    if settings.spark_file:
        from pyspark import SparkFiles

        path = SparkFiles.get(settings.bundle)
    return _load(path, settings.model_id, settings.device, settings.torch_threads, settings.detector)


def _row(settings: ScoreSettings, **values) -> dict:
    row = {name: None for name in NAMES}
    row.update(model_id=settings.model_id, data_version=settings.data_version,
               input_version=settings.input_version, score_run_id=settings.run_id)
    row.update(values)
    return row


def score_photos(records, pred, settings: ScoreSettings, detector=None,
                 timings: Optional[dict] = None) -> List[dict]:
    """(path, bytes) photos -> prediction rows: one per face, or one with a status when none."""
    detector = detector if detector is not None else (
        get_detector(pred.crop.detector) if pred.crop.detector != "none" else None)
    timings = timings if timings is not None else {}
    rows, pixels = [], []
    for record in records:
        path, raw = record[0], record[1]
        if len(record) > 2 and record[2] is not None:  # listed but never read: (path, None, reason, detail)
            rows.append(_row(settings, source_path=path, status=record[2], detail=record[3]))
            continue
        raw = bytes(raw)
        digest = ids.content_sha256(raw)
        try:
            crops = crop_faces(raw, pred.crop, detector, all_faces=True, timings=timings)
        except Reject as e:
            rows.append(_row(settings, source_path=path, status=e.reason, detail=e.detail))
            continue
        except Exception as e:  # noqa: BLE001 - one bad file must not kill the job
            rows.append(_row(settings, source_path=path, status="corrupt",
                             detail=f"unexpected {type(e).__name__}: {e}"))
            continue
        t0 = time.perf_counter()
        for crop in crops:
            pixels.append(decode_image(crop.image, pred.size))
            rows.append(_row(settings, source_path=path, face_index=crop.face_index,
                             face_id=ids.face_id(digest, crop.face_index), bbox=crop.bbox,
                             det_score=crop.det_score, n_faces=crop.n_faces, status="ok",
                             landmarks=crop.landmarks))  # not a table column: for predict and the service
        timings["align"] = timings.get("align", 0.0) + time.perf_counter() - t0
    _infer(rows, pixels, pred, settings, timings)
    return rows


def score_faces(records, pred, settings: ScoreSettings, timings: Optional[dict] = None) -> List[dict]:
    """Rows of a prepared faces table (already cropped by prepare) -> prediction rows."""
    timings = timings if timings is not None else {}
    rows, pixels = [], []
    t0 = time.perf_counter()
    for rec in records:
        pixels.append(decode_image(bytes(rec["image"]), pred.size))
        rows.append(_row(settings, source_path=rec["source_path"], face_index=0, face_id=rec["face_id"],
                         bbox=None if rec["bbox"] is None else [float(v) for v in rec["bbox"]],
                         det_score=rec["det_score"], n_faces=rec["n_faces"], status="ok"))
    timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t0
    _infer(rows, pixels, pred, settings, timings)
    return rows


def _infer(rows, pixels, pred, settings: ScoreSettings, timings: dict) -> None:
    if not pixels:
        return
    t0 = time.perf_counter()
    ages, stds = pred.predict(np.stack(pixels), settings.batch_size, settings.tta)
    timings["infer"] = timings.get("infer", 0.0) + time.perf_counter() - t0
    ok = [r for r in rows if r["status"] == "ok"]
    for row, age, std in zip(ok, ages, stds):
        row["predicted_age"] = float(age)
        row["uncertainty"] = float(std)


def score_partition(batches: Iterator, settings: ScoreSettings, kind: str) -> Iterator:
    """mapInPandas body: photo batches (path, content) or faces-table batches -> PREDICTIONS batches."""
    import pandas as pd

    os.environ.setdefault("OMP_NUM_THREADS", str(settings.torch_threads))
    pred = predictor(settings)
    detector = get_detector(pred.crop.detector) if kind == "photos" and pred.crop.detector != "none" else None
    for batch in batches:
        if kind == "photos":
            from spark_jobs.photo_files import file_content

            records = []
            for rec in batch.itertuples(index=False):
                content, skip = file_content(rec, settings.max_file_bytes)
                records.append((rec.path, content) + (skip if skip else (None, None)))
            rows = score_photos(records, pred, settings, detector)
        else:
            rows = score_faces(batch.to_dict("records"), pred, settings)
        yield pd.DataFrame(rows, columns=NAMES)
