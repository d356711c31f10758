"""Issue 11's full-data experiments on one machine, at one epoch budget: ablations (schedule, head, augmentation,
best-epoch choice) and the seed's two claims (cyclic LR + plateau cuts vs OneCycle vs a constant rate; default vs
TPE vs random search, multi-fidelity), each run scored on the table's own test split and on the two shifted
test sets of bench.shift_data.

Every run trains on ALL train rows of --data (e.g. the whole of UTKFace prepared at 128 px) at --image-size with
--cache, early stopping off; runs whose summary.json exists are kept (the script resumes). Tuning: studies on a
seeded subset at low resolution (the cheap fidelity, pruned by val MAE), the best trial's values re-trained at
the full budget.

    python -m bench.full_scale --data <prepared UTKFace> --work <scratch>/fullscale --shift <scratch>/shift --epochs 6
    python -m bench.full_scale ... --report          # tables from what has run (markdown + summary.json)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from schemas import layout
from bench.common import as_flags, copy_splits, machine, run_python

# name -> trainer.train flags (the rest are shared). cyclic_dist is the trainer's default before issue 11.
ONECYCLE_REG = ["--schedule", "onecycle", "--lr", "3e-3", "--head", "regression"]
RUNS = {
    "cyclic_dist": ["--schedule", "cyclic_plateau", "--lr", "3e-3", "--head", "distribution"],
    "onecycle_dist": ["--schedule", "onecycle", "--lr", "3e-3", "--head", "distribution"],
    "constant_dist": ["--schedule", "constant", "--lr", "1e-3", "--head", "distribution"],
    "onecycle_reg": ONECYCLE_REG,
    "onecycle_reg_noaug": ONECYCLE_REG + ["--augment", "0"],
    "onecycle_reg_ema": ONECYCLE_REG + ["--ema", "0.998"],
    # progressive resizing: the first epochs at --image-size, the last 2 at 112 px (the bundle's size)
    "onecycle_reg_prog112": ONECYCLE_REG + ["--start-size", "{size}", "--image-size", "112", "--final-epochs", "2"],
}
# the schedule claim's runs first (their seconds are compared), the head, the tuning claim, then one-seed ablations;
# "tune:S" is a study with sampler S and its full-budget retrain
QUEUE = [("onecycle_dist", 0), ("cyclic_dist", 0), ("constant_dist", 0), ("cyclic_dist", 1), ("constant_dist", 1),
         ("onecycle_dist", 1), ("onecycle_reg", 0), ("onecycle_reg", 1), ("tune:tpe", 0), ("tune:random", 0),
         ("tune:tpe", 1), ("tune:random", 1), ("onecycle_reg_noaug", 0), ("onecycle_reg_ema", 0),
         ("onecycle_reg_prog112", 0)]


def shared_flags(args, seed: int) -> list:
    return ["--data", args.data, "--image-size", str(args.image_size), "--epochs", str(args.epochs),
            "--batch-size", "128", "--cache", "--early-stop", "1000", "--no-progress", "--seed", str(seed)]


def train(args, folder: Path, flags: list, seed: int) -> None:
    if (folder / layout.SUMMARY).exists():
        return
    log = folder.with_suffix(".log")
    print(f"{time.strftime('%H:%M:%S')} train {folder.name}", flush=True)
    run_python(["-m", "trainer.train", "--output", str(folder), *shared_flags(args, seed), *flags], log=log)
    shifted(args, folder)  # scored on the shifted test sets now: a partial --report needs no more work


def tune(args, seed: int, sampler: str) -> Path:
    """One study on the subset at low resolution; returns the full-budget retrain's folder."""
    from trainer.tune import train_params

    work = Path(args.work)
    subset = work / "tune" / "subset"
    if not (subset / "faces" / "_SUCCESS").exists():
        copy_splits(args.data, subset, {"train": args.tune_train_rows, "val": args.tune_val_rows, "test": 500})
    study = work / "tune" / f"{sampler}-s{seed}"
    if not (study / layout.TUNE_REPORT).exists():
        print(f"{time.strftime('%H:%M:%S')} tune {study.name}", flush=True)
        run_python(["-m", "trainer.tune", "--data", str(subset), "--study", study.name, "--output", str(study),
                    "--n-trials", str(args.trials), "--epochs", str(args.tune_epochs), "--sampler", sampler,
                    "--seed", str(seed), "--train-args",
                    f"--image-size {args.tune_image_size} --cache --no-progress --seed {seed}"],
                   log=study.with_suffix(".log"))
    report = json.loads((study / layout.TUNE_REPORT).read_text())
    # the best values mapped for the FULL train split (the cycle length is counted in batches)
    rows = json.loads((work / "runs" / f"cyclic_dist-s{seed}" / layout.SUMMARY).read_text())["rows"]["train"]
    params = train_params(report["best"]["params"], rows)
    flags = as_flags(params)
    folder = work / "runs" / f"{sampler}-s{seed}"
    train(args, folder, flags, seed)
    return folder


