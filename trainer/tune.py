"""python -m trainer.tune: Optuna search over trainer.train's hyper-parameters.

TPE (seeded, multivariate, constant liar for parallel workers) or random search; a Median or
Hyperband pruner fed the val MAE after every epoch, at the tenth of the trial's planned schedule it has reached
(so trials of different epoch counts or --max-minutes paces compare at the same point), and pruning only from
half of it on. The study lives in an Optuna storage: a SQLite
file by default, or any SQLAlchemy URL (PostgreSQL for many workers/nodes on one study). Workers send
heartbeats: a killed worker's running trial is marked FAIL and retried once when any worker (or a
rerun with the same --study) next starts a trial. --n-trials counts finished trials (complete or
pruned) in the whole study, so a rerun after a kill goes on to the same total.

Outputs in --output: best_params.json (for `python -m trainer.train --params`), report.json and PNG
plots (optimisation history, parameter importances, the best trial's learning curve).
Browse a study live: `optuna-dashboard STORAGE_URL` (pip install optuna-dashboard).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional

from schemas import layout
from shell import uri
from shell.cli import dumps, entry_points, log, non_negative_int, number, Parser, path_arg, positive_int, redact
from shell.errors import UserError
from trainer import tracking

# ----------------------------------------------------------------------------- the search space

# name: (kind, low, high, log) or (categorical, choices). Tuned values map onto trainer.train flags in
# train_params(); the spaces are printed by --print-space and in --help. "onecycle" tunes the trainer's default
# schedule (OneCycle: its peak rate, the EMA of the weights); "cyclic_plateau" the seed's CyclicLR + plateau cuts.
SPACES: Dict[str, Dict[str, tuple]] = {
    "onecycle": {
        "lr": ("float", 1e-3, 1.2e-2, True),  # OneCycle's peak rate
        "weight_decay": ("float", 1e-6, 1e-2, True),
        "batch_size": ("categorical", (64, 128, 256)),
        "augment": ("float", 0.0, 1.5, False),  # augmentation strength
        "head": ("categorical", ("regression", "distribution")),
        "ema": ("categorical", (0.0, 0.99, 0.998, 0.9995)),  # decay per batch, warmed up (0 = no EMA)
    },
    "cyclic_plateau": {
        "lr": ("float", 3e-4, 1e-2, True),  # peak LR (CyclicLR max_lr)
        "base_lr_ratio": ("float", 0.02, 0.5, True),  # CyclicLR lower bound = lr x this
        "step_size_epochs": ("float", 0.5, 4.0, False),  # CyclicLR half-cycle, in epochs
        "plateau_factor": ("float", 0.2, 0.8, False),  # cycle bounds x this on a val-MAE plateau
        "plateau_patience": ("int", 1, 4, False),
        "weight_decay": ("float", 1e-6, 1e-2, True),
        "batch_size": ("categorical", (32, 64, 128)),
        "augment": ("float", 0.0, 1.5, False),  # augmentation strength
        "head": ("categorical", ("regression", "distribution")),
    },
}
DEFAULT_SPACE = "onecycle"

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")


def describe_space() -> str:
    lines = []
    for space, dims in SPACES.items():
        lines.append(f"  --space {space}{' (default)' if space == DEFAULT_SPACE else ''}:")
        for name, spec in dims.items():
            if spec[0] == "categorical":
                lines.append(f"    {name:18s} one of {list(spec[1])}")
            else:
                kind, low, high, log = spec
                lines.append(f"    {name:18s} {kind} in [{low:g}, {high:g}]" + (" (log scale)" if log else ""))
    return "search spaces:\n" + "\n".join(lines)


def suggest(trial, space: str = DEFAULT_SPACE) -> dict:
    params = {}
    for name, spec in SPACES[space].items():
        if spec[0] == "categorical":
            params[name] = trial.suggest_categorical(name, list(spec[1]))
        elif spec[0] == "int":
            params[name] = trial.suggest_int(name, spec[1], spec[2], log=spec[3])
        else:
            params[name] = trial.suggest_float(name, spec[1], spec[2], log=spec[3])
    return params


def train_params(space_values: dict, train_rows: int) -> dict:
    """Tuned values of either space -> trainer.train flag values (the keys --params accepts)."""
    v = dict(space_values)
    common = {k: v[k] for k in ("lr", "weight_decay", "batch_size", "augment", "head")}
    if "base_lr_ratio" not in v:  # the onecycle space
        return {"schedule": "onecycle", **common, "ema": v["ema"]}
    batches_per_epoch = max(1, math.ceil(train_rows / v["batch_size"]))
    return {
        "schedule": "cyclic_plateau", **common,
        "base_lr": v["lr"] * v["base_lr_ratio"],
        "step_size_up": max(1, round(v["step_size_epochs"] * batches_per_epoch)),
        "plateau_factor": v["plateau_factor"],
        "plateau_patience": v["plateau_patience"],
    }


# ----------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tune", prog="python -m trainer.tune", description=__doc__.splitlines()[0], epilog=describe_space())
    p.add_argument("--data", type=path_arg, help="prepare output root (Parquet or Delta), as for trainer.train")
    p.add_argument("--study", default="faceage", help="study name (rerun with the same name to resume)")
    p.add_argument("--storage", default=None,
                   help="SQLAlchemy URL (default: sqlite:///OUTPUT/optuna.db); e.g. postgresql://user@host/db")
    p.add_argument("--output", default="runs/tune", type=path_arg, help="folder for trials, best_params.json and the report")
    p.add_argument("--n-trials", type=positive_int, default=20,
                   help="finished (complete or pruned) trials the study needs")
    p.add_argument("--timeout", type=number(0.0, low_open=True), default=None,
                   help="seconds after which workers start no new trial")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="worker processes sharing the study (Spark tasks: spark_jobs/distributed.py tune)")
    p.add_argument("--space", default=DEFAULT_SPACE, choices=tuple(SPACES),
                   help="what is tuned: onecycle (the trainer's default schedule, with EMA) or cyclic_plateau")
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS)
    p.add_argument("--pruner", default="median", choices=PRUNERS)
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampler seed (worker k uses seed + k)")
    p.add_argument("--epochs", type=positive_int, default=10, help="epoch budget of every trial")
    p.add_argument("--heartbeat", type=positive_int, default=30, help="seconds between a running trial's heartbeats")
    p.add_argument("--grace", type=positive_int, default=None, help="heartbeat silence before a trial is failed "
                                                                    "(default 2 x heartbeat)")
    p.add_argument("--train-args", default="", help="fixed trainer.train flags for every trial, "
                                                    "e.g. \"--image-size 64 --workers 1\"")
    p.add_argument("--print-space", action="store_true", help="print the search space and exit")
    p.add_argument("--report-only", action="store_true", help="write best_params.json and the report, no trials")
    tracking.add_arguments(p)
    return p


class TuneError(UserError):
    """A problem a user can fix."""


def work_dir(args) -> str:
    """The local folder of the tuner's own files (study database, logs, report): --output itself, or for a
    remote --output the local mirror that run() uploads from (shell.uri.WorkFolder)."""
    return getattr(args, "work_dir", None) or uri.local_path(args.output)


def storage_url(args) -> str:
    return args.storage or f"sqlite:///{os.path.abspath(os.path.join(work_dir(args), 'optuna.db'))}"


def make_storage(args):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = storage_url(args)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: experimental
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=args.heartbeat,
                              grace_period=args.grace or 2 * args.heartbeat,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors: say which storage and why
        raise TuneError(f"--storage {redact(url)}: cannot open ({type(e).__name__}: {redact(e)})") from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_sampler(name: str, seed: int):
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=5)


# Pruning steps are tenths of a trial's planned schedule (trainer.train's schedule_done), not epochs: trials
# planned by --max-minutes run different epoch counts. None is pruned before half of it: until then OneCycle warms
# up (30 %) and runs at its peak rate, and the val MAE says little about the end (issue 24's 5-minute study:
# pruned after its first epoch at 14.0 while a trial at 14.4 then ended at 8.1)
PRUNE_STEPS = 10
PRUNE_AFTER = 5


def make_pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=PRUNE_AFTER)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=PRUNE_AFTER, max_resource=PRUNE_STEPS)
    return optuna.pruners.NopPruner()


def prune_steps(done_before: float, done: float) -> range:
    """The pruning steps an epoch reached: the tenths of the schedule passed from `done_before` to `done` (shares
    of the schedule), each reported with the epoch's val MAE, so every trial has a value at every step."""
    def tenth(share):
        return min(PRUNE_STEPS, int(share * PRUNE_STEPS + 1e-9))

    return range(tenth(done_before) + 1, tenth(done) + 1)


