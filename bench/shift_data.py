"""Two test sets of faces the model never trained on, made from the TEST split of a prepared UTKFace table,
and the evaluation of a model bundle on any prepared table (all its rows).

- pasted:   each test-split photo pasted at a random scale (110-260 px), position and tilt (+-12 deg), with
            random brightness/contrast, into a generated 640x480 scene, saved as JPEG (quality 70-90), then
            prepared with the face detector ON: found, aligned and cropped the way users' photos are.
- degraded: each test-split photo in grayscale, 4x downsampled and back, JPEG quality 30; prepared with
            `--detector none` (aligned chips, as the training table was).

File names keep UTKFace's pattern, so `--labels utkface` reads the true ages. The folders and tables go
under --work (outside the repository: they are derived from UTKFace and must not be committed).

    python -m bench.shift_data --data <prepared UTKFace> --work <scratch>/shift
    python -m bench.shift_data --data out/utkface --work runs/recipe/shift --kinds pasted --photos-only  # make recipe
    python -m bench.shift_data --evaluate runs/x/model.pt --tables <scratch>/shift/pasted_table <scratch>/shift/degraded_table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from schemas import layout
from schemas.tables import age_group_names
from bench.common import REPO, env_with_venv
from trainer.runtime import TTA, TTA_HELP

SCENE = (640, 480)


def test_sources(data: str) -> List[str]:
    """The source photo of every row of the table's test split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.data import split_source

    source = split_source(data, "test")
    table = pa.concat_tables(pq.read_table(layout.local_path(f), columns=["source_path"]) for f in source.files)
    return sorted(layout.local_path(p) for p in table.column("source_path").to_pylist())


