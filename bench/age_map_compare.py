"""The age map's variants, fitted on one split's predictions and judged on others' (issue 24, item 3): no map;
the trainer's map (trainer.calibration.fit_age_map: the lowest val MAE within the bias goal less 0 / 0.5 / 1
standard errors); the inverse map (fit_inverse_map) in bins of 25 or 100 faces, at strengths 1 ... 0 and at the
smallest strength meeting the goal on val (choose_strength, the trainer's rule before 2026-12-04); the trainer's
map without its limit on the val MAE cost (trainer.calibration.MAX_MAP_COST, the rule before 2026-12-05). Reads
score.py's predictions of a bundle WITHOUT an age map (python -m trainer.recalibrate --drop age_map) for the val
and test splits (and, with --aaf, All-Age-Faces photos) and the prepared tables' labels, or predicts them here
with --bundle (its age map left off, its TTA on) from prepared tables; prints MAE and bias by true-age group on
each, and the goal each map met on val.

    python -m bench.age_map_compare --val VAL_SCORED --test TEST_SCORED --labels out/utkface_parquet \\
        [--aaf AAF_SCORED --aaf-labels out/aaf_parquet]
    python -m bench.age_map_compare --bundle runs/train/model.pt --labels out/utkface_parquet \\
        [--aaf-labels out/aaf_parquet]
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


def bundle_ages(bundle: str, table: str, splits) -> tuple:
    """(predicted, true) ages of the rows of `splits` of a prepared table, by `bundle` without its age map (with
    the TTA it was calibrated with), predicted here on CPU."""
    from bench.common import raw_ages, split_pixels
    from trainer.bundle import Predictor

    predictor = Predictor(bundle)
    pixels, true = split_pixels(table, splits, predictor.size)
    raw, _ = raw_ages(predictor, pixels)  # in the TTA mode its calibration was fitted under
    return raw, true


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
    yield "lowest-MAE map, no limit on its val MAE cost (the trainer's until 2026-12-05)", \
        calibration.fit_age_map(val_pred, val_true, max_cost=None)
    for min_bin in (25, 100):
        inverse = calibration.fit_inverse_map(val_pred, val_true, min_bin=min_bin)
        chosen = calibration.choose_strength(val_pred, val_true, inverse)
        yield f"inverse, bins of {min_bin}, strength chosen on val ({chosen:g})", {**inverse, "strength": chosen}
        for strength in (1.0, 0.75, 0.5, 0.25):
            yield f"inverse, bins of {min_bin}, strength {strength:g}", {**inverse, "strength": strength}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--val", help="score.py output of the val split (a bundle without an age map)")
    p.add_argument("--test", help="score.py output of the test split (the same bundle)")
    p.add_argument("--bundle", help="instead of --val/--test/--aaf: predict the tables' faces with this bundle")
    p.add_argument("--labels", required=True, help="the prepared table (its faces' ages)")
    p.add_argument("--aaf", help="score.py output of All-Age-Faces photos (the same bundle)")
    p.add_argument("--aaf-labels", help="the All-Age-Faces table prepared with the detector on (its ages)")
    args = p.parse_args()
    if args.bundle:
        sets = {split: bundle_ages(args.bundle, args.labels, (split,)) for split in ("val", "test")}
        if args.aaf_labels:
            sets["aaf"] = bundle_ages(args.bundle, args.aaf_labels, ("train", "val", "test"))
    elif args.val and args.test:
        sets = {"val": ages(args.val, args.labels), "test": ages(args.test, args.labels)}
        if args.aaf:
            sets["aaf"] = ages(args.aaf, args.aaf_labels or args.labels)
    else:
        p.error("give --bundle, or --val and --test (score.py outputs)")
    val_pred, val_true = sets["val"]
    results = {name: {**judged(age_map, sets), "bias_goal_on_val": (age_map or {}).get("bias_goal")}
               for name, age_map in variants(val_pred, val_true)}
    print(json.dumps({"faces": {k: int(v[1].size) for k, v in sets.items()}, "variants": results}, indent=1))


if __name__ == "__main__":
    main()
