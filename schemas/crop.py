"""Crop settings: what decides how a face crop looks. Stored with every faces table (the prepare run
manifest) and every model bundle, and read back by one function each (`CropSettings.from_dict`).

`framing` says how a table's crops are framed, independent of how they were found: crops made by a
detector are aligned to TEMPLATE (where 5 landmarks sit in a UTKFace "aligned & cropped" chip) with a
margin; crops made with detector "none" ARE the input chips, assumed framed that way (margin 0).
Scoring photos always detects and aligns to the model's framing unless the inputs are said to be
aligned chips already.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

from shell.cli import number
from shell.errors import UserError

SIZE_RANGE = (16, 1024)  # a crop's (and a model input's) side in pixels
DEFAULT_SIZE = 128
pixel_size = number(*SIZE_RANGE, integer=True)  # argparse type= of every size flag (prepare, train)
DETECTORS = ("yunet", "hog", "none")
PHOTO_DETECTORS = ("yunet", "hog")  # the ones that find faces in a photo
FRAMING_TEMPLATE = "utkface-chip-5pt"  # schemas/crop.TEMPLATE's name: the alignment crops are framed by

# Where the 5 landmarks (right eye, left eye, nose, right and left mouth corner; the subject's right
# eye is on the image's left) sit in a UTKFace "aligned & cropped" chip, as fractions of its side:
# the mean of YuNet's landmarks over 600 chips (std 0.02-0.03). With margin 0, a crop of a face in
# the wild is framed like those chips, so a model trained on chips sees the same framing at scoring.
TEMPLATE = ((0.282, 0.288), (0.684, 0.290), (0.477, 0.520), (0.308, 0.672), (0.667, 0.670))


@dataclass(frozen=True)
class CropSettings:
    """Everything that decides what a crop looks like; stored with tables and model bundles."""

    size: int = DEFAULT_SIZE
    margin: float = 0.0  # extra border on each side, as a fraction of the crop (0: UTKFace chip framing)
    detector: str = "yunet"
    min_score: float = 0.5  # detector confidence, 0..1
    min_face: int = 24  # smallest accepted face (box side, source pixels)
    detect_max_side: int = 800  # larger images are downscaled for detection only
    max_pixels: int = 64_000_000  # decompression-bomb cap (width x height)
    jpeg_quality: int = 95

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise ValueError(f"detector {self.detector!r}: use one of {DETECTORS}")
        if not SIZE_RANGE[0] <= self.size <= SIZE_RANGE[1]:
            raise ValueError(f"size {self.size}: use {SIZE_RANGE[0]}..{SIZE_RANGE[1]} pixels")
        if not 0.0 <= self.margin <= 2.0:
            raise ValueError(f"margin {self.margin}: use 0..2 (fraction of the face box per side)")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score {self.min_score}: use 0..1")
        if self.min_face < 1 or self.max_pixels < 1 or self.detect_max_side < 16:
            raise ValueError("min_face, max_pixels and detect_max_side must be positive")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality {self.jpeg_quality}: use 1..100")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str) -> "CropSettings":
        """Settings stored in a manifest or bundle; UserError naming `where` when they are not usable."""
        if not isinstance(values, dict):
            raise UserError(f"{where}: crop settings are {type(values).__name__}, not a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{where}: unknown crop settings {unknown}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: crop settings not usable: {e}") from None

    def framing(self) -> dict:
        """How crops made with these settings are framed (what a model trained on them expects)."""
        return {"template": FRAMING_TEMPLATE, "margin": float(self.margin), "size": int(self.size),
                "made_by": "aligned input chips (detector none)" if self.detector == "none"
                else f"{self.detector} detection + 5-point alignment"}


def scoring_settings(trained: CropSettings, detector: str = "auto", size: Optional[int] = None) -> CropSettings:
    """The crop settings to score PHOTOS with for a model trained on `trained` crops.

    auto: the training table's detector when it had one, else yunet: photos are detected and aligned
    to the model's framing even when its training crops were aligned chips (detector none). 'none'
    means the inputs are already aligned chips (centre-square and resize)."""
    if detector not in ("auto",) + DETECTORS:
        raise UserError(f"--detector {detector!r}: use auto or one of {DETECTORS}")
    chosen = detector
    if detector == "auto":
        chosen = trained.detector if trained.detector in PHOTO_DETECTORS else PHOTO_DETECTORS[0]
    values = trained.to_dict()
    values.update(detector=chosen)
    if size is not None:
        values.update(size=int(size))
    return CropSettings(**values)
