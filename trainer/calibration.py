"""A model's calibration: fitted on the val split when a run ends (trainer.train), stored in the bundle (and an
export's contract), applied by every predictor (trainer.bundle.Predictor, trainer.runtime.OnnxPredictor, the
TorchScript check) through calibrated(), so score, predict, the Python API and the service give one number.
numpy only: no torch here.

Two parts, each optional:
- the age map (--age-calibration debias): a model trained on a skewed age distribution reads ages toward its
  mean (children older, the elderly younger). The map fitted (fit_age_map) is the increasing, piecewise-linear
  function of the predicted age with the lowest val MAE among those that bring every true-age group of
  GOAL_FACES+ val faces within BIAS_GOAL years (less half a standard error of that group's mean, so that the goal
  holds on new faces too), moving ages only away from the val median (it undoes a pull toward the mean, never
  adds one): a linear programme. When no such map raises the val MAE by MAX_MAP_COST or less (a weak model),
  the goal is loosened step by step until one does, and the bundle records the goal met. The earlier map, the
  inverse of the mean predicted age per true age at the smallest strength that meets the goal (fit_inverse_map,
  choose_strength), removes the same bias at a larger MAE cost (bench.age_map_compare); bundles that carry one
  keep working (map_ages reads both).
- the std scale: a Gaussian's |error| lies within 1 std 68.27 % of the time. The scale fitted is the one that
  makes that true on the val split (after the age map): the 68.27th percentile of |error| / std.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from schemas.tables import AGE_GROUP_BOUNDS, MAX_AGE, MIN_AGE, age_group_names

ONE_SIGMA = math.erf(1 / math.sqrt(2))  # 0.6827: the share of a Gaussian within 1 std of its mean
MIN_ROWS = 20  # fewer val rows with a std than this: no scale is fitted (it would be noise)
MIN_BIN = 25  # the inverse map: consecutive true ages pooled until each bin holds this many val faces
KNOTS = 20  # the age map: knots at these many quantiles of the val predictions (ends included)
MARGIN_SE = 0.5  # the age map: each group's goal less this many standard errors of its mean error
MIN_MAP_ROWS = 2 * MIN_BIN  # fewer val faces than this: no age map is fitted
BIAS_GOAL = 3.0  # issue 24: no true-age group (the card's) of GOAL_FACES or more faces biased by more than this
GOAL_FACES = 30
# the age map may raise the val MAE by at most this share: a weak model (a short budget) cannot meet the goal, and
# the maps that meet a looser one bent its ages far (a 5-minute run's: 7.5-23.6 read as 1.3-2.3, val MAE +25 %,
# test +22 %)
MAX_MAP_COST = 0.05


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


def _pool_adjacent_violators(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to `values` in weighted least squares (one value per input)."""
    blocks: list = []  # [value, weight, count]
    for v, w in zip(values.tolist(), weights.tolist()):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] >= blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.repeat([b[0] for b in blocks], [b[2] for b in blocks])


def fit_inverse_map(predicted: np.ndarray, true: np.ndarray, min_bin: int = MIN_BIN) -> Optional[dict]:
    """The inverse map fitted on (predicted, true) ages of val: {"predicted": [...], "age": [...]} knots, both strictly
    increasing (a predicted age at a knot becomes its age; between knots linear; beyond the ends shifted by the
    end's offset), or None when fewer than two bins of min_bin faces exist.

    True ages are pooled into bins of consecutive ages holding at least min_bin faces each; the mean predicted age
    per bin is made non-decreasing (pool adjacent violators, weighted by faces); bins that pooling left with one
    value are merged. Each knot pairs a bin's (monotone) mean prediction with its mean true age."""
    predicted, true = np.asarray(predicted, np.float64), np.asarray(true, np.float64)
    usable = np.isfinite(predicted) & np.isfinite(true)
    predicted, true = predicted[usable], true[usable]
    if predicted.size < 2 * min_bin:
        return None
    order = np.argsort(true, kind="stable")
    predicted, true = predicted[order], true[order]
    ages, starts = np.unique(np.round(true), return_index=True)
    bins, start = [], 0  # [first row, end row) of each bin; a bin never splits one true age
    for i in range(1, len(ages) + 1):
        end = starts[i] if i < len(ages) else len(true)
        if end - start >= min_bin:
            bins.append((start, end))
            start = end
    if start < len(true):  # the oldest ages, too few for a bin of their own: into the last bin
        if not bins:
            return None
        bins[-1] = (bins[-1][0], len(true))
    if len(bins) < 2:
        return None
    weights = np.array([e - s for s, e in bins], np.float64)
    mean_pred = np.array([predicted[s:e].mean() for s, e in bins])
    mean_true = np.array([true[s:e].mean() for s, e in bins])
    fitted = _pool_adjacent_violators(mean_pred, weights)
    knots_pred, knots_age = [], []
    for value in np.unique(fitted):  # bins pooled to one value become one knot: their faces' mean true age
        same = fitted == value
        knots_pred.append(float(value))
        knots_age.append(float(np.average(mean_true[same], weights=weights[same])))
    if len(knots_pred) < 2:
        return None
    return {"predicted": knots_pred, "age": knots_age, "fitted_on_rows": int(predicted.size)}


