"""python -m trainer.export --model model.pt --format onnx|torchscript --output model.onnx: the bundle's model
as a file that runs outside this environment (ONNX Runtime, a browser, a C++ or Java service), with its
preprocessing contract beside it (model.onnx.json).

The graph takes `input`: float32 N x 3 x S x S, RGB, (pixel / 255 - mean) / std, batch axis dynamic; it gives
`age` (N, years; a regression age clipped into 0..120), `std` (N, the distribution head's std before its
calibration; NaN for regression) and `raw` (the network's outputs: logits over ages 0..120, or N x 1 ages). The
contract says S, mean, std, the crop settings and framing faces must be cropped with (photos.faces.crop_faces
does it), the calibration (the age through its age_map when there is one, `std` times its std_scale), the head, the source bundle's id and its training
data. Before the files are kept, the export is run on a batch
of the bundle's kind of crops and must give the bundle's own ages within --tolerance years.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from typing import List, Optional

import numpy as np
import torch
from torch import nn

from schemas import layout
from shell.cli import dumps, entry_points, log, number, Parser, path_arg
from shell.errors import UserError
from trainer import calibration, runtime
from trainer.bundle import load_bundle
from trainer.model import ages_of, tta_views

FORMATS = tuple(layout.EXPORT_SUFFIXES)
OPSET = 17


class Exported(nn.Module):
    """model(x) -> (age, std, raw): what trainer.model.predict_ages gives without TTA, plus the raw outputs
    (TTA averages those of its views: trainer.runtime.OnnxPredictor)."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x):
        raw = self.model(x)
        age, std = ages_of(raw, self.head)
        return age, std, raw.float()


def contract(bundle: dict, source: str, exported_as: str) -> dict:
    """The preprocessing contract written beside an export (schemas.layout.EXPORT_FIELDS)."""
    size = int(bundle["input_size"])
    out = {
        "format": layout.EXPORT_FORMAT, "format_version": layout.EXPORT_VERSION, "exported_as": exported_as,
        "source_model_id": runtime.model_id(source), "head": bundle["head"], "input_size": size,
        "normalize": bundle["normalize"], "crop": bundle["crop"], "framing": runtime.framing(bundle),
        "calibration": bundle.get("calibration"),  # the age map and std scale: trainer.calibration.calibrated
        "input": {"name": "input", "dtype": "float32", "shape": ["batch", 3, size, size],
                  "layout": "NCHW, RGB, (pixel / 255 - mean) / std"},
        "outputs": {"age": "N, years", "std": "N, years (NaN: regression head)",
                    "raw": "N x 121 logits over ages 0..120 (distribution) or N x 1 ages (regression)"},
        "data": bundle.get("data"), "params": bundle.get("params"), "metrics": bundle.get("metrics"),
        "exported_with": {"torch": str(torch.__version__), "opset": OPSET},
    }
    assert tuple(out) == layout.EXPORT_FIELDS, "schemas.layout.EXPORT_FIELDS is the contract's one field list"
    return out


def sample_batch(bundle: dict, n: int = 4, seed: int = 0) -> np.ndarray:
    """uint8 N x S x S x 3 face crops drawn by photos.synthetic, for the export check (no data needed)."""
    from photos.synthetic import draw_face

    size, rng = int(bundle["input_size"]), np.random.default_rng(seed)
    faces = [draw_face(int(age), rng, size) for age in rng.integers(5, 80, n)]
    return np.stack([np.asarray(f.convert("RGB").resize((size, size))) for f in faces])