def report_and_judge(trial, val_mae: float, done_before: float, done: float) -> bool:
    """Report an epoch's val MAE at each tenth of the schedule it passed (prune_steps) and say whether the
    trial should stop now: only where it passed a tenth, and never at the last one (the trial has ended there;
    pruning it would only lose what it saved)."""
    steps = prune_steps(done_before, done)
    for step in steps:
        trial.report(val_mae, step)
    return bool(len(steps)) and steps[-1] < PRUNE_STEPS and trial.should_prune()


def fail_orphaned_trials(args, holder: dict) -> None:
    """The study's RUNNING trials when the tune that held this --output is gone (killed: its lock was taken
    over) and the study lives in the output's own database: nobody runs them any more. Each is marked FAIL
    now and retried once (the heartbeat callback's rule), instead of RUNNING for ever, or until the
    heartbeat grace has passed. With a shared --storage other machines' workers may still run theirs: then
    only the heartbeats decide."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    if not os.path.exists(os.path.join(work_dir(args), layout.STUDY_DB)):
        return
    storage = make_storage(args)
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        return  # no such study yet
    retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            retry(study, storage.get_trial(trial._trial_id))
            log.warning(f"tune: trial {trial.number} of study {args.study} was running in run {holder.get('run_id')} "
                        f"(pid {holder.get('pid')}, gone); marked FAIL and queued to be retried once")


def load_study(args, seed: int):
    import optuna

    return optuna.create_study(study_name=args.study, storage=make_storage(args), direction="minimize",
                               sampler=make_sampler(args.sampler, seed),
                               pruner=make_pruner(args.pruner), load_if_exists=True)


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def objective_factory(args, train_rows: int):
    import optuna

    from trainer.train import get_args_parser, run

    def objective(trial) -> float:
        values = suggest(trial, args.space)
        params = train_params(values, train_rows)
        # local or a URI: the trainer writes either
        out = uri.join(args.output, layout.TRIALS_DIR, f"{trial.number:04d}")
        argv = ["--data", args.data, "--output", out, "--epochs", str(args.epochs), "--no-progress",
                *shlex.split(args.train_args)]
        parser = get_args_parser()
        targs = parser.parse_args(argv)
        for key, value in params.items():
            setattr(targs, key, value)
        # tracked trials are nested runs of the study's run
        targs.mlflow = getattr(args, "mlflow", None)
        targs.mlflow_experiment = getattr(args, "mlflow_experiment", tracking.DEFAULT_EXPERIMENT)
        targs.mlflow_parent_run = getattr(args, "mlflow_parent_run", None)
        trial.set_user_attr("train_params", params)
        trial.set_user_attr("worker_pid", os.getpid())
        curve: List[float] = []

        done: List[float] = [0.0]

        def on_epoch(row):
            curve.append(row["val_mae"])
            trial.set_user_attr("val_curve", curve)
            stop = report_and_judge(trial, row["val_mae"], done[-1], row["schedule_done"])
            done.append(row["schedule_done"])
            trial.set_user_attr("schedule_done", done[1:])
            if stop:
                raise optuna.TrialPruned(f"val MAE {row['val_mae']:.2f} after epoch {row['epoch']} "
                                         f"({row['schedule_done']:.0%} of its schedule)")

        summary = run(targs, on_epoch=on_epoch)
        for key in ("test_mae", "test_cs5", "test_rmse", "epochs_run"):
            trial.set_user_attr(key, summary[key])
        return summary["best_val_mae"]

    return objective


def run_worker(args, worker: int) -> None:
    """One worker: trials until the study holds --n-trials finished ones (or --timeout)."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from trainer.data import split_source

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(args, args.seed + worker)
    rows = split_source(args.data, "train").rows
    if finished(study) >= args.n_trials:
        return
    study.optimize(objective_factory(args, rows), n_trials=None, timeout=args.timeout, catch=(),
                   callbacks=[MaxTrialsCallback(args.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))])


