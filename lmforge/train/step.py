"""One optimizer step's worth of forward/backward, precision set-up, and RNG state capture.

Loss normalisation: each micro step contributes sum(token cross-entropy) / N, where N is the
number of target tokens (labels != -100) in the WHOLE global batch: all micro steps of this rank,
summed over data-parallel ranks. N is counted before the first forward, so accumulating k micro
batches of b equals one batch of k*b exactly, also when padded samples carry unequal numbers of
target tokens. DDP/FSDP average gradients over ranks, so each rank's term is scaled by dp_size to
turn that average back into the global token mean. MoE auxiliary losses are averaged over micro
steps (and, through the gradient average, over ranks).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.loss import IGNORE_INDEX, LanguageModelLoss
from lmforge.parallel import clip_grad_norm, grad_sync, loss_parallel_context, plain


def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, dtype: torch.dtype, sharded: bool = False):
    """A GradScaler for fp16 only (bf16 has fp32's range and needs none). With sharded gradients
    (FSDP2 / tensor parallel) each rank sees only its shards' overflows, so the plain scaler would
    skip the step on some ranks and not others; ShardedGradScaler all-reduces the overflow flag."""
    if dtype != torch.float16:
        return None
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device.type)
    return torch.amp.GradScaler(device.type)


def count_targets(batches: list[dict], ctx) -> torch.Tensor:
    """Target tokens in the global batch, on device, summed over data-parallel ranks (no host sync)."""
    local = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches)
    return ctx.reduce_sum(local.to(torch.float32))


# The loss of one micro batch (lmforge.loss.LanguageModelLoss), plain and fused (train.fused_loss):
# the fused one gives the same values without [tokens, vocab] logits; a tensor-parallel output
# layer falls back to the plain logits path.
loss_fn = LanguageModelLoss(fused=False)
fused_loss_fn = LanguageModelLoss(fused=True)


def accumulate_gradients(
    model, batches: list[dict], ctx, amp, scaler=None, loss=loss_fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the micro batches of one step (the plain path: one process, DDP,
    FSDP2, TP). Returns (this rank's share of the step loss as a device tensor, global target-token
    count). Gradients are reduced across ranks only on the last micro step."""
    n_targets = count_targets(batches, ctx)
    denom = n_targets.clamp(min=1.0)
    scale = float(ctx.dp_size)
    total = torch.zeros((), device=batches[0]["input_ids"].device, dtype=torch.float32)
    last = len(batches) - 1
    for i, batch in enumerate(batches):
        # loss_parallel_context: vocab-sharded logits (parallel.loss_parallel) need torch's
        # vocab-parallel cross-entropy around the loss and its backward.
        with grad_sync(model, enabled=i == last), loss_parallel_context(model):
            with amp:
                ce_sum, aux = loss(model, batch)
            micro_loss = plain(ce_sum) * scale / denom + aux / len(batches)
            (scaler.scale(micro_loss) if scaler is not None else micro_loss).backward()
        total += micro_loss.detach()
    return total, n_targets


@dataclass
class StepResult:
    """One optimizer step's outcome; loss and grad_norm stay on the device until logged."""

    loss: torch.Tensor  # mean over data-parallel ranks
    grad_norm: torch.Tensor
    lr: float  # the rate this step used
    finite: bool  # False: the update was skipped
    targets: torch.Tensor  # target tokens of the global batch (summed over data-parallel ranks)


class TrainStep:
    """`step(batches) -> StepResult`: gradients, unscale (fp16), clip, then step the optimizer,
    or skip the update when the loss or norm is not finite. This is the plain path; a pipeline
    replaces `gradients` and `clip` (PipelineTrainStep). `loss` is the micro-batch loss object."""

    def __init__(self, model, optimizer, scheduler, scaler, ctx, amp, grad_clip: float, loss=loss_fn):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.ctx, self.amp, self.grad_clip, self.loss = ctx, amp, grad_clip, loss

    def gradients(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's share of the step loss, global target tokens); gradients accumulated."""
        return accumulate_gradients(self.model, batches, self.ctx, self.amp, self.scaler, self.loss)

    def clip(self) -> torch.Tensor:
        return clip_grad_norm(self.model, self.grad_clip)

    @torch.no_grad()
    def eval_sums(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward only: (summed token CE, target tokens) of `batches` on this rank, fp64."""
        device = self.ctx.device
        ce_sum = torch.zeros((), device=device, dtype=torch.float64)
        targets = torch.zeros((), device=device, dtype=torch.float64)
        for batch in batches:
            with amp_and_loss(self.amp, self.model):
                ce, _ = self.loss(self.model, batch)
            ce_sum += plain(ce).double()
            targets += (batch["labels"] != IGNORE_INDEX).sum().double()
        return ce_sum, targets

    def step(self, batches: list[dict]) -> StepResult:
        scaler, optimizer = self.scaler, self.optimizer
        loss, targets = self.gradients(batches)
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = self.clip()
        loss = self.ctx.reduce_mean(loss)
        # Under fp16 the scaler already skips steps with inf/nan gradients (and lowers its scale).
        finite = torch.isfinite(loss) if scaler is not None else torch.isfinite(loss) & torch.isfinite(norm)
        lr = optimizer.param_groups[0]["lr"]
        finite = bool(finite)  # the step's one host synchronisation
        if scaler is not None:
            if finite:
                scaler.step(optimizer)
            scaler.update()
        elif finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(loss, norm, lr, finite, targets)


@contextlib.contextmanager
def amp_and_loss(amp, model):
    """The forward's autocast plus, for vocab-sharded logits, torch's loss_parallel context."""
    with amp, loss_parallel_context(model):
        yield


class PipelineTrainStep(TrainStep):
    """The step under `parallel.pp > 1`: the same step, with the micro batches run as the
    schedule's microbatches (lmforge.parallel.pipeline_step.PipelineSchedule) and the gradient
    norm taken over every stage."""

    def __init__(self, schedule, model, optimizer, scheduler, scaler, ctx, amp, grad_clip: float, loss):
        super().__init__(model, optimizer, scheduler, scaler, ctx, amp, grad_clip, loss)
        self.schedule = schedule

    def gradients(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        n_targets = count_targets(batches, self.ctx)
        return self.schedule.gradients(batches, n_targets, self.amp, self.scaler), n_targets

    def clip(self) -> torch.Tensor:
        return self.schedule.clip_grad_norm(self.grad_clip)

    def eval_sums(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.eval_sums(batches, self.amp)


def build_train_step(cfg, ctx, model, optimizer, scheduler, *, amp, scaler=None, loss=None) -> TrainStep:
    """The step of this run, chosen once: `PipelineTrainStep` under `parallel.pp > 1` (its
    schedule built here, for micro batches of `cfg.micro_batch_size(dp)` x `data.seq_len`),
    else `TrainStep`. `loss` defaults to the loss object `train.fused_loss` selects."""
    if loss is None:
        loss = fused_loss_fn if cfg.train.fused_loss else loss_fn
        if cfg.train.z_loss:
            loss = LanguageModelLoss(fused=cfg.train.fused_loss, z_loss=cfg.train.z_loss)
    args = (model, optimizer, scheduler, scaler, ctx, amp, cfg.optim.grad_clip, loss)
    if ctx.pp_size == 1:
        return TrainStep(*args)
    from lmforge.parallel.pipeline_step import PipelineSchedule, microbatches

    accum = cfg.train.grad_accum_steps
    schedule = PipelineSchedule(
        model,
        ctx,
        cfg.parallel,
        rows=cfg.micro_batch_size(ctx.dp_size) * accum,
        seq_len=cfg.data.seq_len,
        n_micro=microbatches(cfg.parallel, cfg.train, ctx.dp_size),
        loss=loss,
        logits_dtype=logits_dtype(amp, cfg.parallel, ctx),
    )
    return PipelineTrainStep(schedule, *args)


def logits_dtype(amp, pcfg, ctx) -> torch.dtype:
    """The dtype of the last stage's logits: autocast's, else the (FSDP) parameters'."""
    if isinstance(amp, torch.autocast):
        return amp.fast_dtype
    if ctx.shape.fsdp_wrapped:
        from lmforge.parallel.sharding import fsdp_param_dtype

        return fsdp_param_dtype(pcfg, ctx.precision_device)
    return torch.float32


# ---------------------------------------------------------------------------------------------
# RNG state (saved per rank in checkpoints; dropout and any sampling depend on it)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
