"""Benchmark: the default trainer config vs TPE after N trials vs random search with the same N trials, each
over several seeds, on the same split and epoch budget (test MAE of the trial best by val MAE, mean +- std);
and TPE with vs without the Median pruner (wall time, trials pruned).

CPU-sized: a seeded subset of a prepared table (train/val/test rows as given), 64 px, few epochs. Say so
when quoting the numbers.

    python -m bench.tune_compare --data /tmp/utk/parquet --work /tmp/faceage-tune-bench \\
        --train-rows 800 --val-rows 300 --test-rows 800 --trials 6 --epochs 3 --seeds 0 1
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from schemas import layout
from bench.common import comparison_parser, machine, run_python, subset_table


def run(cmd) -> float:
    return run_python(["-m", *cmd])


def main():
    p = comparison_parser(__doc__.splitlines()[0], "/tmp/faceage-tune-bench", train_rows=800, epochs=3)
    p.set_defaults(val_rows=300)
    p.add_argument("--trials", type=int, default=6)
    args = p.parse_args()
    work, table = Path(args.work), subset_table(args)
    fixed = f"--image-size {args.image_size} --workers 2"
    results = {"default": [], "tpe": [], "random": []}
    seconds = {"default": [], "tpe": [], "random": []}
    pruned = {"tpe": [], "random": []}
    for seed in args.seeds:
        out = work / f"default-{seed}"
        seconds["default"].append(run(["trainer.train", "--data", str(table), "--output", str(out), "--epochs",
                                       str(args.epochs), "--seed", str(seed), "--no-progress", *fixed.split()]))
        results["default"].append(json.loads((out / layout.SUMMARY).read_text())["test_mae"])
        for sampler in ("tpe", "random"):
            out = work / f"{sampler}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            seconds[sampler].append(run(["trainer.tune", "--data", str(table), "--study", f"{sampler}-{seed}",
                                         "--output", str(out), "--n-trials", str(args.trials), "--epochs",
                                         str(args.epochs), "--sampler", sampler, "--seed", str(seed),
                                         "--train-args", f"{fixed} --seed {seed}"]))
            report = json.loads((out / layout.TUNE_REPORT).read_text())
            results[sampler].append(report["best"]["test_mae"])
            pruned[sampler].append(report["trials"]["pruned"])
    # the pruner's saving: TPE, first seed, without pruning
    out = work / "tpe-nopruner"
    shutil.rmtree(out, ignore_errors=True)
    nopruner_s = run(["trainer.tune", "--data", str(table), "--study", "tpe-nopruner", "--output", str(out),
                      "--n-trials", str(args.trials), "--epochs", str(args.epochs), "--sampler", "tpe",
                      "--pruner", "none", "--seed", str(args.seeds[0]),
                      "--train-args", f"{fixed} --seed {args.seeds[0]}"])
    nopruner = json.loads((out / layout.TUNE_REPORT).read_text())

    def stat(values):
        return {"mean": round(statistics.mean(values), 3),
                "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
                "runs": [round(v, 3) for v in values]}

    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine("CPU"),
        "data": {"source": args.data, "train": args.train_rows, "val": args.val_rows, "test": args.test_rows,
                 "image_size": args.image_size},
        "budget": {"trials": args.trials, "epochs_per_run": args.epochs, "seeds": args.seeds},
        "test_mae": {k: stat(v) for k, v in results.items()},
        "seconds": {k: round(sum(v), 1) for k, v in seconds.items()},
        "tpe_vs_default": round(1 - statistics.mean(results["tpe"]) / statistics.mean(results["default"]), 3),
        "random_vs_default": round(1 - statistics.mean(results["random"]) / statistics.mean(results["default"]), 3),
        "pruned_trials": pruned,
        "pruner": {"with_median_pruner_seconds": round(seconds["tpe"][0], 1),
                   "with_median_pruner_pruned": pruned["tpe"][0],
                   "without_pruner_seconds": round(nopruner_s, 1),
                   "without_pruner_best_val_mae": nopruner["best"]["val_mae"],
                   "without_pruner_test_mae": nopruner["best"]["test_mae"]},
    }
    (work / layout.SUMMARY).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
