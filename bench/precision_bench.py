"""Benchmark: training img/s in fp32 vs bf16 (autocast on channels-last tensors), trainer.precision's choice.

Every arm runs trainer.train.train_one_epoch (ResNet-18, AdamW, the same head, batch size and on-device
augmentation) over the same in-memory batches of real crops, the arms alternating `--repeats` times (this VM's
speed drifts within minutes), medians reported with their ratio to the first arm, per image size. An arm is a
precision, optionally with "+compile": the module under torch.compile (inductor; its compile time falls in the
warm-up batches and is reported apart). Also says what --precision auto picks here.

    python -m bench.precision_bench --data out/utkface_parquet --sizes 64 80 --batches 12
    python -m bench.precision_bench --data out/utkface_parquet --sizes 80 --arms fp32 fp32+compile
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

from trainer.data import LoaderSettings, SplitLoader, split_source
from trainer.model import build_model
from trainer.precision import Precision, cpu_has_bf16
from trainer.schedules import Constant
from trainer.train import Learner, train_one_epoch


def rate(batches: list, arm: str, device: torch.device, head: str, warmup: int):
    """(img/s after the warm-up batches, seconds of the warm-up) of one arm, e.g. "fp32" or "bf16+compile"."""
    name, _, compiled = arm.partition("+")
    precision = Precision(name, device)
    torch.manual_seed(0)
    model = precision.model(build_model(head).to(precision.device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    net = torch.compile(model) if compiled else model
    learner = Learner(net, optimizer, Constant(), head, "l1", precision.device, augment=1.0, precision=precision)
    generator = torch.Generator().manual_seed(0)
    warm = train_one_epoch(learner, batches[:warmup], generator)["train_seconds"]
    return train_one_epoch(learner, batches[warmup:], generator)["img_per_s"], warm


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared faces table (prepare.py's output)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 80])
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--head", default="distribution")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--arms", nargs="+", default=["fp32", "bf16"],
                   help="what to compare, the first the baseline: fp32 or bf16, each optionally +compile")
    args = p.parse_args()
    for arm in args.arms:
        name, _, extra = arm.partition("+")
        if name not in ("fp32", "bf16") or extra not in ("", "compile"):
            p.error(f"--arms {arm}: use fp32 or bf16, optionally followed by +compile")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    source = split_source(args.data, "train")
    sizes = {}
    for size in args.sizes:
        settings = LoaderSettings(batch_size=args.batch_size, image_size=size, workers=2, reader="pyarrow")
        loader = SplitLoader(source, settings, train=True)
        batches = [{k: v.to(device) for k, v in b.items()}
                   for b in itertools.islice(iter(loader), args.warmup + args.batches)]
        runs, warm = {arm: [] for arm in args.arms}, {arm: [] for arm in args.arms}
        for _ in range(args.repeats):
            for arm in runs:
                speed, seconds = rate(batches, arm, device, args.head, args.warmup)
                runs[arm].append(speed)
                warm[arm].append(seconds)
        medians = {arm: statistics.median(r) for arm, r in runs.items()}
        base = args.arms[0]
        sizes[size] = {**{f"{arm}_img_per_s": round(m, 1) for arm, m in medians.items()},
                       **{f"{arm}_over_{base}": round(m / medians[base], 2) for arm, m in medians.items() if arm != base},
                       "runs": {k: [round(v, 1) for v in r] for k, r in runs.items()},
                       "warmup_seconds": {k: [round(v, 1) for v in r] for k, r in warm.items()}}
        print(json.dumps({size: sizes[size]}), flush=True)
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cpu_has_bf16": cpu_has_bf16(), "auto_picks": Precision.choose("auto", device).name,
        "batches": args.batches, "batch_size": args.batch_size, "head": args.head, "sizes": sizes}, indent=2))


if __name__ == "__main__":
    main()
