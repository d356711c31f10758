"""Make the data (and, optionally, wheels) a GPU host needs for bench/gpu_train.sh, within a size budget.

Any CUDA host with Python, torch and pyarrow will do; it needs neither pyspark nor petastorm (the GPU
check reads with --reader pyarrow), and torchvision/Pillow wheels can travel with the data for a host
without them. This writes bench/out/gpu/ with
- data/: a Parquet faces table copied from a prepared one (val and test splits whole, so test MAE is on the
  real test split as prepared; train rows sampled, seeded, and optionally re-encoded at a lower JPEG quality,
  and train and val optionally downscaled (--side), so more of them fit the budget) with _SUCCESS and the
  source's manifest.json (crop settings for the bundle);
- aaf/ (with --aaf): the prepared All-Age-Faces table, a seeded --aaf-rows sample of each split, re-encoded at
  --aaf-quality and optionally downscaled, for the held-out check of bench.gpu_recipe (written first: train
  gets what is left);
- wheels/: torchvision and Pillow wheels for --python-version (installed there only if missing).

    python -m bench.gpu_data --data /tmp/utk/parquet --budget-mib 62
    # copy bench/out/gpu to the GPU host (or give it as the carried path), then there: bash bench/gpu_train.sh
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import REPO, copy_splits
from schemas import layout

WHEELS = ("torchvision==0.26.0", "pillow==12.3.0")  # torchvision 0.26 is the one built for torch 2.11


def reencode(jpeg: bytes, quality: int, side: int = 0) -> bytes:
    """A JPEG crop re-encoded at `quality`, first resized to side x side (Lanczos) when `side` is given."""
    from PIL import Image

    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if side and image.size != (side, side):
        image = image.resize((side, side), Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def reencode_column(table, quality: int, side: int = 0):
    import pyarrow as pa

    images = [reencode(b, quality, side) for b in table.column("image").to_pylist()]
    return table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared Parquet output (e.g. all of UTKFace)")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "gpu"))
    p.add_argument("--budget-mib", type=float, default=62.0, help="data + wheels, in MiB")
    p.add_argument("--train-quality", type=int, default=0, help="re-encode train crops at this JPEG quality")
    p.add_argument("--side", type=int, default=0,
                   help="downscale train and val crops to this side (px) first; test stays as prepared")
    p.add_argument("--val-quality", type=int, default=90, help="with --side: the val crops' JPEG quality")
    p.add_argument("--aaf", help="a prepared All-Age-Faces table to take along (aaf/)")
    p.add_argument("--aaf-rows", type=int, default=None, help="a seeded sample of this many rows of each AAF split")
    p.add_argument("--aaf-side", type=int, default=0, help="downscale the AAF crops to this side first")
    p.add_argument("--aaf-quality", type=int, default=90)
    p.add_argument("--no-wheels", action="store_true")
    p.add_argument("--python-version", default="3.12", help="the GPU host's Python, for the wheels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import numpy as np
    import pyarrow as pa

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    if not args.no_wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", args.python_version, "--platform", "manylinux_2_28_x86_64",
                        "-d", str(wheels), *WHEELS], check=True, stdout=subprocess.DEVNULL)
    counts = {}
    if args.aaf:  # each split it has (a held-out table: test alone) sampled to --aaf-rows, re-encoded
        faces = Path(args.aaf) / layout.FACES_DIR
        counts["aaf"] = copy_splits(args.aaf, out / "aaf", {s: args.aaf_rows for s in ("train", "val", "test")
                                                           if (faces / f"split={s}").exists()},
                                    seed=args.seed, row_group_size=512, compression="none",
                                    transform=lambda split, t: reencode_column(t, args.aaf_quality, args.aaf_side))
    budget = args.budget_mib * 2**20 - sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    data = out / "data"

    def fit_train(split, table):
        """test whole, as prepared; val whole (downscaled with --side); train re-encoded (optionally, downscaled
        with --side) and sampled to what the budget leaves."""
        if split == "val" and args.side:
            return reencode_column(table, args.val_quality, args.side)
        if split != "train":
            return table
        if args.train_quality or args.side:
            table = reencode_column(table, args.train_quality or 95, args.side)
        left = budget - sum(f.stat().st_size for f in data.rglob("*.parquet"))
        per_row = table.column("image").nbytes / max(table.num_rows, 1) * 1.06
        keep = int(min(table.num_rows, left // per_row))
        return table.take(pa.array(np.sort(np.random.default_rng(args.seed).permutation(table.num_rows)[:keep])))

    counts["data"] = copy_splits(args.data, data, {"val": None, "test": None, "train": None}, row_group_size=512,
                                 compression="none", transform=fit_train)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"out": str(out), "rows": counts, "train_quality": args.train_quality or "as prepared",
                      "side": args.side or "as prepared",
                      "mib": round(size / 2**20, 1)}))


if __name__ == "__main__":
    main()
