"""The predicted std made honest: fitted on the val split when a run ends (trainer.train), stored in the bundle
(and an export's contract), applied by every predictor (trainer.bundle.Predictor, trainer.runtime.OnnxPredictor)
so score, predict, the Python API and the service give one calibrated number. numpy only: no torch here.

A Gaussian's |error| lies within 1 std 68.27 % of the time. The scale fitted is the one that makes that true on
the val split: the 68.27th percentile of |error| / std. It changes no age, only the std.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

ONE_SIGMA = math.erf(1 / math.sqrt(2))  # 0.6827: the share of a Gaussian within 1 std of its mean
MIN_ROWS = 20  # fewer val rows with a std than this: no scale is fitted (it would be noise)


def coverage(errors: np.ndarray, stds: np.ndarray, k: float = 1.0) -> Optional[float]:
    """The share of |error| <= k * std among rows whose std is finite (None when none is)."""
    errors, stds = np.asarray(errors, np.float64), np.asarray(stds, np.float64)
    usable = np.isfinite(stds) & np.isfinite(errors)
    return float((np.abs(errors[usable]) <= k * stds[usable]).mean()) if usable.any() else None


def fit_std_scale(errors: np.ndarray, stds: np.ndarray, split: str = "val") -> dict:
    """The bundle's calibration fitted on (errors, stds) of `split`: {"std_scale": s or None, "fitted_on", "rows",
    "within_1sd_before", "within_1sd_after"}; std_scale None when the head gives no std or rows are too few."""
    errors, stds = np.asarray(errors, np.float64), np.asarray(stds, np.float64)
    usable = np.isfinite(stds) & (stds > 0) & np.isfinite(errors)
    if usable.sum() < MIN_ROWS:
        return {"std_scale": None, "fitted_on": split, "rows": int(usable.sum()), "within_1sd_before": None,
                "within_1sd_after": None}
    scale = float(np.quantile(np.abs(errors[usable]) / stds[usable], ONE_SIGMA))
    scale = max(scale, 1e-3)  # a val split predicted exactly must not zero every std
    return {"std_scale": scale, "fitted_on": split, "rows": int(usable.sum()),
            "within_1sd_before": coverage(errors, stds), "within_1sd_after": coverage(errors, stds * scale)}


def std_scale(calibration: Optional[dict]) -> float:
    """The factor a predictor multiplies its stds by (1.0 for a bundle without a fitted scale)."""
    scale = (calibration or {}).get("std_scale")
    return float(scale) if scale is not None else 1.0


def apply(stds: np.ndarray, calibration: Optional[dict]) -> np.ndarray:
    """Calibrated stds (float32); NaN (regression) stays NaN."""
    return (np.asarray(stds, np.float32) * np.float32(std_scale(calibration))).astype(np.float32)


def check(calibration, where: str) -> Optional[str]:
    """Why a bundle's calibration is unusable, or None when it is fine (absent counts as fine: scale 1)."""
    if calibration is None:
        return None
    if not isinstance(calibration, dict):
        return f"{where}: calibration is a {type(calibration).__name__}, not a mapping"
    scale = calibration.get("std_scale")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        return f"{where}: calibration std_scale {scale!r} is not a finite number above 0"
    return None