def map_ages(ages: np.ndarray, age_map: Optional[dict]) -> np.ndarray:
    """Ages through the age map (unchanged without one), clipped into MIN_AGE..MAX_AGE; NaN stays NaN. A map of
    strength s (default 1) moves each age that fraction of the way: age + s (map(age) - age)."""
    ages = np.asarray(ages, np.float32)
    if not age_map:
        return ages
    x, y = np.asarray(age_map["predicted"], np.float64), np.asarray(age_map["age"], np.float64)
    a = ages.astype(np.float64)
    mapped = np.interp(a, x, y)
    mapped = np.where(a < x[0], a + (y[0] - x[0]), mapped)  # beyond the ends: the end's offset, slope 1
    mapped = np.where(a > x[-1], a + (y[-1] - x[-1]), mapped)
    strength = float(age_map.get("strength", 1.0))
    return np.clip(a + strength * (mapped - a), MIN_AGE, MAX_AGE).astype(np.float32)


STRENGTHS = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1


def choose_strength(predicted: np.ndarray, true: np.ndarray, age_map: dict, goal: float = BIAS_GOAL,
                    min_faces: int = GOAL_FACES) -> float:
    """The smallest strength (STRENGTHS) at which every true-age group (age_groups: the card's) holding min_faces
    or more of these faces is biased by at most `goal` years; 1 when none is. The full inverse removes bias by age
    but amplifies the noise of ages the model reads alike (a flat stretch of the mean prediction per true age):
    correcting only as far as the goal needs keeps the MAE."""
    predicted, true = np.asarray(predicted, np.float64), np.asarray(true, np.float64)
    group = age_groups(true)
    counted = [g for g in np.unique(group[group >= 0]) if (group == g).sum() >= min_faces]
    for strength in STRENGTHS:
        err = map_ages(predicted, {**age_map, "strength": strength}) - true
        if all(abs(err[group == g].mean()) <= goal for g in counted):
            return strength
    return 1.0


def fit_age_map(predicted: np.ndarray, true: np.ndarray, goal: float = BIAS_GOAL, min_faces: int = GOAL_FACES,
                knots: int = KNOTS, margin_se: float = MARGIN_SE, max_cost: Optional[float] = MAX_MAP_COST
                ) -> Optional[dict]:
    """The age map fitted on (predicted, true) ages of val (the module's docstring): {"predicted": [...], "age":
    [...]} knots as map_ages reads them, plus "fitted_on_rows", "pivot" (the val median, which no age crosses),
    "bias_goal" (the goal met on val: `goal`, or a looser one - 4, 5, 7, 11, 19 years - when no map of this kind
    reaches it (e.g. a group read away from the mean) or every map that does raises the val MAE by more than
    `max_cost` (a share; None: no limit); None when none is met), "margin_se", "val_mae_unmapped" and
    "val_mae_mapped"; None when fewer than MIN_MAP_ROWS faces have both ages.

    Knots sit at `knots` quantiles of the val predictions and at the pivot; their ages solve a linear programme:
    minimise the mean |map(p) - t| subject to slope >= 0.05 between knots (strictly increasing), map(x) >= x above
    the pivot and <= x below it, and |mean error| <= goal - margin_se * (the group's std of error / sqrt(faces))
    in every true-age group (age_groups) of min_faces or more faces."""
    from scipy import sparse
    from scipy.optimize import linprog

    predicted, true = np.asarray(predicted, np.float64), np.asarray(true, np.float64)
    usable = np.isfinite(predicted) & np.isfinite(true)
    predicted, true = predicted[usable], true[usable]
    if predicted.size < MIN_MAP_ROWS:
        return None
    pivot = float(np.median(true))
    x = np.unique(np.round(np.quantile(predicted, np.linspace(0, 1, knots)), 2))
    if x.size < 2:
        return None
    if x[0] < pivot < x[-1]:  # a knot at the pivot, held there: no age between two knots crosses it either
        x = np.unique(np.r_[x, pivot])
    n, k = predicted.size, x.size
    equal, groups = _map_rows(predicted, true, x, min_faces, margin_se)
    cost = np.r_[np.zeros(k), np.full(2 * n, 1.0 / n)]  # the mean of over + under: the MAE
    bounds = [(xi if xi >= pivot else None, xi if xi <= pivot else None) for xi in x] + [(0, None)] * (2 * n)
    slope = sparse.hstack([sparse.diags([np.ones(k - 1), -np.ones(k - 1)], [0, 1], shape=(k - 1, k)),
                           sparse.csr_matrix((k - 1, 2 * n))])  # y[i] - y[i+1] <= -0.05 (x[i+1] - x[i])
    zeros = sparse.csr_matrix((1, 2 * n))
    unmapped = float(np.abs(predicted - true).mean())
    for loosen in (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, None):  # the last: no goal (the identity meets the rest)
        upper, bound = [slope], [-0.05 * np.diff(x)]
        for mean_map, mean_true, margin in (groups if loosen is not None else []):
            allowed = max(goal + loosen - margin, 0.0)
            upper += [sparse.hstack([mean_map, zeros]), sparse.hstack([-mean_map, zeros])]
            bound += [[mean_true + allowed], [allowed - mean_true]]
        result = linprog(cost, A_ub=sparse.vstack(upper).tocsr(), b_ub=np.concatenate([np.ravel(v) for v in bound]),
                         A_eq=equal, b_eq=true, bounds=bounds, method="highs")
        if result.status == 0 and (loosen is None or max_cost is None or result.fun <= unmapped * (1 + max_cost)):
            break
    if result.status != 0:  # the solver failed even on the programme the identity map solves
        return None
    return {"predicted": [float(v) for v in x], "age": [float(v) for v in result.x[:k]],
            "fitted_on_rows": int(n), "pivot": pivot, "bias_goal": None if loosen is None else goal + loosen,
            "margin_se": margin_se, "val_mae_unmapped": round(unmapped, 4),
            "val_mae_mapped": round(float(result.fun), 4)}


