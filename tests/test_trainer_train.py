"""python -m trainer.train on tiny real tables: bundle, metrics, resume after a kill, refusals."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, venv_env
from trainer.bundle import BUNDLE_FORMAT, load_bundle
from trainer import calibration, train
from trainer.precision import Precision
from trainer.schedules import BudgetOneCycle, CyclicPlateau, Plateau

TINY = ["--image-size", "32", "--batch-size", "16", "--workers", "1", "--no-progress", "--plateau-patience", "20"]


def test_train_writes_metrics_and_a_loadable_bundle(tables, tmp_path):
    root, manifest, _ = tables
    out = tmp_path / "run"
    assert train.main(["--data", str(root / "delta"), "--output", str(out), "--epochs", "2", "--head",
                      "regression", "--reader", "pyarrow"] + TINY) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["train_rows"] == manifest["splits"]["train"] and r["val_rows"] == manifest["splits"]["val"]
               for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_rows"] == manifest["splits"]["test"] and summary["data_version"] == 1
    assert summary["precision"] == Precision.choose("auto", torch.device("cpu")).name  # --precision auto
    model, bundle = load_bundle(str(out / "model.pt"))
    assert bundle["head"] == "regression" and bundle["input_size"] == 32
    assert bundle["data"]["version"] == 1 and bundle["crop"]["detector"] == "none"
    assert bundle["metrics"]["test_mae"] == pytest.approx(summary["test_mae"])
    assert torch.load(out / "model.pt", weights_only=True)["format"] == BUNDLE_FORMAT
    assert any((out / "tensorboard").iterdir())


def test_a_last_batch_of_one_row_is_skipped_not_a_crash(tables, tmp_path):
    """BatchNorm cannot train on one row (at 32 px the last feature map is 1x1: "Expected more than 1 value per
    channel"): a batch size that leaves one row over trains every other row and says it skipped one."""
    root, manifest, _ = tables
    n = manifest["splits"]["train"]
    assert n > 3
    out = tmp_path / "run"
    flags = [f if f != "16" else str(n - 1) for f in TINY]  # batches of n-1 rows, then 1
    assert train.main(["--data", str(root / "pq"), "--output", str(out), "--epochs", "1", "--reader", "pyarrow",
                       "--head", "regression", *flags]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_rows"] == n - 1 and row["train_rows_skipped"] == 1


def test_plateau_lowers_the_cycle_bounds():
    opt = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1e-2)
    sched = CyclicPlateau(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=4, plateau=Plateau(factor=0.5, patience=1))
    cuts = [sched.step_epoch(mae) for mae in [10.0, 9.0, 9.5, 9.4, 8.0, 8.1, 8.2]]
    assert cuts == [False, False, False, True, False, False, True]
    assert sched.bounds() == pytest.approx((2.5e-4, 2.5e-3))
    lrs = []
    for _ in range(8):
        sched.step_batch()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) <= 2.5e-3 + 1e-12 and min(lrs) >= 2.5e-4 - 1e-12  # the cycle now runs inside the new bounds


def test_params_file_and_explicit_flags(tmp_path):
    params = tmp_path / "best.json"
    params.write_text(json.dumps({"lr": 0.02, "batch_size": 32}))
    parser = train.get_args_parser()
    argv = ["--data", "x", "--params", str(params), "--lr", "0.5"]
    args = parser.parse_args(argv)
    train.apply_params_file(args, parser, argv)
    assert (args.lr, args.batch_size) == (0.5, 32)
    params.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(train.TrainError, match="unknown keys"):
        train.apply_params_file(parser.parse_args(argv), parser, argv)


def test_refuses_an_unfinished_table(tables, tmp_path, capsys):
    root, _, _ = tables
    copy = tmp_path / "copy"
    shutil.copytree(root / "pq", copy)
    (copy / "faces" / "_SUCCESS").unlink()
    assert train.main(["--data", str(copy), "--output", str(tmp_path / "run")] + TINY) == 2
    assert "did not finish" in capsys.readouterr().err


