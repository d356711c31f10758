"""Benchmark: training img/s fed by the Petastorm loader vs the same loop over in-memory tensors.

Both variants run trainer.train.train_one_epoch (ResNet-18, AdamW, same head and batch size) for the
same number of batches in one process; the in-memory variant first collects those batches from the
loader (decoded) and replays them, so only the feeding differs; both augment each batch on the device.

    python -m bench.train_bench --data /tmp/utk/parquet --batches 20 --batch-size 64 --image-size 128
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time

import torch


from trainer.data import LoaderSettings, READERS, SplitLoader, split_source  # noqa: E402
from trainer.model import build_model  # noqa: E402
from trainer.schedules import Constant  # noqa: E402
from trainer.train import Learner, train_one_epoch  # noqa: E402


def run(batches, head: str, warmup: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model(head).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = iter(batches)
    # both variants augment on the device (trainer/augment.py), as training does
    generator = torch.Generator().manual_seed(0)
    learner = Learner(model, optimizer, Constant(), head, "l1", device, augment=1.0)
    train_one_epoch(learner, itertools.islice(batches, warmup), generator)
    stats = train_one_epoch(learner, batches, generator)
    return stats["img_per_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--head", default="distribution")
    p.add_argument("--workers", type=int, default=2, help="reader threads")
    p.add_argument("--reader", default="petastorm", choices=READERS)
    p.add_argument("--repeats", type=int, default=2, help="alternate fed / in-memory this many times (medians)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (in-memory batches then live on it)")
    args = p.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    settings = LoaderSettings(batch_size=args.batch_size, image_size=args.image_size, workers=args.workers,
                                reader=args.reader)
    source = split_source(args.data, args.split)
    total = args.warmup + args.batches
    in_memory = [{k: v.to(device) for k, v in b.items()}  # resident on the device: a plain loop's best case
                 for b in itertools.islice(iter(SplitLoader(source, settings, train=True)), total)]
    runs = {"fed": [], "memory": []}
    for _ in range(args.repeats):  # alternating: this VM's speed drifts within minutes
        loader = SplitLoader(source, settings, train=True)
        runs["fed"].append(run(itertools.islice(iter(loader), total), args.head, args.warmup, device))
        runs["memory"].append(run(in_memory, args.head, args.warmup, device))
    fed, memory = statistics.median(runs["fed"]), statistics.median(runs["memory"])
    if not memory or len(in_memory) < total:
        raise SystemExit(f"the split holds {len(in_memory)} batches, fewer than --warmup + --batches = {total}")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__}, torch threads {torch.get_num_threads()}",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "batches": args.batches, "batch_size": args.batch_size, "image_size": args.image_size, "head": args.head,
        "workers": args.workers, "reader": args.reader,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "loader_img_per_s": round(fed, 1), "in_memory_img_per_s": round(memory, 1),
        "ratio": round(fed / memory, 3),
        "all_runs_img_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