def _worker_entry(args, worker: int) -> None:
    import contextlib

    log = os.path.join(work_dir(args), f"worker-{worker}.log")
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        run_worker(args, worker)


def check_data(args) -> int:
    """The training table's train rows, or TuneError before anything (a study database) is created;
    the fixed --train-args are parsed once here too, so a typo fails now, not in every trial."""
    from trainer.data import split_source
    from trainer.train import get_args_parser

    if not args.data:
        raise TuneError("--data is required (a prepare output)")
    try:
        rows = split_source(args.data, "train").rows
    except (FileNotFoundError, ValueError, OSError) as e:
        raise TuneError(f"--data {args.data}: {e}") from None
    except Exception as e:  # noqa: BLE001 - IncompleteTableError and reader errors: say which table
        raise TuneError(f"--data {args.data}: {type(e).__name__}: {e}") from None
    train_argv = ["--data", args.data, *shlex.split(args.train_args)]
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            get_args_parser().parse_args(train_argv)
        except SystemExit:
            raise TuneError(f"--train-args {args.train_args!r}: {err.getvalue().strip()}") from None
    return rows




def claim_output(args):
    """The report files tune writes may replace only what faceage wrote (refused otherwise, before any trial);
    the output is marked as faceage's (a remote one proves writable here, not after the first trial)."""
    from shell.outputs import check_overlap, Outputs

    check_overlap([("--data", args.data)], args.output)
    outputs = Outputs.at(args.output, "tune", manifest=(layout.TUNE_REPORT, ("study", "best", "trials")))
    outputs.begin()  # one study writer per --output (run() releases it)
    try:
        outputs.check(layout.TUNE_FILES)
        outputs.record(layout.TUNE_FILES)
    except BaseException:
        outputs.finish()
        raise
    return outputs