def _train_proc(data, out, epochs, *extra):
    return subprocess.Popen([sys.executable, "-m", "trainer.train", "--data", str(data), "--output", str(out),
                             "--epochs", str(epochs), *TINY, *extra], cwd=REPO, env=venv_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def test_resume_after_a_kill_follows_the_same_schedule(tables, tmp_path):
    root, _, _ = tables
    data = root / "pq"
    straight = _train_proc(data, tmp_path / "straight", 4)
    assert straight.wait(timeout=600) == 0, straight.stderr.read().decode()[-2000:]

    out = tmp_path / "killed"
    proc = _train_proc(data, out, 4)
    deadline = time.time() + 600
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = (out / "metrics.jsonl").read_text().splitlines()
    assert len(before) < 4
    resumed = _train_proc(data, out, 4, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]

    a = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    after = (out / "metrics.jsonl").read_text().splitlines()
    b = [json.loads(x) for x in after]
    assert after[: len(before)] == before  # the epochs done before the kill are kept, not redone
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]  # no epoch lost or repeated
    assert [r["lr"] for r in b] == pytest.approx([r["lr"] for r in a], rel=1e-9)  # the same schedule
    # epoch 1 is bit-for-bit the same in both runs (same seed); later epochs differ by Petastorm's
    # timing-dependent shuffling, so their MAEs are only compared in BENCHMARKS.md, at a useful size
    assert b[0]["train_loss"] == a[0]["train_loss"] and b[0]["val_mae"] == a[0]["val_mae"]
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 4


def test_max_minutes_stops_after_the_epoch_that_spends_it(tables, tmp_path):
    root, _, _ = tables
    out = tmp_path / "budget"
    assert train.main(["--data", str(root / "pq"), "--output", str(out), "--epochs", "5", "--max-minutes", "0",
                      "--schedule", "cyclic_plateau", "--reader", "pyarrow"] + TINY) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]  # one epoch always runs; no new one once the budget is spent
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 1


