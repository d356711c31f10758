"""python -m trainer.recalibrate --model model.pt --drop age_map --output model_unmapped.pt: a copy of a bundle
without part of its calibration (trainer.calibration), or with its age map at another strength
(--age-map-strength S), to measure what that part does with the project's own jobs: score and evaluate the same
faces with both bundles (make recipe does, for the model card's bias table before and after the age map).

The copy has the same weights; its calibration records what was dropped (`dropped`) or set (`strength_set`).
The original is never changed; an existing --output is replaced only when it is a faceage bundle.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

import torch

from shell.cli import dumps, entry_points, log, number, Parser, path_arg
from shell.errors import UserError
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
    tmp = f"{output}.tmp-{os.getpid()}"
    torch.save(bundle, tmp)
    os.replace(tmp, output)
    return {"output": output, "dropped": fitted.get("dropped") or [], "strength": strength}


def get_args_parser() -> Parser:
    p = Parser("recalibrate", prog="python -m trainer.recalibrate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=path_arg, help="model bundle written by python -m trainer.train")
    p.add_argument("--drop", action="append", default=[], choices=PARTS,
                   help="the calibration part to leave out of the copy (repeatable)")
    p.add_argument("--age-map-strength", type=number(0.0, 1.0), default=None,
                   help="set the age map's strength in the copy: each age moves this fraction of the way the map "
                        "would move it")
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
    if not args.drop and args.age_map_strength is None:
        raise UserError("give --drop PART or --age-map-strength S: the copy would be the bundle itself")
    result = drop(args.model, args.drop, args.output, args.age_map_strength)
    log.info(f"recalibrate: wrote {args.output}" + (f" without {', '.join(result['dropped'])}" if result["dropped"]
                                                    else "") + (f", age map strength {args.age_map_strength}"
                                                                if args.age_map_strength is not None else ""))
    print(dumps(result))
    return 0


main, console_main = entry_points("recalibrate", _job)

if __name__ == "__main__":
    sys.exit(main())
