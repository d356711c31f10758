"""Benchmark: CyclicLR + ReduceLROnPlateau (the default schedule) vs a constant learning rate, same split,
same epoch budget, several seeds: best val MAE, test MAE, and the epoch / seconds at which each run first
reached the constant-LR run's best val MAE (the seed's "training efficiency" claim, measured).

CPU-sized: a seeded subset of a prepared table at 64 px (bench.common.copy_splits). The GPU version of
this comparison at 128 px is part 2 of bench/gpu_train.sh.

    python -m bench.schedule_compare --data /tmp/utk/parquet --train-rows 1500 --epochs 8 --seeds 0 1
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from schemas import layout
from bench.common import comparison_parser, machine, run_python, subset_table

RUNS = {"cyclic_plateau": ["--schedule", "cyclic_plateau", "--lr", "3e-3"],
        "constant": ["--schedule", "constant", "--lr", "1e-3"]}


def main():
    args = comparison_parser(__doc__.splitlines()[0], "/tmp/faceage-schedule-bench", train_rows=1500,
                             epochs=8).parse_args()
    work, table = Path(args.work), subset_table(args)
    out = {name: [] for name in RUNS}
    for seed in args.seeds:
        for name, flags in RUNS.items():
            folder = work / f"{name}-{seed}"
            run_python(["-m", "trainer.train", "--data", str(table), "--output", str(folder), "--epochs",
                        str(args.epochs), "--early-stop", "1000", "--image-size", str(args.image_size),
                        "--batch-size", "64", "--seed", str(seed), "--no-progress", *flags])
            summary = json.loads((folder / layout.SUMMARY).read_text())
            history = [json.loads(line) for line in (folder / layout.METRICS_LOG).read_text().splitlines()]
            out[name].append({"seed": seed, "best_val_mae": summary["best_val_mae"], "test_mae": summary["test_mae"],
                              "history": [(h["epoch"], h["val_mae"], h["elapsed_seconds"]) for h in history]})
    reach = []
    for cyc, const in zip(out["cyclic_plateau"], out["constant"]):
        target = const["best_val_mae"]
        first = lambda hist: next(((e, round(s, 1)) for e, v, s in hist if v <= target), None)  # noqa: E731
        reach.append({"seed": cyc["seed"], "constant_best_val_mae": round(target, 3),
                      "constant_reached_at": first(const["history"]), "cyclic_reached_at": first(cyc["history"])})
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine("CPU"),
        "data": {"source": args.data, "train": args.train_rows, "val": args.val_rows, "test": args.test_rows,
                 "image_size": args.image_size},
        "epochs": args.epochs, "seeds": args.seeds,
        **{f"{name}_test_mae": {"mean": round(statistics.mean(r["test_mae"] for r in runs), 3),
                                "runs": [round(r["test_mae"], 3) for r in runs]} for name, runs in out.items()},
        **{f"{name}_best_val_mae": [round(r["best_val_mae"], 3) for r in runs] for name, runs in out.items()},
        "reach_constant_best": reach,
    }
    (work / layout.SUMMARY).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
