"""The schedule of a pipelined model: gradient accumulation mapped onto pipeline microbatches, and
the forward-only pass validation uses.

`PipelineSchedule(model, ctx, ...)` is built once, by the train step (lmforge.train.step), with the
shapes of a step. `gradients(batches, n_targets, amp, scaler)` concatenates the step's micro
batches and hands them to the schedule (torch.distributed.pipelining), which splits them into
`parallel.pp_microbatches` microbatches (default: one per micro batch, so the split equals
gradient accumulation's). The document layout (`doc_ids`, `position_ids`) travels with each
microbatch as keyword arguments every stage's forward receives. The last stage's output goes to
the step's loss object (`lmforge.loss.LanguageModelLoss.from_output`: the fused linear +
cross-entropy from hidden states, or the plain / vocab-parallel CE from logits), normalised as
`sum(token CE) * dp_size / N + aux / microbatches`, N the target tokens of the whole global batch:
exactly the non-pipeline step's, so the gradients (summed, never scaled by the schedule) and the
logged loss equal the one-process run's. The schedule returns the microbatch losses
(`losses=`); they live on the last stage and are summed along the pipeline group so every rank
returns the step loss.

`clip_grad_norm(max_norm)`: the norm over every stage (torch's get_total_norm per rank, squared
and summed along the pipeline group), every stage clipped by it (clip_grads_with_norm_).

`eval_sums(batches, amp)`: validation. Each micro batch goes through the stages in order, one
stage at a time (forward only, hidden states passed on with point-to-point sends), and the last
stage's loss object gives the summed CE: the same numbers as one process, for every schedule.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.config import PP_MULTI_STAGE_SCHEDULES, batch_split_error
from lmforge.errors import ConfigError
from lmforge.loss import IGNORE_INDEX
from lmforge.parallel.sharding import fsdp_param_dtype
from lmforge.parallel.tensor_parallel import loss_context, plain

# parallel.pp_schedule -> torch.distributed.pipelining class name. All exist in torch >= 2.6;
# a build without one gets a one-line error naming the schedule and the installed version.
SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
}
_MASK_KEYS = ("doc_ids", "position_ids")


def available_schedules() -> list[str]:
    import torch.distributed.pipelining as pipelining

    return [name for name, cls in SCHEDULES.items() if hasattr(pipelining, cls)]


def schedule_class(name: str):
    import torch.distributed.pipelining as pipelining

    cls = getattr(pipelining, SCHEDULES[name], None)
    if cls is None:
        raise ConfigError(
            f"parallel.pp_schedule: {name} needs torch.distributed.pipelining.{SCHEDULES[name]}, which torch "
            f"{torch.__version__} lacks; use one of {', '.join(available_schedules())}"
        )
    return cls


def microbatches(pcfg, train_cfg, dp_size: int) -> int:
    """Pipeline microbatches per step for `pcfg` (ParallelConfig) and `train_cfg` (TrainConfig) at
    `dp_size` data-parallel ranks, or a one-line refusal. The schedule cuts this rank's step
    (global_batch_size / dp_size sequences) into them, so they must divide it (config.batch_split_error)."""
    n = check_microbatches(pcfg.pp_microbatches or train_cfg.grad_accum_steps, pcfg.pp, pcfg.pp_schedule)
    problem = batch_split_error(train_cfg.global_batch_size, 1, dp_size, n)
    if problem:
        raise ConfigError(f"{problem}; change parallel.pp_microbatches or train.global_batch_size")
    return n


def check_microbatches(n: int, pp: int, schedule: str) -> int:
    """`n` when the `schedule` over `pp` ranks can run n microbatches per step; else ConfigError."""
    if n < pp and schedule != "gpipe":
        raise ConfigError(
            f"parallel.pp_microbatches: {n} microbatches for {pp} stages; "
            f"{schedule} needs at least one per stage (raise train.grad_accum_steps or "
            "parallel.pp_microbatches)"
        )
    if schedule == "zbv" and n < 2 * pp:
        # Fewer microbatches than stages deadlocks the V schedule (seen on torch 2.13).
        raise ConfigError(
            f"parallel.pp_microbatches: {n} microbatches; zbv needs at least 2 x parallel.pp = "
            f"{2 * pp} (raise train.grad_accum_steps or parallel.pp_microbatches)"
        )
    if schedule in PP_MULTI_STAGE_SCHEDULES and n % pp:
        raise ConfigError(
            f"parallel.pp_microbatches: {n} is not a multiple of parallel.pp {pp}, which "
            f"{schedule} needs; change train.grad_accum_steps or parallel.pp_microbatches"
        )
    return n


def _pad(parts: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    return torch.cat([F.pad(t, (0, length - t.shape[1]), value=value) for t in parts])


def _padded_masks(batches: list[dict], length: int) -> dict:
    """doc_ids / position_ids of the step, padded like the tokens (the appended positions form one
    more document at positions past the real ones, which no real token attends to)."""
    out = {}
    for key in _MASK_KEYS:
        if key in batches[0]:
            out[key] = _pad([b[key] for b in batches], length, 0 if key == "position_ids" else -1)
    return out


def _schedule_output(module, args, output):
    """The last stage's ModelOutput / HiddenOutput as the plain tuple torch's pipelining expects,
    the output weight as a view: after each backward the schedule detaches the last stage's outputs
    in place (views excepted), which on the parameter itself would stop its training."""
    if len(output) == 3:
        hidden, weight, aux = output
        return hidden, weight.view_as(weight), aux
    return tuple(output)


class PipelineSchedule:
    """The PipelineStage objects and the torch schedule of one PipelineModel, for steps of `rows`
    sequences of `seq_len` tokens on this rank, and the step's loss object."""

    def __init__(self, model, ctx, pcfg, *, rows: int, seq_len: int, n_micro: int, loss, logits_dtype):
        from torch.distributed.pipelining import PipelineStage

        from lmforge.parallel.pipeline import stages_of_rank

        self.model, self.ctx, self.loss = model, ctx, loss
        # stage index -> the pipeline rank that runs it (the schedule's placement)
        self.owner = {
            s: r for r in range(ctx.pp_size) for s in stages_of_rank(pcfg.pp_schedule, r, ctx.pp_size, pcfg.pp_virtual_stages)
        }
        self.seq_len, self.n_micro, self.rows = seq_len, n_micro, rows  # microbatches() checked n_micro | rows
        self.vocab_parallel = bool(pcfg.loss_parallel) and ctx.tp_size > 1
        self.tp_mesh = ctx.mesh["tp"] if self.vocab_parallel else None
        self.act_dtype = fsdp_param_dtype(pcfg, ctx.precision_device) if ctx.shape.fsdp_wrapped else torch.float32
        self.logits_dtype = logits_dtype
        last = model.stages[-1] if model.has_last else None
        self.hidden_out = last is not None and loss.uses_hidden(last)
        # What the loss object asks of the last stage's forward (return_hidden for the fused loss);
        # the schedule hands keyword arguments to every stage, and the others ignore this one.
        self.forward_kwargs = loss.forward_kwargs(last) if last is not None else {}
        if last is not None:
            last.register_forward_hook(_schedule_output)
        # Per step: the normalisers of the schedule's loss function (set by `gradients`).
        self.denom, self.scale, self.scaler = torch.ones(()), 1.0, None
        stages = []
        for stage, sid in zip(model.stages, model.stage_ids):
            inputs, outputs = self._examples(stage, sid, rows // n_micro)
            stages.append(
                PipelineStage(
                    stage, sid, model.num_stages, ctx.device,
                    input_args=inputs, output_args=outputs, group=ctx.pp_group,
                )
            )
        cls = schedule_class(pcfg.pp_schedule)
        kwargs = {"n_microbatches": n_micro, "loss_fn": self._schedule_loss}
        if "scale_grads" in inspect.signature(cls.__init__).parameters:
            kwargs["scale_grads"] = False  # the loss is already normalised by the global token count
        self.schedule = cls(stages if pcfg.pp_schedule in PP_MULTI_STAGE_SCHEDULES else stages[0], **kwargs)
        # The last stage's merged outputs are never used (and would concatenate output weights).
        self.step_kwargs = {"return_outputs": False} if "return_outputs" in inspect.signature(
            self.schedule.step
        ).parameters else {}

    def _examples(self, stage, sid: int, rows: int):
        """(input_args, output_args) of one stage for one microbatch of `rows` sequences, on meta.
        Given to PipelineStage so no torch version has to infer shapes at run time (torch 2.13's
        inference mis-sizes the sequence-parallel hidden states under tensor parallel)."""
        cfg, shape = stage.cfg, self.ctx.shape
        meta = torch.device("meta")
        hidden_state = torch.empty(rows, self.seq_len // shape.tp, cfg.hidden_size, dtype=self.act_dtype, device=meta)
        aux = (torch.empty(1, dtype=torch.float32, device=meta),) if cfg.moe is not None else ()
        if sid == 0:
            inputs = (torch.empty(rows, self.seq_len, dtype=torch.long, device=meta),)
        else:  # received activations carry gradients back to the previous stage
            inputs = tuple(t.detach().requires_grad_(True) for t in (hidden_state, *aux))
        if sid != self.model.num_stages - 1:
            outputs = (hidden_state, *aux)
        elif self.hidden_out:  # HiddenOutput: final-normed states, the output weight, aux
            weight = stage.output_weight()
            full = torch.empty(rows, self.seq_len, cfg.hidden_size, dtype=self.act_dtype, device=meta)
            outputs = (full, torch.empty(tuple(weight.shape), dtype=self.act_dtype, device=meta),
                       torch.empty((), dtype=torch.float32, device=meta))
        else:
            width = cfg.vocab_size // shape.tp if self.vocab_parallel else cfg.vocab_size
            logits = torch.empty(rows, self.seq_len, width, dtype=self.logits_dtype, device=meta)
            outputs = (logits, torch.empty((), dtype=torch.float32, device=meta))
        return inputs, tuple(t.detach().requires_grad_(True) for t in outputs)

    def _last_stage_loss(self, output, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed CE, aux) of the last stage's output: the step's loss object, on vocab-sharded
        logits as a DTensor for torch's loss_parallel."""
        if self.vocab_parallel:
            from torch.distributed.tensor import DTensor, Shard

            logits, aux = output
            output = (DTensor.from_local(logits, self.tp_mesh, [Shard(-1)], run_check=False), aux)
        ce, aux = self.loss.from_output(output, labels)
        return plain(ce), aux

    def _schedule_loss(self, output, labels):
        ce, aux = self._last_stage_loss(output, labels)
        loss = ce * self.scale / self.denom + aux / self.n_micro
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _step_inputs(self, batches: list[dict]):
        # Stages exchange fixed-shape buffers, so every step is padded to data.seq_len (padded
        # mode may hand out shorter batches): causal attention never looks at the appended
        # positions and their labels are ignored, so the loss and gradients are unchanged.
        inputs = _pad([b["input_ids"] for b in batches], self.seq_len, 0)
        labels = _pad([b["labels"] for b in batches], self.seq_len, IGNORE_INDEX)
        if inputs.shape[0] != self.rows:
            raise ConfigError(
                f"parallel.pp: a step of {inputs.shape[0]} sequences on this rank, but its schedule was built "
                f"for {self.rows}; keep train.global_batch_size and grad_accum_steps fixed within a run"
            )
        return inputs, labels, _padded_masks(batches, self.seq_len)

    def gradients(self, batches: list[dict], n_targets: torch.Tensor, amp, scaler=None) -> torch.Tensor:
        """Forward and backward of the step's micro batches on this rank's stages; returns the
        step loss (the same on every rank of the pipeline). `n_targets`: the global batch's
        target-token count (train.step.count_targets)."""
        model = self.model
        self.denom, self.scale, self.scaler = n_targets.clamp(min=1.0), float(self.ctx.dp_size), scaler
        inputs, labels, masks = self._step_inputs(batches)
        args = (inputs,) if model.has_first else ()
        target = labels if model.has_last else None
        losses: list[torch.Tensor] = []
        with amp, loss_context(self.vocab_parallel):
            self.schedule.step(*args, target=target, losses=losses, **masks, **self.forward_kwargs, **self.step_kwargs)
        model.sync_tied_grads()
        total = torch.zeros((), device=inputs.device, dtype=torch.float32)
        if model.has_last:
            total = torch.stack([plain(v).detach().reshape(()).float() for v in losses]).sum()
            if scaler is not None:
                total = total / scaler.get_scale()
        return self._along_pipeline(total)

    def _along_pipeline(self, value: torch.Tensor) -> torch.Tensor:
        """A value only the last stage holds (0 elsewhere), summed so every pipeline rank has it."""
        if self.ctx.pp_group is not None:
            dist.all_reduce(value, group=self.ctx.pp_group)
        return value

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm over every stage (the tied table once); clip all stages by it."""
        grads = [p.grad for p in self.model.norm_parameters() if p.grad is not None]
        local = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
        local = plain(local).to(device=self.ctx.device, dtype=torch.float32).reshape(())
        norm = self._along_pipeline(local**2).sqrt()
        if max_norm > 0:
            from torch.distributed.tensor.experimental import implicit_replication

            params = [p for p in self.model.parameters() if p.grad is not None]
            with implicit_replication():  # the plain global norm scales DTensor (sharded) gradients
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm

    @torch.no_grad()
    def eval_sums(self, batches: list[dict], amp) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed CE, target tokens) of `batches` on this rank's data-parallel shard (the same on
        every pipeline rank): each micro batch passes the stages in order, forward only."""
        device = self.ctx.device
        ce_sum = torch.zeros((), device=device, dtype=torch.float64)
        targets = torch.zeros((), device=device, dtype=torch.float64)
        with amp, loss_context(self.vocab_parallel):
            for batch in batches:
                inputs, labels, masks = (
                    _pad([batch["input_ids"]], self.seq_len, 0),
                    _pad([batch["labels"]], self.seq_len, IGNORE_INDEX),
                    _padded_masks([batch], self.seq_len),
                )
                targets += (labels != IGNORE_INDEX).sum().double()
                ce = self._forward_through_stages(inputs, labels, masks)
                if ce is not None:
                    ce_sum += ce.double()
        return self._along_pipeline(ce_sum), targets

    def _forward_through_stages(self, inputs, labels, masks):
        """One micro batch through every stage in order; the last stage's summed CE or None."""
        ranks = dist.get_process_group_ranks(self.ctx.pp_group)
        owner = self.owner
        mine = dict(zip(self.model.stage_ids, self.model.stages))
        carry, result = None, None
        for sid in range(self.model.num_stages):
            if sid not in mine:
                continue
            stage = mine[sid]
            if sid == 0:
                args = (inputs,)
            elif owner[sid - 1] == owner[sid]:
                args = carry
            else:
                args = self._receive(stage, inputs.shape[0], ranks[owner[sid - 1]])
            if sid == self.model.num_stages - 1:
                out = stage(*args, **masks, **self.forward_kwargs)
                result = self._last_stage_loss(out, labels)[0]
                continue
            out = stage(*args, **masks)
            carry = out if isinstance(out, tuple) else (out,)
            if owner[sid + 1] != owner[sid]:
                for t in carry:
                    dist.send(t.contiguous(), dst=ranks[owner[sid + 1]], group=self.ctx.pp_group)
        return result

    def _receive(self, stage, rows: int, src: int) -> tuple[torch.Tensor, ...]:
        cfg = stage.cfg
        h = torch.empty(rows, self.seq_len // self.ctx.tp_size, cfg.hidden_size, dtype=self.act_dtype,
                        device=self.ctx.device)
        parts = [h] + ([torch.empty(1, device=self.ctx.device)] if cfg.moe is not None else [])
        for t in parts:
            dist.recv(t, src=src, group=self.ctx.pp_group)
        return tuple(parts)
