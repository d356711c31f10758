"""The predicted std's calibration: coverage, reliability and risk-coverage computed right on cases with known
answers; the scale fitted on val; and one calibrated number from every way of asking (predict, the Python API,
score, an ONNX export, evaluate)."""
from __future__ import annotations

import json
import math
import shutil
import types

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import encode, synthetic_photo
from schemas import layout
from trainer import calibration


def test_coverage_counts_errors_within_k_stds():
    errors = np.array([0.5, -1.5, 2.5, -3.5, 0.0, np.nan])
    stds = np.array([1.0, 1.0, 1.0, 1.0, np.nan, 1.0])  # the NaN std and the NaN error are left out
    assert calibration.coverage(errors, stds) == pytest.approx(1 / 4)
    assert calibration.coverage(errors, stds, 2.0) == pytest.approx(2 / 4)
    assert calibration.coverage(errors, np.full(6, np.nan)) is None  # a regression head: no std


def test_the_fitted_scale_makes_one_std_cover_68_percent():
    rng = np.random.default_rng(0)
    true_std = rng.uniform(2, 10, 20000)
    errors = rng.normal(0, true_std)
    fitted = calibration.fit_std_scale(errors, 2.0 * true_std)  # a model twice too unsure
    assert fitted["std_scale"] == pytest.approx(0.5, rel=0.03)
    assert fitted["within_1sd_before"] == pytest.approx(math.erf(2 / math.sqrt(2)), abs=0.01)  # 95 %: too wide
    assert fitted["within_1sd_after"] == pytest.approx(calibration.ONE_SIGMA, abs=0.002)
    assert calibration.fit_std_scale(errors[:10], true_std[:10])["std_scale"] is None  # too few rows to fit
    assert calibration.apply(np.array([2.0, np.nan]), fitted)[0] == pytest.approx(2.0 * fitted["std_scale"])
    assert np.isnan(calibration.apply(np.array([2.0, np.nan]), fitted)[1])


def test_reliability_and_risk_coverage_on_a_known_case(spark):
    from spark_jobs import evaluate_steps

    # 1,000 faces: std s_i = 1..10 (100 each), error exactly 0.5 s_i for the first half of each std, 3 s_i after
    rows = []
    for i in range(1000):
        std = 1 + i // 100
        err = 0.5 * std if i % 100 < 50 else 3.0 * std
        rows.append((float(err), float(abs(err)), float(std)))
    errors = spark.createDataFrame(rows, "err double, abs_err double, uncertainty double")
    u = evaluate_steps.uncertainty_calibration(errors)
    assert u["within_1sd"] == pytest.approx(0.5) and u["within_2sd"] == pytest.approx(0.5)
    levels = {round(r["nominal"], 2): r["observed"] for r in u["reliability"]}
    assert levels[0.3] == pytest.approx(0.0)  # z = 0.385: not even the 0.5 std errors
    assert levels[0.4] == pytest.approx(0.5)  # z = 0.524: the 0.5 std errors, not the 3 std ones
    assert levels[0.99] == pytest.approx(0.5)  # z = 2.576: the 3 std errors stay out
    curve = u["risk_coverage"]
    assert [round(r["coverage"], 3) for r in curve] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    # MAE of the faces with std <= k: mean over s = 1..k of (0.5 s + 3 s) / 2 = 1.75 x mean(1..k)
    assert [r["mae"] for r in curve] == pytest.approx([1.75 * (k + 1) / 2 for k in range(1, 11)])
    assert all(a["mae"] < b["mae"] for a, b in zip(curve, curve[1:]))  # confident faces are more accurate


AGE_MAP = {"predicted": [0.0, 50.0, 120.0], "age": [10.0, 40.0, 110.0]}


def mapped(age: float) -> float:
    """AGE_MAP by hand: 0..50 -> 10..40 (slope 0.6), 50..120 -> 40..110 (slope 1)."""
    return 10 + 0.6 * age if age <= 50 else age - 10


