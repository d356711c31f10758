"""The Python API (faceage.Estimator): the README's snippet run as written, the CLI's numbers, batch input, and
no Spark (nor torch, for an ONNX export) imported by using it."""
from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, encode, synthetic_photo, venv_env
from spark_jobs import predict


def readme_snippet() -> str:
    """The README's Python API block (the first ```python block after its heading)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### The Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_snippet_prints_the_ages_the_cli_gives(bundles, tmp_path, monkeypatch):
    _, detecting = bundles
    (tmp_path / "runs" / "utk").mkdir(parents=True)
    shutil.copy(detecting, tmp_path / "runs" / "utk" / "model.pt")
    photo, _ = synthetic_photo(52, seed=71)
    (tmp_path / "photo.jpg").write_bytes(encode(photo))
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_snippet(), "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    want = predict.estimate_ages(str(tmp_path / "photo.jpg"), str(detecting))
    assert len(lines) == len(want) == 1 and lines[0].startswith("ok ")
    assert float(lines[0].split()[1]) == pytest.approx(want[0]["age"], abs=1e-4)


def test_one_photo_many_kinds_of_input_and_batches_give_the_same_faces(bundles, tmp_path):
    from faceage import Estimator

    _, detecting = bundles
    est = Estimator.load(str(detecting))
    photos = []
    for i, age in enumerate((9, 33, 61)):
        photo, _ = synthetic_photo(age, seed=80 + i)
        (tmp_path / f"{i}.png").write_bytes(encode(photo, "PNG"))
        photos.append(photo)
    single = [est.predict(str(tmp_path / f"{i}.png")) for i in range(3)]
    assert all(len(faces) == 1 and faces[0].ok and faces[0].uncertainty > 0 for faces in single)
    batch = est.predict([str(tmp_path / f"{i}.png") for i in range(3)])
    assert [f.age for f in batch] == pytest.approx([faces[0].age for faces in single], abs=1e-4)
    as_arrays = est.predict([np.asarray(p) for p in photos])
    as_images = est.predict(photos)
    assert [f.age for f in as_arrays] == [f.age for f in as_images] == pytest.approx([f.age for f in batch], abs=1e-4)
    folder = est.predict(str(tmp_path))
    assert sorted(f.age for f in folder) == pytest.approx(sorted(f.age for f in batch), abs=1e-4)
    assert batch[0].as_dict()["box"] == batch[0].box and len(batch[0].landmarks) == 10
    blank = est.predict(Image.new("RGB", (300, 200), (90, 90, 90)))
    assert len(blank) == 1 and blank[0].status == "no_face" and blank[0].age is None and not blank[0].ok
    info = est.info()
    assert info["head"] == "distribution" and info["uncertainty"] and info["format"] == "bundle"


def test_a_missing_model_is_one_user_error(tmp_path):
    from faceage import Estimator
    from shell.errors import UserError

    with pytest.raises(UserError, match="no such model file"):
        Estimator.load(str(tmp_path / "none.pt"))


def test_importing_faceage_starts_no_spark_and_an_onnx_model_needs_no_torch(bundles, tmp_path):
    from trainer import export

    _, detecting = bundles
    onnx = tmp_path / "model.onnx"
    assert export.main(["--model", str(detecting), "--output", str(onnx)]) == 0
    photo, _ = synthetic_photo(44, seed=90)
    (tmp_path / "p.jpg").write_bytes(encode(photo))
    code = ("import sys\n"
            "import faceage\n"
            "assert 'pyspark' not in sys.modules and 'torch' not in sys.modules, 'imported at import time'\n"
            f"faces = faceage.Estimator.load({str(onnx)!r}).predict({str(tmp_path / 'p.jpg')!r})\n"
            "assert 'pyspark' not in sys.modules and 'torch' not in sys.modules, 'imported by predicting'\n"
            "print(faces[0].age)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=venv_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = predict.estimate_ages(str(tmp_path / "p.jpg"), str(detecting))[0]["age"]
    assert float(proc.stdout.strip()) == pytest.approx(want, abs=1e-3)
