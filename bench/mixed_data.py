"""The SECOND recipe's data (issue 24: "a second recipe that also trains on part of AAF, clearly labelled"): a
prepared UTKFace table and a prepared All-Age-Faces table joined into one training table, with AAF's faces split
train/val/test by the project's own split function (AAF has no subject ids: each photo is its own key), plus two
evaluation tables of the held-out faces only: AAF's test part and UTKFace's test split.

The reference recipe never sees AAF; this one trains on AAF's train part, so its AAF number is NOT a held-out
cross-dataset result: it says how much of the cross-dataset gap training data from that population closes. Every
table goes under --work, outside the repository (derived from the datasets: never commit it).

    python -m bench.mixed_data --utkface out/utkface_parquet --aaf out/aaf_parquet --work <scratch>/mixed
    -> <work>/train_table (train on it; its test split is UTKFace's); <work>/aaf_test and <work>/utkface_test
       (evaluate on them)
    python -m bench.mixed_data --work <scratch>/mixed --evaluate reference=<bundle> second=<bundle>
    -> every bundle on both held-out tables (flip TTA, as shipped and without its age map), one JSON
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Sequence

from schemas import layout

AAF_SPLITS = (0.5, 0.1, 0.4)  # train, val, test: 40 % of AAF stays held out for the comparison
SALT = "faceage-mixed-v1"


def _rows(table: str, split: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.data import split_source

    try:
        files = split_source(table, split).files
    except ValueError:  # no rows in that split
        return None
    return pa.concat_tables(pq.read_table(layout.local_path(f)) for f in files)


def _write(rows_by_split: Dict[str, object], root: Path, manifest: dict, note: str) -> Dict[str, int]:
    """A prepared-table folder (faces/split=*/part-*.parquet, _SUCCESS, manifest.json) the trainer and the bench
    evaluation read like prepare's own."""
    import pyarrow.parquet as pq

    faces = root / "faces"
    if root.exists():
        shutil.rmtree(root)
    counts = {}
    for split, rows in rows_by_split.items():
        counts[split] = 0 if rows is None else rows.num_rows
        if rows is not None and rows.num_rows:
            (faces / f"split={split}").mkdir(parents=True, exist_ok=True)
            pq.write_table(rows, faces / f"split={split}" / "part-00000.parquet", row_group_size=512)
    faces.mkdir(parents=True, exist_ok=True)
    (faces / "_SUCCESS").write_text("")
    manifest = {**manifest, "splits": counts, "counts": {"inputs": sum(counts.values()), "faces": sum(counts.values()),
                                                          "rejects": 0}, "note": note}
    (root / layout.LATEST_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return counts


def aaf_split(rows, fractions: Sequence[float] = AAF_SPLITS):
    """AAF's rows split train/val/test by photos.splits.assign_split on each photo's content hash."""
    import numpy as np

    from photos.splits import assign_split, split_key

    keys = [split_key(s, c) for s, c in zip(rows.column("subject_id").to_pylist(),
                                             rows.column("content_sha256").to_pylist())]
    splits = np.array([assign_split(k, fractions, SALT) for k in keys])
    return {s: rows.filter(splits == s) for s in ("train", "val", "test")}


def make(utkface: str, aaf: str, work: Path) -> dict:
    import pyarrow as pa

    base = layout.read_prepare_manifest(utkface)
    aaf_crop = layout.read_prepare_manifest(aaf)["settings"]["crop"]
    if aaf_crop["size"] != base["settings"]["crop"]["size"] or aaf_crop["margin"] != base["settings"]["crop"]["margin"]:
        raise SystemExit(f"mixed_data: the two tables' crops differ ({aaf_crop} vs {base['settings']['crop']})")
    aaf_rows = pa.concat_tables(t for t in (_rows(aaf, s) for s in ("train", "val", "test")) if t is not None)
    parts = aaf_split(aaf_rows)
    utk = {s: _rows(utkface, s) for s in ("train", "val", "test")}
    seen = {f for s in ("train", "val") for f in parts[s].column("face_id").to_pylist()}
    if seen & set(parts["test"].column("face_id").to_pylist()):  # the held-out part must be held out
        raise SystemExit("mixed_data: an AAF face is in both the training and the held-out part")
    manifest = {k: base[k] for k in ("run_id", "status", "settings", "format", "versions") if k in base}
    # pyarrow cannot concatenate the two tables' schemas when one column's nullability differs: cast to UTKFace's
    joined = {s: pa.concat_tables([utk[s], parts[s].cast(utk[s].schema)]) for s in ("train", "val")}
    out = {
        "train_table": _write({**joined, "test": utk["test"]}, work / "train_table", manifest,
                              "bench.mixed_data: UTKFace train+val with AAF's train+val parts (the second recipe); "
                              "test: UTKFace's test split only"),
        "aaf_test": _write({"test": parts["test"]}, work / "aaf_test", {**manifest, "settings": {
            **base["settings"], "crop": aaf_crop}}, "bench.mixed_data: AAF's held-out test part (detector on)"),
        "utkface_test": _write({"test": utk["test"]}, work / "utkface_test", manifest,
                               "bench.mixed_data: UTKFace's test split"),
    }
    return {"work": str(work), "tables": out, "aaf_fractions": AAF_SPLITS, "salt": SALT}


def at_age_mix(mae_by_group: Dict[str, float], faces_by_group: Dict[str, int]) -> float:
    """A set's MAE had its faces the age groups' shares of another set (`faces_by_group`): what is left of a gap
    once the two sets' age distributions are made equal. Groups the first set lacks are left out of the shares."""
    shared = {g: n for g, n in faces_by_group.items() if g in mae_by_group}
    return round(sum(mae_by_group[g] * n for g, n in shared.items()) / sum(shared.values()), 3)


def compare(work: Path, bundles: Dict[str, str], tta: str = "flip") -> dict:
    """Each bundle on the same held-out faces: AAF's test part and UTKFace's test split (bench.shift_data.evaluate:
    MAE, CS@5, bias by age group, with and without the bundle's age map), and the AAF/UTKFace ratio, also with AAF's
    MAE taken at UTKFace's test age mix (at_age_mix)."""
    from bench.shift_data import evaluate

    cache, out = {}, {}
    for name, bundle in bundles.items():
        res = {t: evaluate(bundle, str(work / t), tta, cache=cache) for t in ("utkface_test", "aaf_test")}
        for suffix in ("", "_unmapped"):
            utk, aaf = res["utkface_test"], res["aaf_test"]
            res["aaf_ratio" + suffix] = round(aaf["mae" + suffix] / utk["mae" + suffix], 3)
            at_mix = at_age_mix(aaf["mae_by_age_group" + suffix], utk["faces_by_age_group"])
            res["aaf_mae_at_utkface_age_mix" + suffix] = at_mix
            res["aaf_ratio_at_utkface_age_mix" + suffix] = round(at_mix / utk["mae" + suffix], 3)
        out[name] = res
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--utkface", help="a prepared UTKFace table (prepare.py --labels utkface)")
    p.add_argument("--aaf", help="a prepared All-Age-Faces table (make recipe-report prepares one)")
    p.add_argument("--work", required=True, help="folder for the tables (outside the repository)")
    p.add_argument("--evaluate", nargs="+", metavar="NAME=BUNDLE", help="compare bundles on the held-out tables")
    args = p.parse_args()
    work = Path(os.path.abspath(args.work))
    if args.evaluate:
        bundles = dict(item.split("=", 1) for item in args.evaluate)
        print(json.dumps(compare(work, bundles), indent=2))
    elif args.utkface and args.aaf:
        print(json.dumps(make(args.utkface, args.aaf, work), indent=2))
    else:
        p.error("give --utkface and --aaf (make the tables) or --evaluate (compare bundles)")


if __name__ == "__main__":
    main()
