"""ResNet-18 with an age head, the losses that go with each head, and the one-file model bundle.

Heads:
- "regression": one output, the age in years (trained with L1 or smooth-L1).
- "distribution": logits over ages 0..MAX_AGE (label-distribution learning, DLDL-v2 style): the
  target is a Gaussian around the true age; the prediction is the expected age and the
  distribution's std is a per-prediction uncertainty.

The bundle is a plain dict of tensors, numbers and strings saved with torch.save, so it loads with
torch.load(weights_only=True): opening a model file never runs code.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from schemas.cli import UserError
from schemas.crop import CropSettings

MAX_AGE = 120
HEADS = ("regression", "distribution")
BUNDLE_FORMAT = "faceage-model-bundle"
BUNDLE_VERSION = 1


class BundleError(UserError, ValueError):
    """A file that is not a usable model bundle; the message says what it is instead."""


def build_model(head: str = "distribution", init_weights: Optional[str] = None) -> nn.Module:
    """torchvision ResNet-18 (weights=None) with the head's output layer; optional local init weights."""
    import torchvision

    if head not in HEADS:
        raise ValueError(f"head {head!r}: use one of {HEADS}")
    model = torchvision.models.resnet18(weights=None, num_classes=1 if head == "regression" else MAX_AGE + 1)
    if init_weights:
        load_init_weights(model, init_weights)
    return model


def load_init_weights(model: nn.Module, path: str) -> Dict[str, list]:
    """Load a state dict from a local file (e.g. torchvision's ImageNet ResNet-18 weights).

    Layers whose shapes differ (the classifier) keep their fresh initialisation. Returns which keys
    were loaded and skipped; raises BundleError when the file holds no matching weights.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init-weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise BundleError(f"--init-weights {path}: not a PyTorch weights file ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a faceage bundle or a checkpoint dict
    if not isinstance(state, dict):
        raise BundleError(f"--init-weights {path}: holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not usable:
        raise BundleError(f"--init-weights {path}: none of its {len(state)} tensors fit a ResNet-18")
    model.load_state_dict(usable, strict=False)
    return {"loaded": sorted(usable), "skipped": sorted(set(own) - set(usable))}


def age_targets(ages: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Gaussian label distributions over 0..MAX_AGE centred on each age (rows sum to 1)."""
    grid = torch.arange(MAX_AGE + 1, dtype=torch.float32, device=ages.device)
    logits = -((grid[None, :] - ages.float()[:, None]) ** 2) / (2 * sigma**2)
    return torch.softmax(logits, dim=1)


def decode(outputs: torch.Tensor, head: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Model outputs -> (predicted age, uncertainty std). Regression has no std: NaN."""
    if head == "regression":
        age = outputs.float().squeeze(1)
        return age, torch.full_like(age, float("nan"))
    probs = torch.softmax(outputs.float(), dim=1)
    grid = torch.arange(MAX_AGE + 1, dtype=torch.float32, device=outputs.device)
    mean = probs @ grid
    var = probs @ (grid**2) - mean**2
    return mean, var.clamp_min(0).sqrt()


def loss_fn(outputs: torch.Tensor, ages: torch.Tensor, head: str, kind: str = "l1") -> torch.Tensor:
    """Training loss: L1 / smooth-L1 for regression; KL to the target distribution + L1 of the
    expected age for the distribution head."""
    ages = ages.float()
    if head == "regression":
        pred = outputs.float().squeeze(1)
        return F.smooth_l1_loss(pred, ages) if kind == "smooth_l1" else F.l1_loss(pred, ages)
    log_probs = F.log_softmax(outputs.float(), dim=1)
    kl = F.kl_div(log_probs, age_targets(ages), reduction="batchmean")
    mean, _ = decode(outputs, head)
    return kl + F.l1_loss(mean, ages)


# ----------------------------------------------------------------------------- the bundle

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


def save_bundle(path: str, model: nn.Module, head: str, input_size: int, mean, std, crop: dict,
                data: dict, params: dict, metrics: dict) -> None:
    """Write the one-file bundle atomically (a reader never sees half a file)."""
    bundle = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "head": head,
        "input_size": int(input_size),
        "normalize": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
        "crop": _plain(crop),
        # how the training crops are framed: scoring photos detects and aligns to this (schemas/crop.py)
        "framing": _plain(CropSettings.from_dict(crop, "bundle crop settings").framing()) if crop else None,
        "data": _plain(data),
        "params": _plain(params),
        "metrics": _plain(metrics),
        "torch_version": str(torch.__version__),
    }
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(bundle, tmp)
    os.replace(tmp, path)


def is_bundle(path: str) -> bool:
    """True when `path` is a faceage model bundle (safe to replace with a newer one)."""
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        return False
    return isinstance(bundle, dict) and bundle.get("format") == BUNDLE_FORMAT


def load_bundle(path: str) -> Tuple[nn.Module, dict]:
    """(model in eval mode, bundle dict) from a bundle file; BundleError with a reason otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model bundle {path}: no such file")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise BundleError(f"model bundle {path}: unreadable, corrupt or holding code that will not be run "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        what = "a plain state dict" if isinstance(bundle, dict) else f"a {type(bundle).__name__}"
        raise BundleError(f"model bundle {path}: this is {what}, not a faceage model bundle "
                          f"(write one with python -m trainer.train)")
    if bundle.get("format_version", 0) > BUNDLE_VERSION:
        raise BundleError(f"model bundle {path}: format version {bundle['format_version']} is newer than this "
                          f"code ({BUNDLE_VERSION}); update the project")
    if bundle.get("head") not in HEADS:
        raise BundleError(f"model bundle {path}: head {bundle.get('head')!r} is not one of {HEADS}")
    size = bundle.get("input_size")
    if not isinstance(size, int) or not 16 <= size <= 1024:
        raise BundleError(f"model bundle {path}: input_size {size!r} is not a pixel size 16..1024")
    normalize = bundle.get("normalize") or {}
    if not all(isinstance(normalize.get(k), list) and len(normalize[k]) == 3 for k in ("mean", "std")):
        raise BundleError(f"model bundle {path}: normalize needs 3 mean and 3 std values")
    crop = bundle.get("crop")
    if not crop:
        raise BundleError(f"model bundle {path}: no crop settings; it cannot say how to crop faces for it "
                          f"(retrain with python -m trainer.train on a prepared table)")
    try:
        CropSettings.from_dict(crop, f"model bundle {path}")
    except UserError as e:
        raise BundleError(str(e)) from None
    model = build_model(bundle["head"])
    try:
        model.load_state_dict(bundle["state_dict"])
    except (RuntimeError, TypeError, KeyError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise BundleError(f"model bundle {path}: its weights do not fit a ResNet-18 with the {bundle['head']} head "
                          f"({first[0][:160] if first else type(e).__name__}{' ...' if len(first) > 1 else ''})") \
            from None
    model.eval()
    return model, bundle
