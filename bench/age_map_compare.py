"""The age map's variants, fitted on one split's predictions and judged on others' (issue 24, item 3): no map;
the trainer's map (trainer.calibration.fit_age_map: the lowest val MAE within the bias goal less 0 / 0.5 / 1
standard errors); the inverse map (fit_inverse_map) in bins of 25 or 100 faces, at strengths 1 ... 0 and at the
smallest strength meeting the goal on val (choose_strength, the trainer's rule before 2026-12-04). Reads
score.py's predictions of a bundle WITHOUT an age map (python -m trainer.recalibrate --drop age_map) for the val
and test splits (and, with --aaf, All-Age-Faces photos) and the prepared tables' labels; prints MAE and bias by
true-age group on each.

    python -m bench.age_map_compare --val VAL_SCORED --test TEST_SCORED --labels out/utkface_parquet \\
        [--aaf AAF_SCORED --aaf-labels out/aaf_parquet]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from trainer import calibration
from trainer.recalibrate import scored_with_labels


def ages(scored: str, labels: str):
    """(predicted, true) ages of the faces in score.py's output folder that the table `labels` has."""
    err, _, true = scored_with_labels(scored, labels, 1.0)
    return err + true, true


def judged(age_map, sets: dict) -> dict:
    """{set: {"mae", "worst_group_bias", "bias_by_age_group"}} of each (predicted, true) set through age_map."""
    out = {}
    for name, (predicted, true) in sets.items():
        err = calibration.map_ages(predicted, age_map).astype(np.float64) - true
        bias = calibration.bias_by_age_group(err, true)
        out[name] = {"mae": round(float(np.abs(err).mean()), 3), "worst_group_bias": max(bias.values(), key=abs),
                     "bias_by_age_group": bias}
    return out


def variants(val_pred, val_true):
    """(name, age map) of every variant, fitted on val."""
    yield "no map", None
    for margin in (0.0, 0.5, 1.0):
        name = f"lowest-MAE map, goal less {margin:g} SE" + (" (the trainer's)" if margin == calibration.MARGIN_SE
                                                             else "")
        yield name, calibration.fit_age_map(val_pred, val_true, margin_se=margin)
    for min_bin in (25, 100):
        inverse = calibration.fit_inverse_map(val_pred, val_true, min_bin=min_bin)
        chosen = calibration.choose_strength(val_pred, val_true, inverse)
        yield f"inverse, bins of {min_bin}, strength chosen on val ({chosen:g})", {**inverse, "strength": chosen}
        for strength in (1.0, 0.75, 0.5, 0.25):
            yield f"inverse, bins of {min_bin}, strength {strength:g}", {**inverse, "strength": strength}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--val", required=True, help="score.py output of the val split (a bundle without an age map)")
    p.add_argument("--test", required=True, help="score.py output of the test split (the same bundle)")
    p.add_argument("--labels", required=True, help="the prepared table (its faces' ages)")
    p.add_argument("--aaf", help="score.py output of All-Age-Faces photos (the same bundle)")
    p.add_argument("--aaf-labels", help="the All-Age-Faces table prepared with the detector on (its ages)")
    args = p.parse_args()
    val_pred, val_true = ages(args.val, args.labels)
    sets = {"val": (val_pred, val_true), "test": ages(args.test, args.labels)}
    if args.aaf:
        sets["aaf"] = ages(args.aaf, args.aaf_labels or args.labels)
    results = {name: judged(age_map, sets) for name, age_map in variants(val_pred, val_true)}
    print(json.dumps({"faces": {k: int(v[1].size) for k, v in sets.items()}, "variants": results}, indent=1))


if __name__ == "__main__":
    main()
