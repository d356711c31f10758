"""python -m spark_jobs.predict PHOTO|FOLDER ... --model MODEL: ages of the faces in a few photos, no Spark.

The fast path for one photo or a folder: no JVM starts. It runs exactly what spark_jobs/score.py runs on
each photo (prepare's crop function, aligned to the model's framing, the same bundle and batched
inference), so both give the same numbers for the same photo. In a notebook:

    from spark_jobs.predict import estimate_ages
    estimate_ages("photo.jpg", "runs/train/model.pt")        # a path, a folder, a list, a PIL image, an array
    -> [{"source": "photo.jpg", "face_index": 0, "bbox": [x0, y0, x1, y1], "age": 31.4, "uncertainty": 4.2,
         "status": "ok", "detail": None}, ...]

A photo without a usable face gives one row with a status (no_face, face_too_small, not_an_image, ...)
and no age.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Iterable, List, Optional, Union


from shell import uri
from shell.cli import entry_points, Parser, path_arg, positive_int
from shell.errors import UserError
from schemas.crop import DETECTORS

Photo = Union[str, os.PathLike, bytes, object]  # a path, encoded bytes, a PIL image or an HxWx3 uint8 array


def _records(photos) -> List[tuple]:
    """(source name, bytes, skip reason, skip detail) per photo; folders are walked (image names only)."""
    import numpy as np
    from PIL import Image

    from spark_jobs.photo_files import classify_file, list_files
    from spark_jobs.storage import MAX_FILE_BYTES

    if isinstance(photos, (str, os.PathLike, bytes, Image.Image, np.ndarray)):
        photos = [photos]
    out = []
    for index, photo in enumerate(photos):
        if isinstance(photo, Image.Image) or isinstance(photo, np.ndarray):
            image = photo if isinstance(photo, Image.Image) else Image.fromarray(np.asarray(photo))
            buf = io.BytesIO()
            image.save(buf, "PNG")  # lossless: the crop function sees these exact pixels
            out.append((f"<image {index}>", buf.getvalue(), None, None))
        elif isinstance(photo, bytes):
            out.append((f"<bytes {index}>", photo, None, None))
        elif uri.is_remote(str(photo)):  # a URI (s3://...): the object, or every object under the prefix
            out += _remote_records(str(photo))
        elif os.path.isdir(photo):  # prepare's own listing: the same files, names and hidden rule as score
            for listed in list_files(None, [str(photo)]):
                skip = listed.skip or classify_file(listed.path, listed.length, listed.hidden, MAX_FILE_BYTES)
                if skip and skip[0] in ("hidden_file", "unsupported_extension"):
                    continue  # a folder's other files are not photos
                out.append((listed.path, None, *skip) if skip else (listed.path, _read(listed.os_path), None, None))
        elif os.path.isfile(photo):
            out.append((str(photo), _read(str(photo)), None, None))
        else:
            raise UserError(f"{photo}: no such file or folder")
    return out


def _remote_records(photo: str) -> list:
    from spark_jobs.photo_files import classify_file
    from spark_jobs.storage import MAX_FILE_BYTES

    fs = uri.RemoteFS()
    if fs.isfile(photo):
        return [(photo, fs.read_bytes(photo), None, None)]
    if not fs.isdir(photo):
        raise UserError(f"{photo}: no such object or prefix")
    out = []
    for rel in fs.walk_files(photo):
        path = uri.join(photo, rel)
        hidden = any(part[:1] in "._" for part in rel.split("/"))
        fsys, inner = uri.filesystem(path)
        skip = classify_file(path, int(fsys.size(inner)), hidden, MAX_FILE_BYTES)
        if skip and skip[0] in ("hidden_file", "unsupported_extension"):
            continue
        out.append((path, None, *skip) if skip else (path, fs.read_bytes(path), None, None))
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def estimate_ages(photos: Union[Photo, Iterable[Photo]], model: str, detector: str = "auto",
                  device: str = "cpu", batch_size: int = 64, tta: str = "none") -> List[dict]:
    """One dict per face found (bbox, age, uncertainty), or per photo without one (status, detail).

    detector: auto (detect and align to the model's framing), yunet, hog, or none (the photos are already
    aligned face chips). tta "flip" averages each face and its mirror image."""
    from spark_jobs import score_steps
    from trainer.bundle import Predictor, model_id

    if not uri.isfile(model):
        raise UserError(f"--model {model}: no such model bundle (python -m trainer.train writes one)")
    predictor = Predictor(model, device, detector=detector)
    settings = score_steps.ScoreSettings(bundle=model, model_id=model_id(model), data_version=None,
                                         input_version=None, run_id="predict", batch_size=batch_size,
                                         device=device, detector=detector, tta=tta)
    rows = score_steps.score_photos(_records(photos), predictor, settings)
    return [{"source": r["source_path"], "face_index": r["face_index"], "bbox": r["bbox"],
             "age": r["predicted_age"], "uncertainty": r["uncertainty"], "status": r["status"],
             "detail": r["detail"]} for r in rows]


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("predict", prog="python -m spark_jobs.predict", description=__doc__.splitlines()[0])
    p.add_argument("photos", nargs="+", type=path_arg, help="photo files or folders")
    p.add_argument("--model", default="runs/train/model.pt", type=path_arg, help="model bundle written by python -m trainer.train")
    framing = p.add_mutually_exclusive_group()
    framing.add_argument("--detector", default="auto", choices=("auto",) + DETECTORS,
                         help="auto detects and aligns faces to the model's framing; none: already aligned chips")
    framing.add_argument("--aligned", action="store_true", help="the photos are aligned face chips (= --detector none)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--batch-size", type=positive_int, default=64, help="faces per inference batch")
    p.add_argument("--tta", default="none", choices=("none", "flip"),
                   help="test-time augmentation: flip averages each face and its mirror image")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    return p


def _job(argv: Optional[List[str]]) -> int:
    args = get_args_parser().parse_args(argv)
    rows = estimate_ages(args.photos, args.model, "none" if args.aligned else args.detector, args.device,
                         args.batch_size, args.tta)
    for r in rows:
        if args.json:
            print(json.dumps(r))
        elif r["status"] == "ok":
            box = ",".join(f"{v:.0f}" for v in r["bbox"])
            spread = "" if r["uncertainty"] is None or r["uncertainty"] != r["uncertainty"] \
                else f" +- {r['uncertainty']:.1f}"
            print(f"{r['source']}  face {r['face_index']}  age {r['age']:.1f}{spread}  box {box}")
        else:
            print(f"{r['source']}  no age: {r['status']} ({r['detail']})")
    return 0


main, console_main = entry_points("predict", _job)

if __name__ == "__main__":
    sys.exit(main())
