"""Benchmark: the default trainer config vs TPE after N trials vs random search with the same N trials, each
over several seeds, on the same split and epoch budget (test MAE of the trial best by val MAE, mean +- std);
and TPE with vs without the Median pruner (wall time, trials pruned).

CPU-sized: a seeded subset of a prepared table (train/val/test rows as given), 64 px, few epochs. Say so
when quoting the numbers.

    python bench/tune_compare.py --data /tmp/utk/parquet --work /tmp/faceage-tune-bench \\
        --train-rows 800 --val-rows 300 --test-rows 800 --trials 6 --epochs 3 --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas import layout  # noqa: E402
from trainer import data as D  # noqa: E402


def subset(data: str, out: Path, rows: dict, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(out, ignore_errors=True)
    for split, n in rows.items():
        source = D.split_source(data, split)
        table = pa.concat_tables(pq.read_table(layout.local_path(f)) for f in source.files)
        keep = np.sort(np.random.default_rng(seed).permutation(table.num_rows)[:n])
        folder = out / "faces" / f"split={split}"
        folder.mkdir(parents=True)
        pq.write_table(table.take(pa.array(keep)), folder / "part-0.parquet", row_group_size=128)
    (out / "faces" / "_SUCCESS").write_text("")
    manifest = layout.local_path(layout.join(data.rstrip("/"), layout.LATEST_MANIFEST))
    if manifest and os.path.exists(manifest):
        shutil.copy(manifest, out / layout.LATEST_MANIFEST)


def run(cmd) -> float:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.time() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--work", default="/tmp/faceage-tune-bench")
    p.add_argument("--train-rows", type=int, default=800)
    p.add_argument("--val-rows", type=int, default=300)
    p.add_argument("--test-rows", type=int, default=800)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    work = Path(args.work)
    table = work / "data"
    subset(args.data, table, {"train": args.train_rows, "val": args.val_rows, "test": args.test_rows})
    fixed = f"--image-size {args.image_size} --workers 2"
    results = {"default": [], "tpe": [], "random": []}
    seconds = {"default": [], "tpe": [], "random": []}
    pruned = {"tpe": [], "random": []}
    for seed in args.seeds:
        out = work / f"default-{seed}"
        seconds["default"].append(run(["trainer.train", "--data", str(table), "--output", str(out), "--epochs",
                                       str(args.epochs), "--seed", str(seed), "--no-progress", *fixed.split()]))
        results["default"].append(json.loads((out / "summary.json").read_text())["test_mae"])
        for sampler in ("tpe", "random"):
            out = work / f"{sampler}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            seconds[sampler].append(run(["trainer.tune", "--data", str(table), "--study", f"{sampler}-{seed}",
                                         "--output", str(out), "--n-trials", str(args.trials), "--epochs",
                                         str(args.epochs), "--sampler", sampler, "--seed", str(seed),
                                         "--train-args", f"{fixed} --seed {seed}"]))
            report = json.loads((out / "report.json").read_text())
            results[sampler].append(report["best"]["test_mae"])
            pruned[sampler].append(report["trials"]["pruned"])
    # the pruner's saving: TPE, first seed, without pruning
    out = work / "tpe-nopruner"
    shutil.rmtree(out, ignore_errors=True)
    nopruner_s = run(["trainer.tune", "--data", str(table), "--study", "tpe-nopruner", "--output", str(out),
                      "--n-trials", str(args.trials), "--epochs", str(args.epochs), "--sampler", "tpe",
                      "--pruner", "none", "--seed", str(args.seeds[0]),
                      "--train-args", f"{fixed} --seed {args.seeds[0]}"])
    nopruner = json.loads((out / "report.json").read_text())

    def stat(values):
        return {"mean": round(statistics.mean(values), 3),
                "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
                "runs": [round(v, 3) for v in values]}

    import torch

    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__} (CPU)",
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
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
