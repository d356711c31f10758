"""Issue 24 item 6's pruning, replayed: which trials of a finished study each pruning rule stops, given every
trial's whole learning curve.

The trials the study pruned are trained again to their end with their own values (trainer.train with the study's
fixed flags: bench.tune_fidelity's, the recipe's in --minutes) in --work; the complete trials' curves are read from
the study's trial folders. Two rules then see the curves in trial order, through Optuna's own MedianPruner in an
in-memory study: the rule before 2026-12-05 (3 startup trials, one step per epoch, pruning from the first) and
trainer.tune's (steps at tenths of the planned schedule, trainer.tune.prune_steps; pruning from PRUNE_AFTER on and
never at the schedule's end, where nothing is saved); with --warmups, that rule from each of those tenths too.
For each: where it stops each trial, the training minutes it spends, the best val MAE among the trials it lets
finish, and whether the trial whose whole curve is best is among them. A curve's share of its schedule is the
trainer's schedule_done where metrics.jsonl has it, else its elapsed time over the whole run's (a budget-planned
OneCycle's horizon ends with its last epoch).

    python -m bench.prune_replay --study <tune_fidelity work>/study --data <tune_fidelity work>/data \\
        --work <scratch> [--minutes 5 --seed 0]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

from bench.common import as_flags, machine, run_python
from bench.recipe_ablation import recipe_flags
from schemas import layout

OLD_RULE = "before 2026-12-05: one step per epoch, pruned from epoch 1"
NEW_RULE = "trainer.tune: tenths of the schedule, pruned from half of it"


def study_trials(study: Path) -> List[dict]:
    """The study's finished trials: number, state, train_params (its trainer.train values)."""
    import optuna

    storage = f"sqlite:///{study / layout.STUDY_DB}"
    name = optuna.get_all_study_names(storage)[0]
    return [{"number": t.number, "state": t.state.name, "train_params": t.user_attrs["train_params"]}
            for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
            if t.state.name in ("COMPLETE", "PRUNED")]


def curve(folder: Path) -> List[dict]:
    """[{"val_mae", "share", "minutes"}] per epoch of a finished run's metrics.jsonl."""
    rows = [json.loads(line) for line in (folder / layout.METRICS_LOG).read_text().splitlines() if line.strip()]
    total = rows[-1]["elapsed_seconds"]
    return [{"val_mae": r["val_mae"], "share": r.get("schedule_done", r["elapsed_seconds"] / total),
             "minutes": r["elapsed_seconds"] / 60} for r in rows]


def full_curves(args) -> Dict[int, List[dict]]:
    """Every trial's whole curve: a complete trial's from the study, a pruned one's trained again to its end."""
    curves = {}
    for trial in study_trials(Path(args.study)):
        folder = Path(args.study) / layout.TRIALS_DIR / f"{trial['number']:04d}"
        if trial["state"] == "PRUNED":
            folder = Path(args.work) / "full" / f"{trial['number']:04d}"
            if not (folder / layout.SUMMARY).exists():
                print(f"{time.strftime('%H:%M:%S')} trial {trial['number']} to its end", flush=True)
                values = {k: v for k, v in trial["train_params"].items() if k != "epochs"}
                flags = recipe_flags() + ["--max-minutes", str(args.minutes), "--seed", str(args.seed),
                                          "--epochs", "80", "--no-progress"] + as_flags(values)
                run_python(["-m", "trainer.train", "--data", args.data, "--output", str(folder), *flags],
                           log=folder.with_suffix(".log"))
        curves[trial["number"]] = curve(folder)
    return curves


def replay(curves: Dict[int, List[dict]], rule: str, after: Optional[int] = None) -> dict:
    """The curves in trial order through a MedianPruner under `rule` (NEW_RULE pruning from tenth `after`,
    default trainer.tune.PRUNE_AFTER): per trial where it stopped (None: it finished), the minutes spent, the best
    val MAE among finished trials."""
    import optuna

    from trainer import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warmup = 1 if rule == OLD_RULE else (after or tune.PRUNE_AFTER)
    study = optuna.create_study(direction="minimize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup))
    stopped, minutes = {}, 0.0
    for number in sorted(curves):
        trial, before = study.ask(), 0.0
        for epoch, point in enumerate(curves[number], start=1):
            if rule == OLD_RULE:  # the rule before: one step per epoch, pruned at any of them
                trial.report(point["val_mae"], epoch)
                stop = trial.should_prune()
            else:
                stop = tune.report_and_judge(trial, point["val_mae"], before, point["share"])
            before = point["share"]
            if stop:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                stopped[number] = {"epoch": epoch, "share": round(point["share"], 3)}
                minutes += point["minutes"]
                break
        else:
            study.tell(trial, min(p["val_mae"] for p in curves[number]))
            minutes += curves[number][-1]["minutes"]
    finished = {n: min(p["val_mae"] for p in c) for n, c in curves.items() if n not in stopped}
    best_whole = min(curves, key=lambda n: min(p["val_mae"] for p in curves[n]))
    return {"stopped": stopped, "minutes": round(minutes, 1), "best_val_mae": round(min(finished.values()), 3),
            "best_trial": min(finished, key=finished.get), "kept_the_best_whole_curve": best_whole in finished}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, help="bench.tune_fidelity's WORK/study (optuna.db, trials/)")
    p.add_argument("--data", required=True, help="the table the study ran on (bench.tune_fidelity's WORK/data)")
    p.add_argument("--work", required=True, help="scratch folder for the pruned trials' whole runs")
    p.add_argument("--minutes", type=float, default=5.0, help="the study's --max-minutes")
    p.add_argument("--seed", type=int, default=0, help="the study's seed")
    p.add_argument("--warmups", type=int, nargs="*", default=[], help="also the new rule pruning from these tenths")
    args = p.parse_args()
    if not (Path(args.study) / layout.STUDY_DB).exists():
        p.exit(2, f"--study {args.study}: no {layout.STUDY_DB} there (run bench.tune_fidelity first)\n")
    curves = full_curves(args)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine("CPU"), "trials": len(curves),
              "whole_curves": {n: [round(p["val_mae"], 2) for p in c] for n, c in curves.items()},
              "best_whole_val_mae": {n: round(min(p["val_mae"] for p in c), 3) for n, c in curves.items()},
              "minutes_if_none_pruned": round(sum(c[-1]["minutes"] for c in curves.values()), 1),
              "rules": {rule: replay(curves, rule) for rule in (OLD_RULE, NEW_RULE)},
              "new_rule_from_tenth": {w: replay(curves, NEW_RULE, w) for w in args.warmups}}
    (Path(args.work) / "prune_replay.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
