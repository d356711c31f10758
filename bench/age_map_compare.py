"""The age map's variants, fitted on one split's predictions and judged on another's (issue 24, item 3): no map,
the full inverse (trainer.calibration.fit_age_map), coarser bins, and partial maps p + s (map(p) - p) of
strength s. Reads score.py's predictions of a bundle WITHOUT an age map (python -m trainer.recalibrate --drop
age_map) for the val and test splits and the prepared table's labels; prints test MAE and bias by true-age group.

    python -m bench.age_map_compare --val VAL_SCORED --test TEST_SCORED --labels out/utkface_parquet
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--val", required=True, help="score.py output of the val split (a bundle without an age map)")
    p.add_argument("--test", required=True, help="score.py output of the test split (the same bundle)")
    p.add_argument("--labels", required=True, help="the prepared table (its faces' ages)")
    args = p.parse_args()
    val_pred, val_true = ages(args.val, args.labels)
    test_pred, test_true = ages(args.test, args.labels)
    results = {}
    for name, min_bin in (("full inverse, bins of 25", 25), ("full inverse, bins of 100", 100)):
        age_map = calibration.fit_age_map(val_pred, val_true, min_bin=min_bin)
        for strength in (1.0, 0.75, 0.5, 0.25, 0.0):
            mapped = calibration.map_ages(test_pred, {**age_map, "strength": strength})
            err = mapped - test_true
            results[f"{name}, strength {strength}"] = {
                "test_mae": round(float(np.abs(err).mean()), 3),
                "worst_group_bias": max(calibration.bias_by_age_group(err, test_true).values(), key=abs),
                "bias_by_age_group": calibration.bias_by_age_group(err, test_true),
                "chosen_on_val": calibration.choose_strength(val_pred, val_true, age_map)}
    print(json.dumps({"val_faces": int(val_true.size), "test_faces": int(test_true.size), "variants": results},
                     indent=1))


if __name__ == "__main__":
    main()