def shifted(args, folder: Path) -> dict:
    from bench.shift_data import evaluate

    cache = folder / "shift.json"
    if cache.exists():
        return json.loads(cache.read_text())
    out = {kind: evaluate(str(folder / layout.MODEL), str(Path(args.shift) / f"{kind}_table"))
           for kind in ("pasted", "degraded") if (Path(args.shift) / f"{kind}_table").exists()}
    cache.write_text(json.dumps(out))
    return out


def run_record(args, folder: Path) -> dict:
    summary = json.loads((folder / layout.SUMMARY).read_text())
    shift = shifted(args, folder)
    history = [json.loads(line) for line in (folder / layout.METRICS_LOG).read_text().splitlines()]
    best_epoch = min(history, key=lambda h: h["val_mae"])["epoch"]
    return {"test_mae": summary["test_mae"], "test_cs5": summary["test_cs5"], "best_val_mae": summary["best_val_mae"],
            "best_epoch": best_epoch, "last_val_mae": history[-1]["val_mae"], "epochs": len(history),
            "seconds": round(sum(h["epoch_seconds"] for h in history), 1),
            "curve": [(h["epoch"], round(h["val_mae"], 3), round(h["elapsed_seconds"], 1)) for h in history],
            **{f"{k}_mae": v["mae"] for k, v in shift.items()}, **{f"{k}_bias": v["bias"] for k, v in shift.items()}}


def mean(values):
    values = [v for v in values if v is not None]
    return round(statistics.mean(values), 3) if values else None


def report(args) -> dict:
    work = Path(args.work)
    runs = {}
    for folder in sorted((work / "runs").glob("*-s*")):
        if folder.is_dir() and (folder / layout.SUMMARY).exists():
            name, seed = folder.name.rsplit("-s", 1)
            runs.setdefault(name, {})[int(seed)] = run_record(args, folder)
    lines = ["| run | seeds | test MAE (each) | mean | CS@5 | pasted MAE | degraded MAE | pasted / test | "
             "best epoch | val MAE best / last | train s |", "|---" * 11 + "|"]
    for name, seeds in runs.items():
        rs = [seeds[s] for s in sorted(seeds)]
        m = mean(r["test_mae"] for r in rs)
        pasted, degraded = mean(r.get("pasted_mae") for r in rs), mean(r.get("degraded_mae") for r in rs)
        each = " / ".join("%.2f" % r["test_mae"] for r in rs)
        epochs = " / ".join(str(r["best_epoch"]) for r in rs)
        vals = " / ".join("%.2f→%.2f" % (r["best_val_mae"], r["last_val_mae"]) for r in rs)
        secs = " / ".join(str(int(r["seconds"])) for r in rs)
        cells = [name, ",".join(map(str, sorted(seeds))), each, "%.2f" % m, "%.3f" % mean(r["test_cs5"] for r in rs),
                 pasted if pasted is not None else "-", degraded if degraded is not None else "-",
                 round(pasted / m, 2) if pasted else "-", epochs, vals, secs]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    reach = []
    for seed, const in runs.get("constant_dist", {}).items():
        target = round(const["best_val_mae"], 3)  # the curves hold val MAEs rounded to 3 digits
        row = {"seed": seed, "constant_best_val_mae": target}
        for name in ("constant_dist", "cyclic_dist", "onecycle_dist"):
            curve = runs.get(name, {}).get(seed, {}).get("curve", [])
            row[name] = next(((e, s) for e, v, s in curve if v <= target), None)
        reach.append(row)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine("CPU, 2 threads"), "data": args.data,
              "epochs": args.epochs, "image_size": args.image_size, "runs": runs, "reach_constant_best": reach,
              "table": "\n".join(lines)}
    (work / layout.SUMMARY).write_text(json.dumps(result, indent=2))
    print(result["table"])
    print(json.dumps(reach, indent=1))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared table (all of UTKFace)")
    p.add_argument("--work", default="/tmp/faceage-full-scale", help="scratch folder (never inside the repository)")
    p.add_argument("--shift", default="/tmp/faceage-shift", help="bench.shift_data's --work")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--tune-epochs", type=int, default=3)
    p.add_argument("--tune-image-size", type=int, default=32)
    p.add_argument("--tune-train-rows", type=int, default=4000)
    p.add_argument("--tune-val-rows", type=int, default=1000)
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these queue entries (e.g. onecycle_reg_ema tune:tpe): a second driver beside a first")
    p.add_argument("--report", action="store_true", help="only the tables, from the runs that finished")
    args = p.parse_args()
    if not args.report:
        for name, seed in QUEUE:
            if seed not in args.seeds or (args.only and name not in args.only):
                continue
            if name.startswith("tune:"):
                tune(args, seed, name.split(":", 1)[1])
            else:
                flags = [f.format(size=args.image_size) for f in RUNS[name]]
                train(args, Path(args.work) / "runs" / f"{name}-s{seed}", flags, seed)
    report(args)


if __name__ == "__main__":
    main()
