"""python -m trainer.export: ONNX (run by ONNX Runtime) and TorchScript files that give the bundle's ages on real
crops, their contract, and score/predict running an .onnx export in a process where torch cannot be imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, encode, synthetic_photo, venv_env
from schemas import layout
from spark_jobs import predict, score
from trainer import export, inference, runtime
from trainer.bundle import Predictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def regression_bundle(tables, tmp_path_factory):
    from trainer import train

    root, _, _ = tables
    out = tmp_path_factory.mktemp("regression")
    assert train.main(["--data", str(root / "pq"), "--output", str(out), "--epochs", "1", "--image-size", "32",
                       "--batch-size", "16", "--workers", "1", "--reader", "pyarrow", "--no-progress",
                       "--head", "regression"]) == 0
    return out / layout.MODEL


def _table_crops(tables, size: int) -> np.ndarray:
    """The crops prepare wrote into the fixture table, decoded as scoring decodes them."""
    root, _, _ = tables
    images = pd.concat(pq.read_table(p, columns=["image"]).to_pandas()
                       for p in sorted((root / "pq" / layout.FACES_DIR).rglob("*.parquet")))["image"]
    return np.stack([runtime.decode_image(bytes(raw), size) for raw in images[:24]])


def _export(bundle, fmt, folder):
    out = folder / f"model{layout.EXPORT_SUFFIXES[fmt]}"
    assert export.main(["--model", str(bundle), "--format", fmt, "--output", str(out)]) == 0
    return out


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_exports_give_the_bundles_ages_on_prepared_crops(bundles, regression_bundle, tables, tmp_path, fmt):
    plain, _ = bundles
    for bundle in (plain, regression_bundle):
        reference = Predictor(str(bundle), device="cpu")
        crops = _table_crops(tables, reference.size)
        out = _export(bundle, fmt, tmp_path / reference.head)
        for tta in runtime.TTA:
            want_age, want_std = reference.predict(crops, tta=tta)
            got_age, got_std = export.run_export(str(out), fmt, crops, tta)
            assert np.abs(got_age - want_age).max() <= 1e-3, (reference.head, tta)
            assert np.allclose(got_std, want_std, atol=1e-3, equal_nan=True), (reference.head, tta)
        assert np.isnan(got_std).all() == (reference.head == "regression")


@pytest.mark.utkface
def test_the_onnx_export_gives_the_bundles_ages_on_utkface_chips(bundles, utkface_dir, tmp_path):
    from photos.faces import crop_faces

    plain, _ = bundles
    reference = Predictor(str(plain), device="cpu")
    names = sorted(os.listdir(utkface_dir))[:: 997][:20]
    crops = np.stack([runtime.decode_image(crop_faces((utkface_dir / n).read_bytes(), reference.crop)[0].image,
                                           reference.size) for n in names])
    out = _export(plain, "onnx", tmp_path)
    want, _ = reference.predict(crops, tta="flip")
    got, _ = runtime.OnnxPredictor(str(out)).predict(crops, tta="flip")
    assert len(names) == 20 and np.abs(got - want).max() <= 1e-3


def test_the_onnx_graph_has_a_dynamic_batch_and_its_contract_says_how_to_feed_it(bundles, tmp_path):
    import onnxruntime

    plain, _ = bundles
    out = _export(plain, "onnx", tmp_path)
    contract = json.loads(open(layout.contract_path(str(out))).read())
    bundle = torch.load(plain, weights_only=True)
    assert tuple(contract) == layout.EXPORT_FIELDS and contract["source_model_id"] == runtime.model_id(str(plain))
    assert (contract["head"], contract["input_size"], contract["normalize"], contract["crop"]) == \
        (bundle["head"], bundle["input_size"], bundle["normalize"], bundle["crop"])
    assert contract["framing"] == runtime.framing(bundle)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    size = contract["input_size"]
    for n in (1, 7):  # the contract alone is enough to feed the graph
        x = np.random.default_rng(n).normal(size=(n, 3, size, size)).astype(np.float32)
        age, std, raw = session.run(None, {contract["input"]["name"]: x})
        assert age.shape == (n,) and std.shape == (n,) and raw.shape == (n, 121)


def test_an_export_that_does_not_match_is_refused_and_nothing_is_replaced(bundles, tmp_path):
    plain, _ = bundles
    out = _export(plain, "onnx", tmp_path)
    contract = layout.contract_path(str(out))
    meta = json.loads(open(contract).read())
    meta["normalize"]["mean"] = [0.0, 0.0, 0.0]  # a contract that no longer describes the graph's input
    with open(contract, "w") as f:
        json.dump(meta, f)
    with pytest.raises(Exception, match="differ from the bundle's"):
        export.check_parity(str(out), "onnx", str(plain), 1e-3)
    text = tmp_path / "notes.onnx"
    text.write_text("mine")
    assert export.main(["--model", str(plain), "--output", str(text)]) == 2  # not an export: never replaced
    assert text.read_text() == "mine"
    assert export.main(["--model", str(plain), "--output", str(tmp_path / "model.bin")]) == 2
    os.remove(contract)
    with pytest.raises(runtime.BundleError, match="contract .* is missing"):
        runtime.OnnxPredictor(str(out))


def _photo_folder(folder):
    folder.mkdir()
    for i, age in enumerate((12, 45, 66)):
        photo, _ = synthetic_photo(age, seed=60 + i)
        (folder / f"p{i}.jpg").write_bytes(encode(photo))
    (folder / "broken.jpg").write_bytes(b"not a photo")
    return folder


def test_predict_runs_an_onnx_export_where_torch_cannot_be_imported(bundles, tmp_path):
    _, detecting = bundles
    folder = _photo_folder(tmp_path / "photos")
    out = _export(detecting, "onnx", tmp_path)
    blocked = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
               "from spark_jobs import predict\n"
               f"code = predict.main([{str(folder)!r}, '--model', {str(out)!r}, '--json', '--tta', 'flip'])\n"
               "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
               "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", blocked], cwd=REPO, env=venv_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {os.path.basename(r["source"]): r for r in map(json.loads, proc.stdout.splitlines())}
    want = {os.path.basename(r["source"]): r for r in predict.estimate_ages(str(folder), str(detecting), tta="flip")}
    assert got.keys() == want.keys() and got["broken.jpg"]["status"] == "not_an_image"
    for name, row in want.items():
        if row["status"] == "ok":
            assert got[name]["age"] == pytest.approx(row["age"], abs=1e-3)
            assert got[name]["uncertainty"] == pytest.approx(row["uncertainty"], abs=1e-3)


def test_score_with_an_onnx_export_writes_the_bundles_predictions(bundles, tmp_path):
    """Under the TTA with the most views (flip-zoom): score with the bundle, score with its ONNX export, predict
    and the HTTP service's flags all give (or accept) one answer."""
    from faceage import serve

    _, detecting = bundles
    folder = _photo_folder(tmp_path / "photos")
    out = _export(detecting, "onnx", tmp_path / "export")

    def scored(model, where):
        assert score.main(["--model", str(model), "--input", str(folder), "--output", str(where),
                           "--tta", "flip-zoom"]) == 0
        rows = pd.concat(pq.read_table(p).to_pandas() for p in (where / layout.PREDICTIONS_DIR).glob("*.parquet"))
        return rows.sort_values(["source_path", "face_index"]).reset_index(drop=True)

    with_bundle, with_onnx = scored(detecting, tmp_path / "a"), scored(out, tmp_path / "b")
    assert list(with_onnx.status) == list(with_bundle.status) and (with_onnx.status == "ok").sum() == 3
    ok = with_bundle.status == "ok"
    assert np.abs(with_onnx.predicted_age[ok] - with_bundle.predicted_age[ok]).max() <= 1e-3
    assert set(with_onnx.model_id) == {runtime.model_id(str(out))}
    manifest = json.loads((tmp_path / "b" / layout.SCORE_MANIFEST).read_text())
    assert manifest["model_framing"] == runtime.framing(inference.describe(str(out)))
    assert manifest["tta"] == "flip-zoom"
    by_predict = {os.path.basename(r["source"]): r["age"]
                  for r in predict.estimate_ages(str(folder), str(detecting), tta="flip-zoom") if r["status"] == "ok"}
    by_score = {os.path.basename(path): age for path, age in zip(with_bundle.source_path[ok],
                                                                 with_bundle.predicted_age[ok])}
    assert by_score.keys() == by_predict.keys()
    assert all(by_score[k] == pytest.approx(by_predict[k], abs=1e-3) for k in by_score)
    flip_only = {os.path.basename(r["source"]): r["age"]
                 for r in predict.estimate_ages(str(folder), str(detecting), tta="flip") if r["status"] == "ok"}
    assert any(abs(flip_only[k] - by_predict[k]) > 1e-3 for k in by_predict)  # the zooms changed the answer
    assert serve.get_args_parser().parse_args(["--tta", "flip-zoom"]).tta == "flip-zoom"