"""What the benchmark scripts share: the repository root, a seeded copy of a prepared table's splits, the
flags every comparison takes, running a project module in a subprocess, and a one-line machine description.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]


def copy_splits(data: str, out: Path, rows: Dict[str, Optional[int]], seed: int = 0, row_group_size: int = 128,
                compression: str = "snappy", transform: Optional[Callable] = None) -> Dict[str, int]:
    """A Parquet faces table at `out` holding a seeded sample of each split of the prepared table `data`
    (None: the whole split), with _SUCCESS and the source's run manifest (the crop settings a bundle
    records). `transform(split, table) -> table` may change a split before sampling (e.g. re-encode).
    Returns the rows written per split."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas import layout
    from trainer.data import split_source

    shutil.rmtree(out, ignore_errors=True)
    written = {}
    for split, n in rows.items():
        source = split_source(data, split)
        table = pa.concat_tables(pq.read_table(layout.local_path(f)) for f in source.files)
        if transform is not None:
            table = transform(split, table)
        if n is not None:
            keep = np.sort(np.random.default_rng(seed).permutation(table.num_rows)[:n])
            table = table.take(pa.array(keep))
        folder = out / layout.FACES_DIR / f"split={split}"
        folder.mkdir(parents=True)
        pq.write_table(table, folder / "part-0.parquet", row_group_size=row_group_size, compression=compression)
        written[split] = table.num_rows
    (out / layout.FACES_DIR / "_SUCCESS").write_text("")
    manifest = layout.local_path(layout.join(layout.output_root(data), layout.LATEST_MANIFEST))
    if manifest and os.path.exists(manifest):
        shutil.copy(manifest, out / layout.LATEST_MANIFEST)
    return written


def split_pixels(data: str, splits, size: int):
    """(uint8 N x size x size x 3 crops, float64 ages) of every row of `splits` of a prepared table, decoded the way
    a bundle's Predictor expects (trainer.runtime.decode_image); splits the table lacks are skipped."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas import layout
    from trainer.data import split_source
    from trainer.runtime import decode_image

    parts = []
    for split in splits:
        try:
            source = split_source(data, split)
        except (FileNotFoundError, ValueError):
            continue
        parts += [pq.read_table(layout.local_path(f), columns=["image", "age"]) for f in source.files]
    rows = pa.concat_tables(parts)
    pixels = np.stack([decode_image(j, size) for j in rows.column("image").to_pylist()])
    return pixels, rows.column("age").to_numpy().astype(np.float64)


def raw_ages(predictor, pixels, tta: Optional[str] = None, batch_size: int = 256):
    """(ages, stds) of `pixels` by a trainer.bundle.Predictor without its age map (raw ages; stds still scaled
    by the bundle's calibration), as float64 arrays; tta None: the mode the bundle's calibration was fitted under.
    The predictor's bundle is left as it was."""
    import numpy as np

    fitted = predictor.bundle.get("calibration")
    try:
        predictor.bundle["calibration"] = {k: v for k, v in (fitted or {}).items() if k != "age_map"}
        ages, stds = predictor.predict(pixels, batch_size=batch_size, tta=tta)
    finally:
        predictor.bundle["calibration"] = fitted
    return np.asarray(ages, np.float64), np.asarray(stds, np.float64)


def comparison_parser(description: str, work: str, train_rows: int, epochs: int) -> argparse.ArgumentParser:
    """The flags every training comparison takes: the prepared table, a scratch folder, the subset sizes,
    the image size, epochs and seeds."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", required=True, help="a prepare output (e.g. all of UTKFace)")
    p.add_argument("--work", default=work, help="scratch folder (never inside the repository)")
    p.add_argument("--train-rows", type=int, default=train_rows)
    p.add_argument("--val-rows", type=int, default=400)
    p.add_argument("--test-rows", type=int, default=800)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    return p


def subset_table(args) -> Path:
    """The comparison's table: --train/--val/--test-rows sampled from --data into WORK/data."""
    table = Path(args.work) / "data"
    copy_splits(args.data, table, {"train": args.train_rows, "val": args.val_rows, "test": args.test_rows})
    return table


def as_flags(values: dict, fmt: Callable = str) -> List[str]:
    """trainer.train flag values (e.g. trainer.tune's train_params) as command-line flags: {"weight_decay": 1e-4}
    -> ["--weight-decay", "0.0001"]; `fmt` writes each value."""
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", fmt(v))]


def env_with_venv() -> dict:
    """This interpreter's bin folder first on PATH (spark-submit, torchrun)."""
    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


def run_python(args: List[str], log: Optional[Path] = None) -> float:
    """`python ARGS` from the repository root; its seconds, or exit with its stderr's tail. With `log`, its
    stdout and stderr are kept in that file too."""
    start = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env_with_venv(), capture_output=True, text=True)
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)}\n{proc.stderr[-3000:]}")
    return time.time() - start


def machine(extra: str = "") -> str:
    import torch

    return (f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}" + (f" ({extra})" if extra else ""))