def run(args, launch: Optional[Callable] = None) -> dict:
    """Run the study's trials (here, in --workers processes, or through `launch(args)`: e.g. Spark tasks,
    spark_jobs/distributed.py) and write the report."""
    check_data(args)
    outputs = claim_output(args)
    try:
        if outputs.lock.took_over is not None and not args.storage:
            fail_orphaned_trials(args, outputs.lock.took_over)
        return _study(args, launch)
    finally:
        outputs.finish()


def _study(args, launch: Optional[Callable]) -> dict:
    work = uri.WorkFolder(args.output)  # --output itself, or a local mirror of a remote one
    args.work_dir = work.path
    tracker = tracking.Run(args, f"tune-{args.study}", tags={"optuna.study": args.study})
    args.mlflow_parent_run = tracker.run_id
    tracker.log_params({k: getattr(args, k) for k in ("study", "sampler", "pruner", "n_trials", "epochs", "seed",
                                                      "data", "train_args", "workers")})
    logs = [f"worker-{k}.log" for k in range(args.workers)]
    with tracker:  # ends the MLflow run FINISHED, KILLED (interrupted) or FAILED
        try:
            if not args.storage:
                work.pull(layout.STUDY_DB)  # a study to continue (remote --output)
            report = _run(args, launch)
            work.push(layout.STUDY_DB, layout.BEST_PARAMS, layout.TUNE_REPORT, *report["plots"], *logs)
            best = report["best"]
            tracker.log_metrics({"best_val_mae": best["val_mae"], "best_test_mae": best.get("test_mae"),
                                 **{f"trials_{k}": v for k, v in report["trials"].items()}})
            tracker.set_tags({"best_trial": best["number"],
                              **{f"best.{k}": v for k, v in best["train_params"].items()}})
            for name in (layout.BEST_PARAMS, layout.TUNE_REPORT, *report["plots"]):
                tracker.log_artifact(os.path.join(work.path, name))
            return report
        except BaseException:
            # a failed study's worker logs are what explains it: keep them beside a remote --output too
            with contextlib.suppress(Exception):
                work.push(layout.STUDY_DB, *logs)
            raise
        finally:
            work.close()