def _map_rows(predicted: np.ndarray, true: np.ndarray, x: np.ndarray, min_faces: int, margin_se: float):
    """fit_age_map's programme over [y (the knots' ages), over, under (each face's positive and negative error)]:
    the equality rows map(p) - over + under = t (map(p) linear in y between p's two knots), and per true-age group
    of min_faces+ faces (its row of mean map(p), its mean true age, margin_se standard errors of its mean error)."""
    from scipy import sparse

    n, k = predicted.size, x.size
    left = np.clip(np.searchsorted(x, predicted, side="right") - 1, 0, k - 2)
    w = np.clip((predicted - x[left]) / (x[left + 1] - x[left]), 0.0, 1.0)
    rows = np.r_[np.arange(n), np.arange(n)]
    interp = sparse.csr_matrix((np.r_[1 - w, w], (rows, np.r_[left, left + 1])), shape=(n, k))
    equal = sparse.hstack([interp, -sparse.eye(n), sparse.eye(n)]).tocsr()
    group, groups = age_groups(true), []
    for g in np.unique(group[group >= 0]):
        in_group = group == g
        if in_group.sum() >= min_faces:
            err = predicted[in_group] - true[in_group]
            groups.append((sparse.csr_matrix(interp[in_group].mean(axis=0)), float(true[in_group].mean()),
                           margin_se * float(err.std()) / math.sqrt(in_group.sum())))
    return equal, groups


def age_groups(true: np.ndarray) -> np.ndarray:
    """Each true age's index in schemas.tables.AGE_GROUP_BOUNDS (0-2, 3-9, 10-19, ..., 70+: the groups evaluate
    and the model card slice by); -1 for a missing age."""
    true = np.asarray(true, np.float64)
    group = np.searchsorted(np.asarray(AGE_GROUP_BOUNDS, np.float64), true, side="right") - 1
    return np.where(np.isfinite(true) & (true >= AGE_GROUP_BOUNDS[0]), group, -1)


def bias_by_age_group(errors: np.ndarray, true: np.ndarray) -> dict:
    """{"0-2": mean signed error, "3-9": ..., "70+": ...} over the faces of each true-age group (age_groups);
    groups without faces are left out."""
    errors = np.asarray(errors, np.float64)
    group, names = age_groups(true), age_group_names()
    out = {}
    for g in np.unique(group[group >= 0]):
        rows = (group == g) & np.isfinite(errors)
        if rows.any():
            out[names[g]] = round(float(errors[rows].mean()), 3)
    return out


def calibrated(ages: np.ndarray, stds: np.ndarray, calibration: Optional[dict]):
    """(ages, stds) as every predictor returns them: ages through the bundle's age map, stds times its scale."""
    return map_ages(ages, (calibration or {}).get("age_map")), apply(stds, calibration)


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
    age_map = calibration.get("age_map")
    if age_map is not None:
        try:
            x, y = (np.asarray(age_map[k], np.float64) for k in ("predicted", "age"))
        except (TypeError, KeyError, ValueError):
            return f"{where}: calibration age_map needs 'predicted' and 'age' lists of numbers"
        if x.ndim != 1 or x.shape != y.shape or x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()) \
                or not ((np.diff(x) > 0).all() and (np.diff(y) > 0).all()):
            return (f"{where}: calibration age_map must be two equally long lists of at least 2 finite, strictly "
                    f"increasing ages")
        strength = age_map.get("strength", 1.0)
        if not (isinstance(strength, (int, float)) and 0 <= strength <= 1):
            return f"{where}: calibration age_map strength {strength!r} is not a number in 0..1"
    return None
