"""`lmforge plan`: every DDP / FSDP / HSDP / TP / PP combination on N GPUs, costed by plan.py, the
fastest one that fits recommended, and one reason for each layout it passes over.

A layout is only proposed if the rules that `lmforge train` enforces accept it: the config
validators (pipeline schedules, stages per layer), `parallel/mesh.resolve_mesh_shape` and
`parallel/tensor_parallel.check_tp_divisibility` are called, not re-implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lmforge.config import PP_SCHEDULES, batch_split_error, parallel_section
from lmforge.errors import ConfigError
from lmforge.hardware import Accelerator
from lmforge.model.flops import count_params, flops_per_token
from lmforge.parallel.plan import AC_MODES, GIB, Layout, plan

# The planner's figure is arithmetic; against the fake-backend dry run (bench/RESULTS.md, "Dry run
# at full shape") it under-counts a 70B pipeline rank by up to 6.8% (a stage's backward temporaries,
# the full-vocabulary embedding gradient, interleaved chunks held gathered). A layout is called
# fitting only when the plan leaves that much of the card free, so a recommendation the dry run
# then measures does not land just over the card.
FIT_MARGIN = 0.07


def fits(cost: dict, gpu_memory_gib: float, margin: float = FIT_MARGIN) -> bool:
    return cost["total"] <= (1 - margin) * gpu_memory_gib * GIB


@dataclass
class Option:
    layout: Layout
    cost: dict
    fits: bool


def axes(layout: Layout) -> str:
    """'FSDP 8 x TP 8', 'TP 8 x PP 8 (1f1b)', 'HSDP 2x4', 'DDP 8', 'single'."""
    parts = []
    if layout.dp_size > 1:
        if layout.fsdp and layout.dp_replicate > 1:
            parts.append(f"HSDP {layout.dp_replicate}x{layout.dp_shard}")
        else:
            parts.append(f"{'FSDP' if layout.fsdp else 'DDP'} {layout.dp_size}")
    if layout.tp > 1:
        parts.append(f"TP {layout.tp}")
    if layout.pp > 1:
        v = f" v{layout.virtual}" if layout.virtual > 1 else ""
        parts.append(f"PP {layout.pp} ({layout.schedule}{v})")
    return " x ".join(parts) or "single"


def describe(layout: Layout) -> str:
    return f"{axes(layout)}, AC {layout.ac}, micro batch {layout.micro_batch}"


def config_keys(layout: Layout, micro_steps: int) -> str:
    """The overrides that select this layout (`micro_steps` micro batches per optimizer step,
    pipelined under PP, accumulated otherwise)."""
    keys = [f"parallel.strategy={layout.strategy}"]
    if layout.strategy in ("hsdp", "fsdp+tp") or layout.dp_replicate > 1 and layout.fsdp:
        # explicit: a config's own dp_shard (MindFormers' data_parallel: 1) would otherwise stay
        keys += [f"parallel.dp_replicate={layout.dp_replicate}", f"parallel.dp_shard={layout.dp_shard}"]
    # tp and pp always: a config's own (the guide's TP 8 x PP 8) would otherwise stay under a
    # recommendation without them.
    keys += [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}"]
    if layout.pp > 1:
        keys.append(f"parallel.pp_schedule={layout.schedule}")
        if layout.virtual > 1:
            keys.append(f"parallel.pp_virtual_stages={layout.virtual}")
    keys.append(f"parallel.activation_checkpoint={layout.ac}")
    if layout.pp > 1:
        keys += ["train.grad_accum_steps=1", f"parallel.pp_microbatches={micro_steps}"]
    else:
        keys.append(f"train.grad_accum_steps={micro_steps}")
    return " ".join(keys)


def available_schedules() -> tuple[str, ...]:
    """Schedules the installed torch provides, in the planner's order of preference."""
    from lmforge.parallel.pipeline_step import available_schedules as installed

    have = set(installed())
    return tuple(s for s in PP_SCHEDULES if s in have)


