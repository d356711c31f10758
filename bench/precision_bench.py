"""Benchmark: training img/s in fp32 vs bf16 (autocast on channels-last tensors), trainer.precision's choice.

Both run trainer.train.train_one_epoch (ResNet-18, AdamW, the same head, batch size and on-device augmentation)
over the same in-memory batches of real crops, alternating fp32 / bf16 `--repeats` times (this VM's speed drifts
within minutes), medians reported with their ratio, per image size. Also says what --precision auto picks here.

    python -m bench.precision_bench --data out/utkface_parquet --sizes 64 80 --batches 12
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


def rate(batches: list, precision: Precision, head: str, warmup: int) -> float:
    torch.manual_seed(0)
    model = precision.model(build_model(head).to(precision.device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    learner = Learner(model, optimizer, Constant(), head, "l1", precision.device, augment=1.0, precision=precision)
    generator = torch.Generator().manual_seed(0)
    train_one_epoch(learner, batches[:warmup], generator)
    return train_one_epoch(learner, batches[warmup:], generator)["img_per_s"]


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
    args = p.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    source = split_source(args.data, "train")
    sizes = {}
    for size in args.sizes:
        settings = LoaderSettings(batch_size=args.batch_size, image_size=size, workers=2, reader="pyarrow")
        loader = SplitLoader(source, settings, train=True)
        batches = [{k: v.to(device) for k, v in b.items()}
                   for b in itertools.islice(iter(loader), args.warmup + args.batches)]
        runs = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):
            for name in runs:
                runs[name].append(rate(batches, Precision(name, device), args.head, args.warmup))
        fp32, bf16 = statistics.median(runs["fp32"]), statistics.median(runs["bf16"])
        sizes[size] = {"fp32_img_per_s": round(fp32, 1), "bf16_img_per_s": round(bf16, 1),
                       "bf16_over_fp32": round(bf16 / fp32, 2), "runs": {k: [round(v, 1) for v in r]
                                                                          for k, r in runs.items()}}
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
