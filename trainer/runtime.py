"""What inference needs, without importing torch (trainer.inference picks the predictor for a model file).

Two kinds of model file give the same ages for the same crops:
- the bundle written by python -m trainer.train (model.pt): trainer.bundle.Predictor runs it with torch;
- an export written by python -m trainer.export (model.onnx + model.onnx.json, its preprocessing contract):
  OnnxPredictor runs it with ONNX Runtime, and nothing in that process imports torch.
Both take the same uint8 N x H x W x 3 crops, normalise them with the file's own mean/std, and say how photos
are cropped for them (the model's crop settings and framing), so score, predict, the Python API and the HTTP
service crop, frame and predict one way whichever file they are given.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from typing import Optional, Tuple

import numpy as np

from schemas import layout
from schemas.crop import SIZE_RANGE, CropSettings, scoring_settings
from schemas.tables import MAX_AGE, MIN_AGE
from shell import uri
from shell.cli import log
from shell.errors import UserError
from trainer import calibration

HEADS = ("regression", "distribution")
# the normalisation every bundle is trained with (ImageNet statistics: torchvision's ResNet weights expect them, and
# they do no harm from scratch); a bundle and an export store theirs, which their predictors use
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
TTA = ("none", "flip", "flip-zoom")
# each TTA mode's zooms (1 = the crop as it is), every one run as it is and mirrored except under "none": "flip-zoom"
# adds the face 7 % smaller and 7 % larger (trainer.augment's warp at fixed scales: 6 passes; BENCHMARKS.md)
TTA_ZOOMS = {"none": (1.0,), "flip": (1.0,), "flip-zoom": (1.0, 0.93, 1.07)}
TTA_MODES_HELP = ("test-time augmentation: flip averages each face and its mirror image (2 passes); flip-zoom "
                  "also the face zoomed to 0.93 and 1.07 times its size, each with its mirror (6 passes)")
# the predictors' flag (score, predict, serve): by default the mode the model's calibration was fitted under
TTA_HELP = (TTA_MODES_HELP + "; default: the mode the model's age map and std scale were fitted under (its "
            "training's --tta; none when it records none)")


def calibrated_tta(meta: dict) -> Optional[str]:
    """The TTA mode a model's calibration was fitted under (trainer.train --tta, trainer.recalibrate --refit-on): the
    mode its age map and std scale are right for. None when it records none (no calibration, or an older bundle)."""
    return (meta.get("calibration") or {}).get("tta")


class TTAError(UserError, ValueError):
    """A TTA mode that is not one of TTA (a flag, an API argument, a pyfunc param)."""


def check_tta(mode: str) -> str:
    """`mode` when it is one of TTA, else a TTAError naming the modes: the one check of every path that takes one."""
    if mode not in TTA:
        raise TTAError(f"tta {mode!r}: use one of {', '.join(TTA)}")
    return mode


def resolve_tta(meta: dict, asked: Optional[str]) -> Tuple[str, Optional[str]]:
    """(the TTA mode to run for a model, a warning or None). `asked` None means the model's own: the mode its
    calibration was fitted under ("none" when it records none), so every predictor gives the ages and stds its
    calibration and metrics were made for. An asked mode runs as asked; the warning says when the model's age map or
    std scale was fitted under another one."""
    fitted = calibrated_tta(meta)
    if asked is None:
        return fitted or "none", None
    check_tta(asked)
    cal = meta.get("calibration") or {}
    parts = [name for name, on in (("age map", cal.get("age_map")), ("std scale", cal.get("std_scale") not in
                                                                       (None, 1, 1.0))) if on]
    if fitted is None or asked == fitted or not parts:
        return asked, None
    return asked, (f"--tta {asked}: the model's {' and '.join(parts)} {'were' if len(parts) > 1 else 'was'} fitted "
                   f"under --tta {fitted}, so its ages and stds under {asked} are calibrated for other outputs (leave "
                   f"--tta out to run {fitted})")


def announce_tta(meta: dict, asked: Optional[str], stage: str, said: Optional[set] = None) -> str:
    """The TTA mode to run for a model (resolve_tta), its warning logged as one `<stage>: ...` line. `said`: a set
    the caller keeps, so a predictor called per batch or per request warns once per asked mode, not every call."""
    mode, warning = resolve_tta(meta, asked)
    if warning and (said is None or mode not in said):
        log.warning(f"{stage}: {warning}")
        if said is not None:
            said.add(mode)
    return mode


@functools.lru_cache(maxsize=16)
def zoom_matrix(size: int, scale: float) -> np.ndarray:
    """size x size float32 R such that R @ image @ R.T (per channel) is the image zoomed about its centre by `scale`,
    sampled bilinearly with black outside: what trainer.augment.apply (grid_sample, align_corners=False, zero
    padding) gives for that scale, written as one matrix so numpy and torch compute it alike. Built once per (size,
    scale) and read-only (every batch of a run shares it)."""
    out = (2 * np.arange(size, dtype=np.float64) + 1) / size - 1  # output pixel centres in [-1, 1]
    src = ((out / scale + 1) * size - 1) / 2  # where each reads in the input, in pixels
    low = np.floor(src).astype(np.int64)
    frac = src - low
    r = np.zeros((size, size), np.float64)
    for offset, weight in ((0, 1 - frac), (1, frac)):
        col = low + offset
        inside = (col >= 0) & (col < size)
        r[np.arange(size)[inside], col[inside]] += weight[inside]
    r = r.astype(np.float32)
    r.setflags(write=False)
    return r


def tta_views(x: np.ndarray, tta: str, black: np.ndarray):
    """The views of a normalised N x 3 x H x W float32 batch that TTA mode `tta` averages (numpy; trainer.model.
    tta_views is the torch twin): each zoom of TTA_ZOOMS, then its mirror unless tta is "none". `black` is the
    normalised value of a black pixel (1 x 3 x 1 x 1), what a zoom below 1 shows outside the face."""
    for scale in TTA_ZOOMS[tta]:
        view = x
        if scale != 1.0:
            r = zoom_matrix(x.shape[-1], scale)
            view = (r @ (x - black) @ r.T + black).astype(np.float32)
        yield view
        if tta != "none":
            yield np.ascontiguousarray(view[..., ::-1])


class BundleError(UserError, ValueError):
    """A file that is not a usable model bundle or export; the message says what it is instead."""


def decode_image(jpeg: bytes, size: int) -> np.ndarray:
    """JPEG bytes -> HxWx3 uint8 at size x size (decoded straight to >= size when that is 2x smaller)."""
    from PIL import Image

    im = Image.open(io.BytesIO(jpeg))
    if im.format == "JPEG" and min(im.size) >= 2 * size:
        im.draft("RGB", (size, size))  # the JPEG decoder scales by 1/2, 1/4 or 1/8 itself: far less work
    im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im)


def model_id(path: str) -> str:
    """The first 16 hex digits of the model file's SHA-256 (local path or URI)."""
    return hashlib.sha256(uri.read_bytes(path)).hexdigest()[:16]