def scene(rng: np.random.Generator):
    """A generated background: a smooth colour field with a few blurred shapes."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = SCENE
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(field).resize((w, h), Image.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(30, 300)), y0 + int(rng.integers(30, 300))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.rectangle if rng.random() < 0.5 else d.ellipse)([x0, y0, x1, y1], fill=colour)
    return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(1, 6))))


def pasted(photo, rng: np.random.Generator):
    from PIL import Image, ImageEnhance

    side = int(rng.integers(110, 261))
    face = photo.convert("RGB").resize((side, side), Image.BILINEAR)
    face = ImageEnhance.Brightness(face).enhance(float(rng.uniform(0.7, 1.3)))
    face = ImageEnhance.Contrast(face).enhance(float(rng.uniform(0.7, 1.3)))
    angle = float(rng.uniform(-12, 12))
    mask = Image.new("L", face.size, 255).rotate(angle, resample=Image.BILINEAR, expand=True)
    face = face.rotate(angle, resample=Image.BILINEAR, expand=True)
    bg = scene(rng)
    x = int(rng.integers(0, SCENE[0] - face.width + 1))
    y = int(rng.integers(0, SCENE[1] - face.height + 1))
    bg.paste(face, (x, y), mask)
    return bg, int(rng.integers(70, 91))


def degraded(photo, rng: np.random.Generator):
    from PIL import Image

    w, h = photo.size
    small = photo.convert("L").resize((max(1, w // 4), max(1, h // 4)), Image.BILINEAR)
    return small.resize((w, h), Image.BILINEAR).convert("RGB"), 30


KINDS = {"pasted": (pasted, "auto"), "degraded": (degraded, "none")}
MARKER = ".faceage-shift"  # in --work: its photo folders were written here, so a rerun may replace their photos


def write_photos(sources: List[str], folder: Path, kind: str, seed: int) -> Path:
    """The `kind` variant of every source photo in `folder` (same file names) and `folder`_labels.csv (path,
    age from the UTKFace name). Refuses a non-empty folder this script did not write."""
    from PIL import Image

    marker = folder.parent / MARKER  # beside the photos, not among them: score.py counts every file it is given
    if folder.exists() and any(folder.iterdir()) and not marker.exists():
        raise SystemExit(f"shift_data: {folder} holds files this script did not write; give another --work")
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text("the photo folders here were written by python -m bench.shift_data\n")
    transform = KINDS[kind][0]
    rng = np.random.default_rng(seed)
    labels = ["path,age"]
    for path in sources:
        with Image.open(path) as photo:
            image, quality = transform(photo, rng)
        name = os.path.basename(path)
        image.save(folder / name, format="JPEG", quality=quality)
        labels.append(f"{folder.resolve() / name},{int(name.split('_')[0])}")
    csv = folder.parent / f"{kind}_labels.csv"
    csv.write_text("\n".join(labels) + "\n")
    return csv


def make(data: str, work: Path, seed: int = 0, kinds=tuple(KINDS), photos_only: bool = False) -> Dict[str, dict]:
    sources = test_sources(data)
    out = {}
    for kind in kinds:
        detector = KINDS[kind][1]
        folder = work / kind
        labels = write_photos(sources, folder, kind, seed)
        out[kind] = {"photos": len(sources), "folder": str(folder), "labels": str(labels)}
        if photos_only:
            continue
        table = work / f"{kind}_table"
        cmd = [os.path.join(os.path.dirname(sys.executable), "spark-submit"), "spark_jobs/prepare.py", "--input",
               str(folder), "--labels", "utkface", "--detector", "yunet" if detector == "auto" else detector,
               "--size", "128", "--output", str(table), "--format", "parquet", "--mode", "overwrite"]
        subprocess.run(cmd, cwd=REPO, env=env_with_venv(), check=True)
        manifest = json.loads((table / layout.LATEST_MANIFEST).read_text())
        out[kind].update(faces=manifest["counts"]["faces"], rejects=manifest["rejects_by_reason"], table=str(table))
    (work / "shift_data.json").write_text(json.dumps(out, indent=2))
    return out


def evaluate(bundle: str, table: str, tta: Optional[str] = None, device: str = "cpu",
             cache: Optional[dict] = None) -> dict:
    """MAE, CS@5 and bias of `bundle` over every row (all splits) of the prepared table `table`, as the bundle ships
    (its age map applied), plus faces, MAE and bias by true-age group with and without the map (`_unmapped`). `cache`
    keeps the decoded crops across calls, keyed by table and input size (bundles of one size share them)."""
    from bench.common import raw_ages, split_pixels
    from trainer import calibration
    from trainer.bundle import Predictor

    predictor = Predictor(bundle, device=device)
    cache = {} if cache is None else cache
    if (table, predictor.size) not in cache:
        cache[table, predictor.size] = split_pixels(table, ("train", "val", "test"), predictor.size)
    pixels, ages = cache[table, predictor.size]
    raw, _ = raw_ages(predictor, pixels, tta=tta, batch_size=256 if device == "cpu" else 512)
    fitted = predictor.bundle.get("calibration") or {}
    err = calibration.map_ages(raw, fitted.get("age_map")).astype(np.float64) - ages
    raw_err = raw - ages
    group, names = calibration.age_groups(ages), age_group_names()
    return {"rows": int(len(ages)), "mae": round(float(np.abs(err).mean()), 3),
            "cs5": round(float((np.abs(err) <= 5).mean()), 3), "bias": round(float(err.mean()), 3),
            "faces_by_age_group": {names[g]: int((group == g).sum()) for g in np.unique(group[group >= 0])},
            "bias_by_age_group": calibration.bias_by_age_group(err, ages),
            "mae_by_age_group": calibration.bias_by_age_group(np.abs(err), ages),
            "mae_unmapped": round(float(np.abs(raw_err).mean()), 3),
            "bias_by_age_group_unmapped": calibration.bias_by_age_group(raw_err, ages),
            "mae_by_age_group_unmapped": calibration.bias_by_age_group(np.abs(raw_err), ages)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a prepared UTKFace table (its test split is used)")
    p.add_argument("--work", default="/tmp/faceage-shift", help="folder for the photos and tables (not the repo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--photos-only", action="store_true",
                   help="only the photos and their labels CSV (no prepared table): e.g. for score.py + evaluate.py")
    p.add_argument("--evaluate", help="a model bundle to evaluate on --tables")
    p.add_argument("--tables", nargs="+", default=[])
    p.add_argument("--tta", default=None, choices=TTA, help=TTA_HELP)
    args = p.parse_args()
    if args.evaluate:
        print(json.dumps({t: evaluate(args.evaluate, t, args.tta) for t in args.tables}, indent=2))
    else:
        print(json.dumps(make(args.data, Path(args.work), args.seed, args.kinds, args.photos_only), indent=2))


if __name__ == "__main__":
    main()
