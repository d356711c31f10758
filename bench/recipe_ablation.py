"""Issue 24's ablations at the recipe's budget: make recipe's training (the Makefile's RECIPE_TRAIN) with one
change at a time, each in the same wall-clock budget, judged on UTKFace's test split (the trainer's own numbers,
flip TTA, after the age map) AND on All-Age-Faces (the recipe's prepared AAF table: the bundle over its crops,
flip TTA, through bench.shift_data.evaluate). Runs whose summary.json exists are kept: the script resumes, so it
can run across sessions.

    python -m bench.recipe_ablation --data out/utkface_parquet --aaf out/aaf_parquet --work /tmp/faceage-ablation \\
        --only recipe aug0 aug025 aug1 ema px64 ageweight --seeds 0
    python -m bench.recipe_ablation ... --only recipe --seeds 1      # the winner's second seed
    python -m bench.recipe_ablation ... --report                    # the table from what has run

--subset-rows N trains on a seeded N-row sample of the train split (a smoke run of the script, not a result).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import List, Optional

from bench.common import REPO, copy_splits, machine, run_python
from schemas import layout

# name -> trainer.train flags added to the recipe's (argparse: the last value of a flag wins)
VARIANTS = {
    "recipe": [],  # 80 px, augmentation strength 0.5, no EMA, --precision auto (RECIPE_TRAIN since 2026-12-04)
    "recipe64": ["--image-size", "64", "--augment", "1.0"],  # the recipe until the 2026-12-04 ablation
    "fp32": ["--precision", "fp32"],  # what auto replaced where the CPU has bf16 instructions
    "ageweight": ["--age-weighting", "sqrt_inv"],  # rare ages weigh more in the loss (against the pull to the mean)
    "aug0": ["--augment", "0"],
    "aug025": ["--augment", "0.25"],
    "aug1": ["--augment", "1.0"],
    "ema": ["--ema", "0.998"],  # with the decay warm-up (default)
    "px64": ["--image-size", "64"],
    "px96": ["--image-size", "96"],  # the upper resolution: fewer epochs fit the budget
}


def recipe_flags(makefile: Path = REPO / "Makefile") -> List[str]:
    """RECIPE_TRAIN as the Makefile sets it (continuation lines joined): the one place the recipe is written."""
    text = makefile.read_text().replace("\\\n", " ")
    found = re.search(r"^RECIPE_TRAIN \?= (.+)$", text, re.M)
    if not found:
        raise SystemExit(f"{makefile}: no RECIPE_TRAIN line")
    return found.group(1).split()


def train(args, name: str, seed: int, data: str, changes: Optional[List[str]] = None) -> Path:
    """The recipe with VARIANTS[name]'s flags (or `changes`) in --minutes, as WORK/runs/NAME-sSEED; kept if done."""
    folder = Path(args.work) / "runs" / f"{name}-s{seed}"
    if not (folder / layout.SUMMARY).exists():
        print(f"{time.strftime('%H:%M:%S')} train {folder.name}", flush=True)
        changes = VARIANTS[name] if changes is None else changes
        flags = recipe_flags() + changes + ["--max-minutes", str(args.minutes), "--seed", str(seed)]
        run_python(["-m", "trainer.train", "--data", data, "--output", str(folder), *flags],
                   log=folder.with_suffix(".log"))
    held_out(args, folder)
    return folder


def held_out(args, folder: Path) -> dict:
    """The bundle on All-Age-Faces' crops (cached beside the run)."""
    from bench.shift_data import evaluate

    cache = folder / "aaf.json"
    if cache.exists():
        return json.loads(cache.read_text())
    result = evaluate(str(folder / layout.MODEL), args.aaf, "flip") if args.aaf else {}
    cache.write_text(json.dumps(result))
    return result


def record(folder: Path) -> dict:
    summary = json.loads((folder / layout.SUMMARY).read_text())
    history = [json.loads(line) for line in (folder / layout.METRICS_LOG).read_text().splitlines()]
    aaf = json.loads((folder / "aaf.json").read_text()) if (folder / "aaf.json").exists() else {}
    return {"test_mae": summary["test_mae"], "test_mae_unmapped": summary.get("test_mae_unmapped"),
            "within_1sd": summary.get("test_within_1sd"), "within_2sd": summary.get("test_within_2sd"),
            "aaf_mae": aaf.get("mae"), "aaf_bias": aaf.get("bias"), "epochs": len(history),
            "precision": summary.get("precision", "fp32"),
            "minutes": round(sum(h["epoch_seconds"] for h in history) / 60, 1)}


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _cell(value, fmt: str = "%.2f") -> str:
    return "-" if value is None else fmt % value


def report(args) -> dict:
    runs = {}
    for folder in sorted((Path(args.work) / "runs").glob("*-s*")):
        if folder.is_dir() and (folder / layout.SUMMARY).exists():
            name, seed = folder.name.rsplit("-s", 1)
            runs.setdefault(name, {})[int(seed)] = record(folder)
    lines = ["| run | flags | seeds | arithmetic | epochs | test MAE (each) | mean | without the age map | AAF MAE | "
             "AAF / test | within 1 std | within 2 std |", "|---" * 12 + "|"]
    for name, seeds in runs.items():
        rs = [seeds[s] for s in sorted(seeds)]
        test, aaf = _mean(r["test_mae"] for r in rs), _mean(r["aaf_mae"] for r in rs)
        cells = [name, " ".join(VARIANTS.get(name, [])) or "(the recipe)", ",".join(map(str, sorted(seeds))),
                 "/".join(sorted({r["precision"] for r in rs})), "/".join(str(r["epochs"]) for r in rs),
                 " / ".join("%.2f" % r["test_mae"] for r in rs),
                 _cell(test), _cell(_mean(r["test_mae_unmapped"] for r in rs)), _cell(aaf),
                 _cell(aaf / test if aaf and test else None), _cell(_mean(r["within_1sd"] for r in rs), "%.3f"),
                 _cell(_mean(r["within_2sd"] for r in rs), "%.3f")]
        lines.append("| " + " | ".join(cells) + " |")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine("CPU"), "data": args.data, "aaf": args.aaf,
              "minutes": args.minutes, "recipe": recipe_flags(), "runs": runs, "table": "\n".join(lines)}
    (Path(args.work) / layout.SUMMARY).write_text(json.dumps(result, indent=2))
    print(result["table"])
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the recipe's prepared UTKFace table (make recipe's RECIPE_DATA)")
    p.add_argument("--aaf", help="the recipe's prepared All-Age-Faces table (make recipe's AAF_DATA)")
    p.add_argument("--work", default="/tmp/faceage-ablation", help="scratch folder (never inside the repository)")
    p.add_argument("--minutes", type=float, default=58.0, help="each run's --max-minutes (the recipe's: 58)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--subset-rows", type=int, default=None, help="a seeded sample of N train rows (smoke runs)")
    p.add_argument("--report", action="store_true", help="only the table, from the runs that finished")
    args = p.parse_args()
    if not args.report:
        data = args.data
        if args.subset_rows:
            data = str(Path(args.work) / f"subset-{args.subset_rows}")
            if not Path(data).exists():
                copy_splits(args.data, Path(data), {"train": args.subset_rows, "val": None, "test": None})
        for seed in args.seeds:
            for name in args.only:
                train(args, name, seed, data)
    report(args)


if __name__ == "__main__":
    main()