def micro_batches_refused(layout: Layout, micro_steps: int) -> str | None:
    """The pipeline step's own refusal of `micro_steps` microbatches for this schedule, if any."""
    from lmforge.parallel.pipeline_step import check_microbatches

    if layout.pp == 1:
        return None
    try:
        check_microbatches(micro_steps, layout.pp, layout.schedule)
    except ConfigError as exc:
        return str(exc)
    return None


def check_layout(cfg, layout: Layout) -> str | None:
    """None when `lmforge train` would accept the layout, else its one-line reason: the rules of
    the parallel section, the mesh, tensor parallel and the stage split are called, on sections."""
    from lmforge.parallel.mesh import resolve_mesh_shape
    from lmforge.parallel.pipeline import stage_layout
    from lmforge.parallel.tensor_parallel import check_tp_divisibility

    parallel = {
        **cfg.parallel.model_dump(mode="json"),
        "strategy": layout.strategy,
        "dp_replicate": layout.dp_replicate,
        "dp_shard": layout.dp_shard,
        "tp": layout.tp,
        "pp": layout.pp,
        "pp_schedule": layout.schedule,
        "pp_virtual_stages": layout.virtual,
        "pp_layers": list(layout.pp_layers) if layout.pp_layers else None,
        "loss_parallel": cfg.parallel.loss_parallel and layout.tp > 1,
    }
    try:
        pcfg = parallel_section(parallel)
        resolve_mesh_shape(pcfg, layout.world_size, source="the layout's GPUs")
        if layout.tp > 1:
            check_tp_divisibility(cfg.model, cfg.data.seq_len, layout.tp)
        if layout.pp > 1:
            stage_layout(pcfg, cfg.model)
    except ConfigError as exc:
        return str(exc)
    return None


def _divisors(n: int, choices) -> list[int]:
    return [c for c in choices if c <= n and n % c == 0]


