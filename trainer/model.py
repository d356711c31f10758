"""ResNet-18 with an age head and the losses that go with each head (the bundle: trainer/bundle.py).

Heads:
- "regression": one output, the age in years (trained with L1 or smooth-L1).
- "distribution": logits over ages 0..MAX_AGE (label-distribution learning, DLDL-v2 style): the
  target is a Gaussian around the true age; the prediction is the expected age and the
  distribution's std is a per-prediction uncertainty.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch.nn import functional
from torch import nn

from schemas.tables import MAX_AGE, MIN_AGE
from shell.errors import UserError

# named once, torch-free, in trainer.runtime
from trainer.runtime import HEADS, MEAN, STD, TTA, TTA_MODES_HELP, TTA_ZOOMS, check_tta, zoom_matrix  # noqa: F401


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
    """Load a state dict from a file, local or a URI (e.g. torchvision's ImageNet ResNet-18 weights).

    Layers whose shapes differ (the classifier) keep their fresh initialisation. Returns which keys
    were loaded and skipped; raises UserError when the file holds no matching weights.
    """

    import io

    from shell import uri

    if not uri.isfile(path):
        raise FileNotFoundError(f"--init-weights {path}: no such file")
    try:
        state = torch.load(io.BytesIO(uri.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise UserError(f"--init-weights {path}: not a PyTorch weights file ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a faceage bundle or a checkpoint dict
    if not isinstance(state, dict):
        raise UserError(f"--init-weights {path}: holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not usable:
        raise UserError(f"--init-weights {path}: none of its {len(state)} tensors fit a ResNet-18")
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


def predict_ages(model, x: torch.Tensor, head: str, tta: str = "none",
                 black: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(age, std) of a normalised N x 3 x H x W batch. tta "flip" also runs the mirrored batch, "flip-zoom" also the
    batch zoomed to 0.93 and 1.07 (tta_views), and averages: the views' predicted distributions (distribution head:
    then decoded) or their ages (regression). `black`: the normalised value of a black pixel (1 x 3 x 1 x 1; default
    the project's normalisation, trainer.runtime.MEAN / STD), what a zoom below 1 shows outside the face.

    A regression age is clipped into MIN_AGE..MAX_AGE (the distribution head's mean is inside by
    construction): no age is negative, every true age is at least as close to the clipped one, and NaN stays
    NaN. Training's val/test MAE and every scoring path go through here, so they agree."""
    if check_tta(tta) == "none":
        return ages_of(model(x), head)
    outs = [model(view).float() for view in tta_views(x, tta, black)]
    if head == "regression":
        return ages_of(sum(outs) / len(outs), head)
    probs = sum(torch.softmax(out, dim=1) for out in outs) / len(outs)
    return decode(torch.log(probs.clamp_min(1e-12)), head)


def tta_views(x: torch.Tensor, tta: str, black: Optional[torch.Tensor] = None):
    """The views of a normalised batch that TTA mode `tta` averages, in the order of trainer.runtime.tta_views
    (its numpy twin, which ONNX Runtime runs): each zoom of runtime.TTA_ZOOMS, then its mirror unless tta is
    "none"."""
    if black is None:
        black = torch.as_tensor(-MEAN / STD, device=x.device).view(1, 3, 1, 1)
    for scale in TTA_ZOOMS[tta]:
        view = x
        if scale != 1.0:
            r = torch.tensor(zoom_matrix(x.shape[-1], scale), device=x.device, dtype=x.dtype)
            view = (r @ (x - black.to(x.dtype)) @ r.T + black.to(x.dtype)).contiguous(
                memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                else torch.contiguous_format)
        yield view
        if tta != "none":
            yield torch.flip(view, dims=[3])


def ages_of(outputs: torch.Tensor, head: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """One forward pass's outputs -> (age, std): decoded, a regression age clipped into MIN_AGE..MAX_AGE.
    An exported model computes exactly this in its graph (trainer.export)."""
    age, std = decode(outputs, head)
    if head == "regression":
        age = age.clamp(MIN_AGE, MAX_AGE)
    return age, std


AGE_WEIGHTINGS = ("none", "sqrt_inv")


def age_weights(train_ages, sigma: float = 2.0, max_weight: float = 5.0) -> torch.Tensor:
    """A weight per age 0..MAX_AGE against a training set's pull toward its common ages: the inverse square root
    of the age histogram smoothed by a Gaussian of `sigma` years (label distribution smoothing, Yang et al. 2021,
    "Delving into Deep Imbalanced Regression"), capped at `max_weight` times the smallest weight, and scaled so
    that the training rows' weights average 1 (the loss keeps its size; rare ages count more)."""
    ages = torch.as_tensor(train_ages, dtype=torch.long).clamp(0, MAX_AGE)
    if ages.numel() == 0:
        raise ValueError("age_weights: no training ages")
    counts = torch.bincount(ages, minlength=MAX_AGE + 1).double()
    grid = torch.arange(MAX_AGE + 1, dtype=torch.float64)
    kernel = torch.exp(-((grid[:, None] - grid[None, :]) ** 2) / (2 * sigma**2))
    smoothed = kernel @ counts  # each age's count spread over its neighbours
    weights = smoothed.clamp_min(1e-12).rsqrt()
    weights = weights.clamp(max=weights.min() * max_weight)
    weights = weights / weights[ages].mean()
    return weights.float()


def loss_fn(outputs: torch.Tensor, ages: torch.Tensor, head: str, kind: str = "l1",
            weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Training loss: L1 / smooth-L1 for regression; KL to the target distribution + L1 of the
    expected age for the distribution head. `weights` (age_weights, one per age): each row's loss times its
    age's weight, averaged over the batch."""
    rows = _row_losses(outputs, ages, head, kind)
    if weights is not None:
        rows = rows * weights.to(rows.device)[ages.long().clamp(0, MAX_AGE)]
    return rows.mean()


def _row_losses(outputs: torch.Tensor, ages: torch.Tensor, head: str, kind: str) -> torch.Tensor:
    """loss_fn's loss of each row, unweighted."""
    ages = ages.float()
    if head == "regression":
        pred = outputs.float().squeeze(1)
        if kind == "smooth_l1":
            return functional.smooth_l1_loss(pred, ages, reduction="none")
        return functional.l1_loss(pred, ages, reduction="none")
    log_probs = functional.log_softmax(outputs.float(), dim=1)
    kl = functional.kl_div(log_probs, age_targets(ages), reduction="none").sum(dim=1)
    mean, _ = decode(outputs, head)
    return kl + (mean - ages).abs()
