"""Benchmark: CyclicLR + ReduceLROnPlateau (the default schedule) vs a constant learning rate, same split,
same epoch budget, several seeds: best val MAE, test MAE, and the epoch / seconds at which each run first
reached the constant-LR run's best val MAE (the seed's "training efficiency" claim, measured).

CPU-sized: a seeded subset of a prepared table at 64 px (bench/tune_compare.py's subset). The GPU version of
this comparison at 128 px is part 2 of bench/gpu_train.sh.

    python bench/schedule_compare.py --data /tmp/utk/parquet --train-rows 1500 --epochs 8 --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.tune_compare import subset  # noqa: E402

RUNS = {"cyclic_plateau": ["--schedule", "cyclic_plateau", "--lr", "3e-3"],
        "constant": ["--schedule", "constant", "--lr", "1e-3"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--work", default="/tmp/faceage-schedule-bench")
    p.add_argument("--train-rows", type=int, default=1500)
    p.add_argument("--val-rows", type=int, default=400)
    p.add_argument("--test-rows", type=int, default=800)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    work = Path(args.work)
    table = work / "data"
    subset(args.data, table, {"train": args.train_rows, "val": args.val_rows, "test": args.test_rows})
    out = {name: [] for name in RUNS}
    for seed in args.seeds:
        for name, flags in RUNS.items():
            folder = work / f"{name}-{seed}"
            proc = subprocess.run([sys.executable, "-m", "trainer.train", "--data", str(table), "--output",
                                   str(folder), "--epochs", str(args.epochs), "--early-stop", "1000",
                                   "--image-size", str(args.image_size), "--batch-size", "64", "--seed", str(seed),
                                   "--no-progress", *flags], cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            summary = json.loads((folder / "summary.json").read_text())
            history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            out[name].append({"seed": seed, "best_val_mae": summary["best_val_mae"], "test_mae": summary["test_mae"],
                              "history": [(h["epoch"], h["val_mae"], h["elapsed_seconds"]) for h in history]})
    reach = []
    for cyc, const in zip(out["cyclic_plateau"], out["constant"]):
        target = const["best_val_mae"]
        first = lambda hist: next(((e, round(s, 1)) for e, v, s in hist if v <= target), None)  # noqa: E731
        reach.append({"seed": cyc["seed"], "constant_best_val_mae": round(target, 3),
                      "constant_reached_at": first(const["history"]), "cyclic_reached_at": first(cyc["history"])})
    import torch

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__} (CPU)",
        "data": {"source": args.data, "train": args.train_rows, "val": args.val_rows, "test": args.test_rows,
                 "image_size": args.image_size},
        "epochs": args.epochs, "seeds": args.seeds,
        **{f"{name}_test_mae": {"mean": round(statistics.mean(r["test_mae"] for r in runs), 3),
                                "runs": [round(r["test_mae"], 3) for r in runs]} for name, runs in out.items()},
        **{f"{name}_best_val_mae": [round(r["best_val_mae"], 3) for r in runs] for name, runs in out.items()},
        "reach_constant_best": reach,
    }
    (work / "summary.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
