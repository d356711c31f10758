"""Benchmark: flip test-time augmentation vs none, the same model on the same split (MAE, CS@5, seconds).

With --views, TTA beyond the flip: the bundle's MAE (no age map) when its predicted age distributions are averaged
over more views of each crop, zooms (trainer.augment's scale) and shifts, each with its mirror. The views are
trainer.augment.apply with fixed parameters and no colour change: the warp the model saw in training. The
distribution head only (its views' probabilities are averaged, as trainer.model.predict_ages averages the flip's).

    python -m bench.tta_compare --model runs/utk/model.pt --data /tmp/utk/parquet --split test
    python -m bench.tta_compare --model runs/recipe/train/model.pt --data out/utkface_parquet --split val --views
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.common import machine, raw_ages, split_pixels
from trainer.runtime import TTA_ZOOMS

# name -> (views, mirrored): views are (scale, horizontal shift as a fraction of the side); mirrored: each view
# also runs mirrored, its distribution averaged with the others
VIEW_SETS = {
    "none": ([(1.0, 0.0)], False),
    "flip (the project's TTA)": ([(1.0, 0.0)], True),
    "flip x zoom 1.07": ([(1.0, 0.0), (1.07, 0.0)], True),
    "flip x zoom 0.93": ([(1.0, 0.0), (0.93, 0.0)], True),
    "flip x zooms 0.93, 1.07": ([(1.0, 0.0), (0.93, 0.0), (1.07, 0.0)], True),
    "flip x shifts -0.04, 0.04": ([(1.0, 0.0), (1.0, -0.04), (1.0, 0.04)], True),
}


def view_probs(predictor, pixels: np.ndarray, views, batch_size: int) -> dict:
    """{(scale, shift, mirrored): N x ages probabilities} of every view of `pixels`."""
    import torch

    from trainer import augment

    out = {}
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            x = torch.from_numpy(pixels[i:i + batch_size]).permute(0, 3, 1, 2)
            n = len(x)
            for scale, shift in views:
                for mirrored in (False, True):
                    params = {"scale": torch.full((n,), scale), "shift": torch.tensor([[shift, 0.0]]).repeat(n, 1),
                              "flip": torch.full((n,), mirrored), "brightness": torch.ones(n),
                              "contrast": torch.ones(n), "saturation": torch.ones(n)}
                    v = (augment.apply(x, params).to(predictor.device) / 255.0 - predictor.mean) / predictor.std
                    probs = torch.softmax(predictor.model(v).float(), dim=1).cpu()
                    out.setdefault((scale, shift, mirrored), []).append(probs)
    return {k: torch.cat(v) for k, v in out.items()}


def views_table(predictor, pixels: np.ndarray, ages: np.ndarray, batch_size: int) -> dict:
    """{view set: {"passes", "mae"}} of VIEW_SETS (raw ages: no age map), and the seconds all views took."""
    import torch

    from trainer.model import decode

    if predictor.head != "distribution":
        raise SystemExit(f"--views: the bundle's head is {predictor.head!r}; the views average distributions")
    start = time.time()
    probs = view_probs(predictor, pixels, sorted({v for vs, _ in VIEW_SETS.values() for v in vs}), batch_size)
    table = {"seconds_all_views": round(time.time() - start, 1)}
    for name, (views, mirrored) in VIEW_SETS.items():
        keys = [(s, d, m) for s, d in views for m in ((False, True) if mirrored else (False,))]
        mean = sum(probs[k] for k in keys) / len(keys)
        predicted, _ = decode(torch.log(mean.clamp_min(1e-12)), "distribution")
        table[name] = {"passes": len(keys),
                       "mae": round(float(np.abs(predicted.numpy().astype(np.float64) - ages).mean()), 4)}
    # the product's TTA mode (trainer.runtime.TTA_ZOOMS; zooms as one matrix) should repeat its row above
    product, _ = raw_ages(predictor, pixels, "flip-zoom", batch_size)
    table["--tta flip-zoom (score, predict, serve, ONNX)"] = {"passes": 2 * len(TTA_ZOOMS["flip-zoom"]),
                                                             "mae": round(float(np.abs(product - ages).mean()), 4)}
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a prepare output")
    p.add_argument("--split", default="test", help="a split, or several joined by commas (e.g. train,val,test)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--views", action="store_true", help="TTA beyond the flip (VIEW_SETS), no age map")
    args = p.parse_args()

    from trainer.bundle import Predictor

    predictor = Predictor(args.model, "cpu")
    pixels, ages = split_pixels(args.data, args.split.split(","), predictor.size)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine("CPU"), "model": args.model,
              "data": args.data, "split": args.split, "rows": int(len(ages))}
    if args.views:
        result["views"] = views_table(predictor, pixels, ages, args.batch_size)
        print(json.dumps(result, indent=2))
        return
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
