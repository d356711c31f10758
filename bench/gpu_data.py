"""Make the data and wheels a lent GPU machine needs for bench/gpu_train.sh, within its carry limit.

The GPU machine gets the working tree plus at most 64 MiB of carried ignored paths, and has Python 3.12,
torch 2.11 and pyarrow but no pyspark or petastorm (and maybe no torchvision or Pillow). This writes
bench/out/gpu/ with
- data/: a Parquet faces table read from a prepared one (val and test splits whole, so test MAE is on
  the real test split; train rows sampled, seeded, and optionally re-encoded at a lower JPEG quality so
  more of them fit) with _SUCCESS and the source's manifest.json (crop settings for the bundle);
- wheels/: torchvision and Pillow wheels for cp312 (installed there only if missing).

    python bench/gpu_data.py --data /tmp/utk/parquet --budget-mib 62
    # then, with a lent GPU: run(command="bash bench/gpu_train.sh", carry=["bench/out/gpu"])
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas import layout  # noqa: E402
from trainer import data as D  # noqa: E402

WHEELS = ("torchvision==0.26.0", "pillow==12.3.0")  # torchvision 0.26 is the one built for torch 2.11


def reencode(jpeg: bytes, quality: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared Parquet output (e.g. all of UTKFace)")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "gpu"))
    p.add_argument("--budget-mib", type=float, default=62.0, help="data + wheels (the carry limit is 64 MiB)")
    p.add_argument("--train-quality", type=int, default=0, help="re-encode train crops at this JPEG quality")
    p.add_argument("--no-wheels", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    if not args.no_wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "-d", str(wheels),
                        *WHEELS], check=True, stdout=subprocess.DEVNULL)
    budget = args.budget_mib * 2**20 - sum(f.stat().st_size for f in wheels.iterdir())
    faces = out / "data" / layout.FACES_DIR
    counts = {}
    for split in ("val", "test", "train"):
        source = D.split_source(args.data, split)
        table = pa.concat_tables(pq.read_table(layout.local_path(f)) for f in source.files)
        if split == "train":
            if args.train_quality:
                images = [reencode(b, args.train_quality) for b in table.column("image").to_pylist()]
                table = table.set_column(table.schema.get_field_index("image"), "image",
                                         pa.array(images, pa.binary()))
            per_row = table.column("image").nbytes / max(table.num_rows, 1) * 1.06
            keep = int(min(table.num_rows, budget // per_row))
            order = np.random.default_rng(args.seed).permutation(table.num_rows)[:keep]
            table = table.take(pa.array(np.sort(order)))
        folder = faces / f"split={split}"
        folder.mkdir(parents=True)
        pq.write_table(table, folder / "part-0.parquet", row_group_size=512, compression="none")
        budget -= (folder / "part-0.parquet").stat().st_size
        counts[split] = table.num_rows
    (faces / "_SUCCESS").write_text("")
    manifest = layout.local_path(layout.join(args.data.rstrip("/"), layout.LATEST_MANIFEST))
    if manifest and os.path.exists(manifest):
        shutil.copy(manifest, out / "data" / layout.LATEST_MANIFEST)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"out": str(out), "rows": counts, "train_quality": args.train_quality or "as prepared",
                      "mib": round(size / 2**20, 1)}))


if __name__ == "__main__":
    main()
