"""The pipeline-parallel step body: gradient accumulation mapped onto pipeline microbatches.

`pipeline_gradients(model, batches, n_targets, ctx, amp, scaler)` replaces the data-parallel loop of
`train/step.py` under `parallel.pp > 1`: the step's micro batches are concatenated and the
schedule (torch.distributed.pipelining) splits them into `parallel.pp_microbatches` microbatches
(default: one per micro batch, so the split equals gradient accumulation's). Each microbatch's
loss on the last stage is `sum(token CE) * dp_size / N + aux / microbatches`, N the target tokens of
the whole global batch, exactly the non-pipeline step's, so the gradients (summed, never scaled by
the schedule) and the logged loss equal the one-process run's. The loss lives on the last stage;
it is summed along the pipeline group so every rank returns it (then averaged over dp as usual).

`pipeline_clip_grad_norm` measures the norm over all stages (squared local norms summed along the
pipeline group) and clips every stage by the same factor.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.config import PP_MULTI_STAGE_SCHEDULES
from lmforge.errors import ConfigError
from lmforge.loss import IGNORE_INDEX
from lmforge.parallel.sharding import fsdp_param_dtype

# parallel.pp_schedule -> torch.distributed.pipelining class name. All exist in torch >= 2.6;
# a build without one gets a one-line error naming the schedule and the installed version.
SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
}


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


def microbatches(cfg) -> int:
    n = cfg.parallel.pp_microbatches or cfg.train.grad_accum_steps
    if n < cfg.parallel.pp and cfg.parallel.pp_schedule != "gpipe":
        raise ConfigError(
            f"parallel.pp_microbatches: {n} microbatches for {cfg.parallel.pp} stages; "
            f"{cfg.parallel.pp_schedule} needs at least one per stage (raise train.grad_accum_steps or "
            "parallel.pp_microbatches)"
        )
    if cfg.parallel.pp_schedule == "zbv" and n < 2 * cfg.parallel.pp:
        # Fewer microbatches than stages deadlocks the V schedule (seen on torch 2.13).
        raise ConfigError(
            f"parallel.pp_microbatches: {n} microbatches; zbv needs at least 2 x parallel.pp = "
            f"{2 * cfg.parallel.pp} (raise train.grad_accum_steps or parallel.pp_microbatches)"
        )
    if cfg.parallel.pp_schedule in PP_MULTI_STAGE_SCHEDULES and n % cfg.parallel.pp:
        raise ConfigError(
            f"parallel.pp_microbatches: {n} is not a multiple of parallel.pp {cfg.parallel.pp}, which "
            f"{cfg.parallel.pp_schedule} needs; change train.grad_accum_steps or parallel.pp_microbatches"
        )
    return n


class _Loss:
    """The schedule's loss function; per-step normalisers are set before each `step`."""

    def __init__(self, tp_mesh, vocab_parallel: bool):
        self.tp_mesh, self.vocab_parallel = tp_mesh, vocab_parallel
        self.denom = self.scale = self.aux_weight = 1.0
        self.scaler = None
        self.values: list[torch.Tensor] = []

    def __call__(self, output, labels):
        from lmforge.loss import summed_cross_entropy

        logits, aux = output if isinstance(output, tuple) else (output, None)
        if self.vocab_parallel:
            from torch.distributed.tensor import DTensor, Shard

            logits = DTensor.from_local(logits, self.tp_mesh, [Shard(-1)], run_check=False)
        loss = summed_cross_entropy(logits, labels) * self.scale / self.denom
        if aux is not None:
            loss = loss + aux.sum() * self.aux_weight
        value = loss.detach()
        self.values.append(value.full_tensor() if hasattr(value, "full_tensor") else value)
        return self.scaler.scale(loss) if self.scaler is not None else loss


