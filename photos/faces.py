"""Decode, detect, align and crop faces: the ONE function prepare and score both use.

`crop_faces(raw_bytes, settings)` turns the bytes of one image file into aligned,
fixed-size face crops, or raises `Reject(reason, detail)` (reasons: schemas.tables.REASONS).
Everything here is plain Python + numpy + Pillow so it is tested without Spark.
"""
from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps

from schemas.crop import CropSettings
from schemas.crop import TEMPLATE as TEMPLATE_POINTS
from schemas.tables import REASONS

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is "corrupt", never half a face

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
TEMPLATE = np.array(TEMPLATE_POINTS)

# Where those landmarks sit inside a dlib HOG box (fractions of box width/height; mean over 296 UTKFace
# faces). HOG gives a box only: these pseudo-landmarks let it share the one alignment path.
_LANDMARKS_IN_BOX = np.array([[0.287, 0.286], [0.755, 0.288], [0.513, 0.555], [0.319, 0.732], [0.737, 0.730]])


class Reject(Exception):
    """An input that does not become a face: `reason` is a REASONS code, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:  # a code the rejects table does not define is this code's bug, not the input's
            raise ValueError(f"reject reason {reason!r} is not one of schemas.tables.REASONS")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class FaceCrop:
    image: bytes  # JPEG, size x size
    bbox: List[float]  # x0, y0, x1, y1 in upright source pixels
    landmarks: Optional[List[float]]  # 10 floats or None
    det_score: Optional[float]
    n_faces: int
    source_width: int
    source_height: int
    face_index: int = 0


# ----------------------------------------------------------------------------- decoding

def decode_upright(raw: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> upright 8-bit RGB image, or Reject. EXIF orientation is applied."""
    if not raw:
        raise Reject("empty_file", "the file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        raise Reject("too_large", f"{e}") from None
    except Image.DecompressionBombWarning as e:
        raise Reject("too_large", f"{e}") from None
    except Image.UnidentifiedImageError:
        raise Reject("not_an_image", f"Pillow cannot identify the {len(raw)} bytes as an image") from None
    except Exception as e:  # noqa: BLE001 - any parser failure on the header means the same thing
        raise Reject("corrupt", f"header unreadable: {type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise Reject("too_large", f"{w}x{h} = {w * h} pixels is over the cap of {max_pixels} (--max-pixels)")
    if w < 1 or h < 1:
        raise Reject("corrupt", f"image size {w}x{h}")
    try:
        if im.format == "JPEG" and max(w, h) > 4096:
            im.draft("RGB", (max(w, h) // 2, max(w, h) // 2))  # fast DCT downscale, still >= 2048 px
        im.load()
        im = ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001
        raise Reject("corrupt", f"image data unreadable: {type(e).__name__}: {e}") from None
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode a photo can have -> 8-bit RGB, or Reject('unsupported_mode')."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        if mode in ("I", "F") and a.max() > 65535:
            top = float(a.max())
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    raise Reject("unsupported_mode", f"pixel mode {mode!r} has no RGB conversion here")


# ----------------------------------------------------------------------------- detectors

@dataclass
class Detection:
    box: np.ndarray  # x0, y0, x1, y1
    landmarks: Optional[np.ndarray]  # (5, 2) or None
    score: Optional[float]

    @property
    def side(self) -> float:
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


class YuNetDetector:
    """libfacedetection's CNN (yuface wheel; weights compiled in): boxes, scores, 5 landmarks."""

    name = "yunet"

    def __init__(self):
        import yuface  # noqa: F401 - fail here, once, if the wheel is missing

        self._detect = yuface.detect

    def __call__(self, rgb: np.ndarray, min_score: float) -> List[Detection]:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        confs, boxes, landmarks = self._detect(bgr, conf=min_score)
        out = []
        for conf, (x, y, w, h), lm in zip(confs, boxes, landmarks):
            x, y, w, h = (float(v) for v in (x, y, w, h))
            box = np.array([x, y, x + w, y + h])
            out.append(Detection(box, np.asarray(lm, dtype=np.float64).reshape(5, 2), float(conf) / 100.0))
        return out


class HogDetector:
    """dlib's HOG frontal-face detector (box only; landmarks are placed from the box)."""

    name = "hog"

    def __init__(self):
        import dlib

        self._detector = dlib.get_frontal_face_detector()

    def __call__(self, rgb: np.ndarray, min_score: float) -> List[Detection]:
        rects, scores, _ = self._detector.run(np.ascontiguousarray(rgb), 1, 0.0)
        out = []
        for r, s in zip(rects, scores):
            # HOG scores are SVM margins (0 at the boundary); map to 0..1 for one threshold flag.
            score = float(1.0 / (1.0 + np.exp(-2.0 * s)))
            if score >= min_score * 0.5 + 0.25:
                out.append(Detection(np.array([r.left(), r.top(), r.right(), r.bottom()], float), None, score))
        return out


_DETECTORS = {}


def get_detector(name: str):
    """One detector per Python process (Spark reuses its workers), built on first use."""
    if name == "none":
        return None
    if name not in _DETECTORS:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        _DETECTORS[name] = {"yunet": YuNetDetector, "hog": HogDetector}[name]()
    return _DETECTORS[name]


# ----------------------------------------------------------------------------- geometry

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping src->dst points (Umeyama).

    Returns a 2x3 matrix M with dst ~= M @ [x, y, 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var_s = (s0**2).sum() / len(src)
    scale = (sig * np.diag(sign)).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def template_points(size: int, margin: float) -> np.ndarray:
    """The 5 template points in a size x size crop; `margin` widens the view by that fraction per side."""
    return ((TEMPLATE - 0.5) / (1.0 + 2.0 * margin) + 0.5) * size


def landmarks_from_box(box: np.ndarray) -> np.ndarray:
    """Pseudo-landmarks for a HOG box (so HOG crops are framed like YuNet ones)."""
    x0, y0, x1, y1 = box
    return np.stack([x0 + _LANDMARKS_IN_BOX[:, 0] * (x1 - x0), y0 + _LANDMARKS_IN_BOX[:, 1] * (y1 - y0)], 1)


def crop_transform(landmarks: np.ndarray, size: int, margin: float) -> np.ndarray:
    """2x3 matrix from upright source pixels to crop pixels."""
    return similarity_transform(landmarks, template_points(size, margin))


def crop_center_in_source(m: np.ndarray, size: int) -> np.ndarray:
    """Where the crop's centre lies in the source image (for checking crops against ground truth)."""
    a, t = m[:, :2], m[:, 2]
    return np.linalg.solve(a, np.array([size / 2.0, size / 2.0]) - t)


def warp(im: Image.Image, m: np.ndarray, size: int) -> Image.Image:
    """Apply source->crop matrix `m` with Pillow, pre-shrinking big sources to avoid aliasing."""
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))  # crop pixels per source pixel
    factor = int(0.5 / scale) if scale < 0.5 else 1
    if factor > 1:
        im = im.reduce(factor)
        m = m.copy()
        m[:, :2] *= factor
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)[:2].ravel()
    return im.transform((size, size), Image.Transform.AFFINE, tuple(inv), resample=Image.Resampling.BICUBIC,
                        fillcolor=(0, 0, 0))


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- the one function

def detect(rgb_im: Image.Image, settings: CropSettings, detector) -> List[Detection]:
    """Detections in upright source pixels, largest first; big images are shrunk for detection only."""
    w, h = rgb_im.size
    shrink = min(1.0, settings.detect_max_side / max(w, h))
    small = rgb_im if shrink == 1.0 else rgb_im.resize(
        (max(1, round(w * shrink)), max(1, round(h * shrink))), Image.Resampling.BILINEAR)
    found = detector(np.asarray(small), settings.min_score)
    for d in found:
        d.box = d.box / shrink
        if d.landmarks is not None:
            d.landmarks = d.landmarks / shrink
    return sorted(found, key=lambda d: d.area, reverse=True)


def crop_faces(raw: bytes, settings: CropSettings, detector=None, all_faces: bool = False,
               timings: Optional[dict] = None) -> List[FaceCrop]:
    """Bytes of one image -> aligned crops (the largest face, or every face with all_faces).

    Raises Reject when the bytes are not a usable image or hold no acceptable face.
    `detector` is get_detector(settings.detector) unless given. `timings`, when given, accumulates
    seconds spent in "decode", "detect" and "align" (warp + encode).
    """
    clock = time.perf_counter
    t0 = clock()
    im = decode_upright(raw, settings.max_pixels)
    w, h = im.size
    if timings is not None:
        timings["decode"] = timings.get("decode", 0.0) + clock() - t0
    if settings.detector == "none":
        # Pre-aligned crops: centre-square and resize, nothing else.
        side = min(w, h)
        x0, y0 = (w - side) / 2.0, (h - side) / 2.0
        box = [x0, y0, x0 + side, y0 + side]
        crop = im.crop(tuple(round(v) for v in box)).resize((settings.size, settings.size),
                                                            Image.Resampling.BICUBIC, reducing_gap=3.0)
        return [FaceCrop(encode_jpeg(crop, settings.jpeg_quality), [float(v) for v in box], None, None, 1, w, h)]

    detector = detector or get_detector(settings.detector)
    t0 = clock()
    found = detect(im, settings, detector)
    if timings is not None:
        timings["detect"] = timings.get("detect", 0.0) + clock() - t0
    t0 = clock()
    if not found:
        raise Reject("no_face", f"{settings.detector} found no face with score >= {settings.min_score} in {w}x{h}")
    chosen = found if all_faces else found[:1]
    crops = []
    for index, d in enumerate(chosen):
        if d.side < settings.min_face:
            if index == 0:
                raise Reject("face_too_small",
                             f"largest face is {d.side:.0f} px, under --min-face {settings.min_face}")
            break  # sorted by area: the rest are smaller still
        points = d.landmarks if d.landmarks is not None else landmarks_from_box(d.box)
        m = crop_transform(points, settings.size, settings.margin)
        crop = warp(im, m, settings.size)
        crops.append(FaceCrop(
            image=encode_jpeg(crop, settings.jpeg_quality),
            bbox=[float(v) for v in d.box],
            landmarks=None if d.landmarks is None else [float(v) for v in d.landmarks.ravel()],
            det_score=d.score,
            n_faces=len(found),
            source_width=w,
            source_height=h,
            face_index=index,
        ))
    if timings is not None:
        timings["align"] = timings.get("align", 0.0) + clock() - t0
    return crops
