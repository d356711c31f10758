"""Issue 24's recipe variants on one CUDA GPU, several at once, each trained for the epochs the 2-core dev VM fits
in the recipe's 58 minutes, so a few GPU minutes say which variant deserves the VM's hours.

Each variant is make recipe's training (the Makefile's RECIPE_TRAIN) with a few flags changed, and --epochs set to
what the dev VM trains in the budget (BENCHMARKS.md: 45 epochs at 64 px in bf16; 80 px trains at 0.71x that
speed, so 32). --max-minutes stays as a cap that this script lowers to the time left before --deadline-minutes, so
every started run ends (annealed) in time; a run that the cap cut short says so (epochs_run < the variant's
--epochs). Variants start in the order given, --parallel at a time; a later one starts only when the slowest
finished run, scaled by epochs x pixels, says it fits. After each run: test MAE (the trainer's summary, flip TTA,
with and without the age map) and, with --aaf, All-Age-Faces MAE and bias by age group (the bundle on the GPU,
flip TTA). One JSON line per run goes to OUT/results.jsonl as soon as the run ends.

    python -m bench.gpu_recipe --data bench/out/gpu/data --aaf bench/out/gpu/aaf --out $OUT --deadline-minutes 8
    python -m bench.gpu_recipe --report results.jsonl [more.jsonl]     # the Markdown table of what ran
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.recipe_ablation import recipe_flags
from schemas import layout

# name -> flags added to RECIPE_TRAIN (argparse: the last value of a flag wins); each sets its size, augmentation
# strength and --epochs (the dev VM's budget at that size), so it means the same whatever RECIPE_TRAIN says
P64, P80 = ["--image-size", "64", "--epochs", "45"], ["--image-size", "80", "--epochs", "32"]
VARIANTS = {
    "r64": P64 + ["--augment", "1.0"],  # the recipe until this ablation (2026-12-04), as the dev VM trains it (bf16)
    "r64w": P64 + ["--augment", "1.0", "--age-weighting", "sqrt_inv"],
    "r80": P80 + ["--augment", "1.0"],
    "r80w": P80 + ["--augment", "1.0", "--age-weighting", "sqrt_inv"],
    "r64aug05": P64 + ["--augment", "0.5"],
    "r64-s1": P64 + ["--augment", "1.0", "--seed", "1"],
    "r80w-s1": P80 + ["--augment", "1.0", "--age-weighting", "sqrt_inv", "--seed", "1"],
    "r64x2": ["--image-size", "64", "--augment", "1.0", "--epochs", "90"],  # twice the budget: a faster machine
    "r80aug05": P80 + ["--augment", "0.5"],  # the recipe since this ablation
    "r80-s1": P80 + ["--augment", "1.0", "--seed", "1"],
    "r80aug05-s1": P80 + ["--augment", "0.5", "--seed", "1"],
    "r64aug025": P64 + ["--augment", "0.25"],
}


def flag(flags, name: str, default):
    """The value of the last `name` in `flags` (as argparse reads them), else `default`."""
    at = [i for i, f in enumerate(flags[:-1]) if f == name]
    return type(default)(flags[at[-1] + 1]) if at else default


def cost(flags) -> float:
    """Relative work of a run: epochs x pixels (the recipe's flags, then the variant's)."""
    flags = recipe_flags() + list(flags)
    return flag(flags, "--epochs", 80) * flag(flags, "--image-size", 64) ** 2


def held_out(bundle: Path, aaf: str, device: str, cache: dict) -> dict:
    """The bundle over every All-Age-Faces crop, flip TTA, with and without its age map (bench.shift_data)."""
    from bench.shift_data import evaluate

    result = evaluate(str(bundle), aaf, "flip", device, cache)
    return {"aaf_rows": result["rows"], "aaf_mae_unmapped": result["mae_unmapped"], "aaf_mae_mapped": result["mae"],
            "aaf_bias_by_age_group_unmapped": result["bias_by_age_group_unmapped"],
            "aaf_bias_by_age_group_mapped": result["bias_by_age_group"]}


def record(name, flags, folder: Path, seconds: float) -> dict:
    s = json.loads((folder / layout.SUMMARY).read_text())
    history = [json.loads(line) for line in (folder / layout.METRICS_LOG).read_text().splitlines()]
    keep = ("test_mae", "test_mae_unmapped", "test_cs5", "best_val_mae", "test_within_1sd", "test_within_2sd",
            "precision", "age_weighting", "rows", "test_bias_by_age_group_unmapped", "test_bias_by_age_group_mapped")
    speeds = sorted(h["img_per_s"] for h in history)
    return {"name": name, "flags": flags, "epochs_planned": flag(recipe_flags() + flags, "--epochs", 80),
            "epochs_run": len(history), "seconds": round(seconds, 1), "img_per_s_median": speeds[len(speeds) // 2],
            **{k: s.get(k) for k in keep}}


def worst(groups: dict) -> str:
    """The group with the largest |bias|, as "-3.7 (70+)"."""
    name = max(groups, key=lambda g: abs(groups[g]))
    return f"{groups[name]:+.1f} ({name})"


def report(files) -> str:
    """A Markdown table of results.jsonl lines (several calls' files together), one row per run."""
    rows = [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()]
    lines = ["| run | flags after the recipe's | epochs | s | test MAE | without the age map | best val "
             "| within 1 / 2 std | worst test group (map) | AAF MAE | without the map | AAF / test (both without the map) "
             "| worst AAF group (map) |", "|---" * 13 + "|"]
    for r in sorted(rows, key=lambda r: r["test_mae"]):
        aaf = r.get("aaf_mae_unmapped")
        lines.append("| " + " | ".join([
            r["name"], " ".join(r["flags"]), f"{r['epochs_run']}/{r['epochs_planned']}", f"{r['seconds']:.0f}",
            f"{r['test_mae']:.2f}", f"{r['test_mae_unmapped']:.2f}", f"{r['best_val_mae']:.2f}",
            f"{100 * r['test_within_1sd']:.1f} / {100 * r['test_within_2sd']:.1f} %",
            worst(r["test_bias_by_age_group_mapped"]),
            f"{r.get('aaf_mae_mapped', float('nan')):.2f}", f"{aaf:.2f}" if aaf else "-",
            f"{aaf / r['test_mae_unmapped']:.2f}x" if aaf else "-",
            worst(r["aaf_bias_by_age_group_mapped"]) if aaf else "-"]) + " |")
    return "\n".join(lines)


def main():
    if sys.argv[1:2] == ["--report"]:  # python -m bench.gpu_recipe --report results.jsonl [...]
        print(report(sys.argv[2:]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared UTKFace table (bench.gpu_data's data/)")
    p.add_argument("--aaf", help="a prepared All-Age-Faces table (bench.gpu_data's aaf/)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out/gpu-recipe"), help="results.jsonl, runs.log")
    p.add_argument("--work", default="bench/out/gpu-recipe-runs", help="run folders (bundles stay there)")
    p.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--parallel", type=int, default=4, help="runs sharing the GPU at once")
    p.add_argument("--workers", type=int, default=3, help="each run's reader threads")
    p.add_argument("--deadline-minutes", type=float, default=8.0, help="every run ends by then (from this start)")
    p.add_argument("--reserve-seconds", type=float, default=45.0,
                   help="kept after a run's training budget: its test/val passes, calibration, AAF")
    p.add_argument("--device", default="cuda", help="cpu only for a smoke run of this script")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="flags added after every variant's (a smoke run: --extra --epochs 1)")
    args = p.parse_args()

    start = time.time()
    deadline = start + args.deadline_minutes * 60
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results, biglog = out / "results.jsonl", out / "runs.log"
    queue = [(n, VARIANTS[n]) for n in args.only]
    running, done, pixels = {}, [], {}

    def say(text):
        line = f"{time.time() - start:6.0f}s {text}"
        print(line, flush=True)
        with open(biglog, "a") as f:
            f.write(line + "\n")

    while queue or running:
        left = deadline - time.time()
        while queue and len(running) < args.parallel:
            name, flags = queue[0][0], queue[0][1] + args.extra
            fits = left - args.reserve_seconds
            if done:  # the slowest finished run, scaled by its work, says how long this one takes
                need = max(d["seconds"] / cost(d["flags"]) for d in done) * cost(flags)
                if need > fits:
                    say(f"skip {name}: needs about {need:.0f} s, {fits:.0f} s left")
                    queue.pop(0)
                    continue
            if fits < 60:
                say(f"skip {name}: {fits:.0f} s left")
                queue.pop(0)
                continue
            queue.pop(0)
            folder = work / name
            cmd = [sys.executable, "-m", "trainer.train", "--data", args.data, "--output", str(folder),
                   *recipe_flags(), *flags, "--device", args.device, "--reader", "pyarrow",
                   "--workers", str(args.workers), "--max-minutes", f"{fits / 60:.2f}", "--no-progress"]
            log = open(work / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time(), flags, log)
            say(f"start {name}: {' '.join(flags)} (cap {fits / 60:.2f} min)")
        time.sleep(2)
        for name, (proc, began, flags, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            log.close()
            seconds = time.time() - began
            with open(biglog, "a") as f:
                f.write(f"---- {name} rc {proc.returncode}\n" + (work / f"{name}.log").read_text()[-6000:] + "\n")
            if proc.returncode != 0:
                say(f"{name} failed (rc {proc.returncode}) after {seconds:.0f} s")
                continue
            row = record(name, flags, work / name, seconds)
            done.append(row)
            if args.aaf:
                try:
                    row.update(held_out(work / name / layout.MODEL, args.aaf, args.device, pixels))
                except Exception as e:  # noqa: BLE001 - the training's numbers still count
                    say(f"{name}: AAF evaluation failed: {type(e).__name__}: {e}")
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            say(f"done {name}: {row['epochs_run']}/{row['epochs_planned']} epochs in {seconds:.0f} s, test MAE "
                f"{row['test_mae']} (unmapped {row['test_mae_unmapped']}), AAF {row.get('aaf_mae_mapped')} "
                f"(unmapped {row.get('aaf_mae_unmapped')})")
    say(f"all done: {len(done)} runs")


if __name__ == "__main__":
    main()