def _stage_examples(stage, cfg, ctx, rows: int, logits_dtype: torch.dtype):
    """(input_args, output_args) of one stage for one microbatch of `rows` sequences, on meta.
    Given to PipelineStage so no torch version has to infer shapes at run time (torch 2.13's
    inference mis-sizes the sequence-parallel hidden states under tensor parallel)."""

    seq, hidden, vocab = cfg.data.seq_len, cfg.model.hidden_size, cfg.model.vocab_size
    shape = ctx.shape
    act = fsdp_param_dtype(cfg.parallel, ctx.device) if shape.fsdp_wrapped else torch.float32
    meta = torch.device("meta")
    hidden_state = torch.empty(rows, seq // shape.tp, hidden, dtype=act, device=meta)
    aux = (torch.empty(1, dtype=torch.float32, device=meta),) if stage.carry_aux else ()
    if stage.first:
        inputs = (torch.empty(rows, seq, dtype=torch.long, device=meta),)
    else:  # received activations carry gradients back to the previous stage
        inputs = tuple(t.detach().requires_grad_(True) for t in (hidden_state, *aux))
    if stage.last:
        width = vocab // shape.tp if cfg.parallel.loss_parallel and shape.tp > 1 else vocab
        outputs = (torch.empty(rows, seq, width, dtype=logits_dtype, device=meta), *aux)
    else:
        outputs = (hidden_state, *aux)
    return inputs, tuple(t.detach().requires_grad_(True) for t in outputs)


def _pad(parts: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    out = torch.cat([F.pad(t, (0, length - t.shape[1]), value=value) for t in parts])
    return out


def _logits_dtype(amp, cfg, ctx) -> torch.dtype:
    """The dtype of the last stage's logits: autocast's, else the (FSDP) parameters'."""

    if isinstance(amp, torch.autocast):
        return amp.fast_dtype
    if ctx.shape.fsdp_wrapped:
        return fsdp_param_dtype(cfg.parallel, ctx.device)
    return torch.float32


class PipelineRunner:
    """The PipelineStage objects and schedule of one PipelineModel (built on its first step, when
    the microbatch size and compute dtype are known)."""

    def __init__(self, model, cfg, ctx, rows: int, logits_dtype: torch.dtype):
        from torch.distributed.pipelining import PipelineStage

        self.model, self.ctx = model, ctx
        self.seq_len = cfg.data.seq_len
        self.n_micro = microbatches(cfg)
        vocab_parallel = bool(cfg.parallel.loss_parallel) and ctx.tp_size > 1
        self.loss = _Loss(ctx.mesh["tp"] if vocab_parallel else None, vocab_parallel)
        self.vocab_parallel = vocab_parallel
        stages = []
        for stage, sid in zip(model.stages, model.stage_ids):
            inputs, outputs = _stage_examples(stage, cfg, ctx, rows // self.n_micro, logits_dtype)
            stages.append(
                PipelineStage(
                    stage, sid, model.num_stages, ctx.device,
                    input_args=inputs, output_args=outputs, group=ctx.pp_group,
                )
            )
        cls = schedule_class(cfg.parallel.pp_schedule)
        kwargs = {"n_microbatches": self.n_micro, "loss_fn": self.loss}
        if "scale_grads" in inspect.signature(cls.__init__).parameters:
            kwargs["scale_grads"] = False  # the loss is already normalised by the global token count
        if cfg.parallel.pp_schedule in PP_MULTI_STAGE_SCHEDULES:
            self.schedule = cls(stages, **kwargs)
        else:
            self.schedule = cls(stages[0], **kwargs)

    def step(self, batches: list[dict], n_targets: torch.Tensor, amp, scaler=None) -> torch.Tensor:
        from lmforge.parallel.tensor_parallel import loss_context

        model, ctx, loss = self.model, self.ctx, self.loss
        loss.denom = n_targets.clamp(min=1.0)
        loss.scale = float(ctx.dp_size)
        loss.aux_weight = 1.0 / self.n_micro
        loss.scaler = scaler
        loss.values.clear()
        # refused by the config (data.document_mask / reset_positions with parallel.pp > 1)
        assert not any("doc_ids" in b or "position_ids" in b for b in batches), "document layout under pp"
        # Stages exchange fixed-shape buffers, so every step is padded to data.seq_len (padded
        # mode may hand out shorter batches): causal attention never looks at the appended
        # positions and their labels are ignored, so the loss and gradients are unchanged.
        inputs = _pad([b["input_ids"] for b in batches], self.seq_len, 0)
        labels = _pad([b["labels"] for b in batches], self.seq_len, IGNORE_INDEX)
        if inputs.shape[0] % self.n_micro:
            raise ConfigError(
                f"parallel.pp_microbatches: {self.n_micro} does not divide the {inputs.shape[0]} sequences "
                "of a step on this rank; choose a divisor of micro_batch_size x grad_accum_steps"
            )
        args = (inputs,) if model.has_first else ()
        target = labels if model.has_last else None
        with amp, loss_context(self.vocab_parallel):
            self.schedule.step(*args, target=target)
        model.sync_tied_grads()
        # The last n_micro calls are this step's microbatches (a first step may also run the loss
        # function once on placeholder outputs while the schedule infers shapes).
        values = loss.values[-self.n_micro :] if model.has_last else []
        total = torch.stack(values).sum() if values else torch.zeros((), device=inputs.device)
        total = total.reshape(()).to(torch.float32)
        if ctx.pp_group is not None:  # only the last stage computed it: share it along the pipeline
            if not model.has_last:
                total = torch.zeros((), device=inputs.device, dtype=torch.float32)
            dist.all_reduce(total, group=ctx.pp_group)
        return total


def pipeline_gradients(model, batches: list[dict], n_targets: torch.Tensor, ctx, amp, scaler=None):
    """The pipelined `accumulate_gradients`: (this rank's share of the step loss, global targets).
    `n_targets` is the global batch's target-token count (train.step.count_targets)."""
    runner = model.__dict__.get("runner")
    if runner is None:
        rows = sum(b["input_ids"].shape[0] for b in batches)
        cfg = model.run_cfg
        logits_dtype = _logits_dtype(amp, cfg, ctx)
        runner = model.__dict__["runner"] = PipelineRunner(model, cfg, ctx, rows, logits_dtype)
    return runner.step(batches, n_targets, amp, scaler), n_targets


def pipeline_clip_grad_norm(model, max_norm: float, ctx) -> torch.Tensor:
    """Global gradient norm over every stage (the tied table once), then clip all stages by it."""
    params = [p for p in model.norm_parameters() if p.grad is not None]
    device = ctx.device
    if params:
        local = torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=True)
        if hasattr(local, "full_tensor"):
            local = local.full_tensor()
        sq = local.to(torch.float32).reshape(()) ** 2
    else:
        sq = torch.zeros((), device=device, dtype=torch.float32)
    if ctx.pp_group is not None:
        dist.all_reduce(sq, group=ctx.pp_group)
    norm = sq.sqrt()
    if max_norm > 0:
        # torch's rule: coefficient max_norm / (norm + 1e-6), never above 1.
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                g.mul_(coef.to(g.dtype))
    return norm