class Clock:
    """Seconds that move only when the test says (the schedule's own clock argument)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_budget_schedule_follows_the_fraction_of_the_budget_spent():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    clock = Clock()
    schedule = BudgetOneCycle(optimizer, max_lr=0.01, seconds=600, clock=clock)
    seen = []
    for second in range(0, 601, 30):  # a batch every 30 s of a 10-minute budget
        clock.now = 100.0 + second
        schedule.step_batch()
        seen.append((second, optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]))
    assert seen[0][1] == pytest.approx(0.01 / 25)  # warm-up starts at max_lr / div_factor
    assert max(lr for _, lr, _ in seen) == pytest.approx(0.01) and seen[6][1] == pytest.approx(0.01)  # peak at 30 %
    after = [lr for second, lr, _ in seen if second >= 180]
    assert all(a > b for a, b in zip(after, after[1:]))  # then it only anneals
    assert seen[-1][1] == pytest.approx(0.01 / 25 / 1e4) and schedule.spent()  # 1e-6 of the peak at the budget
    assert seen[6][2] == pytest.approx(0.85) and seen[-1][2] == pytest.approx(0.95)  # beta1 the other way round
    # a resumed run goes on with the time its checkpoint had spent
    clock.now = 100.0 + 300
    state = schedule.state_dict()
    again = BudgetOneCycle(torch.optim.AdamW(model.parameters(), lr=1.0), max_lr=0.01, seconds=600, clock=Clock())
    again.load_state_dict(state)
    assert again.fraction() == pytest.approx(0.5) and not again.spent()
    # two ranks that share rank 0's start compute the same rate at the same moment, whenever each was built
    clock.now = 100.0 + 120
    late = BudgetOneCycle(torch.optim.AdamW(model.parameters(), lr=1.0), max_lr=0.01, seconds=600, clock=clock)
    late.start_at(100.0)
    assert late.optimizer.param_groups[0]["lr"] == pytest.approx(schedule.rate(120 / 600))
    clock.now = 100.0 + 300
    # fewer --epochs left than the budget holds: the horizon comes sooner
    schedule.plan(epochs_left=2, seconds_per_epoch=50)
    assert schedule.horizon == pytest.approx(400) and schedule.fraction() == pytest.approx(300 / 400)


def test_the_console_counts_the_epochs_a_budget_holds_not_the_epochs_cap():
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1.0)
    clock = Clock()
    budget = BudgetOneCycle(optimizer, max_lr=0.01, seconds=600, clock=clock)
    args = argparse.Namespace(epochs=80, max_minutes=10)
    clock.now += 130  # a first epoch of 130 s: 470 s left hold 3 more and a fourth cut at the budget
    assert train.epoch_label(args, budget, 0, 130.0) == "1/~5 of a 10-minute budget"
    clock.now += 100  # a faster second epoch: 370 s left are 3.7 epochs at its pace
    assert train.epoch_label(args, budget, 1, 100.0) == "2/~6 of a 10-minute budget"
    budget.plan(epochs_left=1, seconds_per_epoch=100.0)  # --epochs 3 ends before the budget does
    assert train.epoch_label(argparse.Namespace(epochs=3, max_minutes=10), budget, 1, 100.0).startswith("2/~3 ")
    clock.now = 100.0 + 600
    assert train.epoch_label(args, budget, 5, 100.0).startswith("6/~6 ")  # spent: no more epochs
    assert train.epoch_label(args, CyclicPlateau(optimizer, 0.001, 0.01, 10), 0, 130.0) == "1/80"  # not budget-planned


def test_a_fraction_of_a_minute_budget_anneals_within_it_and_writes_a_bundle(tables, tmp_path):
    root, _, _ = tables
    out = tmp_path / "minutes"
    assert train.main(["--data", str(root / "pq"), "--output", str(out), "--epochs", "1000", "--max-minutes",
                       "0.2", "--lr", "0.003", "--reader", "pyarrow"] + TINY) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 1 < len(rows) < 1000  # the budget, not --epochs, ended it
    assert rows[-1]["lr_end"] < 0.01 * 0.003  # the last steps ran annealed: under 1 % of the peak
    assert max(r["lr"] for r in rows) > 0.5 * 0.003  # after warming up to near the peak
    assert sum(r["train_seconds"] for r in rows) <= 0.2 * 60 + 1  # training itself stayed inside the budget
    assert load_bundle(str(out / "model.pt"))[1]["format"] == BUNDLE_FORMAT


def test_age_calibration_fits_the_map_on_val_then_the_std_on_the_mapped_errors(tables, tmp_path, caplog):
    import argparse

    import numpy as np

    rng = np.random.default_rng(3)
    true = rng.uniform(1, 90, 3000)
    pred = 40 + 0.7 * (true - 40) + rng.normal(0, 4, true.size)  # read toward the mean
    std = np.full(true.size, 8.0)  # twice too unsure of the mapped errors (about 4 / 0.7)
    args = argparse.Namespace(tta="flip", age_calibration="debias")
    fitted, before = train.fit_calibration(args, (pred[:2000] - true[:2000], std[:2000], true[:2000]),
                                           (pred[2000:] - true[2000:], true[2000:]))
    assert fitted["age_map"] is not None and fitted["tta"] == "flip"
    mapped = calibration.map_ages(pred[2000:], fitted["age_map"]) - true[2000:]
    # the scale is fitted on the mapped errors: +-1 scaled std covers about 68 % of the held-out mapped errors
    assert calibration.coverage(mapped, std[2000:] * fitted["std_scale"]) == pytest.approx(0.683, abs=0.04)
    # the map meets the bias goal on val (3 years for every age group of 30+ faces, trainer.calibration.fit_age_map),
    # and that carries over to the test half's groups of 30+ faces (its 0-2 group holds 24: outside the goal, as on a
    # card)
    assert fitted["age_map"]["bias_goal"] == calibration.BIAS_GOAL
    assert before["test_bias_by_age_group_unmapped"]["70+"] < -8
    names, groups = calibration.age_group_names(), calibration.age_groups(true[2000:])
    counted = [names[g] for g in range(len(names)) if (groups == g).sum() >= calibration.GOAL_FACES]
    assert len(counted) == len(names) - 1 and "0-2" not in counted
    assert max(abs(before["test_bias_by_age_group_mapped"][n]) for n in counted) <= 3.5
    assert before["test_mae_unmapped"] == pytest.approx(np.abs(pred[2000:] - true[2000:]).mean())
    none, nothing = train.fit_calibration(argparse.Namespace(tta="none", age_calibration="none"),
                                          (pred - true, std, true), (pred - true, true))
    assert none["age_map"] is None and nothing == {}
    # a real run on a table whose val split is too small for the map: trained, said, no map stored
    out = tmp_path / "debias"
    assert train.main(["--data", str(tables[0] / "pq"), "--output", str(out), "--epochs", "1",
                       "--head", "distribution", "--age-calibration", "debias", "--reader", "pyarrow"] + TINY) == 0
    assert "no age map fitted (too few val faces)" in caplog.text
    bundle = load_bundle(str(out / "model.pt"))[1]
    assert bundle["calibration"]["age_map"] is None
    assert bundle["params"]["age_calibration"] == "debias"


def test_the_ema_decay_warms_up_then_holds_at_the_given_decay():
    import argparse

    assert train.ema_decay(0.998, 0, True) == 0.0  # the first update takes the model's weights
    assert train.ema_decay(0.998, 1, True) == pytest.approx(1 - 2 ** -0.75)  # 0.405
    assert train.ema_decay(0.998, 100, True) == pytest.approx(1 - 101 ** -0.75)  # 0.969
    assert train.ema_decay(0.998, 100_000, True) == 0.998 and train.ema_decay(0.998, 1, False) == 0.998
    model = torch.nn.Linear(1, 1, bias=False)
    ema = train.build_ema(argparse.Namespace(ema=0.998, ema_warmup=True), model)
    for value in (1.0, 2.0, 3.0):  # the weight after each step; the first update copies it
        model.weight.data.fill_(value)
        ema.update_parameters(model)
    d1, d2 = 1 - 2 ** -0.75, 1 - 3 ** -0.75
    want = (1.0 * d1 + 2.0 * (1 - d1)) * d2 + 3.0 * (1 - d2)  # about 2.1; without warm-up it would stay near 1.0
    assert ema.module.weight.item() == pytest.approx(want, rel=1e-6)
    plain = train.build_ema(argparse.Namespace(ema=0.998, ema_warmup=False), model)
    for value in (1.0, 2.0, 3.0):
        model.weight.data.fill_(value)
        plain.update_parameters(model)
    assert plain.module.weight.item() == pytest.approx((1.0 * 0.998 + 2.0 * 0.002) * 0.998 + 3.0 * 0.002)


def test_ema_weights_are_the_ones_validated_and_bundled(tables, tmp_path):
    root, _, _ = tables
    out = tmp_path / "ema"
    assert train.main(["--data", str(root / "pq"), "--output", str(out), "--epochs", "1", "--ema", "0.5",
                      "--reader", "pyarrow"] + TINY) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    averaged = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    model, _ = load_bundle(str(out / "model.pt"))
    bundled = model.state_dict()
    assert averaged.keys() == bundled.keys()
    assert all(torch.equal(averaged[k], bundled[k]) for k in bundled)  # the average is what ships
    raw = ckpt["model"]
    assert any(not torch.equal(raw[k], bundled[k]) for k in bundled if raw[k].is_floating_point())


def test_progressive_resizing_trains_small_then_at_the_bundle_size(tables, tmp_path):
    root, manifest, _ = tables
    out = tmp_path / "progressive"
    assert train.main(["--data", str(root / "pq"), "--output", str(out), "--epochs", "3", "--start-size", "16",
                      "--final-epochs", "1", "--reader", "pyarrow"] + TINY) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_size"] for r in rows] == [16, 16, 32]
    assert all(r["train_rows"] == manifest["splits"]["train"] for r in rows)
    assert load_bundle(str(out / "model.pt"))[1]["input_size"] == 32


def test_final_epochs_alone_is_refused(tables, tmp_path, capsys):
    root, _, _ = tables
    assert train.main(["--data", str(root / "pq"), "--output", str(tmp_path / "x"), "--epochs", "2",
                       "--final-epochs", "1"] + TINY) == 2
    err = capsys.readouterr().err
    assert "--final-epochs needs --start-size" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_precision_sets_the_training_arithmetic_while_evaluation_stays_fp32_on_a_cpu(name, tmp_path):
    """--precision bf16 trains the convolutions in bf16 on channels-last tensors (fp32: neither); the weights stay
    fp32, and evaluation on a CPU runs in fp32 as every predictor does: the same predictions either way."""
    from trainer.model import build_model
    from trainer.schedules import Constant

    cpu = torch.device("cpu")
    precision = Precision.choose(name, cpu)
    torch.manual_seed(0)
    model = precision.model(build_model("distribution"))
    reference = build_model("distribution")
    seen = []
    model.conv1.register_forward_hook(
        lambda m, i, o: seen.append((o.dtype, o.is_contiguous(memory_format=torch.channels_last), model.training)))
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen),
             "age": torch.tensor([1, 5, 12, 20, 33, 47, 60, 85])}
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    learner = train.Learner(model, optimizer, Constant(), "distribution", "l1", cpu, 0.0, precision=precision)
    stats = train.train_one_epoch(learner, [batch])
    assert stats["train_rows"] == 8 and torch.isfinite(torch.tensor(stats["train_loss"]))
    dtype, channels_last, training = seen[-1]
    assert training and dtype == (torch.bfloat16 if name == "bf16" else torch.float32)
    assert channels_last == (name == "bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the bundle holds plain (contiguous) fp32 tensors whatever the layout it trained in
    from trainer.bundle import Provenance, save_bundle
    save_bundle(str(tmp_path / "model.pt"), model, "distribution", 32, {"size": 32, "margin": 0.0},
                Provenance(data={}, params={}, metrics={}))
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert all(t.is_contiguous() and t.dtype in (torch.float32, torch.int64) for t in saved.values())
    saved["conv1.weight"].view(-1)  # what a reader may do with a plain tensor

    reference.load_state_dict(model.state_dict())
    err, std, true = train.predict_split(model, [batch], "distribution", precision, lambda it, **kw: it, "val")
    ref_err, ref_std, _ = train.predict_split(reference, [batch], "distribution", Precision.choose("fp32", cpu),
                                              lambda it, **kw: it, "val")
    assert seen[-1][0] == torch.float32 and not seen[-1][2]  # the model's own evaluation pass: fp32
    assert err == pytest.approx(ref_err, abs=1e-4) and std == pytest.approx(ref_std, abs=1e-4)
    assert list(true) == [1, 5, 12, 20, 33, 47, 60, 85]


def test_auto_precision_follows_the_processor(monkeypatch, tmp_path):
    """auto: bf16 where the CPU lists avx512_bf16 or amx_bf16 in /proc/cpuinfo, fp32 where it does not."""
    from trainer import precision as precision_module

    cpu = torch.device("cpu")
    real_open = open
    for flags, expected in (("fpu avx2 avx512f avx512bw", "fp32"), ("fpu avx2 avx512f avx512_bf16", "bf16"),
                            ("fpu amx_bf16 amx_tile", "bf16"), ("fpu avx512_bf16x", "fp32")):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
        precision_module.cpu_has_bf16.cache_clear()
        assert precision_module.Precision.choose("auto", cpu).name == expected, flags
        assert precision_module.Precision.choose("fp32", cpu).name == "fp32"
    monkeypatch.undo()
    precision_module.cpu_has_bf16.cache_clear()


def test_age_weighting_trains_on_the_train_splits_own_age_weights(tables, tmp_path, caplog):
    """--age-weighting sqrt_inv weights each row's loss by its age's weight from the train split's labels (read
    from the table: the log states the weights' range) and the run says so in summary.json."""
    from trainer.data import split_ages, split_source
    from trainer.model import age_weights

    root, manifest, _ = tables
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="faceage")
    assert train.main(["--data", str(root / "pq"), "--output", str(out), "--epochs", "1", "--reader", "pyarrow",
                       "--age-weighting", "sqrt_inv"] + TINY) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["age_weighting"] == "sqrt_inv" and summary["rows"]["train"] == manifest["splits"]["train"]
    ages = split_ages(split_source(str(root / "pq"), "train"))
    assert len(ages) == manifest["splits"]["train"]
    w = age_weights(ages)
    assert f"weights {w.min():.2f}..{w.max():.2f}" in caplog.text
