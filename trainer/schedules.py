"""Learning-rate schedules: CyclicLR stepped per batch, with ReduceLROnPlateau-style cuts of its bounds.

`BudgetOneCycle` is `--schedule onecycle` with `--max-minutes`: OneCycle's shape over wall-clock time.
`CyclicPlateau` is what `--schedule cyclic_plateau` uses: the cycle runs per batch between base_lr and
max_lr; after each epoch the validation MAE feeds a plateau rule (mode min, relative threshold,
patience, cooldown, min_lr, as in torch's ReduceLROnPlateau) that multiplies BOTH bounds by `factor`,
so later cycles run lower instead of being overwritten on the next batch.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import torch


@dataclasses.dataclass(frozen=True)
class Plateau:
    """The plateau rule's settings, as torch's ReduceLROnPlateau names them (mode min, relative threshold)."""

    factor: float = 0.5
    patience: int = 2
    threshold: float = 1e-3
    cooldown: int = 0
    min_lr: float = 1e-6


class CyclicPlateau:
    def __init__(self, optimizer, base_lr: float, max_lr: float, step_size_up: int, plateau: Plateau = Plateau(),
                 mode: str = "triangular"):
        cycle_momentum = "momentum" in optimizer.defaults and optimizer.defaults.get("momentum", 0) > 0
        self.cyclic = torch.optim.lr_scheduler.CyclicLR(
            optimizer, base_lr=base_lr, max_lr=max_lr, step_size_up=max(1, step_size_up), mode=mode,
            cycle_momentum=cycle_momentum)
        self.factor, self.patience, self.threshold = plateau.factor, plateau.patience, plateau.threshold
        self.cooldown, self.min_lr = plateau.cooldown, plateau.min_lr
        self.best: Optional[float] = None
        self.bad_epochs = 0
        self.cooldown_left = 0
        self.cuts = 0

    def step_batch(self) -> None:
        self.cyclic.step()

    def step_epoch(self, val_mae: float) -> bool:
        """Feed the epoch's validation MAE; returns True when the bounds were cut."""
        if self.best is None or val_mae < self.best * (1 - self.threshold):
            self.best, self.bad_epochs = val_mae, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience:
            self.cyclic.base_lrs = [max(self.min_lr, lr * self.factor) for lr in self.cyclic.base_lrs]
            self.cyclic.max_lrs = [max(self.min_lr, lr * self.factor) for lr in self.cyclic.max_lrs]
            self.cooldown_left, self.bad_epochs = self.cooldown, 0
            self.cuts += 1
            return True
        return False

    def bounds(self):
        return self.cyclic.base_lrs[0], self.cyclic.max_lrs[0]

    def state_dict(self) -> dict:
        return {"cyclic": self.cyclic.state_dict(), "best": self.best, "bad_epochs": self.bad_epochs,
                "cooldown_left": self.cooldown_left, "cuts": self.cuts}

    def load_state_dict(self, state: dict) -> None:
        self.cyclic.load_state_dict(state["cyclic"])
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
        self.cooldown_left, self.cuts = state["cooldown_left"], state["cuts"]


class PerBatch:
    """Adapter for schedulers stepped per batch with nothing to do per epoch (OneCycle)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def step_batch(self) -> None:
        self.scheduler.step()

    def step_epoch(self, val_mae: float) -> bool:
        return False

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def _cos(start: float, end: float, pct: float) -> float:
    """torch's OneCycleLR annealing: start at pct 0, end at pct 1, along half a cosine."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * min(max(pct, 0.0), 1.0)) + 1)


