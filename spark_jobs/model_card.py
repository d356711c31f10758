"""python -m spark_jobs.model_card: a model card (Markdown) from a training run and its evaluation report.

    python -m spark_jobs.model_card --run runs/recipe --report runs/recipe/report --command "make recipe" \\
        --output runs/recipe/MODEL_CARD.md

Reads the run's summary.json and metrics.jsonl (trainer.train), the bundle's recorded settings, and the
report's metrics.json (spark_jobs/evaluate.py: overall and per-slice MAE with intervals, the uncertainty's
calibration); writes what a user of the model needs: the data and its version, the exact command, the
test metrics, MAE by age group / gender / race, how honest the uncertainty is, and what the numbers do
not cover. Aggregates only: no image, path or per-face row of the data is copied into it.
"""
from __future__ import annotations

import json
import sys
import time
from typing import List, NamedTuple, Optional

from schemas import layout
from shell import uri
from shell.cli import entry_points, log, Parser, path_arg
from shell.errors import UserError


def get_args_parser() -> Parser:
    p = Parser("model_card", prog="python -m spark_jobs.model_card", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=path_arg, help="the trainer's run folder (summary.json, metrics.jsonl)")
    p.add_argument("--report", required=True, type=path_arg, help="evaluate.py's output folder for the test split")
    p.add_argument("--command", required=True, help="the exact command that produced the model")
    p.add_argument("--output", required=True, type=path_arg, help="Markdown file to write")
    p.add_argument("--title", default="faceage model card")
    p.add_argument("--note", action="append", default=[], help="a line for the card's notes (repeatable)")
    p.add_argument("--cross", action="append", default=[], metavar="NAME=REPORT",
                   help="evaluate.py's output folder for faces from elsewhere (another dataset, other cameras), with "
                        "a name for the card (repeatable): the card compares its MAE with the test split's")
    p.add_argument("--bundle", type=path_arg,
                   help="the bundle the reports scored, when not the run's own (e.g. a trainer.recalibrate copy)")
    p.add_argument("--unmapped", type=path_arg,
                   help="evaluate.py's output folder for the test split scored by the bundle WITHOUT its age map "
                        "(python -m trainer.recalibrate --drop age_map): the card shows bias by age before and after")
    p.add_argument("--cross-unmapped", action="append", default=[], metavar="NAME=REPORT",
                   help="the same for a --cross set of the same NAME (repeatable)")
    return p


BIAS_GOAL = {"in-domain": 3.0, "elsewhere": 5.0}  # issue 24: |bias| of an age group with >= 30 faces at most this
GOAL_FACES = 30


def _groups(metrics: dict) -> dict:
    return {s["value"]: s for s in metrics["slices"] if s["slice"] == "age_group"}


def _off_goal(metrics: dict, limit: float) -> List[str]:
    """The age groups of >= GOAL_FACES faces whose |bias| exceeds `limit`, as 'group (+b)'."""
    return [f"{g} ({s['bias']:+.1f})" for g, s in _groups(metrics).items()
            if s["count"] >= GOAL_FACES and s.get("bias") is not None and abs(s["bias"]) > limit]


