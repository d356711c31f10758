"""python -m trainer.recalibrate --model model.pt --drop age_map --output model_unmapped.pt: a copy of a bundle
without part of its calibration (trainer.calibration), to measure what that part does with the project's own
jobs: score and evaluate the same faces with both bundles (make recipe does, for the model card's bias table
before and after the age map).

The copy has the same weights; its calibration records what was dropped (`dropped`). The original is never
changed; an existing --output is replaced only when it is a faceage bundle.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

import torch

from shell.cli import dumps, entry_points, log, Parser, path_arg
from shell.errors import UserError
from trainer.bundle import is_bundle, load_bundle

PARTS = ("age_map", "std_scale")


def drop(bundle_path: str, parts: List[str], output: str) -> dict:
    """Write `output`: the bundle at `bundle_path` with the calibration `parts` set to None (atomically)."""
    load_bundle(bundle_path)  # checked whole first: a broken bundle is refused in one line
    bundle = torch.load(bundle_path, map_location="cpu", weights_only=True)
    fitted = dict(bundle.get("calibration") or {})
    for part in parts:
        fitted[part] = None
    fitted["dropped"] = sorted(set(parts) | set(fitted.get("dropped") or []))
    bundle["calibration"] = fitted
    tmp = f"{output}.tmp-{os.getpid()}"
    torch.save(bundle, tmp)
    os.replace(tmp, output)
    return {"output": output, "dropped": fitted["dropped"]}


def get_args_parser() -> Parser:
    p = Parser("recalibrate", prog="python -m trainer.recalibrate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=path_arg, help="model bundle written by python -m trainer.train")
    p.add_argument("--drop", required=True, action="append", choices=PARTS,
                   help="the calibration part to leave out of the copy (repeatable)")
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
    result = drop(args.model, args.drop, args.output)
    log.info(f"recalibrate: wrote {args.output} without {', '.join(result['dropped'])}")
    print(dumps(result))
    return 0


main, console_main = entry_points("recalibrate", _job)

if __name__ == "__main__":
    sys.exit(main())
