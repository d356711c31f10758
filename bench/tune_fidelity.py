"""Issue 24 item 6: the tuner against the recipe's own flags, at a fidelity closer to the recipe than issue 11's
(32 px, 3 epochs on 4,000 rows, then re-trained at 64 px for 6 epochs).

Every run here is make recipe's training (the Makefile's RECIPE_TRAIN: 80 px, OneCycle planned over --max-minutes,
the distribution head, the age map fitted on val, flip TTA) on a seeded sample of the train and val splits, in a
short wall-clock budget (--minutes). The study (trainer.tune --space onecycle: peak rate, weight decay, batch size,
augmentation strength, head, EMA; TPE, Median pruner) runs its trials in the same budget, with the recipe's flags
as the fixed ones. Its best trial's values (chosen by val MAE) are then trained again for every seed, and both the
recipe and the tuned flags are judged on the table's WHOLE test split (never seen by the search) and, with --aaf,
on All-Age-Faces' crops (bench.shift_data.evaluate, flip TTA). The search ranks trials by their best epoch's val
MAE, before the age map is fitted, so test MAE is reported both as shipped and without the map. Runs and the study
are kept: the script resumes.

    python -m bench.tune_fidelity --data out/utkface_parquet --aaf out/aaf_parquet --work <scratch> \\
        --train-rows 6000 --val-rows 1000 --minutes 5 --trials 8 --seeds 0 1
    python -m bench.tune_fidelity ... --report          # the table from what has run
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from pathlib import Path
from typing import Callable

from bench.common import as_flags, copy_splits, machine, run_python
from bench.recipe_ablation import record, recipe_flags, train
from schemas import layout


def table(args) -> str:
    """WORK/data: --train-rows and --val-rows sampled (seed 0), the whole test split."""
    data = Path(args.work) / "data"
    if not (data / layout.FACES_DIR / "_SUCCESS").exists():
        copy_splits(args.data, data, {"train": args.train_rows, "val": args.val_rows, "test": None})
    return str(data)


def study(args, data: str) -> dict:
    """The study at the runs' budget (seeded with the first seed); its report."""
    out = Path(args.work) / "study"
    if not (out / layout.TUNE_REPORT).exists():
        print(f"{time.strftime('%H:%M:%S')} tune ({args.trials} trials)", flush=True)
        fixed = recipe_flags() + ["--max-minutes", str(args.minutes), "--seed", str(args.seeds[0])]
        run_python(["-m", "trainer.tune", "--data", data, "--study", "recipe-fidelity", "--output", str(out),
                    "--space", "onecycle", "--sampler", "tpe", "--pruner", "median", "--seed", str(args.seeds[0]),
                    "--n-trials", str(args.trials), "--epochs", "80", "--train-args", shlex.join(fixed)],
                   log=Path(args.work) / "study.log")
    return json.loads((out / layout.TUNE_REPORT).read_text())


def tuned_flags(report: dict, fmt: Callable = str) -> list:
    """The best trial's trainer.train values as flags (added after the recipe's: the last value of a flag wins)."""
    return as_flags({k: v for k, v in report["best"]["train_params"].items() if k != "epochs"}, fmt)


def summarise(args, report: dict) -> dict:
    runs = {name: {seed: record(Path(args.work) / "runs" / f"{name}-s{seed}") for seed in args.seeds
                   if (Path(args.work) / "runs" / f"{name}-s{seed}" / layout.SUMMARY).exists()}
            for name in ("recipe", "tuned")}
    lines = ["| flags | seeds | epochs | test MAE (each) | mean | without the age map (mean) | AAF MAE (mean) | "
             "AAF / test |", "|---" * 8 + "|"]
    means, unmapped_means = {}, {}
    for name, seeds in runs.items():
        rs = [seeds[s] for s in sorted(seeds)]
        if not rs:
            continue
        test = statistics.mean(r["test_mae"] for r in rs)
        aaf = [r["aaf_mae"] for r in rs if r["aaf_mae"] is not None]
        aaf_mean = statistics.mean(aaf) if aaf else None
        means[name] = test
        unmapped = [r["test_mae_unmapped"] for r in rs if r["test_mae_unmapped"] is not None]
        if unmapped:
            unmapped_means[name] = statistics.mean(unmapped)
        lines.append("| " + " | ".join([
            "the recipe's" if name == "recipe" else "tuned: " + " ".join(
                tuned_flags(report, lambda v: "%.4g" % v if isinstance(v, float) else str(v))),
            ",".join(map(str, sorted(seeds))), "/".join(str(r["epochs"]) for r in rs),
            " / ".join("%.2f" % r["test_mae"] for r in rs), "%.2f" % test,
            "%.2f" % statistics.mean(unmapped) if unmapped else "-",
            "%.2f" % aaf_mean if aaf_mean else "-", "%.2f" % (aaf_mean / test) if aaf_mean else "-"]) + " |")
    def below(m):  # the tuned flags' MAE below the recipe's, as a fraction of the recipe's (None: not both yet)
        return 1 - m["tuned"] / m["recipe"] if len(m) == 2 else None

    return {"date": time.strftime("%Y-%m-%d"), "machine": machine("CPU"), "data": args.data, "aaf": args.aaf,
            "rows": {"train": args.train_rows, "val": args.val_rows, "test": "all"}, "minutes": args.minutes,
            "recipe": recipe_flags(), "study": {k: report[k] for k in ("trials", "wall_seconds", "best", "all")},
            "runs": runs, "tuned_below_recipe": below(means), "tuned_below_recipe_unmapped": below(unmapped_means),
            "table": "\n".join(lines)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the recipe's prepared UTKFace table (make recipe's RECIPE_DATA)")
    p.add_argument("--aaf", help="the recipe's prepared All-Age-Faces table (make recipe's AAF_DATA)")
    p.add_argument("--work", default="/tmp/faceage-tune-fidelity", help="scratch folder (never inside the repository)")
    p.add_argument("--train-rows", type=int, default=6000)
    p.add_argument("--val-rows", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=5.0, help="every run's and trial's --max-minutes")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--report", action="store_true", help="only the table, from what has run")
    args = p.parse_args()
    if not args.report:
        data = table(args)
        for seed in args.seeds:
            train(args, "recipe", seed, data, changes=[])
        report = study(args, data)
        for seed in args.seeds:
            train(args, "tuned", seed, data, changes=tuned_flags(report))
    study_report = Path(args.work) / "study" / layout.TUNE_REPORT
    if not study_report.exists():
        p.exit(2, f"{study_report}: no study has finished in --work yet (run without --report first)\n")
    result = summarise(args, json.loads(study_report.read_text()))
    (Path(args.work) / layout.SUMMARY).write_text(json.dumps(result, indent=2, default=str))
    print(result["table"])
    for key, what in (("tuned_below_recipe", "as shipped"), ("tuned_below_recipe_unmapped", "without the age map")):
        if result[key] is not None:
            print(f"the tuned flags' test MAE ({what}) is {100 * result[key]:.1f} % below the recipe's flags' "
                  "(mean of the seeds; negative: above)")


if __name__ == "__main__":
    main()