def age_map_section(fitted: Optional[dict], pairs: List[tuple]) -> List[str]:
    """Bias and MAE by true age group before (the bundle without its age map) and after (as it ships), for each
    (name, before metrics, after metrics, goal) set; the groups off the issue's goal."""
    age_map = (fitted or {}).get("age_map")
    if not pairs or not age_map:
        return []
    fitted_by = f"fitted on the val split ({age_map.get('fitted_on_rows')} faces, {len(age_map['predicted'])} knots"
    if "bias_goal" in age_map:  # trainer.calibration.fit_age_map
        goal = age_map["bias_goal"]
        how = (f"{fitted_by}; trainer.calibration): the increasing map with the lowest val MAE"
               + (f" among those that bring every age group of {GOAL_FACES}+ val faces within {goal:g} years (less "
                  f"{age_map['margin_se']:g} standard error of the group's mean)" if goal is not None
                  else f" (no map of its kind brings every age group of {GOAL_FACES}+ val faces within a bias goal)")
               + f", moving ages only away from the val median ({age_map['pivot']:g})"
               + (f"; val MAE {age_map['val_mae_unmapped']:.2f} without it, {age_map['val_mae_mapped']:.2f} with it"
                  if "val_mae_mapped" in age_map else "")
               + (f" at strength {age_map['strength']:g}" if "strength" in age_map else ""))
    else:  # trainer.calibration.fit_inverse_map at the strength choose_strength chose
        how = (f"{fitted_by}; trainer.calibration): the inverse of the mean predicted age per true age, applied at "
               f"strength {age_map.get('strength', 1.0):g} (each age moves that fraction of the way; the smallest "
               f"strength that brings every age group of {GOAL_FACES}+ val faces within {BIAS_GOAL['in-domain']:g} "
               f"years)")
    lines = ["## Ages read toward the mean: the age map", "",
             f"Every predicted age goes through an age map {how}. Before = the same weights without the map "
             f"(`python -m trainer.recalibrate --drop age_map`), scored and evaluated by the same jobs.", ""]
    for name, before, after, limit in pairs:
        b, a = _groups(before), _groups(after)
        lines += [f"### {name}", "", "| group | faces | bias before | bias after | MAE before | MAE after |",
                  "|---|---|---|---|---|---|"]
        for group, s in a.items():
            old = b.get(group) or {}
            lines.append(f"| {group}{' (small)' if s.get('small') else ''} | {s['count']} | {_f(old.get('bias'))} | "
                         f"{_f(s['bias'])} | {_f(old.get('mae'))} | {_f(s['mae'])} |")
        lines.append(f"| all | {after['rows']['matched']} | {_f(before['overall']['bias'])} | "
                     f"{_f(after['overall']['bias'])} | {_f(before['overall']['mae'])} | {_f(after['overall']['mae'])} |")
        lines += ["", f"Groups of {GOAL_FACES}+ faces biased by more than {limit:g} years: before "
                      f"{', '.join(_off_goal(before, limit)) or 'none'}; after {', '.join(_off_goal(after, limit)) or 'none'}.",
                  ""]
    return lines


def _json(path: str) -> dict:
    try:
        return json.loads(uri.read_text(path))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run the trainer and evaluate.py first)") from None
    except ValueError as e:
        raise UserError(f"{path}: not JSON ({e})") from None