def is_export(path: str) -> bool:
    """True when `path` names an ONNX export (score, predict and serve run it without torch)."""
    return str(path).lower().endswith(layout.EXPORT_SUFFIXES["onnx"])


def framing(meta: dict) -> dict:
    """How the model's training crops are framed (schemas.crop.CropSettings.framing): scoring detects and
    aligns photos to it. Derived from the crop settings, the one place they are stored."""
    return CropSettings.from_dict(dict(meta["crop"]), "model bundle").framing()


def crop_for(meta: dict, detector: str = "auto") -> CropSettings:
    """How PHOTOS are cropped for a model (its bundle or contract dict) with the --detector choice: its training
    crop settings with the detector chosen by schemas.crop.scoring_settings (photos are detected and aligned to
    the model's framing, unless detector 'none' says they are aligned chips already)."""
    trained = CropSettings.from_dict(dict(meta["crop"]), "model bundle")
    return scoring_settings(trained, detector, size=trained.size)


def check_fields(meta: dict, path: str) -> None:
    """BundleError naming `path` when a model's fields (a bundle's or an export contract's) are not usable:
    format version, head, input size, normalisation, calibration (and the TTA it was fitted under), crop
    settings."""
    newest = layout.EXPORT_VERSION if meta.get("format") == layout.EXPORT_FORMAT else layout.BUNDLE_VERSION
    if meta.get("format_version", 0) > newest:
        raise BundleError(f"model bundle {path}: format version {meta['format_version']} is newer than this "
                          f"code ({newest}); update the project")
    if meta.get("head") not in HEADS:
        raise BundleError(f"model bundle {path}: head {meta.get('head')!r} is not one of {HEADS}")
    size = meta.get("input_size")
    if not isinstance(size, int) or not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise BundleError(f"model bundle {path}: input_size {size!r} is not a pixel size "
                          f"{SIZE_RANGE[0]}..{SIZE_RANGE[1]}")
    normalize = meta.get("normalize") or {}
    if not all(isinstance(normalize.get(k), list) and len(normalize[k]) == 3 for k in ("mean", "std")):
        raise BundleError(f"model bundle {path}: normalize needs 3 mean and 3 std values")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in normalize["mean"] + normalize["std"]) \
            or not all(v > 0 for v in normalize["std"]):
        raise BundleError(f"model bundle {path}: normalize holds {normalize}; mean and std must be finite numbers, "
                          f"std above 0")
    wrong = calibration.check(meta.get("calibration"), f"model bundle {path}")
    if wrong:
        raise BundleError(wrong)
    if calibrated_tta(meta) not in (None,) + TTA:
        raise BundleError(f"model bundle {path}: calibration tta {calibrated_tta(meta)!r} is not one of {TTA}")
    crop = meta.get("crop")
    if not crop:
        raise BundleError(f"model bundle {path}: no crop settings; it cannot say how to crop faces for it "
                          f"(retrain with python -m trainer.train on a prepared table)")
    try:
        CropSettings.from_dict(crop, f"model bundle {path}")
    except UserError as e:
        raise BundleError(str(e)) from None