def write_export(model: nn.Module, bundle: dict, fmt: str, path: str) -> None:
    """The graph of `model` (eval mode) in `fmt` at `path`, batch axis dynamic."""
    size = int(bundle["input_size"])
    wrapped = Exported(model, bundle["head"]).eval()
    example = torch.zeros(2, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.14 calls both the TorchScript-based ONNX exporter and jit.trace deprecated; both still write
        # the files this checks (check_parity), and the dynamo exporter needs onnxscript, not pinned here
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        if fmt == "onnx":
            torch.onnx.export(wrapped, (example,), path, input_names=["input"], output_names=["age", "std", "raw"],
                              dynamic_axes={name: {0: "batch"} for name in ("input", "age", "std", "raw")},
                              opset_version=OPSET, dynamo=False)
        else:
            torch.jit.trace(wrapped, example, check_trace=False).save(path)


def check_parity(path: str, fmt: str, bundle_path: str, tolerance: float) -> float:
    """The largest |age difference| in years between the export and the bundle on sample crops (both TTA
    modes); UserError when it is over `tolerance`."""
    from trainer.bundle import Predictor

    reference = Predictor(bundle_path, device="cpu")
    pixels = sample_batch(reference.bundle, n=5)
    worst = 0.0
    for tta in runtime.TTA:
        want, _ = reference.predict(pixels, tta=tta)
        got, _ = run_export(path, fmt, pixels, tta)
        worst = max(worst, float(np.abs(np.asarray(got) - want).max()))
    if not worst <= tolerance:
        raise UserError(f"the {fmt} export's ages differ from the bundle's by {worst:.2e} years, over --tolerance "
                        f"{tolerance}; nothing was written")
    return worst


def run_export(path: str, fmt: str, pixels: np.ndarray, tta: str = "none"):
    """(ages, stds) of uint8 crops through an exported file: ONNX Runtime, or torch.jit for TorchScript."""
    if fmt == "onnx":
        return runtime.OnnxPredictor(path).predict(pixels, tta=tta)
    meta = runtime.read_contract(path)
    scripted = torch.jit.load(path, map_location="cpu")
    mean = torch.tensor(meta["normalize"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["normalize"]["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    with torch.inference_mode():
        if tta != "none":
            raws = [scripted(view)[2].numpy() for view in tta_views(x, tta, -mean / std)]
            age, spread = runtime.average_outputs(raws, meta["head"])
            return calibration.calibrated(age, spread, meta.get("calibration"))
        age, spread, _ = scripted(x)
    return calibration.calibrated(age.numpy(), spread.numpy(), meta.get("calibration"))


def export(bundle_path: str, fmt: str, output: str, tolerance: float = 1e-3) -> dict:
    """Write the export and its contract (each replaced atomically, after the parity check passed)."""
    model, bundle = load_bundle(bundle_path)
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".faceage-export-") as tmp:
        staged = os.path.join(tmp, os.path.basename(output))
        write_export(model, bundle, fmt, staged)
        meta = contract(bundle, bundle_path, fmt)
        with open(layout.contract_path(staged), "w") as f:
            f.write(dumps(meta))
        worst = check_parity(staged, fmt, bundle_path, tolerance)
        os.replace(layout.contract_path(staged), layout.contract_path(output))
        os.replace(staged, output)
    return {"output": output, "contract": layout.contract_path(output), "format": fmt, "max_age_diff": worst,
            "source_model_id": meta["source_model_id"], "bytes": os.path.getsize(output)}


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("export", prog="python -m trainer.export", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join("runs", "train", layout.MODEL), type=path_arg,
                   help="model bundle written by python -m trainer.train")
    p.add_argument("--format", default="onnx", choices=FORMATS)
    p.add_argument("--output", type=path_arg, help="the exported file (default: beside the bundle, model.onnx or "
                                                   "model.ts); its contract is written beside it as OUTPUT.json")
    p.add_argument("--tolerance", type=number(0.0), default=1e-3,
                   help="largest age difference in years from the bundle the export may show on sample crops")
    return p


def _job(argv: Optional[List[str]]) -> int:
    args = get_args_parser().parse_args(argv)
    if not os.path.isfile(args.model):
        raise UserError(f"--model {args.model}: no such model bundle (python -m trainer.train writes one)")
    suffix = layout.EXPORT_SUFFIXES[args.format]
    output = args.output or os.path.splitext(args.model)[0] + suffix
    if not output.endswith(suffix):
        raise UserError(f"--output {output}: a {args.format} export's name ends in {suffix}")
    if os.path.exists(output) and not os.path.exists(layout.contract_path(output)):
        raise UserError(f"--output {output} exists and is not a faceage export (no {layout.contract_path(output)} "
                        f"beside it); refusing to replace it")
    if os.path.abspath(output) == os.path.abspath(args.model):
        raise UserError("--output is the bundle itself")
    result = export(args.model, args.format, output, args.tolerance)
    log.info(f"export: wrote {output} ({result['bytes']} bytes) and {result['contract']}; largest age difference "
                  f"from the bundle on sample crops: {result['max_age_diff']:.2e} years")
    print(json.dumps(result))
    return 0


main, console_main = entry_points("export", _job)

if __name__ == "__main__":
    sys.exit(main())
