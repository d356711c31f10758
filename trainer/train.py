"""python -m trainer.train: ResNet-18 age estimation on a prepared faces table.

Several ranks: torchrun (it sets RANK/WORLD_SIZE), or on Spark `spark-submit spark_jobs/distributed.py train
--num-processes N ...` (TorchDistributor).

Reads train/val/test through Petastorm or pyarrow (trainer/data.py), trains with AdamW or SGD under
OneCycle (the default), CyclicLR + ReduceLROnPlateau or a constant rate, augments each batch on the
training device (trainer/augment.py), keeps the best epoch by val MAE,
checkpoints every epoch (resume with --resume), and writes one model bundle plus metrics.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from schemas import layout
from schemas.crop import CropSettings, pixel_size
from shell import uri
from shell.cli import (apply_params, dumps, entry_points, log, non_negative_int, number, Parser, path_arg,
                       positive_int, redact, redacted)
from shell.errors import check_space, UserError
from shell.outputs import check_overlap, Outputs
from trainer.augment import augment_batch
from trainer.bundle import Provenance, is_bundle, normalize, save_bundle
from trainer.data import LoaderSettings, READERS, SplitLoader, split_ages, split_source
from trainer.model import AGE_WEIGHTINGS, HEADS, TTA, TTA_MODES_HELP, age_weights, build_model, loss_fn, predict_ages
from trainer.precision import PRECISIONS, Precision
from trainer import calibration, tracking
from trainer.schedules import SCHEDULES, BudgetOneCycle, ScheduleSettings, build_schedule

OPTIMIZERS = {
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, nesterov=True),
}


class TrainError(UserError):
    """A problem a user can fix (bad data path, unfinished table, bad params file, diverged run)."""


# flags a checkpoint must agree with to be resumed (they change the model, its input or its schedule)
RESUME_KEYS = ("head", "image_size", "optimizer", "schedule", "batch_size", "data", "data_version", "ema", "start_size",
               "final_epochs")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("train", prog="python -m trainer.train", description=__doc__.splitlines()[0])
    for add in (_data_flags, _model_flags, _schedule_flags, _run_flags):
        add(p)
    tracking.add_arguments(p, register=True)
    p.add_argument("--mlflow-parent-run", default=None, help=argparse.SUPPRESS)  # trainer.tune's study run
    return p


def _data_flags(p) -> None:
    """What is read and written."""
    p.add_argument("--data", required=True, type=path_arg, help="prepare output root (or its faces/ table): Parquet or Delta")
    p.add_argument("--data-version", type=non_negative_int, default=None,
                   help="Delta version to read (default: latest)")
    p.add_argument("--output", default="runs/train", type=path_arg, help="run folder: checkpoint, metrics, bundle")
    p.add_argument("--bundle", default=None, type=path_arg, help="model bundle path (default OUTPUT/model.pt)")
    p.add_argument("--params", default=None, type=path_arg, help="JSON file of flag values (e.g. trainer.tune's best params)")
    p.add_argument("--reader", default="petastorm", choices=READERS,
                   help="petastorm, or pyarrow (local tables, no Petastorm needed: e.g. a GPU box without it)")
    p.add_argument("--shuffle-buffer", type=non_negative_int, default=1024)
    p.add_argument("--cache", action="store_true",
                   help="keep every split's crops decoded at the training size after the first pass (memory is "
                        "checked first); later epochs decode nothing, row counts are still checked every epoch")
    p.add_argument("--workers", type=positive_int, default=2, help="reader/decode threads")


def _model_flags(p) -> None:
    """The model, its input, its loss and how it starts."""
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--image-size", type=pixel_size, default=None,
                   help="input side (default: the table's crop size)")
    p.add_argument("--head", default="distribution", choices=HEADS)
    p.add_argument("--loss", default="l1", choices=("l1", "smooth_l1"), help="regression head loss")
    p.add_argument("--init-weights", default=None, type=path_arg,
                   help="state-dict file (local or a URI) to start from (e.g. ImageNet)")
    p.add_argument("--augment", type=number(0.0, 5.0), default=1.0,
                   help="augmentation strength (0 = none): shift/scale crop, flip and colour jitter per sample, applied "
                        "to whole batches on the training device")
    p.add_argument("--ema", type=number(0.0, 0.99999), default=0.0,
                   help="keep an exponential moving average of the weights (and BatchNorm statistics) with this "
                        "decay per batch, e.g. 0.998; validation, the best epoch and the bundle use the average "
                        "(0 = off)")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="with --ema: the decay rises from 0 towards --ema as 1 - (1 + step)^-0.75 (timm's ModelEmaV3 "
                        "warm-up), so the average is not dominated by the random first weights on a short run")
    p.add_argument("--start-size", type=pixel_size, default=None,
                   help="progressive resizing: train the first epochs at this size and the last --final-epochs at "
                        "--image-size (the bundle's size); batches are resampled on the training device")
    p.add_argument("--final-epochs", type=positive_int, default=None,
                   help="with --start-size: how many final epochs train at --image-size (default a quarter of "
                        "--epochs, at least 1)")
    p.add_argument("--age-weighting", default="none", choices=AGE_WEIGHTINGS,
                   help="sqrt_inv: each training row's loss weighted by 1/sqrt of how common its age is in the train "
                        "split (histogram smoothed over +-2 years, weights capped at 5x, averaging 1), against ages "
                        "read toward the training set's mean at training time (trainer.model.age_weights)")
    p.add_argument("--age-calibration", default="none", choices=("none", "debias"),
                   help="debias: fit an age map on val when the run ends (trainer.calibration) against ages read "
                        "toward the mean, applied as far as needed for every true-age group of 30+ val faces to be "
                        "biased by at most 3 years; stored in the bundle and applied by every predictor")
    p.add_argument("--tta", default="none", choices=TTA,
                   help=f"{TTA_MODES_HELP}; of the final val/test metrics and the calibration fitted on them "
                        "(epochs are still chosen without it)")


def _schedule_flags(p) -> None:
    """The optimizer and its learning-rate schedule."""
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    p.add_argument("--lr", type=number(0.0, 1000.0, low_open=True), default=3e-3,
                   help="peak learning rate (CyclicLR max_lr, OneCycle max_lr)")
    p.add_argument("--base-lr", type=number(0.0, 1000.0, low_open=True), default=None,
                   help="CyclicLR lower bound (default lr/10)")
    p.add_argument("--step-size-up", type=positive_int, default=None,
                   help="CyclicLR half-cycle in batches (default 2 epochs)")
    p.add_argument("--plateau-factor", type=number(0.0, 1.0, low_open=True), default=0.5,
                   help="cycle bounds x this on a val-MAE plateau")
    p.add_argument("--plateau-patience", type=non_negative_int, default=2,
                   help="epochs without improvement before a cut")
    p.add_argument("--schedule", default="onecycle", choices=SCHEDULES,
                   help="onecycle (default: best of the three at full scale, BENCHMARKS.md), cyclic_plateau "
                        "(CyclicLR per batch with plateau cuts of its bounds) or constant")
    p.add_argument("--weight-decay", type=number(0.0, 1.0), default=1e-4)


def _run_flags(p) -> None:
    """When the run stops, where it runs, how it reports."""
    p.add_argument("--early-stop", type=positive_int, default=8,
                   help="stop after this many epochs without a better val MAE (not with a --max-minutes "
                        "OneCycle: its plan is the budget, and stopping early would leave the rate high)")
    p.add_argument("--max-minutes", type=number(0.0), default=None,
                   help="a wall-clock budget. With --schedule onecycle it plans the rate: OneCycle over the "
                        "budget's time, not over --epochs, and training ends when the budget does (mid-epoch), "
                        "so the last minutes anneal on any machine (--epochs then only caps the run). Other "
                        "schedules: start no new epoch after it (the first epoch of a run always runs)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads on CPU (default: the CPUs this process may use)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="training arithmetic: bf16 (autocast, channels-last) or fp32; auto: bf16 on CUDA and on a CPU "
                        "with bf16 instructions (avx512_bf16, AMX), where it trains about 2x faster, else fp32 "
                        "(trainer.precision)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def apply_params_file(args, parser, argv) -> None:
    """Values from --params go through each flag's own type and choices (exactly as if typed);
    flags typed on the command line override them."""
    if not args.params:
        return
    try:
        params = json.loads(uri.read_text(args.params))
    except (OSError, ValueError) as e:
        raise TrainError(f"--params {args.params}: {e}") from None
    try:
        apply_params(parser, args, params, argv, f"--params {args.params}")
    except UserError as e:
        raise TrainError(str(e)) from None


def check_output(args, main_rank: bool = True) -> Outputs:
    """The run folder (local or a URI) may hold only what a faceage run wrote (refused otherwise, before
    any work); so may --bundle. Rank 0 takes the folder's lock (one writer; finish() releases it)."""
    check_overlap([("--data", args.data), ("--params", args.params)], args.output)
    if args.bundle:
        check_overlap([("--data", args.data)], args.bundle, output_flag="--bundle")
    outputs = Outputs.at(args.output, "train")
    if main_rank:
        outputs.begin()
    try:
        outputs.check(layout.RUN_FILES)
        if args.bundle and uri.exists(args.bundle) and not is_bundle(args.bundle):
            raise TrainError(f"--bundle {args.bundle}: the file there is not a faceage model bundle; refusing to "
                             f"overwrite it (choose another path or move it away)")
    except BaseException:
        outputs.finish()
        raise
    return outputs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is visible")
    return torch.device(name)


