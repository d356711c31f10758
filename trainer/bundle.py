"""The model bundle and its inference contract: ONE module that training (which writes bundles) and
scoring (spark_jobs/score.py, which reads them) both import.

- The bundle is one file: a plain dict of tensors, numbers and strings saved with torch.save, so it loads
  with torch.load(weights_only=True): opening a model file never runs code. It records the head, the input
  size, the normalisation, the crop settings of its training table and how those crops are framed.
- The preprocessing every model input goes through: decode_image (JPEG -> pixels at the input size; in
  trainer.runtime, which runs exported models without torch) and normalize (uint8 batch -> the float input).
- Predictor: a loaded bundle ready for batched inference, and how photos are cropped for it.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from shell.cli import redacted
from shell.errors import check_space
from schemas import layout
from trainer import calibration
from trainer.model import build_model, predict_ages
# the torch-free pieces every predictor shares (BundleError is raised, and caught, under this module's name too)
# MEAN, STD: named in trainer.runtime, re-exported here
from trainer.runtime import MEAN, STD, BundleError, check_fields, crop_for, resolve_tta  # noqa: F401

BUNDLE_FORMAT, BUNDLE_VERSION = layout.BUNDLE_FORMAT, layout.BUNDLE_VERSION


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


def _plain(value):
    """Metadata as the plain types weights_only loading accepts (NaN becomes None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)  # str subclasses (e.g. torch's TorchVersion) are not allowed by weights_only
    if isinstance(value, int):
        return int(value)
    try:
        number = float(value)  # numpy scalars, 0-d tensors
    except (TypeError, ValueError):
        raise TypeError(f"bundle metadata value {value!r} ({type(value).__name__}) is not a plain type") from None
    return None if math.isnan(number) else number


@dataclasses.dataclass
class Provenance:
    """Where a bundle came from: the data it was trained on, the settings, the metrics of its chosen epoch."""

    data: dict
    params: dict
    metrics: dict
    calibration: Optional[dict] = None  # what the val split fitted (trainer.calibration): the std's scale


def save_bundle(path: str, model: nn.Module, head: str, input_size: int, crop: dict, provenance: Provenance,
                normalize=(MEAN, STD)) -> None:
    """Write the one-file bundle atomically (a reader never sees half a file)."""
    mean, std = normalize
    bundle = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        # contiguous: a model trained channels-last (--precision bf16) bundles the same plain tensors as any other
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "head": head,
        "input_size": int(input_size),  # the model's input side; crop.size: the side crops are made at
        "normalize": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
        "crop": _plain(crop),  # how faces are cropped for it, its framing included (framing() below)
        "data": redacted(_plain(provenance.data)),  # a credential in a URI or setting never reaches the file
        "params": redacted(_plain(provenance.params)),
        "metrics": _plain(provenance.metrics),
        "calibration": _plain(provenance.calibration),
        "torch_version": str(torch.__version__),
    }
    assert tuple(bundle) == layout.BUNDLE_FIELDS, "schemas.layout.BUNDLE_FIELDS is the bundle's one field list"
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(bundle, tmp)
    except (RuntimeError, OSError) as e:  # a full disk reads `basic_ios::clear: iostream error` in torch
        if os.path.exists(tmp):
            os.remove(tmp)
        check_space(e, path)
        raise
    os.replace(tmp, path)


def _read(path: str) -> bytes:
    """The bytes of a bundle at a local path or URI (shell.uri)."""
    from shell import uri

    return uri.read_bytes(path)


def is_bundle(path: str) -> bool:
    """True when `path` (local or a URI) is a faceage model bundle (safe to replace with a newer one)."""
    try:
        bundle = torch.load(io.BytesIO(_read(path)), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        return False
    return isinstance(bundle, dict) and bundle.get("format") == BUNDLE_FORMAT


def load_bundle(path: str) -> Tuple[nn.Module, dict]:
    """(model in eval mode, bundle dict) from a bundle file (local or a URI); BundleError with a reason
    otherwise."""
    from shell import uri

    if not uri.isfile(path):
        raise FileNotFoundError(f"model bundle {path}: no such file")
    try:  # a run folder whose commit (bundle + summary) a kill interrupted: refused until a rerun finished it
        layout.check_no_pending_commit(layout.parent(path))
    except layout.IncompleteTableError as e:
        raise BundleError(f"model bundle {path}: {e}") from None
    try:
        bundle = torch.load(io.BytesIO(_read(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise BundleError(f"model bundle {path}: unreadable, corrupt or holding code that will not be run "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        what = "a plain state dict" if isinstance(bundle, dict) else f"a {type(bundle).__name__}"
        raise BundleError(f"model bundle {path}: this is {what}, not a faceage model bundle "
                          f"(write one with python -m trainer.train)")
    check_fields(bundle, path)
    model = build_model(bundle["head"])
    try:
        model.load_state_dict(bundle["state_dict"])
    except (RuntimeError, TypeError, KeyError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise BundleError(f"model bundle {path}: its weights do not fit a ResNet-18 with the {bundle['head']} head "
                          f"({first[0][:160] if first else type(e).__name__}{' ...' if len(first) > 1 else ''})") \
            from None
    broken = [name for name, t in bundle["state_dict"].items()
              if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise BundleError(f"model bundle {path}: {len(broken)} weight tensors hold NaN or infinite values (first: "
                          f"{broken[0]}); it cannot predict an age. Use the bundle of a run that did not diverge")
    model.eval()
    return model, bundle


class Predictor:
    """One model bundle, ready for batched inference on CPU or CUDA.

    `crop` is how PHOTOS are cropped for it: the bundle's training crop settings with the detector
    chosen by schemas.crop.scoring_settings (photos are detected and aligned to the model's framing,
    unless detector 'none' says they are aligned chips already)."""

    def __init__(self, path: str, device: str = "auto", threads: Optional[int] = None, detector: str = "auto"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model, self.bundle = load_bundle(path)
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.model.to(self.device)
        self.head = self.bundle["head"]
        self.size = int(self.bundle["input_size"])
        self.mean = torch.tensor(self.bundle["normalize"]["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.bundle["normalize"]["std"], device=self.device).view(1, 3, 1, 1)
        self.crop = self.crop_for(self.bundle, detector)

    crop_for = staticmethod(crop_for)  # how photos are cropped for a bundle with a --detector choice

    def predict(self, pixels: np.ndarray, batch_size: int = 64, tta: Optional[str] = None):
        """uint8 N x H x W x 3 -> (ages, stds) float32 arrays, through the bundle's calibration (trainer.calibration:
        the age map when it has one, the std scale); std is NaN for a regression head.
        tta "flip" / "flip-zoom": the mirrored (and zoomed) faces too, averaged (trainer.model.predict_ages); None:
        the mode the calibration was fitted under (trainer.runtime.resolve_tta)."""
        import torch

        tta, _ = resolve_tta(self.bundle, tta)

        ages, stds = [], []
        with torch.inference_mode():
            for i in range(0, len(pixels), batch_size):
                x = torch.from_numpy(pixels[i:i + batch_size]).to(self.device).permute(0, 3, 1, 2)
                x = (x.float() / 255.0 - self.mean) / self.std
                age, std = predict_ages(self.model, x, self.head, tta, -self.mean / self.std)
                ages.append(age.float().cpu().numpy())
                stds.append(std.float().cpu().numpy())
        if not ages:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        return calibration.calibrated(np.concatenate(ages), np.concatenate(stds), self.bundle.get("calibration"))
