"""Benchmark: 2-rank training through TorchDistributor (gloo, CPU) vs single-process training on the same
data, same epochs, same global batch (2 x 32 vs 64), several seeds: test MAE and wall time.

CPU-sized: a seeded subset (bench.common.copy_splits) of a prepared table at 64 px.

    python -m bench.distributed_compare --data /tmp/utk/parquet --epochs 4 --seeds 0 1
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from schemas import layout
from bench.common import comparison_parser, machine, run_python, subset_table


def main():
    args = comparison_parser(__doc__.splitlines()[0], "/tmp/faceage-distributed-bench", train_rows=1500,
                             epochs=4).parse_args()
    work, table = Path(args.work), subset_table(args)
    runs = {"single": [], "two_ranks": []}
    for seed in args.seeds:
        for name, launcher, flags in (("single", ["-m", "trainer.train"], ["--batch-size", "64"]),
                                      ("two_ranks", ["spark_jobs/distributed.py", "train", "--num-processes", "2"],
                                       ["--batch-size", "32"])):
            out = work / f"{name}-{seed}"
            seconds = run_python([*launcher, "--data", str(table), "--output", str(out), "--epochs",
                                  str(args.epochs), "--image-size", str(args.image_size), "--seed", str(seed),
                                  "--early-stop", "1000", "--no-progress", *flags])
            summary = json.loads((out / layout.SUMMARY).read_text())
            runs[name].append({"seed": seed, "test_mae": round(summary["test_mae"], 3),
                               "best_val_mae": round(summary["best_val_mae"], 3),
                               "seconds": round(seconds, 1)})
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine("CPU, gloo"),
        "train_rows": args.train_rows, "epochs": args.epochs, "image_size": args.image_size,
        "runs": runs,
        "test_mae_mean": {k: round(statistics.mean(r["test_mae"] for r in v), 3) for k, v in runs.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
