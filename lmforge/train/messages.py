"""What a person reads around a training run: the start banner, notes, the end summary."""

from __future__ import annotations

from pathlib import Path

from lmforge.model.flops import count_params
from lmforge.train.metrics import fmt_count, fmt_duration, fmt_ppl
from lmforge.train.schedule import warmup_steps


def _layout(cfg, ctx) -> str:
    from lmforge.parallel.plan_search import axes
    from lmforge.train.preflight import own_layout

    layout = own_layout(cfg, ctx.world_size)
    text = axes(layout) if layout is not None else cfg.parallel.strategy
    ac = cfg.parallel.activation_checkpoint
    return text + (f", activation checkpointing {ac}" if ac != "none" else "")


def start_banner(cfg, ctx, dtype, total: int, run_dir: Path, step: int, resumed_from) -> list[str]:
    m = cfg.model
    params = count_params(m)["total"]
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    device = f"{ctx.device}" + (f" x {ctx.world_size} ranks" if ctx.world_size > 1 else "")
    start = f"resuming at step {step} from {resumed_from}" if resumed_from else "from scratch"
    if cfg.run_mode == "finetune" and not resumed_from:
        start = f"finetuning from {cfg.train.load_checkpoint}"
    return [
        f"model   {m.preset or 'custom'}: {fmt_count(params)} parameters, {m.num_layers} layers, "
        f"hidden {m.hidden_size}, vocab {m.vocab_size}",
        f"batch   {cfg.train.global_batch_size} x {cfg.data.seq_len} = {fmt_count(tokens)} tokens per step "
        f"({cfg.train.grad_accum_steps} micro steps), {total} steps = {fmt_count(tokens * total)} tokens",
        f"device  {device}; layout {_layout(cfg, ctx)}; dtype {str(dtype).replace('torch.', '')}",
        f"run     {run_dir} ({start})",
    ]


def warmup_note(optim_cfg, total: int) -> str | None:
    warmup = warmup_steps(optim_cfg, total)  # a warmup_ratio (<= 1) never exceeds the run
    if warmup <= total:
        return None
    return (
        f"note: optim.warmup_steps {warmup} is longer than the run ({total} steps); warmup is cut to "
        f"{total} steps, so the learning rate reaches optim.lr only at the last step"
    )


def end_summary(s: dict) -> list[str]:
    def loss(x):
        return "n/a" if x is None else f"{x:.4f}"

    how = "stopped by signal" if s["preempted"] else "done"
    lines = [
        f"{how}: {s['steps']}/{s['total_steps']} steps, {fmt_count(s['tokens'])} tokens in "
        f"{fmt_duration(s['elapsed'])}"
        + (f"; train loss {loss(s['first_loss'])} -> {loss(s['loss'])}" if s["loss"] is not None else "")
        + (f"; val loss {loss(s['val_loss'])} (ppl {fmt_ppl(s['val_ppl'])})" if s["val_loss"] is not None else ""),
    ]
    if s["checkpoint"]:
        lines.append(f"checkpoint {s['checkpoint']}")
        lines.append(
            f"next: lmforge generate --checkpoint {s['checkpoint']} --prompt '...'; "
            f"lmforge export --checkpoint {s['checkpoint']} --out DIR; lmforge report {s['run_dir']}"
        )
    else:
        lines.append(f"no checkpoint written this run; lmforge report {s['run_dir']}")
    return lines