def _f(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mae(row: dict) -> str:
    """MAE with its 95 % interval when there is one."""
    if row.get("mae_low") is None or row.get("mae_high") is None:
        return _f(row["mae"])
    return f"{_f(row['mae'])} ({_f(row['mae_low'])}–{_f(row['mae_high'])})"


def _version(version) -> str:
    return "a Parquet table: no version" if version is None else f"Delta version {version}"


def at_age_mix(metrics: dict, mix: dict) -> Optional[float]:
    """`metrics`' MAE had its faces the age mix of `mix` (another report): the MAE of each age group weighted by
    that group's share in `mix`, over the groups both have (None when they share none)."""
    groups, weights = _groups(metrics), {g: s["count"] for g, s in _groups(mix).items()}
    shared = [g for g in weights if g in groups and groups[g].get("mae") is not None]
    total = sum(weights[g] for g in shared)
    return sum(weights[g] * groups[g]["mae"] for g in shared) / total if total else None


def cross_section(cross: List[tuple], test: dict) -> List[str]:
    """The card's cross-dataset table: (name, evaluate metrics) pairs against the test split's report: the MAE,
    its ratio to the test MAE, and the same at the test split's age mix (what is left of the gap when the sets'
    age distributions are made alike: per-age difficulty, not composition)."""
    if not cross:
        return []
    test_mae = test["overall"]["mae"]
    lines = ["## Faces unlike the training set", "",
             "| set | faces | MAE (95 % CI) | CS@5 | bias | MAE / test MAE | MAE at the test split's age mix (ratio) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in cross:
        o, mixed = m["overall"], at_age_mix(m, test)
        lines.append(f"| {name} | {m['rows']['matched']} | {_mae(o)} | {_f(o['cs5'], 3)} | {_f(o['bias'])} | "
                     f"{_f(o['mae'] / test_mae if test_mae else None)}× | {_f(mixed)} "
                     f"({_f(mixed / test_mae if mixed is not None and test_mae else None)}×) |")
    for name, m in cross:  # where the error goes: bias by true age group, the ages read toward the mean
        lines += ["", f"### {name}: by age group", "", "| group | faces | MAE (95 % CI) | CS@5 | bias |",
                  "|---|---|---|---|---|"]
        lines += [f"| {s['value']}{' (small)' if s.get('small') else ''} | {s['count']} | {_mae(s)} | "
                  f"{_f(s['cs5'], 3)} | {_f(s['bias'])} |" for s in m["slices"] if s["slice"] == "age_group"]
    return lines + [""]


def uncertainty_lines(fitted: Optional[dict], unc: dict, cross: List[tuple]) -> List[str]:
    """The std's calibration (fitted on val, applied by every predictor), the risk-coverage curve, and the
    coverage on the other sets."""
    lines = []
    if fitted and fitted.get("std_scale") is not None:
        lines += [f"- Calibration: every std is multiplied by {_f(fitted['std_scale'], 3)}, the scale that makes "
                  f"+-1 std cover 68.3 % of the {fitted['rows']} val faces' errors"
                  f"{' (after the age map)' if fitted.get('age_map') else ''} (before: "
                  f"{_f(100 * fitted['within_1sd_before'], 1)} %). The test numbers above are after it."]
    curve = unc.get("risk_coverage") or []
    if curve:
        lines += ["- Risk-coverage (MAE of the most confident faces): " + ", ".join(
            f"{round(100 * r['fraction'])} %: {_f(r['mae'])}" for r in curve if round(100 * r["fraction"]) in
            (10, 25, 30, 50, 70, 90, 100)) + "."]
    for name, m in cross:
        u = m.get("uncertainty") or {}
        if u:
            lines += [f"- {name}: within 1 std {_f(100 * u['within_1sd'], 1)} %, within 2 std "
                      f"{_f(100 * u['within_2sd'], 1)} %."]
    return lines + ([""] if lines else [])


class TrainingRun(NamedTuple):
    """What a training run left: summary.json, metrics.jsonl's rows, the bundle's fields."""

    summary: dict
    curve: List[dict]
    bundle: dict


def about_lines(run: TrainingRun, command: str) -> List[str]:
    """The card's "What it is": the model, its training data and settings, the command, the training time."""
    summary, curve, bundle = run
    params = bundle.get("params") or {}
    return ["## What it is", "",
            f"- ResNet-18 from scratch, `{params.get('head')}` head, input {bundle.get('input_size')} px, crops framed "
            f"as in the prepare run (`{(bundle.get('crop') or {}).get('detector')}` detector, "
            f"size {(bundle.get('crop') or {}).get('size')}).",
            f"- Trained on `{summary.get('data')}` ({_version(summary.get('data_version'))}; rows "
            f"{summary.get('rows')}), {summary.get('epochs_run')} epochs, schedule `{params.get('schedule')}`, "
            f"lr {params.get('lr')}, batch {params.get('batch_size')}, augmentation {params.get('augment')}"
            + (f", weight EMA {params['ema']}" if params.get("ema") else "")
            + (f", progressive resizing from {params['start_size']} px" if params.get("start_size") else "")
            + (f", loss weighted by age (`{params['age_weighting']}`)"
               if params.get("age_weighting", "none") != "none" else "")
            + (", ages through an age map fitted on val" if (bundle.get("calibration") or {}).get("age_map") else "")
            + (f", a {params['max_minutes']:g}-minute budget planning the rate" if params.get("max_minutes") else "")
            + f"; best epoch by val MAE; test-time augmentation `{summary.get('tta')}`.",
            f"- Command: `{command}`",
            f"- Training time: {_f(sum(r.get('epoch_seconds', 0) for r in curve) / 60, 1)} min of epochs on "
            f"{summary.get('device')} (world size {summary.get('world_size')})"
            + (f", {summary['precision']} arithmetic" if summary.get("precision") else "") + ".", ""]


def _refit_note(refit_on: Optional[dict]) -> str:
    """What the trainer's own numbers are when the bundle's calibration was fitted again after training."""
    if not refit_on:
        return ""
    return (f", with the calibration it fitted when training ended; the bundle's calibration was fitted again "
            f"since (`python -m trainer.recalibrate --refit-on`, on {refit_on.get('rows')} faces scored without an "
            f"age map), and the tables here are the refitted bundle's")


def render(run: TrainingRun, metrics: dict, command: str, title: str, notes: List[str],
           cross: Optional[List[tuple]] = None, unmapped: Optional[dict] = None) -> str:
    """The card's markdown: the run, its evaluation report (`metrics`), other datasets' reports (`cross`), and
    the reports of the bundle without its age map (`unmapped`: "test" and cross names -> metrics)."""
    summary, _, bundle = run
    overall = metrics["overall"]
    lines = [f"# {title}", "",
             f"Written {time.strftime('%Y-%m-%d')} by `python -m spark_jobs.model_card` from the run's own files.", "",
             *about_lines(run, command),
             "## Test metrics", "",
             f"Test split of the same table ({metrics['rows']['matched']} faces; scored by `score.py`, evaluated by "
             f"`evaluate.py`):", "",
             "| MAE (95 % CI) | RMSE | CS@5 | bias (mean signed error) |", "|---|---|---|---|",
             f"| {_mae(overall)} | "
             f"{_f(overall['rmse'])} | {_f(overall['cs5'], 3)} | {_f(overall['bias'])} |", "",
             f"The trainer's own test numbers: MAE {_f(summary.get('test_mae'))}, CS@5 "
             f"{_f(summary.get('test_cs5'), 3)} (best val MAE {_f(summary.get('best_val_mae'))})"
             + _refit_note((bundle.get("calibration") or {}).get("refit_on")) + ".", ""]
    for name, heading in (("age_group", "By age group"), ("gender", "By gender"), ("race", "By race")):
        rows = [s for s in metrics["slices"] if s["slice"] == name]
        if not rows:
            continue
        lines += [f"### {heading}", "", "| group | faces | MAE (95 % CI) | CS@5 | bias |", "|---|---|---|---|---|"]
        for s in rows:
            flag = " (small)" if s.get("small") else ""
            lines.append(f"| {s['value']}{flag} | {s['count']} | {_mae(s)} | {_f(s['cs5'], 3)} | {_f(s['bias'])} |")
        lines.append("")
    lines += cross_section(cross or [], metrics)
    unmapped = unmapped or {}
    pairs = [("UTKFace test split", unmapped["test"], metrics, BIAS_GOAL["in-domain"])] if "test" in unmapped else []
    pairs += [(name, unmapped[name], m, BIAS_GOAL["elsewhere"]) for name, m in cross or [] if name in unmapped]
    lines += age_map_section(bundle.get("calibration"), pairs)
    unc = metrics.get("uncertainty") or {}
    lines += ["## Uncertainty", ""]
    if unc:
        lines += [f"The predicted std covers the error within 1 std for {_f(100 * unc['within_1sd'], 1)} % of faces "
                  f"and within 2 std for {_f(100 * unc['within_2sd'], 1)} % (a calibrated Gaussian: 68 % and 95 %); "
                  f"correlation of |error| with the std: {_f(unc.get('corr_abs_error_std'))}.", ""]
        lines += uncertainty_lines(bundle.get("calibration"), unc, cross or [])
    else:
        lines += ["This head predicts no uncertainty (regression head).", ""]
    lines += ["## Limits", "",
              "- Test faces come from the same dataset and distribution as the training faces; other cameras, "
              "ages and populations will do worse (see BENCHMARKS.md for what has been measured across datasets).",
              "- Age labels in UTKFace are partly estimated; the smallest groups (flagged small) have wide intervals.",
              "- UTKFace is for non-commercial research only: so is a model trained on it."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _job(argv: Optional[list]) -> int:
    args = get_args_parser().parse_args(argv)
    named, named_unmapped = _named(args.cross, "--cross"), _named(args.cross_unmapped, "--cross-unmapped")
    stray = sorted(set(n for n, _ in named_unmapped) - set(n for n, _ in named))
    if stray:
        raise UserError(f"--cross-unmapped {stray[0]!r}: no --cross of that name (give both with the same NAME)")
    summary = _json(uri.join(args.run, layout.SUMMARY))
    curve = [json.loads(line) for line in uri.read_text(uri.join(args.run, layout.METRICS_LOG)).splitlines()
             if line.strip()]
    from trainer.bundle import load_bundle

    own = uri.join(args.run, layout.MODEL)  # the run's own bundle, wherever the run folder was moved or copied to
    path = args.bundle or (own if uri.exists(own) else summary.get("bundle")) or own
    try:
        _, bundle = load_bundle(path)
    except FileNotFoundError:
        raise UserError(f"model bundle {path}: not found (neither in --run nor where its summary.json says; give "
                        f"--bundle, the bundle the reports scored)") from None
    metrics = _json(uri.join(args.report, layout.EVAL_METRICS))
    cross = [(name, _json(uri.join(folder, layout.EVAL_METRICS))) for name, folder in named]
    unmapped = {name: _json(uri.join(folder, layout.EVAL_METRICS)) for name, folder in named_unmapped}
    if args.unmapped:
        unmapped["test"] = _json(uri.join(args.unmapped, layout.EVAL_METRICS))
    text = render(TrainingRun(summary, curve, bundle), metrics, args.command, args.title, args.note, cross, unmapped)
    uri.write_text(args.output, text)
    log.info(f"model_card: wrote {args.output} (test MAE {metrics['overall']['mae']:.2f})")
    return 0


def _named(items: List[str], flag: str) -> List[tuple]:
    """NAME=REPORT_FOLDER items -> (name, folder) pairs, checked before anything is read."""
    named = []
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise UserError(f"{flag} {item!r}: give NAME=REPORT_FOLDER (an evaluate.py output folder)")
        named.append((name.strip(), uri.check(folder.strip(), flag)))
    return named


main, console_main = entry_points("model_card", _job)

if __name__ == "__main__":
    sys.exit(main())
