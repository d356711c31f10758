"""Benchmark: flip test-time augmentation vs none, the same model on the same split (MAE, CS@5, seconds).

    python -m bench.tta_compare --model runs/utk/model.pt --data /tmp/utk/parquet --split test
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.common import machine, split_pixels


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a prepare output")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()

    from trainer.bundle import Predictor

    predictor = Predictor(args.model, "cpu")
    pixels, ages = split_pixels(args.data, [args.split], predictor.size)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine("CPU"), "model": args.model,
              "data": args.data, "split": args.split, "rows": int(len(ages))}
    for tta in ("none", "flip"):
        start = time.time()
        predicted, _ = predictor.predict(pixels, args.batch_size, tta)
        err = predicted.astype(np.float64) - ages
        result[tta] = {"mae": round(float(np.abs(err).mean()), 4), "cs5": round(float((np.abs(err) <= 5).mean()), 4),
                       "seconds": round(time.time() - start, 2)}
    result["flip_vs_none_mae"] = round(result["flip"]["mae"] / result["none"]["mae"], 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