def test_the_inverse_map_undoes_a_known_pull_toward_the_mean():
    rng = np.random.default_rng(1)
    true = rng.uniform(1, 90, 8000)
    pulled = 40 + 0.7 * (true - 40) + rng.normal(0, 3, true.size)  # children read older, the elderly younger
    age_map = calibration.fit_inverse_map(pulled[:4000], true[:4000])  # fitted on one half ("val")
    assert calibration.check({"age_map": age_map}, "x") is None
    # the inverse of p = 40 + 0.7 (t - 40) is t = 40 + (p - 40) / 0.7, within the fit's noise
    probe = np.array([20.0, 30.0, 40.0, 55.0, 70.0])
    assert calibration.map_ages(probe, age_map) == pytest.approx(40 + (probe - 40) / 0.7, abs=1.5)
    before = calibration.bias_by_age_group(pulled[4000:] - true[4000:], true[4000:])  # the other half ("test")
    after = calibration.bias_by_age_group(calibration.map_ages(pulled[4000:], age_map) - true[4000:], true[4000:])
    assert before["0-2"] > 8 and before["3-9"] > 8 and before["70+"] < -8  # the known pull: +11.4, +10.2, -11.9
    assert max(abs(v) for v in after.values()) < 1.0
    # beyond the knots: the end's offset (slope 1), clipped into 0..120; NaN stays NaN
    ends = calibration.map_ages(np.array([-50.0, 500.0, np.nan]), AGE_MAP)
    assert ends[0] == 0 and ends[1] == 120 and np.isnan(ends[2])
    assert calibration.map_ages(np.array([130.0 - 200]), {"predicted": [0, 10], "age": [5, 15]})[0] == 0
    assert calibration.fit_inverse_map(pulled[:30], true[:30]) is None  # too few faces for two bins


def test_the_strength_corrects_only_as_far_as_the_bias_goal_needs():
    rng = np.random.default_rng(2)
    true = rng.uniform(1, 90, 6000)
    pulled = 40 + 0.7 * (true - 40) + rng.normal(0, 3, true.size)
    age_map = calibration.fit_inverse_map(pulled, true)
    half = calibration.map_ages(pulled, {**age_map, "strength": 0.5})
    full = calibration.map_ages(pulled, age_map)
    inside = full > 0  # away from the clip at age 0: halfway between the prediction and the full map
    assert inside.mean() > 0.95 and half[inside] == pytest.approx((pulled[inside] + full[inside]) / 2, abs=1e-4)
    chosen = calibration.choose_strength(pulled, true, age_map)

    def worst(strength):
        err = calibration.map_ages(pulled, {**age_map, "strength": strength}) - true
        return max(abs(v) for v in calibration.bias_by_age_group(err, true).values())

    # the pull leaves 70+ about 12 years young: about three quarters of the map brings every group within 3
    assert 0.6 <= chosen <= 0.85 and worst(chosen) <= 3.0 < worst(chosen - 0.05)
    assert calibration.choose_strength(true + rng.normal(0, 3, true.size), true, age_map) == 0.0  # unbiased: none
    assert calibration.choose_strength(pulled, true, age_map, goal=0.01) == 1.0  # out of reach: the full map


def test_the_age_map_meets_the_bias_goal_at_the_lowest_mae():
    rng = np.random.default_rng(3)
    true = np.concatenate([rng.uniform(1, 90, 3000), rng.uniform(20, 35, 3000)])  # skewed toward the 20s, as UTKFace
    pulled = 33 + 0.7 * (true - 33) + rng.normal(0, 3, true.size) * (1 + true / 30)  # noisier with age
    val, test = slice(0, None, 2), slice(1, None, 2)
    age_map = calibration.fit_age_map(pulled[val], true[val])
    assert calibration.check({"age_map": age_map}, "x") is None
    assert age_map["bias_goal"] == 3.0 and age_map["pivot"] == np.median(true[val])

    def judged(ages, rows):
        err = ages - true[rows]
        return float(np.abs(err).mean()), calibration.bias_by_age_group(err, true[rows])

    before_mae, before = judged(pulled[test], test)
    assert min(before.values()) < -6 and max(before.values()) > 6  # the known pull, both ends
    # on val: every group within the goal less half a standard error; on the other half within the goal
    assert max(abs(v) for v in judged(calibration.map_ages(pulled[val], age_map), val)[1].values()) <= 3.0
    mae, after = judged(calibration.map_ages(pulled[test], age_map), test)
    assert max(abs(v) for v in after.values()) <= 3.0
    # the inverse map at the smallest strength meeting the same goal on val costs more MAE on the other half
    inverse = calibration.fit_inverse_map(pulled[val], true[val])
    inverse["strength"] = calibration.choose_strength(pulled[val], true[val], inverse)
    inverse_mae, _ = judged(calibration.map_ages(pulled[test], inverse), test)
    assert mae < inverse_mae - 0.1, (mae, inverse_mae, before_mae)
    # ages move only away from the val median, never across it
    probe = np.linspace(0, 100, 201)
    moved = calibration.map_ages(probe, age_map) - probe
    assert (moved[probe >= age_map["pivot"]] >= -1e-4).all() and (moved[probe <= age_map["pivot"]] <= 1e-4).all()