def read_contract(path: str) -> dict:
    """The preprocessing contract of the export at `path` (its .json beside it), checked; BundleError otherwise."""
    where = layout.contract_path(path)
    if not uri.isfile(path):
        raise BundleError(f"model {path}: no such file")
    if not uri.isfile(where):
        raise BundleError(f"model {path}: its contract {where} is missing (python -m trainer.export writes both; "
                          f"keep them side by side)")
    try:
        contract = json.loads(uri.read_text(where))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"model {path}: its contract {where} is not JSON ({e})") from None
    if not isinstance(contract, dict) or contract.get("format") != layout.EXPORT_FORMAT:
        raise BundleError(f"model {path}: {where} is not a faceage export contract")
    check_fields(contract, path)
    return contract


def decode_outputs(raw: np.ndarray, head: str):
    """Raw model outputs (N x 1 ages, or N x MAX_AGE+1 logits) -> (ages, stds) float32, as trainer.model.decode
    and predict_ages do in torch: a regression age clipped into MIN_AGE..MAX_AGE (std NaN), a distribution's
    expected age and std."""
    raw = raw.astype(np.float64)
    if head == "regression":
        age = np.clip(raw[:, 0], MIN_AGE, MAX_AGE)
        return age.astype(np.float32), np.full(len(age), np.nan, np.float32)
    return _moments(_softmax(raw))


def average_outputs(raws, head: str):
    """TTA from the raw outputs of every view -> (ages, stds), as trainer.model.predict_ages averages them in
    torch: the distributions (then their moments), or the regression ages (then clipped)."""
    if head == "regression":
        return decode_outputs(sum(raw.astype(np.float64) for raw in raws) / len(raws), head)
    return _moments(sum(_softmax(raw.astype(np.float64)) for raw in raws) / len(raws))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _moments(probs: np.ndarray):
    grid = np.arange(MAX_AGE + 1, dtype=np.float64)
    mean = probs @ grid
    var = probs @ grid**2 - mean**2
    return mean.astype(np.float32), np.sqrt(np.clip(var, 0, None)).astype(np.float32)


class OnnxPredictor:
    """An exported model in ONNX Runtime (CPU), with the interface of trainer.bundle.Predictor: .head, .size,
    .crop (how photos are cropped for it), .bundle (its contract) and predict(pixels, batch_size, tta)."""

    def __init__(self, path: str, threads: Optional[int] = None, detector: str = "auto"):
        import onnxruntime

        self.bundle = read_contract(path)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(uri.read_bytes(path), options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - any load failure means the same to the user
            raise BundleError(f"model {path}: ONNX Runtime cannot load it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        self.head = self.bundle["head"]
        self.size = int(self.bundle["input_size"])
        self.mean = np.asarray(self.bundle["normalize"]["mean"], np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(self.bundle["normalize"]["std"], np.float32).reshape(1, 3, 1, 1)
        self.crop = crop_for(self.bundle, detector)
        self.input_name = self.bundle["input"]["name"]

    def predict(self, pixels: np.ndarray, batch_size: int = 64, tta: Optional[str] = None):
        """uint8 N x H x W x 3 -> (ages, stds) float32 arrays; std is NaN for a regression head.
        tta "flip" / "flip-zoom": the views of tta_views too; their distributions (or regression ages) averaged, as
        in torch; None: the mode the calibration was fitted under (resolve_tta). The ages and stds go through the
        contract's calibration, as trainer.bundle.Predictor's through a bundle's."""
        tta, _ = resolve_tta(self.bundle, tta)
        ages, stds = [], []
        black = -self.mean / self.std
        for i in range(0, len(pixels), batch_size):
            x = (pixels[i:i + batch_size].transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - self.mean) / self.std
            if tta == "none":
                age, std = self.session.run(["age", "std"], {self.input_name: x})
            else:
                raws = [self.session.run(["raw"], {self.input_name: v})[0] for v in tta_views(x, tta, black)]
                age, std = average_outputs(raws, self.head)
            ages.append(np.asarray(age, np.float32))
            stds.append(np.asarray(std, np.float32))
        if not ages:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        return calibration.calibrated(np.concatenate(ages), np.concatenate(stds), self.bundle.get("calibration"))