def cpu_count(world: int = 1) -> int:
    """CPUs this process may use (its affinity mask, not the host's count), shared by the local ranks."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world if world > 1 else 1))
    return max(1, cpus // max(1, local))


@dataclasses.dataclass
class Learner:
    """What a training step needs: the module to train (DDP-wrapped with several ranks), its optimizer and
    schedule, the head and loss, the device, the augmentation strength and the EMA copy that follows it."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object  # trainer.schedules: step_batch() after every batch, step_epoch(val_mae) after an epoch
    head: str
    loss: str
    device: torch.device
    augment: float = 0.0
    ema: Optional[torch.nn.Module] = None  # a torch AveragedModel
    progress: Callable = lambda it, **kw: it
    precision: Optional[Precision] = None  # trainer.precision; None: bf16 on CUDA, fp32 on a CPU
    age_weights: Optional[torch.Tensor] = None  # trainer.model.age_weights (--age-weighting), one per age

    @property
    def arithmetic(self) -> Precision:
        return self.precision or Precision.choose("bf16" if self.device.type == "cuda" else "fp32", self.device)


def train_one_epoch(learner: Learner, loader, generator: Optional[torch.Generator] = None,
                    size: Optional[int] = None) -> Dict[str, float]:
    """One pass over `loader`; each batch resized to `size` (when given) and augmented on the device
    (trainer.augment, the learner's strength, `generator`); the EMA copy follows every step."""
    net = learner.net
    net.train()
    start = time.time()
    with (net.join() if hasattr(net, "join") else contextlib.nullcontext()):  # DDP: shards may differ in length
        total, rows, skipped = _train_batches(learner, loader, generator, size)
    seconds = time.time() - start
    return {"train_loss": total / max(rows, 1), "train_rows": rows, "train_rows_skipped": skipped,
            "train_seconds": seconds, "img_per_s": rows / seconds if seconds else float("nan")}


