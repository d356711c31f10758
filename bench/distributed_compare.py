"""Benchmark: 2-rank training through TorchDistributor (gloo, CPU) vs single-process training on the same
data, same epochs, same global batch (2 x 32 vs 64), several seeds: test MAE and wall time.

CPU-sized: bench/tune_compare.py's seeded subset of a prepared table at 64 px.

    python bench/distributed_compare.py --data /tmp/utk/parquet --epochs 4 --seeds 0 1
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--work", default="/tmp/faceage-distributed-bench")
    p.add_argument("--train-rows", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    work = Path(args.work)
    table = work / "data"
    subset(args.data, table, {"train": args.train_rows, "val": 400, "test": 800})
    runs = {"single": [], "two_ranks": []}
    for seed in args.seeds:
        for name, flags in (("single", ["--batch-size", "64"]),
                            ("two_ranks", ["--batch-size", "32", "--distributor", "spark", "--num-processes", "2"])):
            out = work / f"{name}-{seed}"
            start = time.time()
            env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
            proc = subprocess.run([sys.executable, "-m", "trainer.train", "--data", str(table), "--output", str(out),
                                   "--epochs", str(args.epochs), "--image-size", "64", "--seed", str(seed),
                                   "--early-stop", "1000", "--no-progress", *flags], cwd=REPO, env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            summary = json.loads((out / "summary.json").read_text())
            runs[name].append({"seed": seed, "test_mae": round(summary["test_mae"], 3),
                               "best_val_mae": round(summary["best_val_mae"], 3),
                               "seconds": round(time.time() - start, 1)})
    import torch

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__} (CPU, gloo)",
        "train_rows": args.train_rows, "epochs": args.epochs, "image_size": 64,
        "runs": runs,
        "test_mae_mean": {k: round(statistics.mean(r["test_mae"] for r in v), 3) for k, v in runs.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