def _data_parallel(dp: int, tp: int, gpus_per_node: int) -> list[tuple[str, int, int]]:
    """(strategy, dp_replicate, dp_shard) ways to spend `dp` data-parallel ranks."""
    if dp == 1:
        return [("fsdp+tp" if tp > 1 else "single", 1, 1)]
    sharded = "fsdp+tp" if tp > 1 else "fsdp"
    out = [(sharded, 1, dp)]
    if tp == 1:
        out.insert(0, ("ddp", dp, 1))
    shard = max(gpus_per_node // tp, 1)  # HSDP: shard inside a node, replicate across nodes
    if 1 < shard < dp and dp % shard == 0:
        out.append(("hsdp" if tp == 1 else "fsdp+tp", dp // shard, shard))
    return out


def candidates(cfg, gpus: int, gpu: Accelerator) -> tuple[list[Layout], dict[str, str]]:
    """Layouts to cost (every micro batch, AC mode and schedule), and {layout family: reason} for
    families the training code would refuse."""
    s = 4 if cfg.parallel.param_dtype == "float32" else 2
    gb, layers = cfg.train.global_batch_size, cfg.model.num_layers
    schedules = available_schedules()
    out, refused = [], {}
    for tp in _divisors(gpus, (1, 2, 4, 8)):
        if tp > gpu.per_node:
            continue
        for pp in _divisors(gpus // tp, (1, 2, 4, 8, 16, 32)):
            dp = gpus // (tp * pp)
            for strategy, rep, shard in _data_parallel(dp, tp, gpu.per_node):
                variants = [("1f1b", 1)]
                if pp > 1:
                    variants = [
                        (sc, 2 if sc in ("interleaved_1f1b", "zero_bubble", "zbv") else 1) for sc in schedules
                    ]
                for schedule, v in variants:
                    explicit = cfg.parallel.pp_layers
                    base = Layout(
                        strategy, rep, shard, tp, compute_bytes=s, pp=pp, schedule=schedule, virtual=v
                    )
                    if explicit and len(explicit) == pp * v:
                        base = replace(base, pp_layers=tuple(explicit))
                    if pp * v > layers:
                        continue
                    reason = check_layout(cfg, base)
                    if reason:
                        refused.setdefault(axes(base), reason)
                        continue
                    if batch_split_error(gb, 1, dp):
                        continue
                    per_rank = gb // dp
                    micro = [
                        b
                        for b in dict.fromkeys((per_rank, 16, 8, 4, 2, 1))
                        if b <= per_rank and per_rank % b == 0
                    ]
                    micro = [b for b in micro if not micro_batches_refused(base, per_rank // b)]
                    if not micro:
                        refused.setdefault(axes(base), micro_batches_refused(base, per_rank))
                    # Zero-bubble schedules run each backward in two passes (input, then weight
                    # gradients), which torch's selective checkpointing refuses at the first step
                    # (torch 2.13; found by the dry run on this planner's 70B recommendation).
                    acs = [ac for ac in AC_MODES if not (ac == "selective" and schedule in ("zero_bubble", "zbv"))]
                    out += [replace(base, ac=ac, micro_batch=b) for ac in acs for b in micro]
    return out, refused


def _family(layout: Layout) -> tuple:
    return (layout.strategy, layout.dp_replicate, layout.dp_shard, layout.tp, layout.pp)


def recommend(cfg, gpus: int, gpu: Accelerator, gpu_memory_gib: float, mfu: float = 0.4,
              margin: float = FIT_MARGIN):
    """(best Option or None, one Option per layout family, refused {family: reason}). Within a
    family the fastest fitting option represents it; if none fits, the smallest. `margin`: the
    share of the memory a fitting plan leaves free (the trainer's preflight, which judges the run
    by the same plan with none, asks with none so its advice passes its own check)."""
    layouts, refused = candidates(cfg, gpus, gpu)
    families: dict[tuple, Option] = {}
    for lay in layouts:
        opt = Option(lay, plan(cfg, lay, gpu, mfu), False)
        opt.fits = fits(opt.cost, gpu_memory_gib, margin)
        held = families.get(_family(lay))
        if held is None or _better(opt, held):
            families[_family(lay)] = opt
    fitting = [o for o in families.values() if o.fits]
    best = min(fitting, key=lambda o: o.cost["step_time_s"]) if fitting else None
    return best, list(families.values()), refused


def _better(a: Option, b: Option) -> bool:
    if a.fits != b.fits:
        return a.fits
    if a.fits:
        return a.cost["step_time_s"] < b.cost["step_time_s"]
    return a.cost["total"] < b.cost["total"]


def configured_layout(cfg, gpus: int) -> tuple[Layout | None, str]:
    """(the layout the config's own parallel section gives on `gpus` GPUs, or None and why not)."""
    from lmforge.parallel.mesh import resolve_mesh_shape

    p = cfg.parallel
    try:
        shape = resolve_mesh_shape(p, gpus, source="--gpus")
    except ConfigError as exc:
        return None, str(exc)
    dp = shape.dp_size
    # Under PP each micro step's batch is cut into pp_microbatches pipeline micro batches.
    split = (p.pp_microbatches or 1) if p.pp > 1 else 1
    per_step = cfg.train.grad_accum_steps * dp * split
    problem = batch_split_error(cfg.train.global_batch_size, cfg.train.grad_accum_steps, dp, split)
    if problem:
        return None, problem
    return Layout(
        shape.strategy,
        shape.dp_replicate,
        shape.dp_shard if shape.strategy != "fsdp+tp" or dp > 1 else 1,
        shape.tp,
        ac=p.activation_checkpoint,
        micro_batch=cfg.train.global_batch_size // per_step,
        compute_bytes=4 if p.param_dtype == "float32" else 2,
        pp=p.pp,
        schedule=p.pp_schedule,
        virtual=p.pp_virtual_stages,
        pp_layers=tuple(p.pp_layers) if p.pp_layers else None,
    ), ""


def check_request(gpus, gpu_memory_gib, mfu) -> None:
    bad = []
    if not isinstance(gpus, int) or gpus < 1:
        bad.append(f"--gpus {gpus} (need a whole number >= 1)")
    if not (
        isinstance(gpu_memory_gib, (int, float)) and math.isfinite(gpu_memory_gib) and gpu_memory_gib > 0
    ):
        bad.append(f"--gpu-memory {gpu_memory_gib} (need a finite number of GiB > 0)")
    if not (math.isfinite(mfu) and 0 < mfu <= 1):
        bad.append(f"--mfu {mfu} (need 0 < mfu <= 1)")
    if bad:
        raise ConfigError("plan: " + "; ".join(bad))


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _row(label: str, o: Option) -> str:
    c = o.cost
    cells = "".join(
        f"{_gib(c[k]):>8}"
        for k in ("parameters", "gradients", "optimizer", "activations", "temporaries", "total")
    )
    stages = ""
    if o.layout.pp > 1:
        stages = f"  stages {_gib(c['stage_totals'][0])}..{_gib(c['stage_totals'][-1])}"
    verdict = "fits" if o.fits else "too big"
    return f"{label:<58}{cells}{c['step_time_s']:9.3g}{c['bubble']:7.0%}  {verdict}{stages}"


def _explain(o: Option, best: Option, limit_gib: float) -> str:
    c = o.cost
    if not o.fits:
        return f"needs {_gib(c['total'])} GiB > {limit_gib:g} less the {FIT_MARGIN:.0%} margin even with AC {o.layout.ac} at micro batch {o.layout.micro_batch}"
    slower = c["step_time_s"] / best.cost["step_time_s"]
    if slower < 1.005:
        return f"fits ({_gib(c['total'])} GiB) and is as fast as the best ({c['step_time_s']:.3g} s/step)"
    parts = [f"compute {c['compute_time_s']:.3g} s"]
    for key, name in (
        ("bubble", "bubble"),
        ("dp_comm_time_s", "DP"),
        ("tp_comm_time_s", "TP"),
        ("pp_p2p_time_s", "P2P"),
    ):
        if c[key] > 0:
            parts.append(f"{name} {c[key]:.0%}" if key == "bubble" else f"{name} {c[key]:.3g} s")
    return f"fits ({_gib(c['total'])} GiB) but {c['step_time_s']:.3g} s/step, {slower:.2f}x the best ({', '.join(parts)})"


def plan_report(
    cfg, gpus: int, gpu: Accelerator, gpu_memory_gib: float, mfu: float = 0.4
) -> tuple[str, bool]:
    """(report text, whether anything fits)."""
    check_request(gpus, gpu_memory_gib, mfu)
    best, options, refused = recommend(cfg, gpus, gpu, gpu_memory_gib, mfu)
    if not options:
        raise ConfigError(
            f"plan: no layout of {gpus} GPU(s) can run this config (train.global_batch_size "
            f"{cfg.train.global_batch_size} must be a multiple of the data-parallel size; "
            + (next(iter(refused.values()), "") or "")
            + ")"
        )
    m, seq = cfg.model, cfg.data.seq_len
    lines = [
        f"model: {m.preset or 'custom'} {count_params(m)['total'] / 1e9:.2f}B params, {m.num_layers} layers, seq {seq}, "
        f"global batch {cfg.train.global_batch_size} x {seq} tokens; {gpus} x {gpu.name} "
        f"({gpu_memory_gib:g} GiB, {gpu.bf16_tflops:g} TFLOP/s bf16, {gpu.per_node} per node)",
        f"FLOPs/token {flops_per_token(m, seq):.3e}, MFU {mfu:g}; memory in GiB per GPU (the busiest pipeline stage); "
        f"'fits' keeps {FIT_MARGIN:.0%} of the card free for the plan's own error (check with --simulate)",
        "",
        f"{'layout':<58}{'params':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'temp':>8}{'total':>8}{'step s':>9}{'bubble':>7}",
    ]
    ordered = sorted(
        options, key=lambda o: (not o.fits, o.cost["step_time_s"] if o.fits else o.cost["total"])
    )
    lines += [_row(describe(o.layout), o) for o in ordered]
    own, why_not = configured_layout(cfg, gpus)
    if own is None:
        lines += ["", f"the config's own layout does not run on {gpus} GPU(s): {why_not}"]
    else:
        if check_layout(cfg, own) is None:
            mine = Option(own, plan(cfg, own, gpu, mfu), False)
            mine.fits = fits(mine.cost, gpu_memory_gib)
            lines += ["", "the config's own layout:", _row(describe(own), mine)]
            if best is not None:
                lines.append(
                    f"  vs recommended: {_explain(mine, best, gpu_memory_gib)}"
                    if mine.layout != best.layout
                    else "  = recommended"
                )
        else:
            lines += [
                "",
                f"the config's own layout ({axes(own)}) would be refused: {check_layout(cfg, own)}",
            ]
    lines.append("")
    if best is None:
        lines.append(
            f"nothing fits in {gpu_memory_gib:g} GiB per GPU on {gpus} GPU(s): add GPUs, shorten data.seq_len, or "
            "offload parameters and optimizer states to the CPU (parallel.cpu_offload=true, much slower)"
        )
        return "\n".join(lines), False
    c = best.cost
    lines += [
        f"recommended: {describe(best.layout)}, {c['grad_accum_steps']} micro batches per step",
        f"  {config_keys(best.layout, c['grad_accum_steps'])}",
        f"  {_gib(c['total'])} GiB per GPU; {c['flops_per_step']:.3e} FLOPs/step; step {c['step_time_s']:.3g} s; "
        f"{c['tokens_per_s']:,.0f} tokens/s ({c['tokens_per_s'] / gpus:,.0f} per GPU)",
        f"  compute {c['compute_time_s']:.3g} s (bubble {c['bubble']:.1%}), data-parallel traffic "
        f"{c['dp_comm_time_s']:.3g} s (overlapped), tensor-parallel {c['tp_comm_time_s']:.3g} s, "
        f"pipeline P2P {c['pp_p2p_time_s']:.3g} s",
    ]
    for o in ordered:
        if o is not best:
            lines.append(f"  not {axes(o.layout)}: {_explain(o, best, gpu_memory_gib)}")
    by_reason: dict[str, list[str]] = {}
    for family, reason in refused.items():
        by_reason.setdefault(reason, []).append(family)
    for reason, families in by_reason.items():
        more = f" and {len(families) - 2} more" if len(families) > 2 else ""
        lines.append(f"  not {', '.join(families[:2])}{more}: lmforge train refuses it: {reason}")
    return "\n".join(lines), True


def plan_command(
    config_path: str, gpus: int, gpu_type: str, gpu_memory_gib: float | None, mfu: float
) -> None:
    """`lmforge plan`: print the report; a request nothing fits is an error (non-zero exit)."""
    from lmforge.hardware import find_accelerator
    from lmforge.mindformers import load_run_config

    try:
        gpu = find_accelerator(gpu_type)
    except KeyError as exc:
        raise ConfigError(f"plan: --gpu-type: {exc.args[0]}") from None
    memory = gpu.memory_gib if gpu_memory_gib is None else gpu_memory_gib
    check_request(gpus, memory, mfu)
    notes: list[str] = []
    cfg = load_run_config(config_path, notes=notes)
    for note in notes:
        print(f"note: {note}")
    text, fits = plan_report(cfg, gpus, gpu, memory, mfu)
    print(text, flush=True)
    if not fits:
        raise ConfigError(
            f"plan: nothing fits in {memory:g} GiB per GPU on {gpus} x {gpu.name} (table above)"
        )
