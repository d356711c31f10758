"""python -m trainer.recalibrate --model model.pt --drop age_map --output model_unmapped.pt: a copy of a bundle
without part of its calibration (trainer.calibration), or with its age map at another strength
(--age-map-strength S), to measure what that part does with the project's own jobs: score and evaluate the same
faces with both bundles (make recipe does, for the model card's bias table before and after the age map).

--refit-on SCORED --labels TABLE fits the whole calibration again, as trainer.train does when a run ends (the age
map with the lowest MAE that meets the bias goal, then the std scale), from score.py's predictions of faces with
labels - e.g. the val split scored by a copy without an age map, or faces of the population the model will serve.

The copy has the same weights; its calibration records what was dropped (`dropped`), set (`strength_set`) or
refitted on (`refit_on`). The original is never changed; an existing --output is replaced only when it is a
faceage bundle.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import numpy as np
import torch

from schemas import layout
from shell import uri
from shell.cli import dumps, entry_points, log, number, Parser, path_arg
from shell.errors import UserError
from trainer import calibration
from trainer.bundle import is_bundle, load_bundle

PARTS = ("age_map", "std_scale")


def drop(bundle_path: str, parts: List[str], output: str, strength: Optional[float] = None) -> dict:
    """Write `output`: the bundle at `bundle_path` with the calibration `parts` set to None and, with `strength`,
    its age map at that strength (atomically)."""
    load_bundle(bundle_path)  # checked whole first: a broken bundle is refused in one line
    bundle = torch.load(bundle_path, map_location="cpu", weights_only=True)
    fitted = dict(bundle.get("calibration") or {})
    if strength is not None:
        if not fitted.get("age_map"):
            raise UserError(f"--model {bundle_path}: it has no age map to set the strength of")
        fitted["age_map"] = {**fitted["age_map"], "strength": strength}
        fitted["strength_set"] = strength
    for part in parts:
        fitted[part] = None
    if parts:
        fitted["dropped"] = sorted(set(parts) | set(fitted.get("dropped") or []))
    bundle["calibration"] = fitted
    _write(bundle, output)
    return {"output": output, "dropped": fitted.get("dropped") or [], "strength": strength}


def _write(bundle: dict, output: str) -> None:
    tmp = f"{output}.tmp-{os.getpid()}"
    torch.save(bundle, tmp)
    os.replace(tmp, output)


def scored_with_labels(scored: str, labels: str, std_scale: float):
    """(errors, raw stds, true ages) of the faces score.py wrote to `scored` that the table `labels` has."""
    import pyarrow.parquet as pq

    truth = {}
    for f in layout.table_files(layout.faces_table(uri.to_uri(labels))):
        truth.update((r["face_id"], r["age"]) for r in pq.read_table(uri.local_path(f), columns=["face_id", "age"])
                     .to_pylist())
    rows = []
    for f in layout.table_files(uri.to_uri(os.path.join(scored, layout.PREDICTIONS_DIR))):
        rows += [r for r in pq.read_table(uri.local_path(f), columns=["face_id", "predicted_age", "uncertainty"])
                 .to_pylist() if r["face_id"] in truth and r["predicted_age"] is not None]
    if not rows:
        raise UserError(f"--refit-on {scored}: none of its predictions has a label in --labels {labels}")
    true = np.array([truth[r["face_id"]] for r in rows], np.float64)
    err = np.array([r["predicted_age"] for r in rows], np.float64) - true
    std = np.array([np.nan if r["uncertainty"] is None else r["uncertainty"] for r in rows], np.float64) / std_scale
    return err, std, true


def refit(bundle_path: str, scored: str, labels: str, output: str) -> dict:
    """Write `output`: the bundle with its calibration fitted again (trainer.train.fit_calibration) on the
    predictions in `scored`, which must come from the same weights without an age map."""
    from trainer.train import fit_calibration

    model, _ = load_bundle(bundle_path)
    try:
        manifest = json.loads(uri.read_text(os.path.join(scored, layout.SCORE_MANIFEST)))
        scorer, _ = load_bundle(manifest["model"])
    except (OSError, ValueError, KeyError, TypeError, UserError) as e:
        raise UserError(f"--refit-on {scored}: not a score.py output whose model can be read ({e})") from None
    used = manifest.get("model_calibration") or {}
    if used.get("age_map"):
        raise UserError(f"--refit-on {scored}: its ages went through an age map; score the faces with a copy "
                        f"without one (python -m trainer.recalibrate --drop age_map) and refit on that")
    theirs = scorer.state_dict()
    if any(not torch.equal(v, theirs[k]) for k, v in model.state_dict().items()):
        raise UserError(f"--refit-on {scored}: scored by other weights ({manifest['model']}) than --model")
    val = scored_with_labels(scored, labels, calibration.std_scale(used))
    fitted, _ = fit_calibration(argparse.Namespace(tta=manifest.get("tta", "none"), age_calibration="debias"), val,
                                (np.array([]), np.array([])))
    fitted["refit_on"] = {"predictions": scored, "labels": labels, "rows": int(val[2].size)}
    bundle = torch.load(bundle_path, map_location="cpu", weights_only=True)
    bundle["calibration"] = fitted
    _write(bundle, output)
    return {"output": output, "refit_on_rows": int(val[2].size), "std_scale": fitted["std_scale"],
            "age_map_bias_goal": (fitted["age_map"] or {}).get("bias_goal")}


def get_args_parser() -> Parser:
    p = Parser("recalibrate", prog="python -m trainer.recalibrate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=path_arg, help="model bundle written by python -m trainer.train")
    p.add_argument("--drop", action="append", default=[], choices=PARTS,
                   help="the calibration part to leave out of the copy (repeatable)")
    p.add_argument("--age-map-strength", type=number(0.0, 1.0), default=None,
                   help="set the age map's strength in the copy: each age moves this fraction of the way the map "
                        "would move it")
    p.add_argument("--refit-on", type=path_arg, default=None,
                   help="score.py's output folder for labelled faces, scored by these weights without an age map: "
                        "the calibration is fitted again on them (with --labels)")
    p.add_argument("--labels", type=path_arg, default=None, help="with --refit-on: the prepared table of their ages")
    p.add_argument("--output", required=True, type=path_arg, help="the copy's path (a new file, or a bundle)")
    return p


def _job(argv: Optional[List[str]]) -> int:
    args = get_args_parser().parse_args(argv)
    if not os.path.isfile(args.model):
        raise UserError(f"--model {args.model}: no such model bundle (python -m trainer.train writes one)")
    if os.path.abspath(args.output) == os.path.abspath(args.model):
        raise UserError("--output is the bundle itself; give another path (the original is never changed)")
    if os.path.exists(args.output) and not is_bundle(args.output):
        raise UserError(f"--output {args.output} exists and is not a faceage model bundle; refusing to replace it")
    if args.refit_on or args.labels:
        if not (args.refit_on and args.labels) or args.drop or args.age_map_strength is not None:
            raise UserError("--refit-on and --labels go together, without --drop or --age-map-strength")
        result = refit(args.model, args.refit_on, args.labels, args.output)
        log.info(f"recalibrate: wrote {args.output}, calibration refitted on {result['refit_on_rows']} faces")
        print(dumps(result))
        return 0
    if not args.drop and args.age_map_strength is None:
        raise UserError("give --drop PART, --age-map-strength S or --refit-on: the copy would be the bundle itself")
    result = drop(args.model, args.drop, args.output, args.age_map_strength)
    log.info(f"recalibrate: wrote {args.output}" + (f" without {', '.join(result['dropped'])}" if result["dropped"]
                                                    else "") + (f", age map strength {args.age_map_strength}"
                                                                if args.age_map_strength is not None else ""))
    print(dumps(result))
    return 0


main, console_main = entry_points("recalibrate", _job)

if __name__ == "__main__":
    sys.exit(main())
