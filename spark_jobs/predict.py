"""python -m spark_jobs.predict PHOTO|FOLDER ... --model MODEL: ages of the faces in a few photos, no Spark.

The fast path for one photo or a folder: no JVM starts. It runs exactly what spark_jobs/score.py runs on
each photo (prepare's crop function, aligned to the model's framing, the same model file and batched
inference), so both give the same numbers for the same photo. Estimator is that path loaded once; the
Python API (`from faceage import Estimator`) and the HTTP service (faceage.serve) are it too:

    from faceage import Estimator
    Estimator.load("runs/train/model.pt").predict("photo.jpg")  # a path, a folder, a list, a PIL image, an array
    -> [Face(source="photo.jpg", face_index=0, box=[x0, y0, x1, y1], age=31.4, uncertainty=4.2, status="ok"...)]

A photo without a usable face gives one row with a status (no_face, face_too_small, not_an_image, ...)
and no age.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from typing import Iterable, List, Optional, Union


from shell import uri
from shell.cli import entry_points, Parser, path_arg, positive_int, redact
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


@dataclasses.dataclass(frozen=True)
class Face:
    """One face found in a photo, or (status not "ok", age None) why a photo gave none.

    box: x0, y0, x1, y1 in upright source pixels; landmarks: the detector's 5 points (x, y, ...) the crop was
    aligned on, None when the face was aligned from its box (HOG) or the photo was an aligned chip."""

    source: str
    face_index: Optional[int]
    box: Optional[List[float]]
    age: Optional[float]
    uncertainty: Optional[float]  # the std of the predicted age in years; None when the head gives none
    det_score: Optional[float]
    status: str  # "ok", or a reject reason (schemas.tables.REASONS): no_face, not_an_image, corrupt, ...
    detail: Optional[str]
    landmarks: Optional[List[float]] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Estimator:
    """A model loaded once, predicting faces' ages in photos: the one path of score, predict and the service
    (photos.faces.crop_faces aligned to the model's framing, the model's own preprocessing, its head).

        est = Estimator.load("runs/train/model.pt")        # a bundle, or an .onnx export (no torch then)
        faces = est.predict("photo.jpg")                    # or bytes, a PIL image, an HxWx3 array, a folder,
        faces[0].age, faces[0].uncertainty, faces[0].box    # or a list of any of them

    detector: auto (detect and align to the model's framing), yunet, hog, or none (aligned face chips).
    tta "flip" averages each face and its mirror image, "flip-zoom" also their zooms (trainer.runtime.TTA_HELP);
    None (the default): the mode the model's calibration was fitted under, so its ages and stds are the calibrated ones
    (trainer.runtime.resolve_tta; an asked mode that differs is logged as a warning)."""

    def __init__(self, model: str, detector: str = "auto", device: str = "cpu", batch_size: int = 64,
                 tta: Optional[str] = None, threads: Optional[int] = None):
        from spark_jobs import score_steps
        from trainer import inference, runtime

        model = str(model)
        if not uri.isfile(model):
            raise UserError(f"--model {model}: no such model file (python -m trainer.train writes a bundle, "
                            f"python -m trainer.export an .onnx)")
        if tta is not None:
            runtime.check_tta(tta)  # before the model is loaded
        self.path = model
        self.predictor = inference.load_predictor(model, device, threads, detector)
        tta = runtime.announce_tta(self.predictor.bundle, tta, "predict")
        self.settings = score_steps.ScoreSettings(
            bundle=model, model_id=runtime.model_id(model),
            data_version=(self.predictor.bundle.get("data") or {}).get("version"), input_version=None,
            run_id="predict", batch_size=batch_size, device=device, detector=detector, tta=tta)

    @classmethod
    def load(cls, model: str, **settings) -> "Estimator":
        """Estimator(model, **settings): detector, device, batch_size, tta, threads."""
        return cls(model, **settings)

    def predict(self, photos: Union[Photo, Iterable[Photo]]) -> List[Face]:
        """Faces of one photo or many (in their order; a folder: its image files), each a Face; a photo
        without a usable face gives one Face with its status and no age."""
        return [self._face(row) for row in self.score_records(_records(photos))]

    def score_records(self, records) -> List[dict]:
        """(source name, bytes[, skip reason, detail]) records -> prediction rows (schemas.tables.PREDICTIONS
        fields, plus landmarks): what score writes for the same photos."""
        from spark_jobs import score_steps

        return score_steps.score_photos(records, self.predictor, self.settings)

    def info(self) -> dict:
        """What the model is: its id, format, head, input size, training data, crop settings and framing."""
        from trainer import runtime

        meta = self.predictor.bundle
        return {"model_id": self.settings.model_id, "path": redact(self.path),
                "format": "onnx" if runtime.is_export(self.path) else "bundle", "head": meta["head"],
                "input_size": meta["input_size"], "uncertainty": meta["head"] == "distribution",
                "data": meta.get("data"), "data_version": self.settings.data_version, "crop": meta["crop"],
                "framing": runtime.framing(meta), "photo_crop": self.predictor.crop.to_dict(),
                "tta": self.settings.tta, "metrics": meta.get("metrics")}

    @staticmethod
    def _face(row: dict) -> Face:
        spread = row["uncertainty"]
        return Face(source=row["source_path"], face_index=row["face_index"], box=row["bbox"],
                    age=row["predicted_age"], uncertainty=None if spread is None or spread != spread else spread,
                    det_score=row["det_score"], status=row["status"], detail=row["detail"],
                    landmarks=row.get("landmarks"))


def estimate_ages(photos: Union[Photo, Iterable[Photo]], model: str, detector: str = "auto",
                  device: str = "cpu", batch_size: int = 64, tta: Optional[str] = None) -> List[dict]:
    """One dict per face found (bbox, age, uncertainty), or per photo without one (status, detail): the rows
    of Estimator(model, ...).predict(photos) as the CLI prints them."""
    estimator = Estimator(model, detector, device, batch_size, tta)
    rows = estimator.score_records(_records(photos))
    return [{"source": r["source_path"], "face_index": r["face_index"], "bbox": r["bbox"],
             "age": r["predicted_age"], "uncertainty": r["uncertainty"], "status": r["status"],
             "detail": r["detail"]} for r in rows]


def get_args_parser() -> argparse.ArgumentParser:
    from trainer.runtime import TTA, TTA_HELP  # torch-free; imported here, where the flags are defined

    p = Parser("predict", prog="python -m spark_jobs.predict", description=__doc__.splitlines()[0])
    p.add_argument("photos", nargs="+", type=path_arg, help="photo files or folders")
    p.add_argument("--model", default="runs/train/model.pt", type=path_arg,
                   help="model bundle written by python -m trainer.train, or an .onnx export (python -m trainer.export)")
    framing = p.add_mutually_exclusive_group()
    framing.add_argument("--detector", default="auto", choices=("auto",) + DETECTORS,
                         help="auto detects and aligns faces to the model's framing; none: already aligned chips")
    framing.add_argument("--aligned", action="store_true", help="the photos are aligned face chips (= --detector none)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--batch-size", type=positive_int, default=64, help="faces per inference batch")
    p.add_argument("--tta", default=None, choices=TTA, help=TTA_HELP)
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
