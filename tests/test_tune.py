"""python -m trainer.tune on tiny real tables: SQLite, PostgreSQL with two workers, a killed worker."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO, venv_env
from trainer import train, tune

TINY = "--image-size 32 --workers 1 --reader pyarrow"


def _postgres_url():
    url = os.environ.get("FACEAGE_TEST_POSTGRES")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must start PostgreSQL (.ci/postgres.sh) and export FACEAGE_TEST_POSTGRES")
        pytest.skip("no FACEAGE_TEST_POSTGRES (start one with: source .ci/postgres.sh)")
    return url


def _trials(storage, study):
    import optuna

    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def test_space_is_printed_and_maps_onto_train_flags():
    out = subprocess.run([sys.executable, "-m", "trainer.tune", "--print-space"], cwd=REPO, env=venv_env(),
                         capture_output=True, text=True, check=True).stdout
    helptext = subprocess.run([sys.executable, "-m", "trainer.tune", "--help"], cwd=REPO, env=venv_env(),
                              capture_output=True, text=True, check=True).stdout
    for space, dims in tune.SPACES.items():
        assert f"--space {space}" in out and f"--space {space}" in helptext
        for name in dims:
            assert name in out and name in helptext
    values = {"lr": 1e-3, "base_lr_ratio": 0.1, "step_size_epochs": 2.0, "plateau_factor": 0.5,
              "plateau_patience": 2, "weight_decay": 1e-4, "batch_size": 64, "augment": 1.0, "head": "regression"}
    params = tune.train_params(values, train_rows=640)
    dests = {a.dest for a in train.get_args_parser()._actions}
    assert set(params) <= dests  # every tuned value is a trainer.train flag
    assert params["step_size_up"] == 20 and params["base_lr"] == pytest.approx(1e-4)
    assert params["schedule"] == "cyclic_plateau"
    # the default space tunes the trainer's default schedule: OneCycle's peak rate and the EMA among them
    assert tune.DEFAULT_SPACE == "onecycle" and train.get_args_parser().get_default("schedule") == "onecycle"
    onecycle = tune.train_params({"lr": 5e-3, "weight_decay": 1e-4, "batch_size": 128, "augment": 0.5,
                                  "head": "distribution", "ema": 0.998}, train_rows=640)
    assert set(onecycle) <= dests
    assert onecycle == {"schedule": "onecycle", "lr": 5e-3, "weight_decay": 1e-4, "batch_size": 128, "augment": 0.5,
                        "head": "distribution", "ema": 0.998}
    args = train.get_args_parser().parse_args(["--data", "t"])
    for key, value in onecycle.items():  # each value is one the trainer's own flag accepts
        assert type(getattr(args, key)) is type(value) or getattr(args, key) is None, key


def test_sqlite_study_prunes_reports_and_retrains(tables, tmp_path):
    root, manifest, _ = tables
    out = tmp_path / "tune"
    argv = ["--data", str(root / "pq"), "--study", "s1", "--output", str(out), "--n-trials", "5", "--epochs", "3",
            "--train-args", TINY, "--seed", "1"]
    assert tune.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["storage"].startswith("sqlite:///") and (out / "optuna.db").exists()
    assert report["space"] == "onecycle" and report["best"]["train_params"]["schedule"] == "onecycle"
    assert set(report["best"]["params"]) == set(tune.SPACES["onecycle"])
    assert report["trials"]["complete"] + report["trials"]["pruned"] == 5
    assert {p for p in report["plots"]} == {"optimization_history.png", "param_importances.png",
                                            "best_trial_curve.png"}
    assert all((out / p).stat().st_size > 1000 for p in report["plots"])
    # val MAE reported at each tenth of a trial's schedule (3 epochs: tenths 1-3, 4-6, 7-10), pruned from half on
    for t in _trials(report["storage"], "s1"):
        steps, curve, done = sorted(t.intermediate_values), t.user_attrs["val_curve"], t.user_attrs["schedule_done"]
        assert steps == list(range(1, steps[-1] + 1)) and len(done) == len(curve), (steps, done)
        epoch_of = [next(i for i, d in enumerate(done) if d * 10 >= s - 1e-9) for s in steps]
        assert [t.intermediate_values[s] for s in steps] == [curve[i] for i in epoch_of]
        if t.state.name == "PRUNED":
            assert tune.PRUNE_AFTER <= steps[-1] < tune.PRUNE_STEPS
        else:
            assert t.state.name == "COMPLETE" and steps[-1] == tune.PRUNE_STEPS and done == [0.3333, 0.6667, 1.0]
    # rerunning the finished study adds no trial
    assert tune.main(argv) == 0
    assert len(_trials(report["storage"], "s1")) == 5
    # the best params retrain through trainer.train
    best = json.loads((out / "best_params.json").read_text())
    assert best == report["best"]["train_params"] | {"epochs": 3}
    run = tmp_path / "retrain"
    assert train.main(["--data", str(root / "pq"), "--params", str(out / "best_params.json"), "--output", str(run),
                      "--epochs", "1", *TINY.split()]) == 0
    ckpt_args = __import__("torch").load(run / "checkpoint.pt", weights_only=True)["args"]
    assert ckpt_args["lr"] == pytest.approx(best["lr"]) and ckpt_args["batch_size"] == best["batch_size"]
    assert ckpt_args["head"] == best["head"] and ckpt_args["epochs"] == 1  # typed flags win over the file


def test_pruning_steps_are_tenths_of_the_schedule_whatever_the_epoch_count():
    assert list(tune.prune_steps(0.0, 0.1)) == [1] and list(tune.prune_steps(0.0, 0.09)) == []
    assert list(tune.prune_steps(0.09, 0.41)) == [1, 2, 3, 4]  # a long epoch passes several tenths
    assert list(tune.prune_steps(0.41, 0.45)) == []  # a short one may pass none: nothing is reported for it
    assert list(tune.prune_steps(0.95, 1.0)) == [10] and list(tune.prune_steps(0.0, 1.7)) == list(range(1, 11))
    # the trainer's share: epochs of --epochs, or the time of --max-minutes when further on; a budget-planned
    # OneCycle's own clock
    args = train.get_args_parser().parse_args(["--data", "t", "--epochs", "8"])
    assert train.schedule_done(args, None, 1, 9999.0) == 0.25
    args.max_minutes = 10
    assert train.schedule_done(args, None, 1, 300.0) == 0.5 and train.schedule_done(args, None, 5, 60.0) == 0.75
    from trainer.schedules import BudgetOneCycle

    clock = [100.0]
    model = __import__("torch").nn.Linear(1, 1)
    cycle = BudgetOneCycle(__import__("torch").optim.SGD(model.parameters(), lr=0.1), 0.1, 600, clock=lambda: clock[0])
    clock[0] += 150
    assert train.schedule_done(args, cycle, 0, 0.0) == 0.25
    cycle.plan(1, 150.0)  # one epoch left at this pace: the horizon is 300 s, not the budget's 600
    assert train.schedule_done(args, cycle, 0, 0.0) == 0.5


def test_a_trial_is_judged_only_where_it_passed_a_tenth_from_half_on_and_never_at_its_end():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", pruner=tune.make_pruner("median"))
    for value in (5.0, 5.1, 5.2):  # three finished trials set the median at every tenth
        trial = study.ask()
        assert not tune.report_and_judge(trial, value, 0.0, 1.0)  # the last tenth never prunes
        assert len(study.trials[trial.number].intermediate_values) == 10
        study.tell(trial, value)
    bad = study.ask()
    assert not tune.report_and_judge(bad, 9.0, 0.0, 0.45)  # far worse, but before half the schedule
    assert not tune.report_and_judge(bad, 9.0, 0.45, 0.48)  # passed no tenth: nothing reported, nothing judged
    assert tune.report_and_judge(bad, 9.0, 0.48, 0.55)  # worse than the median at tenth 5: stop
    assert tune.report_and_judge(bad, 9.0, 0.55, 0.95)
    assert not tune.report_and_judge(bad, 9.0, 0.95, 1.0)  # its end: kept whatever it reads
    good = study.ask()
    assert not tune.report_and_judge(good, 4.0, 0.0, 0.9)  # better than the median: goes on
    assert sorted(study.trials[good.number].intermediate_values) == list(range(1, 10))


def test_postgres_two_workers_share_one_study(tables, tmp_path):
    url = _postgres_url()
    root, _, _ = tables
    study = f"two-workers-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "tune"
    assert tune.main(["--data", str(root / "pq"), "--study", study, "--storage", url, "--output", str(out),
                     "--n-trials", "6", "--epochs", "2", "--workers", "2", "--train-args", TINY]) == 0
    trials = _trials(url, study)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))  # no duplicated trial
    states = {t.state.name for t in trials}
    assert states <= {"COMPLETE", "PRUNED"}  # none lost in RUNNING, none failed
    assert 6 <= len(trials) <= 7  # each worker stops once 6 are finished; one may be in flight then
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2  # both processes ran trials
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)


def _kill_mid_first_trial(argv, storage: str, study: str) -> None:
    """Start the tune of `argv` and SIGKILL it (its process group) once its first trial reported an epoch."""
    proc = subprocess.Popen(argv, cwd=REPO, env=venv_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            try:
                running = [t for t in _trials(storage, study) if t.intermediate_values]
            except Exception:  # noqa: BLE001 - the database or the study may not exist yet
                running = []
            if running:
                return
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.5)
        pytest.fail("no trial reported an epoch within 240 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_killed_worker_is_failed_and_the_study_resumes(tables, tmp_path):
    root, _, _ = tables
    out = tmp_path / "tune"
    storage = f"sqlite:///{out / 'optuna.db'}"
    argv = [sys.executable, "-m", "trainer.tune", "--data", str(root / "pq"), "--study", "killed", "--output",
            str(out), "--n-trials", "3", "--epochs", "30", "--heartbeat", "1", "--grace", "3",
            "--pruner", "none", "--train-args", TINY + " --early-stop 100"]
    _kill_mid_first_trial(argv, storage, "killed")
    killed = _trials(storage, "killed")
    assert [t.state.name for t in killed] == ["RUNNING"]
    time.sleep(4)  # past the grace period: its heartbeat has stopped
    rerun = argv[:argv.index("--epochs") + 1] + ["2"] + argv[argv.index("--epochs") + 2:]
    subprocess.run(rerun, cwd=REPO, env=venv_env(), check=True, capture_output=True)
    after = _trials(storage, "killed")
    assert after[0].state.name == "FAIL"  # the killed trial is marked failed, not left running
    finished = [t for t in after if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    retried = [t for t in after if "failed_trial" in t.system_attrs]
    assert retried and retried[0].system_attrs["failed_trial"] == after[0].number
    assert retried[0].params == after[0].params  # the failed trial's params are tried again


def test_a_tune_killed_mid_trial_is_rerun_at_once_without_waiting_for_heartbeats(tables, tmp_path):
    """A killed tune's running trial is never left RUNNING: the rerun takes over the dead tune's lock on
    --output and, the study being in that output's own database, fails the orphaned trial there and then
    (default heartbeat 30 s, grace 60 s: no wait) and retries its parameters once."""
    root, _, _ = tables
    out = tmp_path / "tune"
    storage = f"sqlite:///{out / 'optuna.db'}"
    argv = [sys.executable, "-m", "trainer.tune", "--data", str(root / "pq"), "--study", "orphan", "--output",
            str(out), "--n-trials", "2", "--epochs", "30", "--pruner", "none",
            "--train-args", TINY + " --early-stop 100"]
    _kill_mid_first_trial(argv, storage, "orphan")
    assert [t.state.name for t in _trials(storage, "orphan")] == ["RUNNING"]
    rerun = argv[:argv.index("--epochs") + 1] + ["1"] + argv[argv.index("--epochs") + 2:]
    done = subprocess.run(rerun, cwd=REPO, env=venv_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trial 0 of study orphan was running in run" in done.stdout + done.stderr
    after = _trials(storage, "orphan")
    assert after[0].state.name == "FAIL"
    assert len([t for t in after if t.state.name in ("COMPLETE", "PRUNED")]) == 2
    retried = [t for t in after if t.system_attrs.get("failed_trial") == 0]
    assert retried and retried[0].params == after[0].params