class BudgetOneCycle:
    """OneCycle's rate over a wall-clock budget instead of a count of batches: before every batch the rate (and
    beta1 or momentum, inversely) follows the fraction of the budget spent - warm-up over the first pct_start,
    then cosine annealing to max_lr / (div_factor * final_div_factor) at its end - so whatever the machine's
    speed, the last minutes anneal. The horizon is the budget, or sooner when the --epochs left would end first
    (plan(), after each epoch); spent() says when training must stop (trainer.train ends the epoch there).
    The clock is wall-clock time, so ranks that share one start (start_at: rank 0's) compute the same rate."""

    def __init__(self, optimizer, max_lr: float, seconds: float, pct_start: float = 0.3, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, clock: Callable[[], float] = time.time):
        self.optimizer, self.max_lr, self.budget, self.pct_start = optimizer, max_lr, float(seconds), pct_start
        self.initial = max_lr / div_factor
        self.final = self.initial / final_div_factor
        self.clock, self.started, self.before = clock, clock(), 0.0
        self.horizon = self.budget
        self.step_batch()

    def start_at(self, started: float) -> None:
        """Count from `started` (the clock's time): every rank of a run uses rank 0's."""
        self.started = started
        self.step_batch()

    def elapsed(self) -> float:
        return self.before + self.clock() - self.started

    def fraction(self) -> float:
        return min(1.0, self.elapsed() / self.horizon) if self.horizon > 0 else 1.0

    def spent(self) -> bool:
        return self.fraction() >= 1.0

    def rate(self, fraction: float) -> float:
        if fraction < self.pct_start:
            return _cos(self.initial, self.max_lr, fraction / self.pct_start)
        return _cos(self.max_lr, self.final, (fraction - self.pct_start) / (1 - self.pct_start))

    def momentum(self, fraction: float, low: float = 0.85, high: float = 0.95) -> float:
        if fraction < self.pct_start:
            return _cos(high, low, fraction / self.pct_start)
        return _cos(low, high, (fraction - self.pct_start) / (1 - self.pct_start))

    def step_batch(self) -> None:
        fraction = self.fraction()
        for group in self.optimizer.param_groups:
            group["lr"] = self.rate(fraction)
            if "betas" in group:
                group["betas"] = (self.momentum(fraction), group["betas"][1])
            elif group.get("momentum"):
                group["momentum"] = self.momentum(fraction)

    def plan(self, epochs_left: int, seconds_per_epoch: float) -> None:
        """After an epoch: end at the budget, or when the epochs left (at this pace) end, if that comes first."""
        self.horizon = min(self.budget, self.elapsed() + epochs_left * seconds_per_epoch)

    def step_epoch(self, val_mae: float) -> bool:
        return False

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed(), "horizon": self.horizon, "budget": self.budget}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run goes on with the time its checkpoint had spent (its budget is the one it started with)."""
        self.before, self.started, self.horizon = float(state["elapsed"]), self.clock(), float(state["horizon"])
        self.step_batch()


class Constant:
    def step_batch(self) -> None:
        pass

    def step_epoch(self, val_mae: float) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
    """What a schedule is built from: the peak rate, the run's length in batches, cyclic_plateau's own knobs."""

    lr: float
    epochs: int
    batches_per_epoch: int
    base_lr: Optional[float] = None  # cyclic_plateau: the cycle's low end (default lr / 10)
    step_size_up: Optional[int] = None  # cyclic_plateau: batches from low to high (default two epochs)
    plateau: Plateau = Plateau()
    seconds: Optional[float] = None  # onecycle: plan over this wall-clock budget instead of epochs x batches

    @classmethod
    def from_args(cls, args, batches_per_epoch: int) -> "ScheduleSettings":
        """From trainer.train's flags (--lr, --epochs, --base-lr, --step-size-up, --plateau-*, --max-minutes)."""
        seconds = args.max_minutes * 60 if getattr(args, "max_minutes", None) is not None else None
        return cls(args.lr, args.epochs, batches_per_epoch, args.base_lr, args.step_size_up,
                   Plateau(factor=args.plateau_factor, patience=args.plateau_patience), seconds)


def build_schedule(name: str, optimizer, settings: ScheduleSettings):
    """cyclic_plateau | onecycle | constant -> an object with step_batch / step_epoch / state_dict."""
    s = settings
    if name == "cyclic_plateau":
        return CyclicPlateau(optimizer, base_lr=s.base_lr if s.base_lr is not None else s.lr / 10, max_lr=s.lr,
                             step_size_up=s.step_size_up or 2 * s.batches_per_epoch, plateau=s.plateau)
    if name == "onecycle" and s.seconds is not None:
        return BudgetOneCycle(optimizer, max_lr=s.lr, seconds=s.seconds)
    if name == "onecycle":
        return PerBatch(torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr,
                                                            total_steps=max(1, s.epochs * s.batches_per_epoch)))
    if name == "constant":
        return Constant()
    raise ValueError(f"schedule {name!r}: use cyclic_plateau, onecycle or constant")


SCHEDULES = ("cyclic_plateau", "onecycle", "constant")
