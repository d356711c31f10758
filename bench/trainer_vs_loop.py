"""Benchmark: the trainer's training img/s vs a plain in-memory PyTorch loop on the same rows, model and batch.

Trainer: trainer.data.SplitLoader (Petastorm over the Parquet table, decode threads at the training size,
row count checked) feeding trainer.train.train_one_epoch with batched augmentation on the device
(trainer/augment.py: shift/scale, flip, colour jitter per sample). Plain loop: the same rows decoded once
into one uint8 tensor beforehand (not timed), each batch a random shift (roll) + flip on the whole batch,
then the same normalisation and the same train step (ResNet-18, AdamW, the same head and batch size).
The two alternate (trainer, loop, trainer, loop, ...) at each image size; each variant runs `--epochs`
epochs and the last epoch's img/s counts (the first pays Petastorm's and the allocator's start-up).

    python -m bench.trainer_vs_loop --data out/utk128 --rows 4096 --sizes 64 128 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import copy_splits, machine
from trainer.data import LoaderSettings, READERS, SplitLoader, layout, split_source
from trainer.model import build_model, loss_fn
from trainer.bundle import normalize
from trainer.runtime import decode_image
from trainer.schedules import Constant
from trainer.train import Learner, cpu_count, train_one_epoch


def _model(head: str, device):
    torch.manual_seed(0)
    model = build_model(head).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def trainer_epochs(source, size: int, batch: int, workers: int, head: str, epochs: int, device, cache: bool,
                   reader: str = "petastorm"):
    loader = SplitLoader(source, LoaderSettings(batch_size=batch, image_size=size, workers=workers,
                                                    cache=cache, reader=reader), train=True)
    model, optimizer = _model(head, device)
    rates = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(epoch)
        stats = train_one_epoch(Learner(model, optimizer, Constant(), head, "l1", device, augment=1.0), loader,
                                generator)
        rates.append(stats["img_per_s"])
    return rates


def decode_all(source, size: int) -> tuple:
    import pyarrow.parquet as pq

    images, ages = [], []
    for uri in source.files:
        table = pq.read_table(layout.local_path(uri), columns=["image", "age"])
        images += [decode_image(b, size) for b in table.column("image").to_pylist()]
        ages += table.column("age").to_pylist()
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ages, dtype=torch.float32)


def loop_epochs(images, ages, batch: int, head: str, epochs: int, device):
    """The plain loop: resident tensors, batch shift (roll by up to 1/8 of the side) + flip, same step."""
    model, optimizer = _model(head, device)
    images, ages = images.to(device), ages.to(device)
    size = images.shape[-1]
    generator = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(ages), generator=generator)
        start, rows = time.time(), 0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            x = images[idx]
            dx, dy = (torch.randint(-size // 8, size // 8 + 1, (2,), generator=generator)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            if torch.rand(1, generator=generator).item() < 0.5:
                x = torch.flip(x, dims=[3])
            loss = loss_fn(model(normalize(x)), ages[idx], head, "l1")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rows += len(idx)
        rates.append(rows / (time.time() - start))
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared faces table (e.g. UTKFace at 128 px)")
    p.add_argument("--rows", type=int, default=4096, help="train rows sampled (seeded) for both variants")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="the trainer's decode threads")
    p.add_argument("--head", default="distribution")
    p.add_argument("--cache", action="store_true", help="the trainer with --cache (decoded crops kept)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reader", default="petastorm", choices=READERS)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "sample"
        copy_splits(args.data, table, {"train": args.rows, "val": 64, "test": 64})
        source = split_source(str(table), "train")
        results = {}
        for size in args.sizes:
            images, ages = decode_all(source, size)
            runs = {"trainer": [], "loop": []}
            for _ in range(args.repeats):
                runs["trainer"].append(trainer_epochs(source, size, args.batch_size, args.workers, args.head,
                                                      args.epochs, device, args.cache, args.reader)[-1])
                runs["loop"].append(loop_epochs(images, ages, args.batch_size, args.head, args.epochs, device)[-1])
            med = {k: statistics.median(v) for k, v in runs.items()}
            results[size] = {"trainer_img_per_s": round(med["trainer"], 1), "loop_img_per_s": round(med["loop"], 1),
                             "ratio_trainer_vs_loop": round(med["trainer"] / med["loop"], 3),
                             "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()}}
            print(json.dumps({size: results[size]}), flush=True)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(), "rows": source.rows,
                      "batch_size": args.batch_size, "epochs_each": args.epochs, "repeats": args.repeats,
                      "workers": args.workers, "threads": torch.get_num_threads(), "cache": args.cache,
                      "reader": args.reader,
                      "device": str(device), "results": results}, indent=2))


if __name__ == "__main__":
    main()