def test_an_age_map_out_of_the_goals_reach_loosens_it_and_says_so():
    rng = np.random.default_rng(4)
    true = rng.uniform(1, 90, 4000)
    away = true + np.where(true >= 70, 12.0, 0.0) + rng.normal(0, 2, true.size)  # the elderly read OLDER: away
    age_map = calibration.fit_age_map(away, true)  # from the mean, which an outward-only map cannot undo
    assert calibration.check({"age_map": age_map}, "x") is None and age_map["bias_goal"] > 3.0
    after = calibration.bias_by_age_group(calibration.map_ages(away, age_map) - true, true)
    assert max(abs(v) for v in after.values()) <= age_map["bias_goal"]
    assert calibration.fit_age_map(away[:40], true[:40]) is None  # too few faces


def test_an_age_map_that_would_cost_more_val_mae_than_allowed_loosens_the_goal_instead():
    # a weak model (a short budget): ages pulled hard toward the mean and noisy. The maps that meet 3 years bend
    # whole age ranges onto a few ages; the trainer keeps the tightest goal whose map costs <= MAX_MAP_COST
    rng = np.random.default_rng(5)
    true = np.concatenate([rng.uniform(1, 90, 1200), rng.uniform(20, 35, 800)])
    weak = 33 + 0.3 * (true - 33) + rng.normal(0, 8, true.size)
    val, test = slice(0, None, 2), slice(1, None, 2)
    bent = calibration.fit_age_map(weak[val], true[val], max_cost=None)  # the rule before: the goal at any cost
    kept = calibration.fit_age_map(weak[val], true[val])
    assert bent["bias_goal"] == 3.0 and bent["val_mae_mapped"] > 1.2 * bent["val_mae_unmapped"]
    assert kept["val_mae_unmapped"] == bent["val_mae_unmapped"]
    assert kept["val_mae_mapped"] <= (1 + calibration.MAX_MAP_COST) * kept["val_mae_unmapped"] + 1e-6
    assert kept["bias_goal"] is not None and kept["bias_goal"] > 3.0  # said, not hidden
    mapped = calibration.map_ages(weak[val], kept) - true[val]
    assert abs(float(np.abs(mapped).mean()) - kept["val_mae_mapped"]) < 0.01  # the cost it records is the real one

    def test_mae(age_map):
        return float(np.abs(calibration.map_ages(weak[test], age_map) - true[test]).mean())

    assert test_mae(kept) < test_mae(bent) - 1.0  # on faces it was not fitted on, too
    # a model the goal suits is not affected: its map meets 3 years within the limit
    pulled = 33 + 0.7 * (true - 33) + rng.normal(0, 3, true.size)
    assert calibration.fit_age_map(pulled, true)["bias_goal"] == 3.0


def test_a_malformed_age_map_is_refused_in_one_line(calibrated, tmp_path):
    from trainer.bundle import load_bundle
    from trainer.runtime import BundleError

    for bad in ({"predicted": [1, 1], "age": [1, 2]}, {"predicted": [1, 2], "age": [3, 2]},
                {"predicted": [1, 2, 3], "age": [1, 2]}, {"predicted": [1, float("nan")], "age": [1, 2]},
                {"age": [1, 2]}, "0..120", {"predicted": [1, 2], "age": [1, 2], "strength": 1.5}):
        bundle = torch.load(calibrated[0], weights_only=True)
        bundle["calibration"]["age_map"] = bad
        torch.save(bundle, tmp_path / "bad.pt")
        with pytest.raises(BundleError, match="age_map") as e:
            load_bundle(str(tmp_path / "bad.pt"))
        assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def calibrated(bundles, tmp_path_factory):
    """The fixture's detecting bundle with a calibration (std scale 2.5, the age map AGE_MAP), and its original."""
    _, detecting = bundles
    folder = tmp_path_factory.mktemp("calibrated")
    bundle = torch.load(detecting, weights_only=True)
    bundle["calibration"] = {"std_scale": 2.5, "fitted_on": "val", "rows": 100, "within_1sd_before": 0.3,
                             "within_1sd_after": 0.68, "tta": "none", "age_map": AGE_MAP}
    torch.save(bundle, folder / "model.pt")
    photos = folder / "photos"
    photos.mkdir()
    for i, age in enumerate((11, 38, 64)):
        photo, _ = synthetic_photo(age, seed=150 + i)
        (photos / f"{age}_0_0_2026010100{i:05d}.jpg").write_bytes(encode(photo))
    return folder / "model.pt", detecting, photos


