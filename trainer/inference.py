"""A model file -> its predictor and its description: trainer.bundle.Predictor (torch) for a bundle,
trainer.runtime.OnnxPredictor (ONNX Runtime, no torch import) for an .onnx export. score, predict, the Python
API and the HTTP service all load models here, so each runs whichever file it is given the same way."""
from __future__ import annotations

from typing import Optional

from trainer.runtime import OnnxPredictor, is_export, read_contract


def describe(path: str) -> dict:
    """A model file's metadata without its weights: head, input_size, normalize, crop, data, params, metrics
    (a bundle's fields, or an export's contract). Refuses an unusable file with BundleError."""
    if is_export(path):
        return read_contract(path)
    from trainer.bundle import load_bundle

    _, bundle = load_bundle(path)
    return {k: v for k, v in bundle.items() if k != "state_dict"}


def load_predictor(path: str, device: str = "auto", threads: Optional[int] = None, detector: str = "auto"):
    """The predictor for a model file: OnnxPredictor for an .onnx export, trainer.bundle.Predictor otherwise."""
    if is_export(path):
        return OnnxPredictor(path, threads, detector)
    from trainer.bundle import Predictor

    return Predictor(path, device, threads, detector)
