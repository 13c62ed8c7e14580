"""The learning rate as a pure function of the optimizer step.

`lr(group, step) = the group's base rate x multiplier(step)`: the base rate is what the optimizer's
config gave the group (optim.lr; Muon's matrices optim.muon_lr), the multiplier the schedule below.
`LrSchedule` writes each group's rate for the step about to run; it holds nothing but the step,
so resuming needs only the step count (TrainState.step), and a changed optim.lr or schedule shape
on resume simply applies from there.

cosine: linear warmup to 1, then half a cosine down to `min_lr_ratio`.
    MiniMind's `lr/10 + 0.5*lr*(1 + cos(pi*t/T))` is this schedule with warmup_steps=0,
    optim.lr = 1.1 * lr_minimind and min_lr_ratio = 1/11 (0.0909...): the peak is 1.1x and the
    floor 0.1x MiniMind's nominal rate, exactly as in its formula.
wsd: warmup, constant at 1, then a linear decay to `min_lr_ratio` over the last `decay_ratio`
    of the run (warmup-stable-decay).
constant: warmup, then 1.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from lmforge.config import Config, OptimConfig
from lmforge.errors import ConfigError


class LrMultiplier:
    """multiplier(step) of the schedule `kind`, for steps counted from 0."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, min_ratio: float, decay_ratio: float):
        self.kind = kind
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = min(int(warmup_steps), self.total_steps)
        self.min_ratio = float(min_ratio)
        self.decay_ratio = float(decay_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "wsd":
            decay_steps = self.decay_ratio * self.total_steps
            decay_start = self.total_steps - decay_steps
            if step < decay_start or decay_steps <= 0:
                return 1.0
            progress = min(1.0, (step - decay_start) / decay_steps)
            return 1.0 - (1.0 - self.min_ratio) * progress
        raise ValueError(f"unknown schedule {self.kind}")


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length: warmup_ratio (MindFormers' way of saying it, a fraction of the run) wins when
    set, else warmup_steps."""
    return round(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio is not None else cfg.warmup_steps


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> LrMultiplier:
    warmup = warmup_steps(cfg, total_steps)
    return LrMultiplier(cfg.schedule, total_steps, warmup, cfg.min_lr_ratio, cfg.decay_ratio)


class LrSchedule:
    """Sets every param group's lr to `base x multiplier(step)` for the step about to run.
    `step()` after each optimizer step moves on by one (what the train step calls, like torch's
    schedulers); `resume(step)` jumps to a step. The base rates are the groups' rates when built."""

    def __init__(self, optimizer: Optimizer, multiplier, step: int = 0):
        self.optimizer, self.multiplier = optimizer, multiplier
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.resume(step)

    def lrs(self, step: int) -> list[float]:
        """Each group's rate at `step` (0 = the first optimizer step)."""
        factor = self.multiplier(step)
        return [base * factor for base in self.base_lrs]

    def resume(self, step: int) -> None:
        self.position = int(step)
        for group, lr in zip(self.optimizer.param_groups, self.lrs(self.position)):
            group["lr"] = lr

    def step(self) -> None:
        self.resume(self.position + 1)


def build_schedule(optimizer: Optimizer, cfg: OptimConfig, total_steps: int) -> LrSchedule:
    return LrSchedule(optimizer, lr_multiplier(cfg, total_steps))


def total_steps(cfg: Config, samples_per_epoch: int | None = None) -> int:
    """Optimizer steps for the run: train.max_steps, else max_tokens, else epochs over the data."""
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps
    if t.max_tokens is not None:
        return max(1, math.ceil(t.max_tokens / (t.global_batch_size * cfg.data.seq_len)))
    if t.epochs is not None:
        if not samples_per_epoch:
            raise ConfigError("train.epochs: the training data has no samples; check data.train")
        return max(1, math.ceil(t.epochs * samples_per_epoch / t.global_batch_size))
    raise ConfigError("train: set one of train.max_steps, train.max_tokens or train.epochs")