def test_every_predictor_applies_the_bundles_calibration(calibrated, tmp_path):
    from faceage import Estimator
    from spark_jobs import predict
    from trainer import export

    model, plain, photos = calibrated
    raw = predict.estimate_ages(str(photos), str(plain))
    scaled = predict.estimate_ages(str(photos), str(model))
    assert [r["age"] for r in scaled] == pytest.approx([mapped(r["age"]) for r in raw], abs=1e-4)
    assert [r["uncertainty"] for r in scaled] == pytest.approx([2.5 * r["uncertainty"] for r in raw], rel=1e-6)
    api = Estimator.load(str(model)).predict(str(photos))
    assert [f.uncertainty for f in api] == pytest.approx([r["uncertainty"] for r in scaled], rel=1e-6)
    assert [f.age for f in api] == pytest.approx([r["age"] for r in scaled], abs=1e-4)
    onnx = tmp_path / "model.onnx"
    assert export.main(["--model", str(model), "--output", str(onnx)]) == 0
    assert json.loads(open(layout.contract_path(str(onnx))).read())["calibration"]["std_scale"] == 2.5
    from_onnx = predict.estimate_ages(str(photos), str(onnx))
    assert [r["uncertainty"] for r in from_onnx] == pytest.approx([r["uncertainty"] for r in scaled], abs=1e-3)
    assert [r["age"] for r in from_onnx] == pytest.approx([r["age"] for r in scaled], abs=1e-3)
    script = tmp_path / "model.ts"
    # the TorchScript export is kept only when its ages (mapped in Python after the graph) match the bundle's
    assert export.main(["--model", str(model), "--format", "torchscript", "--output", str(script)]) == 0


def test_the_tta_to_run_is_the_calibrations_unless_asked_and_a_mismatch_is_named():
    from trainer.runtime import TTAError, resolve_tta

    flip = {"calibration": {"tta": "flip", "std_scale": 2.0, "age_map": AGE_MAP}}
    assert resolve_tta(flip, None) == ("flip", None) and resolve_tta(flip, "flip") == ("flip", None)
    mode, warning = resolve_tta(flip, "flip-zoom")
    assert mode == "flip-zoom" and "age map and std scale were fitted under --tta flip" in warning
    scale_only = {"calibration": {"tta": "flip-zoom", "std_scale": 2.0}}
    assert "the model's std scale was fitted under --tta flip-zoom" in resolve_tta(scale_only, "none")[1]
    # nothing fitted that depends on the mode (scale 1, no map), or no mode recorded: no warning; default none
    assert resolve_tta({"calibration": {"tta": "flip", "std_scale": 1.0}}, "none") == ("none", None)
    assert resolve_tta({"calibration": {"std_scale": 2.0}}, None) == ("none", None)
    assert resolve_tta({"calibration": {"std_scale": 2.0}}, "flip") == ("flip", None)
    assert resolve_tta({"calibration": None}, None) == ("none", None) and resolve_tta({}, None) == ("none", None)
    with pytest.raises(TTAError, match="tta 'sideways': use one of none, flip, flip-zoom"):
        resolve_tta(flip, "sideways")


