"""Benchmark: rows/s of the Petastorm feed (trainer/data.py) vs the raw decode rate of the same shards.

Raw: pyarrow reads the split's Parquet files by row group and a thread pool of `--workers` decodes the JPEG
crops with the loader's own function into uint8 arrays: the same per-row work without Petastorm.
(Augmentation is no longer per-row work of the feed: the training loop applies it to whole batches,
trainer/augment.py; bench.trainer_vs_loop measures it.)
Feed: trainer.data.SplitLoader over the same split, as training sees it (one full epoch, row count
checked). Both in the same run, same machine, same number of workers. This VM's speed drifts by +-30 % within minutes, so the variants
alternate (raw, feed, raw, feed, ...) `--repeats` times and the medians are compared.

    python -m bench.loader_bench --data /tmp/utk/parquet --split train --image-size 128
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor


from trainer.data import (LoaderSettings, READERS, SplitLoader, SplitSource, decode_image, layout, split_source)  # noqa: E402


def raw_decode(source: SplitSource, size: int, workers: int) -> dict:
    """The same per-row work as the feed (decode at the training size, uint8 N x 3 x H x W)."""
    import numpy as np
    import pyarrow.parquet as pq

    def one_group(job):
        path, group = job
        table = pq.ParquetFile(path).read_row_group(group, columns=["image", "age"])
        images = table.column("image").to_pylist()
        batch = np.stack([decode_image(b, size) for b in images]).transpose(0, 3, 1, 2)
        return len(np.ascontiguousarray(batch))

    jobs = []
    for uri in source.files:
        path = layout.local_path(uri)
        jobs += [(path, g) for g in range(pq.ParquetFile(path).num_row_groups)]
    start = time.time()
    with ThreadPoolExecutor(workers) as pool:
        rows = sum(pool.map(one_group, jobs))
    seconds = time.time() - start
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}


def feed(source: SplitSource, settings: LoaderSettings, train: bool) -> dict:
    loader = SplitLoader(source, settings, train=train)
    start = time.time()
    rows = sum(len(b["age"]) for b in loader)
    seconds = time.time() - start
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reader", default="petastorm", choices=READERS)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    source = split_source(args.data, args.split)
    settings = LoaderSettings(batch_size=args.batch_size, image_size=args.image_size, workers=args.workers,
                                reader=args.reader)
    runs = {"raw": [], "feed": [], "feed_train": []}
    for _ in range(args.repeats):
        runs["raw"].append(raw_decode(source, args.image_size, args.workers)["rows_per_s"])
        runs["feed"].append(feed(source, settings, train=False)["rows_per_s"])
        runs["feed_train"].append(feed(source, settings, train=True)["rows_per_s"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "split": args.split, "rows": source.rows, "image_size": args.image_size, "workers": args.workers,
        "reader": args.reader, "repeats": args.repeats,
        "raw_rows_per_s": round(med["raw"], 1),
        "feed_rows_per_s": round(med["feed"], 1),
        "feed_train_rows_per_s": round(med["feed_train"], 1),  # shuffled row groups and buffer
        "ratio_feed_vs_raw": round(med["feed"] / med["raw"], 3),
        "all_runs_rows_per_s": {k: [round(x) for x in v] for k, v in runs.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