def _train_batches(learner: Learner, loader, generator, size):
    total, rows, skipped = 0.0, 0, 0
    device, optimizer, precision = learner.device, learner.optimizer, learner.arithmetic
    for index, batch in enumerate(learner.progress(loader, desc="train", leave=False)):
        if len(batch["age"]) < 2:  # BatchNorm cannot normalise one row (at 32 px: "Expected more than 1 value
            skipped += len(batch["age"])  # per channel"): a shard's last batch of one row sits this epoch out
            continue
        x = precision.inputs(normalize(augment_batch(batch["image"].to(device, non_blocking=True), learner.augment,
                                                     generator, size)))
        y = batch["age"].to(device, non_blocking=True)
        with precision.train_step():
            loss = loss_fn(learner.net(x), y, learner.head, learner.loss, learner.age_weights)
        if not torch.isfinite(loss.detach()):
            raise TrainError(f"training diverged: the loss is {loss.item()} at batch {index + 1} (learning rate "
                             f"{optimizer.param_groups[0]['lr']:.2e}); nothing from this epoch was kept. Lower --lr "
                             f"(e.g. to a tenth) and rerun (add --resume to go on from the last good epoch)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.schedule.step_batch()
        if learner.ema is not None:
            learner.ema.update_parameters(learner.net.module if hasattr(learner.net, "module") else learner.net)
        total += loss.item() * len(y)
        rows += len(y)
        if _budget_over(learner.schedule):  # --max-minutes planned the rate: training ends where the budget does
            break
    return total, rows, skipped


def _budget_over(schedule) -> bool:
    return isinstance(schedule, BudgetOneCycle) and schedule.spent()


@torch.no_grad()
def predict_split(model, loader, head, precision: Precision, progress, prefix: str, tta: str = "none"):
    """(errors, stds, true ages) of every row of `loader` on `precision`'s device: predicted minus true age, the
    head's std (NaN: regression) and the label; in fp32 on a CPU (as every predictor runs), bf16 autocast on
    CUDA with --precision bf16 (or auto)."""
    device = precision.device
    model.eval()
    errors, stds, true = [], [], []
    for batch in progress(loader, desc=prefix, leave=False):
        x = precision.inputs(normalize(batch["image"].to(device)))
        with precision.evaluation():
            age, std = predict_ages(model, x, head, tta)
        errors.append((age.float().cpu() - batch["age"].float()).numpy())
        stds.append(std.float().cpu().numpy())
        true.append(batch["age"].float().numpy())
    if not errors:
        return np.array([]), np.array([]), np.array([])
    return np.concatenate(errors), np.concatenate(stds), np.concatenate(true)


def split_metrics(err: np.ndarray, prefix: str) -> Dict[str, float]:
    return {f"{prefix}_mae": float(np.abs(err).mean()), f"{prefix}_rmse": float(np.sqrt((err**2).mean())),
            f"{prefix}_cs5": float((np.abs(err) <= 5).mean()), f"{prefix}_rows": int(err.size)}


def evaluate(model, loader, head, precision: Precision, progress, prefix: str, tta: str = "none") -> Dict[str, float]:
    return split_metrics(predict_split(model, loader, head, precision, progress, prefix, tta)[0], prefix)


def save_checkpoint(path: str, state: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
    except (RuntimeError, OSError) as e:  # a full disk reads `basic_ios::clear: iostream error` in torch
        with contextlib.suppress(OSError):
            os.remove(tmp)
        check_space(e, path)
        raise
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


@dataclasses.dataclass
class Progress:
    """Where a run stands: restored from a checkpoint by --resume, advanced by every epoch."""

    start_epoch: int = 0
    best: float = math.inf
    best_state: Optional[dict] = None
    history: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunState:
    """One training run as it goes: who this rank is, what it reads and writes, what it trains, where it stands.
    Made by run(), filled by _run() (data, folder, tracking) and _train() (loaders, model, learner, progress)."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    outputs: Outputs
    on_epoch: Optional[Callable[[dict], None]] = None
    sources: dict = dataclasses.field(default_factory=dict)  # split -> data.SplitSource
    crop: dict = dataclasses.field(default_factory=dict)  # the table's crop settings (the bundle records them)
    work: Optional[uri.WorkFolder] = None
    tracker: Optional[tracking.Run] = None
    image_size: int = 0
    loaders: dict = dataclasses.field(default_factory=dict)
    model: Optional[torch.nn.Module] = None  # the bare model (the learner's net may be its DDP wrapper)
    learner: Optional[Learner] = None
    progress: Progress = dataclasses.field(default_factory=Progress)
    writer: object = None  # TensorBoard, rank 0
    calibration: Optional[dict] = None  # fitted on val by finish() (trainer.calibration), written into the bundle

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    @property
    def judged(self) -> torch.nn.Module:
        """The weights validated, kept as best and bundled: the EMA copy's with --ema."""
        ema = self.learner.ema
        return ema.module if ema is not None else self.model


def build_loaders(args, sources: dict, image_size: int, rank: int, world: int) -> dict:
    """{'train', 'val', 'test'} loaders; with several ranks each reads its own shard of the train row
    groups (val/test whole on every rank)."""
    settings = LoaderSettings(batch_size=args.batch_size, image_size=image_size,
                                shuffle_buffer=args.shuffle_buffer, workers=args.workers, seed=args.seed,
                                reader=args.reader, cache=args.cache)
    try:
        loaders = {s: SplitLoader(src, settings, train=(s == "train")) for s, src in sources.items()}
        if world > 1:
            loaders["train"] = SplitLoader(sources["train"], dataclasses.replace(
                settings, cur_shard=rank, shard_count=world), train=True)
    except ValueError as e:  # a --cache that does not fit in memory, or with sharded ranks
        raise TrainError(str(e)) from None
    return loaders


def epoch_size(args, epoch: int) -> Optional[int]:
    """The size epoch `epoch` (0-based) trains at with progressive resizing (--start-size before the last
    --final-epochs); None: the loader's size (--image-size)."""
    if not args.start_size:
        return None
    final = args.final_epochs or max(1, round(args.epochs / 4))
    return args.start_size if epoch < args.epochs - final else None


EMA_WARMUP_POWER = 0.75  # timm ModelEmaV3's warmup_power for runs of fewer steps (2/3 for 100k+ steps)


def ema_decay(decay: float, step: int, warmup: bool) -> float:
    """The decay of the EMA update after `step` earlier updates: min(decay, 1 - (1 + step)^-0.75) with warm-up."""
    return min(decay, 1.0 - (1.0 + step) ** -EMA_WARMUP_POWER) if warmup else decay


def build_ema(args, model):
    """--ema: a torch AveragedModel of `model` (weights and BatchNorm buffers), else None; its decay warms up
    (ema_decay) unless --no-ema-warmup."""
    if not args.ema:
        return None
    from torch.optim.swa_utils import AveragedModel

    warmup = getattr(args, "ema_warmup", True)

    @torch.no_grad()
    def update(averaged: list, current: list, steps) -> None:
        decay = ema_decay(args.ema, int(steps), warmup)
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:  # integer buffers (BatchNorm's num_batches_tracked)
            for a, c in zip(averaged, current):
                a.copy_(a * decay + c * (1.0 - decay))

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def build_learner(r: RunState) -> None:
    """The model, its DDP wrapper with several ranks, optimizer, schedule and EMA copy, into `r`."""
    args, device = r.args, r.device
    precision = Precision.choose(getattr(args, "precision", "auto"), device)
    if r.main_rank:
        requested = getattr(args, "precision", "auto")
        log.info(f"train: {precision.name} arithmetic on {device.type} (--precision {requested})")
    model = precision.model(build_model(args.head, args.init_weights).to(device))
    net = model
    if r.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    optimizer = OPTIMIZERS[args.optimizer](model.parameters(), args.lr, args.weight_decay)
    schedule = build_schedule(args.schedule, optimizer, ScheduleSettings.from_args(args, len(r.loaders["train"])))
    share_clock(schedule, r)
    r.model = model
    r.learner = Learner(net, optimizer, schedule, args.head, args.loss, device, args.augment, build_ema(args, model),
                        _progress(args.no_progress or not r.main_rank), precision, training_age_weights(r))


def training_age_weights(r: RunState) -> Optional[torch.Tensor]:
    """--age-weighting sqrt_inv: the weight of each age, from the whole train split's labels; else None."""
    if getattr(r.args, "age_weighting", "none") == "none":
        return None
    weights = age_weights(split_ages(r.sources["train"]))
    if r.main_rank:
        log.info(f"train: --age-weighting {r.args.age_weighting}: weights {weights.min():.2f}..{weights.max():.2f} "
                 f"(age 26: {weights[26]:.2f}, age 70: {weights[70]:.2f})")
    return weights.to(r.device)


def resume(r: RunState, ckpt_path: str) -> Progress:
    """--resume: the checkpoint's state loaded into the model, optimizer, schedule and EMA copy (checked first);
    else a fresh start."""
    args, learner = r.args, r.learner
    if not args.resume:
        return Progress()
    if not os.path.exists(ckpt_path):
        log.info(f"train: --resume but no {ckpt_path}; starting fresh")
        return Progress()
    ckpt = load_checkpoint(ckpt_path, r.device, args)
    try:
        r.model.load_state_dict(ckpt["model"])
        learner.optimizer.load_state_dict(ckpt["optimizer"])
        learner.schedule.load_state_dict(ckpt["schedule"])
        share_clock(learner.schedule, r)
        if learner.ema is not None and ckpt.get("ema") is not None:
            learner.ema.load_state_dict(ckpt["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"--resume: {ckpt_path} does not fit this run's model/optimizer/schedule "
                         f"({str(e).splitlines()[0][:160]}); rerun with the flags it was written with, or "
                         f"without --resume into a new --output") from None
    torch.set_rng_state(ckpt["torch_rng"])
    log.info(f"train: resumed from {ckpt_path} after epoch {ckpt['epoch'] + 1}")
    return Progress(ckpt["epoch"] + 1, ckpt["best_val_mae"], ckpt["best_model"], ckpt["history"])


def share_clock(schedule, r: RunState) -> None:
    """A budget-planned OneCycle on several ranks: all count from rank 0's start, so their rates agree (DDP's
    replicas stay the same) without a collective per batch (shards of unequal length would hang on one)."""
    if isinstance(schedule, BudgetOneCycle) and r.world > 1:
        schedule.start_at(broadcast_row({"started": schedule.started}, r.device)["started"])


def budget_spent(r: RunState, started: float, epoch: int) -> bool:
    """--max-minutes: True when no new epoch may start (the first epoch of a run always runs)."""
    args = r.args
    if args.max_minutes is None or (epoch == r.progress.start_epoch and not _budget_over(r.learner.schedule)):
        return False
    schedule = r.learner.schedule  # a budget-planned OneCycle keeps its own clock (resumes included)
    spent = schedule.spent() if isinstance(schedule, BudgetOneCycle) else time.time() - started > args.max_minutes * 60
    if r.world > 1:  # rank 0's clock decides: ranks that disagree would wait for each other forever
        spent = broadcast_row({"spent": spent}, r.device)["spent"]
    return spent


def check_finite(row: dict) -> None:
    """TrainError when an epoch's numbers say the run diverged: a non-finite loss or val MAE, or a train loss
    or val MAE larger than any model predicting ages inside MIN_AGE..MAX_AGE could have (both losses are an
    L1 in years, the distribution head's plus a KL that is as large only for a collapsed distribution):
    e.g. --lr 1000 trains to a finite loss of ~1e7 while the val MAE, in eval mode, looks ordinary (25).
    Called before the epoch is recorded, so the last good checkpoint stays the one a --resume goes on from."""
    from schemas.tables import MAX_AGE, MIN_AGE

    lowering = (f"(learning rate {row['lr']:.2e}); this epoch was not kept. Lower --lr (e.g. to a tenth) and rerun")
    if not math.isfinite(row["val_mae"]) or not math.isfinite(row["train_loss"]):
        raise TrainError(f"training diverged: after epoch {row['epoch']} the train loss is {row['train_loss']:.3g} "
                         f"and the val MAE {row['val_mae']:.3g} {lowering}")
    worst = MAX_AGE - MIN_AGE
    if row["val_mae"] > worst or row["train_loss"] > worst:
        raise TrainError(f"training diverged: after epoch {row['epoch']} the train loss is {row['train_loss']:.3g} "
                         f"and the val MAE {row['val_mae']:.3g} years, more than any prediction inside "
                         f"{MIN_AGE}..{MAX_AGE} could be off {lowering}")


def run(args, on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    """Train as `args` say; `on_epoch(row)` sees every epoch's metrics after its checkpoint (the tuner
    reports val MAE there and may raise to stop the run, e.g. optuna.TrialPruned)."""
    if args.final_epochs and not args.start_size:
        raise TrainError("--final-epochs needs --start-size (the size of the epochs before them)")
    seed_everything(args.seed)
    rank, world, device = init_distributed(pick_device(args.device))
    if device.type == "cpu":
        torch.set_num_threads(args.threads or cpu_count(world))
    outputs = check_output(args, rank == 0)
    try:
        return _run(RunState(args, rank, world, device, outputs, on_epoch))
    finally:
        outputs.finish()


def _run(r: RunState) -> dict:
    args = r.args
    try:
        r.sources = {s: split_source(args.data, s, args.data_version) for s in ("train", "val", "test")}
    except (layout.IncompleteTableError, FileNotFoundError, ValueError) as e:
        raise TrainError(str(e)) from None
    # read now, not after hours of training: the bundle must say how its crops were made
    r.crop = layout.table_crop_settings(args.data).to_dict()
    r.work = uri.WorkFolder(args.output)  # the run folder itself, or a local mirror of a remote one
    if r.main_rank:  # the folder is ours from now on: a killed run never blocks its rerun
        r.outputs.record(layout.RUN_FILES)
    r.tracker = tracking.Run(args, f"train-{uri.basename(args.output)}", parent_run_id=args.mlflow_parent_run,
                             active=r.main_rank)
    args.mlflow_run_id = r.tracker.run_id  # recorded in the bundle: evaluate logs to this run
    r.tracker.log_params({k: v for k, v in vars(args).items() if k not in ("resume", "no_progress", "mlflow_run_id")})
    with r.tracker:  # ends the MLflow run FINISHED, KILLED (pruned, interrupted) or FAILED
        try:
            summary = _train(r)
            # the chosen epoch's test metrics (val_* per epoch were logged with their steps)
            r.tracker.log_metrics({k: v for k, v in summary.items() if k.startswith(("test_", "best_"))},
                                  step=summary["epochs_run"])
            r.tracker.log_bundle(local_bundle(args, r.work), getattr(args, "register_model", None))
            r.tracker.log_artifact(r.work.local(layout.SUMMARY))
            return summary
        finally:
            r.work.close()


def local_bundle(args, work) -> str:
    """Where the bundle is written on local disk (then copied to --bundle / OUTPUT when those are remote)."""
    return work.local(layout.MODEL) if args.bundle is None or uri.is_remote(args.bundle) else args.bundle


def start_training(r: RunState) -> None:
    """Loaders, model and learner into `r`; the checkpoint resumed (--resume); metrics.jsonl rewritten from its
    history; every loader at the epoch to start (the same shuffles and augmentations as an uninterrupted run)."""
    args, work = r.args, r.work
    r.image_size = args.image_size or CropSettings.from_dict(r.crop, args.data).size  # the table's crop size
    r.loaders = build_loaders(args, r.sources, r.image_size, r.rank, r.world)
    build_learner(r)
    if args.resume:
        work.pull(layout.CHECKPOINT)
    r.progress = resume(r, work.local(layout.CHECKPOINT))
    if r.main_rank:
        with open(work.local(layout.METRICS_LOG), "w") as f:  # from the checkpoint's history: no duplicate epochs
            for row in r.progress.history:
                f.write(json.dumps(row) + "\n")
        work.push(layout.METRICS_LOG)
    for loader in r.loaders.values():
        loader.epoch = r.progress.start_epoch
    r.writer = _tensorboard(work.local(layout.TENSORBOARD)) if r.main_rank else None


def _train(r: RunState) -> dict:
    start_training(r)
    args, state = r.args, r.progress
    since_best = epochs_since_best(state.history)
    started = time.time()
    try:
        for epoch in range(state.start_epoch, args.epochs):
            if since_best >= args.early_stop and not isinstance(r.learner.schedule, BudgetOneCycle):
                log.info(f"train: early stop after {epoch} epochs ({args.early_stop} without a better val MAE)")
                break
            if budget_spent(r, started, epoch):
                log.info(f"train: --max-minutes {args.max_minutes} spent after {epoch} epochs")
                break
            row = train_epoch(r, epoch)
            improved = row["val_mae"] < state.best
            if improved:
                state.best = row["val_mae"]
                state.best_state = {k: v.detach().cpu().clone() for k, v in r.judged.state_dict().items()}
            since_best = 0 if improved else since_best + 1
            state.history.append(row)
            if r.main_rank:  # only rank 0 writes
                record_epoch(r, epoch, row, improved)
            if r.on_epoch is not None:
                r.on_epoch(row)
    finally:
        if r.writer is not None:
            r.writer.close()
    summary = finish(r)
    if r.main_rank:
        r.work.push(layout.SUMMARY, layout.TENSORBOARD)
    return summary


def train_epoch(r: RunState, epoch: int) -> dict:
    """Epoch `epoch` (0-based) trained and validated: its metrics row, the same on every rank."""
    args, state, learner = r.args, r.progress, r.learner
    size = epoch_size(args, epoch)
    row = {"epoch": epoch + 1, "lr": learner.optimizer.param_groups[0]["lr"], "train_size": size or r.image_size}
    epoch_start = time.time()
    # augmentation drawn from (seed, epoch, rank): a resumed run augments as an uninterrupted one
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch * 1009 + r.rank)
    row.update(train_one_epoch(learner, r.loaders["train"], generator, size))
    row.update(evaluate(r.judged, r.loaders["val"], args.head, learner.arithmetic, learner.progress, "val"))
    row["epoch_seconds"] = time.time() - epoch_start
    if r.world > 1:  # every rank takes rank 0's numbers, so plateau cuts, early stops and budget plans agree
        row = broadcast_row(row, r.device)
        row["world_size"] = r.world
    check_finite(row)
    row["lr_cut"] = learner.schedule.step_epoch(row["val_mae"])
    row["lr_end"] = learner.optimizer.param_groups[0]["lr"]  # the rate of the epoch's last step
    if isinstance(learner.schedule, BudgetOneCycle):  # end at the budget, or with the last --epochs if sooner
        learner.schedule.plan(args.epochs - epoch - 1, row["epoch_seconds"])
    row["elapsed_seconds"] = (state.history[-1]["elapsed_seconds"] if state.history else 0.0) + row["epoch_seconds"]
    row["schedule_done"] = schedule_done(args, learner.schedule, epoch, row["elapsed_seconds"])
    return row


def schedule_done(args, schedule, epoch: int, elapsed: float) -> float:
    """The share of the run's planned schedule done after epoch `epoch` (0-based): a budget-planned OneCycle's own
    (the time spent of its horizon); otherwise the epochs done of --epochs, or the time spent of --max-minutes
    when that is further on. The tuner compares and prunes trials at the same shares (trainer.tune.prune_steps)."""
    if isinstance(schedule, BudgetOneCycle):
        return round(schedule.fraction(), 4)
    done = (epoch + 1) / args.epochs
    if args.max_minutes:
        done = max(done, elapsed / (args.max_minutes * 60))
    return round(min(1.0, done), 4)


def epoch_label(args, schedule, epoch: int, epoch_seconds: float) -> str:
    """The console's "3/80"; with a budget-planned OneCycle "3/~12 of a 58-minute budget": --epochs only caps such
    a run, so the count is the epochs its horizon holds at this epoch's pace (the last one cut where the budget
    ends). On an AVX2-only VM, about 7x slower than the card's, the recipe's first epoch said /~5 (it ran 4 and
    part of a fifth; BENCHMARKS.md) instead of promising 80."""
    if not isinstance(schedule, BudgetOneCycle) or epoch_seconds <= 0:
        return f"{epoch + 1}/{args.epochs}"
    more = math.ceil(max(0.0, schedule.horizon - schedule.elapsed()) / epoch_seconds - 1e-6)
    return f"{epoch + 1}/~{min(args.epochs, epoch + 1 + more)} of a {args.max_minutes:g}-minute budget"


def record_epoch(r: RunState, epoch: int, row: dict, improved: bool) -> None:
    """Checkpoint first: a metrics line then always has its checkpoint (a kill between the two loses only
    the line, which --resume rewrites from the checkpoint's history). Then TensorBoard, tracking, the console."""
    args, state, learner, work = r.args, r.progress, r.learner, r.work
    save_checkpoint(work.local(layout.CHECKPOINT), {
        "model": r.model.state_dict(), "optimizer": learner.optimizer.state_dict(),
        "schedule": learner.schedule.state_dict(), "epoch": epoch, "best_val_mae": state.best,
        "best_model": state.best_state, "history": state.history, "args": redacted(vars(args)),
        "torch_rng": torch.get_rng_state(), "ema": learner.ema.state_dict() if learner.ema is not None else None})
    with open(work.local(layout.METRICS_LOG), "a") as f:
        f.write(json.dumps(row) + "\n")
    if r.writer is not None:
        for key in ("train_loss", "val_mae", "val_cs5", "lr", "img_per_s"):
            r.writer.add_scalar(key, row[key], epoch + 1)
        r.writer.flush()
    work.push(layout.CHECKPOINT, layout.METRICS_LOG)
    r.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
    log.info(f"epoch {epoch_label(args, learner.schedule, epoch, row['epoch_seconds'])}: "
             f"loss {row['train_loss']:.3f} val MAE {row['val_mae']:.2f} "
             f"lr {row['lr']:.2e} {row['img_per_s']:.0f} img/s" + (" (best)" if improved else ""))


def finish(r: RunState) -> dict:
    """The best epoch's weights on test and val; rank 0 writes the bundle and summary.json (commit_run)."""
    args, state, sources = r.args, r.progress, r.sources
    if state.best_state is None:
        raise TrainError("no epoch was trained (check --epochs, or the checkpoint already finished)")
    r.model.load_state_dict(state.best_state)
    progress = r.learner.progress
    precision = r.learner.arithmetic
    test_err, test_std, test_true = predict_split(r.model, r.loaders["test"], args.head, precision, progress, "test",
                                                  args.tta)
    val_err, val_std, val_true = predict_split(r.model, r.loaders["val"], args.head, precision, progress, "val",
                                               args.tta)
    r.calibration, before = fit_calibration(args, (val_err, val_std, val_true), (test_err, test_true))
    # what every predictor returns from now on: the bundle's calibration applied to the raw predictions
    test_age, test_std = calibration.calibrated(test_err + test_true, test_std, r.calibration)
    val_age, _ = calibration.calibrated(val_err + val_true, val_std, r.calibration)
    test_err, val_err = test_age - test_true, val_age - val_true
    test, val = split_metrics(test_err, "test"), split_metrics(val_err, "val")
    if r.calibration["std_scale"] is not None:
        test.update(test_within_1sd=calibration.coverage(test_err, test_std),
                    test_within_2sd=calibration.coverage(test_err, test_std, 2.0),
                    test_within_1sd_uncalibrated=calibration.coverage(test_err, test_std / r.calibration["std_scale"]))
    summary = {"best_val_mae": state.best, **val, **test, **before, "calibration": r.calibration,
               "epochs_run": len(state.history),
               "image_size": r.image_size, "device": str(r.device), "precision": precision.name,
               "age_weighting": getattr(args, "age_weighting", "none"), "data": args.data,
               "data_version": sources["train"].version, "rows": {s: src.rows for s, src in sources.items()},
               "world_size": r.world, "tta": args.tta, "bundle": args.bundle or uri.join(args.output, layout.MODEL)}
    if r.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if r.main_rank:
        commit_run(r, summary)
        log.info(f"train: test MAE {test['test_mae']:.2f}, CS@5 {test['test_cs5']:.3f}, RMSE {test['test_rmse']:.2f}; "
                 f"bundle {summary['bundle']}")
    return summary


def fit_calibration(args, val, test) -> Tuple[dict, dict]:
    """The bundle's calibration, fitted on val's (errors, stds, true ages): the age map first (--age-calibration
    debias), then the std scale on the mapped errors (+-1 std covers 68 % of val). Also the test split's numbers
    without the age map (test_mae_unmapped, test_bias_by_age_group_unmapped/_mapped) when one was fitted."""
    val_err, val_std, val_true = val
    fitted = {"tta": args.tta, "age_map": None}
    if args.age_calibration == "debias":
        fitted["age_map"] = calibration.fit_age_map(val_err + val_true, val_true)
        if fitted["age_map"] is None:
            log.warning("train: --age-calibration debias: no age map fitted (too few val faces); none is stored")
        else:
            goal = fitted["age_map"]["bias_goal"]
            log.info(f"train: age map fitted on {val_true.size} val faces, "
                     + (f"every age group within {goal:g} years" if goal is not None else "no bias goal reachable")
                     + f" (val MAE {fitted['age_map']['val_mae_unmapped']:.2f} -> "
                       f"{fitted['age_map']['val_mae_mapped']:.2f})")
    mapped = calibration.map_ages(val_err + val_true, fitted["age_map"]) - val_true
    fitted.update(calibration.fit_std_scale(mapped, val_std))
    before = {}
    if fitted["age_map"] is not None:
        test_err, test_true = test
        after = calibration.map_ages(test_err + test_true, fitted["age_map"]) - test_true
        before = {"test_mae_unmapped": float(np.abs(test_err).mean()) if test_err.size else float("nan"),
                  "test_bias_by_age_group_unmapped": calibration.bias_by_age_group(test_err, test_true),
                  "test_bias_by_age_group_mapped": calibration.bias_by_age_group(after, test_true)}
    return fitted, before


def commit_run(r: RunState, summary: dict) -> None:
    """model.pt (when it is the run folder's) and summary.json: staged, then made current in ONE commit."""
    args, work, outputs = r.args, r.work, r.outputs
    staged = outputs.staging_root if not work.remote else os.path.join(work.path, "_faceage_staged")
    os.makedirs(staged, exist_ok=True)
    in_run = args.bundle is None
    local = os.path.join(staged, layout.MODEL) if in_run else local_bundle(args, work)
    save_bundle(local, r.model, args.head, r.image_size, r.crop, Provenance(
        data={"uri": args.data, "version": r.sources["train"].version, "rows": summary["rows"]},
        params={k: v for k, v in vars(args).items() if k not in ("resume", "no_progress")},
        metrics={k: summary[k] for k in ("best_val_mae", "val_mae", "test_mae", "test_rmse", "test_cs5")},
        calibration=r.calibration))
    bundle_path = summary["bundle"]
    if not in_run and (uri.is_remote(bundle_path) or local != uri.local_path(bundle_path)):
        uri.put(local, bundle_path)
    with open(os.path.join(staged, layout.SUMMARY), "w") as f:
        f.write(redact(dumps(summary)))
    names = [layout.MODEL, layout.SUMMARY] if in_run else [layout.SUMMARY]
    if work.remote:
        for name in names:
            uri.put(os.path.join(staged, name), outputs.staging(name))
    outputs.commit(names)
    if work.remote:  # the local mirror holds them too (tracking logs them from there)
        for name in names:
            os.replace(os.path.join(staged, name), work.local(name))


def init_distributed(device: torch.device):
    """(rank, world size, device) from torchrun's / TorchDistributor's environment; (0, 1, device) alone.

    gloo on CPU, nccl on CUDA (each rank on its LOCAL_RANK's GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def broadcast_row(row: dict, device: torch.device) -> dict:
    """Rank 0's dict (epoch metrics, decisions) on every rank."""
    import torch.distributed as dist

    box = [row]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def epochs_since_best(history) -> int:
    """Epochs since the best val MAE in `history` (for early stopping across a resume)."""
    best, count = math.inf, 0
    for row in history:
        best, count = (row["val_mae"], 0) if row["val_mae"] < best else (best, count + 1)
    return count


def load_checkpoint(path: str, device, args) -> dict:
    """A checkpoint to resume from, checked against this run's flags; TrainError otherwise."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, or carrying code that is never run
        raise TrainError(f"--resume: {path} is not a readable checkpoint (truncated, corrupt or holding code that "
                         f"will not be run: {type(e).__name__}); delete it to start fresh, or resume another "
                         f"--output") from None
    needed = ("model", "optimizer", "schedule", "epoch", "best_val_mae", "best_model", "history", "args")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise TrainError(f"--resume: {path} is not a trainer checkpoint; delete it to start fresh")
    saved = dict(ckpt["args"])
    saved.setdefault("image_size", None)
    now = redacted({**vars(args), "image_size": args.image_size})  # compared as it was stored
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} then, {now.get(k)!r} now" for k in RESUME_KEYS
              if k in saved and saved.get(k) != now.get(k)]
    if differ:
        raise TrainError(f"--resume: {path} was written with other settings ({'; '.join(differ)}); rerun with the "
                         f"same flags, or without --resume into a new --output")
    planned = saved.get("epochs")
    if now.get("schedule") == "onecycle" and isinstance(planned, int) and args.epochs > planned:
        raise TrainError(f"--resume: {path} was trained with a OneCycle schedule planned over --epochs {planned} (it "
                         f"anneals the rate to the end of those); it cannot go on to --epochs {args.epochs}. Resume "
                         f"with --epochs {planned}, or train a longer run into a new --output (or use "
                         f"--schedule cyclic_plateau, which has no planned end)")
    return ckpt


def _progress(disabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return lambda it, **kw: it
    quiet = disabled or not sys.stderr.isatty()
    return lambda it, **kw: tqdm(it, disable=quiet, **kw)


def _tensorboard(folder: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is pinned, but training must not need it
        return None
    return SummaryWriter(folder)


# the line a failed rank prints last: TorchDistributor keeps a failed rank's last output lines in the error the
# driver gets, and spark_jobs.distributed puts what follows the marker on its one line
RANK_ERROR = "faceage rank error:"


def distributed_entry(argv: list) -> dict:
    """One rank of a TorchDistributor run (module level, so it pickles)."""
    try:
        parser = get_args_parser()
        args = parser.parse_args(argv)
        apply_params_file(args, parser, argv)
        # where this rank imported the trainer from: on a cluster, the shipped code zip (tests check it)
        return {**run(args), "code_file": __file__}
    except BaseException as e:
        text = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"{RANK_ERROR} rank {os.environ.get('RANK', '?')}: {type(e).__name__}" + (f": {text}" if text else ""),
              file=sys.stderr, flush=True)
        raise


def _job(argv: Optional[list]) -> int:
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    apply_params_file(args, parser, argv)
    run(args)
    return 0


main, console_main = entry_points("train", _job)

if __name__ == "__main__":
    sys.exit(main())