def test_every_predictor_runs_the_tta_its_calibration_was_fitted_under(calibrated, tmp_path, capsys):
    from faceage import Estimator, serve
    from spark_jobs import predict, score
    from trainer import export, pyfunc_model, runtime
    from trainer.bundle import Predictor, load_bundle

    model, _, photos = calibrated  # its calibration (age map, std scale 2.5) says it was fitted under --tta none
    flipped = tmp_path / "flipped.pt"  # the same weights and calibration, said to be fitted under --tta flip
    bundle = torch.load(model, weights_only=True)
    bundle["calibration"]["tta"] = "flip"
    torch.save(bundle, flipped)

    def ages(rows):  # {photo: age, photo + " std": its std}
        ok = [r for r in rows if r["status"] == "ok"]
        return {**{r["source"].split("/")[-1]: r["age"] for r in ok},
                **{r["source"].split("/")[-1] + " std": r["uncertainty"] for r in ok}}

    as_fitted = ages(predict.estimate_ages(str(photos), str(flipped)))  # no tta: the calibration's
    assert as_fitted and as_fitted == pytest.approx(ages(predict.estimate_ages(str(photos), str(model), tta="flip")))
    unflipped = ages(predict.estimate_ages(str(photos), str(flipped), tta="none"))
    assert unflipped == pytest.approx(ages(predict.estimate_ages(str(photos), str(model))))  # model's own: none
    assert max(abs(as_fitted[k] - unflipped[k]) for k in as_fitted) > 1e-3  # the modes do differ here
    assert Estimator.load(str(flipped)).info()["tta"] == "flip" and Estimator.load(str(model)).info()["tta"] == "none"
    reference = Predictor(str(flipped))
    crops = np.random.default_rng(0).integers(0, 256, (4, reference.size, reference.size, 3), dtype=np.uint8)
    torch_default = reference.predict(crops)
    assert np.allclose(torch_default, reference.predict(crops, tta="flip"), equal_nan=True)
    assert not np.allclose(torch_default[0], reference.predict(crops, tta="none")[0])
    onnx = tmp_path / "flipped.onnx"
    assert export.main(["--model", str(flipped), "--output", str(onnx)]) == 0  # the contract carries the mode
    assert np.allclose(runtime.OnnxPredictor(str(onnx)).predict(crops), torch_default, atol=1e-3, equal_nan=True)
    assert serve.get_args_parser().parse_args([]).tta is None  # the service too: Estimator.load(tta=None)
    # the MLflow pyfunc takes the mode as a param: by default the calibration's; another one warns once, not per call
    pyfunc = pyfunc_model.FaceAgeModel()
    pyfunc.load_context(types.SimpleNamespace(artifacts={"bundle": str(flipped)}))
    # PNG is lossless: the pyfunc decodes the very pixels the Predictor was given
    frame = pd.DataFrame({"image": [encode(Image.fromarray(crop), "PNG") for crop in crops]})
    capsys.readouterr()
    assert np.allclose(pyfunc.predict(None, frame), torch_default[0], atol=1e-4)
    for _ in range(2):
        assert np.allclose(pyfunc.predict(None, frame, params={"tta": "none"}), reference.predict(crops, tta="none")[0],
                           atol=1e-4)
    warned = [line for line in capsys.readouterr().out.splitlines() if "fitted under --tta flip" in line]
    assert len(warned) == 1 and warned[0].endswith("(leave --tta out to run flip)") and "pyfunc: --tta none" in warned[0]
    # a mode no path knows is refused by the one check every path shares (Estimator before it loads the model)
    for refuse in (lambda: Estimator.load(str(flipped), tta="sideways"), lambda: reference.predict(crops, tta="sideways"),
                   lambda: pyfunc.predict(None, frame, params={"tta": "sideways"})):
        with pytest.raises(runtime.TTAError, match="tta 'sideways': use one of none, flip, flip-zoom"):
            refuse()
    # an asked mode that is not the calibration's runs as asked, and says so in one line
    capsys.readouterr()
    assert predict.main([str(photos), "--model", str(flipped), "--json", "--tta", "none"]) == 0
    assert predict.main([str(photos), "--model", str(flipped), "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    warned = [line for line in out if "fitted under --tta flip" in line]
    assert len(warned) == 1 and "--tta none" in warned[0] and "age map and std scale" in warned[0]
    printed = [json.loads(line) for line in out if line.startswith("{")]
    half = len(printed) // 2  # the CLI's numbers: the first run's, then the default's
    assert ages(printed[:half]) == pytest.approx(unflipped) and ages(printed[half:]) == pytest.approx(as_fitted)
    scored = tmp_path / "scored"
    assert score.main(["--model", str(flipped), "--input", str(photos), "--tta", "none", "--output", str(scored)]) == 0
    assert json.loads((scored / layout.SCORE_MANIFEST).read_text())["tta"] == "none"
    assert any("score: --tta none" in line and "fitted under --tta flip" in line
               for line in capsys.readouterr().out.splitlines())
    # a calibration that names no TTA mode this code knows is refused in one line
    bundle["calibration"]["tta"] = "sideways"
    torch.save(bundle, tmp_path / "bad.pt")
    with pytest.raises(runtime.BundleError, match="calibration tta 'sideways'"):
        load_bundle(str(tmp_path / "bad.pt"))


def test_recalibrate_drops_the_age_map_from_a_copy_and_nothing_else(calibrated, tmp_path, capsys):
    from spark_jobs import predict
    from trainer import recalibrate

    model, plain, photos = calibrated
    before = model.read_bytes()
    copy = tmp_path / "unmapped.pt"
    assert recalibrate.main(["--model", str(model), "--drop", "age_map", "--output", str(copy)]) == 0
    assert model.read_bytes() == before  # the original is untouched
    raw = predict.estimate_ages(str(photos), str(plain))
    unmapped = predict.estimate_ages(str(photos), str(copy))
    assert [r["age"] for r in unmapped] == pytest.approx([r["age"] for r in raw], abs=1e-5)  # no age map
    assert [r["uncertainty"] for r in unmapped] == pytest.approx([2.5 * r["uncertainty"] for r in raw], rel=1e-6)
    assert torch.load(copy, weights_only=True)["calibration"]["dropped"] == ["age_map"]
    capsys.readouterr()
    assert recalibrate.main(["--model", str(model), "--drop", "age_map", "--output", str(model)]) == 2
    (tmp_path / "notes.txt").write_text("mine")
    assert recalibrate.main(["--model", str(model), "--drop", "age_map", "--output",
                             str(tmp_path / "notes.txt")]) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "the bundle itself" in err[0] and "not a faceage model bundle" in err[1]
    half = tmp_path / "half.pt"
    assert recalibrate.main(["--model", str(model), "--age-map-strength", "0.5", "--output", str(half)]) == 0
    halfway = predict.estimate_ages(str(photos), str(half))
    assert [r["age"] for r in halfway] == pytest.approx([(r["age"] + mapped(r["age"])) / 2 for r in raw], abs=1e-4)
    assert recalibrate.main(["--model", str(copy), "--age-map-strength", "0.5", "--output", str(half)]) == 2
    assert recalibrate.main(["--model", str(model), "--output", str(half)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no age map" in err[-2] and "give --drop" in err[-1]


def test_recalibrate_refits_on_scored_faces_as_the_trainer_does(bundles, tables, tmp_path, capsys):
    import argparse

    from spark_jobs import score
    from trainer import recalibrate
    from trainer.train import fit_calibration

    plain, _ = bundles
    root = tables[0] / "pq"
    scored = tmp_path / "scored"
    assert score.main(["--model", str(plain), "--input", str(root), "--output", str(scored)]) == 0
    out = tmp_path / "refit.pt"
    assert recalibrate.main(["--model", str(plain), "--refit-on", str(scored), "--labels", str(root),
                             "--output", str(out)]) == 0
    # the same fit by hand: the predictions joined to the table's ages, the stds back to before the old scale
    preds = pd.concat(pq.read_table(p).to_pandas() for p in (scored / layout.PREDICTIONS_DIR).glob("*.parquet"))
    ages = pd.concat(pq.read_table(p).to_pandas()[["face_id", "age"]] for p in root.glob("faces/**/*.parquet"))
    rows = preds.merge(ages, on="face_id")
    old = calibration.std_scale(torch.load(plain, weights_only=True)["calibration"])
    want, _ = fit_calibration(argparse.Namespace(tta="none", age_calibration="debias"),
                              ((rows.predicted_age - rows.age).to_numpy(float), rows.uncertainty.to_numpy(float) / old,
                               rows.age.to_numpy(float)), (np.array([]), np.array([])))
    got = torch.load(out, weights_only=True)["calibration"]
    assert got["refit_on"]["rows"] == len(rows) == len(ages) > 0
    assert got["std_scale"] == pytest.approx(want["std_scale"]) and got["age_map"] == want["age_map"]
    # refused in one line: ages that went through an age map, other weights, half the flags
    mapped = tmp_path / "mapped.pt"
    bundle = torch.load(plain, weights_only=True)
    bundle["calibration"] = {**(bundle["calibration"] or {}), "age_map": AGE_MAP}
    torch.save(bundle, mapped)
    scored_mapped = tmp_path / "scored-mapped"
    assert score.main(["--model", str(mapped), "--input", str(root), "--output", str(scored_mapped)]) == 0
    capsys.readouterr()
    assert recalibrate.main(["--model", str(mapped), "--refit-on", str(scored_mapped), "--labels", str(root),
                             "--output", str(tmp_path / "x.pt")]) == 2
    other = tmp_path / "other.pt"
    bundle = torch.load(plain, weights_only=True)
    bundle["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in bundle["state_dict"].items()}
    torch.save(bundle, other)
    assert recalibrate.main(["--model", str(other), "--refit-on", str(scored), "--labels", str(root),
                             "--output", str(tmp_path / "x.pt")]) == 2
    assert recalibrate.main(["--model", str(plain), "--refit-on", str(scored), "--output", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "age map" in err[0] and "other weights" in err[1] and "go together" in err[2]
    assert not (tmp_path / "x.pt").exists()


def test_score_writes_and_evaluate_reports_the_calibrated_std(calibrated, tmp_path):
    from spark_jobs import evaluate, predict, score

    model, _, photos = calibrated
    out = tmp_path / "scored"
    assert score.main(["--model", str(model), "--input", str(photos), "--output", str(out)]) == 0
    rows = pd.concat(pq.read_table(p).to_pandas() for p in (out / layout.PREDICTIONS_DIR).glob("*.parquet"))
    by_name = {p.split("/")[-1]: u for p, u in zip(rows.source_path, rows.uncertainty)}
    want = {r["source"].split("/")[-1]: r["uncertainty"] for r in predict.estimate_ages(str(photos), str(model))}
    assert by_name == pytest.approx(want, abs=1e-4)  # score and predict: the same calibrated std
    ages = {p.split("/")[-1]: a for p, a in zip(rows.source_path, rows.predicted_age)}
    want = {r["source"].split("/")[-1]: r["age"] for r in predict.estimate_ages(str(photos), str(model))}
    assert ages == pytest.approx(want, abs=1e-3)  # and the same mapped ages
    manifest = json.loads((out / layout.SCORE_MANIFEST).read_text())
    assert manifest["model_calibration"]["std_scale"] == 2.5
    labels = tmp_path / "labels.csv"
    names = sorted(p.name for p in photos.iterdir())
    pd.DataFrame({"path": [str(photos / n) for n in names], "age": [int(n.split("_")[0]) for n in names]}).to_csv(
        labels, index=False)
    report = tmp_path / "report"
    assert evaluate.main(["--predictions", str(out), "--labels", str(labels), "--output", str(report)]) == 0
    metrics = json.loads((report / layout.EVAL_METRICS).read_text())
    errors = {p.split("/")[-1]: abs(a - int(p.split("/")[-1].split("_")[0]))
              for p, a in zip(rows.source_path, rows.predicted_age)}
    within = np.mean([errors[k] <= by_name[k] for k in errors])
    assert metrics["uncertainty"]["within_1sd"] == pytest.approx(within)  # evaluate reads the same std
    assert metrics["model_calibration"]["std_scale"] == 2.5
    for plot in (layout.PLOT_RELIABILITY, layout.PLOT_RISK_COVERAGE):
        assert (report / plot).exists()
    assert "carries the model's calibration: x 2.500" in (report / layout.EVAL_HTML).read_text()
    shutil.rmtree(report)


def test_bias_by_age_group_uses_the_groups_evaluate_and_the_card_slice_by():
    from schemas.tables import AGE_GROUP_BOUNDS, age_group_names

    assert age_group_names() == ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]
    assert len(age_group_names()) == len(AGE_GROUP_BOUNDS)
    true = np.array([0, 2, 3, 9, 10, 69, 70, 116, np.nan])
    assert list(calibration.age_groups(true)) == [0, 0, 1, 1, 2, 7, 8, 8, -1]
    errors = np.array([1.0, 3.0, -2.0, -4.0, 5.0, 6.0, -1.0, -3.0, 9.0])
    assert calibration.bias_by_age_group(errors, true) == {"0-2": 2.0, "3-9": -3.0, "10-19": 5.0, "60-69": 6.0,
                                                         "70+": -2.0}