def _run(args, launch: Optional[Callable]) -> dict:
    start = time.time()
    load_study(args, args.seed)  # create it once, before workers race to
    if launch is not None:
        launch(args)
    elif args.workers <= 1:
        run_worker(args, 0)
    else:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker_entry, args=(args, k), name=f"tune-worker-{k}")
                 for k in range(args.workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        bad = [p.name for p in procs if p.exitcode != 0]
        if bad:
            raise TuneError(f"workers {bad} failed: see {work_dir(args)}/worker-*.log")
    return write_report(args, wall_seconds=time.time() - start)


# ----------------------------------------------------------------------------- results

def report_only(args) -> dict:
    """--report-only: the report of the study so far (its database pulled from a remote --output first)."""
    work = uri.WorkFolder(args.output)
    args.work_dir = work.path
    try:
        if not args.storage:
            work.pull(layout.STUDY_DB)
        report = write_report(args)
        work.push(layout.BEST_PARAMS, layout.TUNE_REPORT, *report["plots"])
        return report
    finally:
        work.close()


def write_report(args, wall_seconds: Optional[float] = None) -> dict:
    from optuna.trial import TrialState

    study = load_study(args, args.seed)
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise TuneError(f"study {args.study!r} has no complete trial yet ({counts})")
    best = study.best_trial
    best_params = dict(best.user_attrs["train_params"])
    best_params["epochs"] = args.epochs
    with open(os.path.join(work_dir(args), layout.BEST_PARAMS), "w") as f:
        f.write(dumps(best_params))
    best_path = uri.join(args.output, layout.BEST_PARAMS)
    report = {
        "study": args.study, "storage": redact(storage_url(args)), "space": getattr(args, "space", DEFAULT_SPACE),
        "sampler": args.sampler, "pruner": args.pruner,
        "epochs_per_trial": args.epochs, "trials": counts, "wall_seconds": wall_seconds,
        "trial_seconds": sum((t.datetime_complete - t.datetime_start).total_seconds()
                             for t in trials if t.datetime_complete and t.datetime_start),
        "best": {"number": best.number, "val_mae": best.value, "params": best.params,
                 "train_params": best_params, **{k: best.user_attrs.get(k) for k in ("test_mae", "test_cs5")}},
        "all": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                 "test_mae": t.user_attrs.get("test_mae"), "epochs": len(t.user_attrs.get("val_curve", []))}
                for t in trials],
        "best_params_file": best_path,
    }
    report["plots"] = _plots(study, best, work_dir(args))
    with open(os.path.join(work_dir(args), layout.TUNE_REPORT), "w") as f:
        f.write(redact(dumps(report, default=str)))
    return report


def _plots(study, best, folder: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    written = []

    def save(name, make):
        try:
            ax = make()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.tight_layout()
            fig.savefig(os.path.join(folder, name), dpi=90)
            plt.close(fig)
            written.append(name)
        except (ValueError, RuntimeError) as e:  # e.g. importances need 2+ complete trials
            log.warning(f"tune: plot {name} skipped: {e}")

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        save(layout.PLOT_HISTORY, lambda: ovm.plot_optimization_history(study))
        save(layout.PLOT_IMPORTANCES, lambda: ovm.plot_param_importances(study))

    def curve():
        fig, ax = plt.subplots(figsize=(6, 4))
        values = best.user_attrs.get("val_curve", [])
        ax.plot(range(1, len(values) + 1), values, marker="o")
        ax.set(xlabel="epoch", ylabel="val MAE (years)", title=f"best trial #{best.number}: learning curve")
        return ax

    save(layout.PLOT_BEST_CURVE, curve)
    return written


def report_line(report: dict) -> None:
    b = report["best"]
    log.info(f"tune: study {report['study']!r}: {report['trials']['complete']} complete, {report['trials']['pruned']} "
          f"pruned, {report['trials']['fail']} failed; best #{b['number']} val MAE {b['val_mae']:.2f} "
          f"(test MAE {b['test_mae']:.2f}); params -> {report['best_params_file']}")


def _job(argv: Optional[list]) -> int:
    args = get_args_parser().parse_args(argv)
    if args.print_space:
        print(describe_space())
        return 0
    report_line(report_only(args) if args.report_only else run(args))
    return 0


main, console_main = entry_points("tune", _job)

if __name__ == "__main__":
    sys.exit(main())
