"""`lmforge train --config F --dry-run`: the trainer's own path for one representative rank of every
distinct role, at the configured shapes, on torch's fake process group under FakeTensorMode.

Per rank it builds what the trainer builds (mesh and groups, `build_parallel_model`: meta build,
pipeline split, TP/SP, activation checkpointing, FSDP2/HSDP; the optimizer; the LR schedule; the step
with the configured loss, schedule and micro batches; the gradient clip) and measures one full
training step in the steady state, i.e. with the optimizer's state alive (created beforehand by one
update on zero gradients, which is what the first step leaves behind), with
`lmforge.parallel.dryrun.StepMeasure`. Ranks with the same pipeline position hold same-sized shards
(FSDP2 pads every shard to one size; TP shapes must divide, checked below), so one rank per
pipeline rank stands for all. Beside each: the planner's figure for that rank.

Many micro batches (the 70B recipe's 256) repeat the same work, and each costs seconds of Python
dispatch at full shape. Past the schedule's warm-up (at most `pp` micro batches in flight for
gpipe/1F1B) a step's peak memory and its collectives grow linearly with the micro batch count
(torch's pipeline stages keep one receive buffer per micro batch; each micro batch issues the same
collectives), so a rank is run at two counts past the warm-up and its figures are extended along
that line to the configured count (`microbatch_counts`); tests/integration/test_dryrun.py checks the
extension against a direct run.

The coupling to the train step is one function, `_run_one_step`: what the trainer calls per step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.parallel.dryrun import CATEGORIES, StepMeasure, fake_rank, fake_tensors

GIB = 1024**3


# ---------------------------------------------------------------------------------------------
# The trainer's pieces for one rank


def build_step(cfg, ctx):
    """(model, optimizer, train step) as `trainer._Trainer` builds them."""
    from lmforge.parallel import build_parallel_model
    from lmforge.train.optim import build_optimizer
    from lmforge.train.schedule import build_schedule
    from lmforge.train.step import autocast_context, build_train_step, make_scaler

    dtype = step_dtype(cfg, ctx)
    sharded = ctx.distributed and (ctx.shape.uses_fsdp or ctx.tp_size > 1)
    model = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_schedule(optimizer, cfg.optim, max(cfg.train.max_steps or 0, 10))
    step = build_train_step(
        cfg,
        ctx,
        model,
        optimizer,
        scheduler,
        amp=autocast_context(ctx.device, dtype),
        scaler=make_scaler(ctx.device, dtype, sharded),
    )
    model.train()
    return model, optimizer, step


def gpu_rules(cfg) -> bool:
    """Whether the dry run picks dtypes as on a GPU: the config targets one (train.device auto or
    cuda). Tensors stay fake CPU tensors either way; train.device=cpu simulates lmforge's CPU rule
    (FSDP2 gathers and reduces in fp32), which is what the real gloo runs of the tests do."""
    return cfg.train.device != "cpu"


def step_dtype(cfg, ctx) -> torch.dtype:
    """The trainer's compute dtype (train.dtype); under `ctx.gpu_rules`, auto is bf16 as on the
    GPUs the planner costs (A100 / H100 and later all support it), whatever this machine has."""
    from lmforge.weights.dtypes import compute_dtype

    if ctx.gpu_rules and cfg.train.dtype == "auto":
        return torch.bfloat16
    return compute_dtype(cfg.train.dtype, ctx.device)


def _run_one_step(train_step, batches: list[dict]):
    """THE call site of the train step (re-point here when the step API changes)."""
    return train_step.step(batches)


def loader_batches(cfg, ctx, generator: torch.Generator | None = None) -> list[dict]:
    """One step's micro batches with the loader's shapes and keys (packed windows of seq_len;
    doc_ids / position_ids when the config asks for document masking / reset positions)."""
    rows, seq, vocab = cfg.micro_batch_size(ctx.dp_size), cfg.data.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(cfg.train.grad_accum_steps):
        ids = torch.randint(0, vocab, (rows, seq + 1), generator=generator)
        batch = {"input_ids": ids[:, :-1].to(ctx.device), "labels": ids[:, 1:].to(ctx.device)}
        if cfg.data.document_mask:
            batch["doc_ids"] = torch.zeros(rows, seq, dtype=torch.long, device=ctx.device)
        if cfg.data.reset_positions:
            batch["position_ids"] = torch.arange(seq, device=ctx.device).expand(rows, seq).contiguous()
        out.append(batch)
    return out


def prime_optimizer(model, optimizer) -> None:
    """Create the optimizer's state as the first step leaves it (moments alive, no gradients): one
    update on zero gradients. The step measured after it is then the steady state."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_rank(cfg, ctx, fake: bool, batches: list[dict] | None = None, checkpoint=None) -> dict:
    """Build this rank's model and step, prime the optimizer and measure one full training step
    (real or fake tensors). `checkpoint`: (path, config key, with optimizer) to plan this rank's
    load of (`dryrun_ckpt.plan_problems`), listed under "checkpoint_problems"."""
    model, optimizer, step = build_step(cfg, ctx)
    prime_optimizer(model, optimizer)
    batches = batches or loader_batches(cfg, ctx)
    extra = {}
    if getattr(model, "tied_group", None) is not None:
        extra[model.tied_group.group_name] = "pp"  # tied embedding: first <-> last stage
    with StepMeasure(ctx, model, optimizer, fake, extra) as m:
        _run_one_step(step, batches)
    out = m.result()
    if checkpoint is not None:
        from lmforge.train.dryrun_ckpt import plan_problems

        path, key, with_optim = checkpoint
        out["checkpoint_problems"] = plan_problems(Path(path), key, model, optimizer if with_optim else None, ctx.rank)
    return out


# ---------------------------------------------------------------------------------------------
# Fewer micro batches, extended to the configured count


def microbatch_counts(cfg, shape) -> tuple[int, list[int]]:
    """(the step's micro batch count n, the counts to run): [n] when n is small, else two counts
    past the schedule's warm-up, whose figures extend linearly to n. Where the line starts was
    measured at tiny shapes (figures per count, pp 2): without a pipeline from the second micro
    batch; 1F1B from pp + 1 (pp in flight, then one more forward before the first backward);
    interleaved 1F1B (2 virtual stages) from 3 x pp, so multi-stage schedules (which also need
    multiples of pp) start at (virtual stages + 2) x pp."""
    from lmforge.config import PP_MULTI_STAGE_SCHEDULES
    from lmforge.parallel.pipeline_step import microbatches

    accum = cfg.train.grad_accum_steps
    if shape.pp == 1:
        n, lo, gap = accum, 2, 1
    else:
        pcfg = cfg.parallel
        n = microbatches(pcfg, cfg.train, shape.dp_size)
        if pcfg.pp_schedule in PP_MULTI_STAGE_SCHEDULES:
            lo, gap = (max(pcfg.pp_virtual_stages, 2) + 2) * shape.pp, shape.pp
        else:
            lo, gap = shape.pp + 1, 1
    if n <= lo + gap:
        return n, [n]
    return n, [lo, lo + gap]


def tree_with_microbatches(tree: dict, cfg, shape, k: int) -> dict:
    """The config tree of the same step with k micro batches of the same rows each."""
    out = json.loads(json.dumps(tree))
    train, dp = out["train"], shape.dp_size
    rows = cfg.micro_batch_size(dp) * cfg.train.grad_accum_steps  # sequences per step on a rank
    if shape.pp == 1:
        train["grad_accum_steps"], train["global_batch_size"] = k, k * cfg.micro_batch_size(dp) * dp
    else:
        n, _ = microbatch_counts(cfg, shape)
        out["parallel"]["pp_microbatches"] = k
        train["grad_accum_steps"], train["global_batch_size"] = 1, k * (rows // n) * dp
    return out


def extend(lo: dict, hi: dict, k_lo: int, k_hi: int, n: int) -> dict:
    """The record at n micro batches on the line through the records at k_lo and k_hi."""
    f = (n - k_lo) / (k_hi - k_lo)

    def line(a: int, b: int) -> int:
        return int(round(a + f * (b - a)))

    cats = {c: line(lo["categories"][c], hi["categories"][c]) for c in CATEGORIES}
    colls: dict = {}
    for dim in sorted(set(lo["collectives"]) | set(hi["collectives"])):
        a, b = lo["collectives"].get(dim, {}), hi["collectives"].get(dim, {})
        colls[dim] = {}
        for kind in sorted(set(a) | set(b)):
            za, zb = a.get(kind, {"count": 0, "bytes": 0}), b.get(kind, {"count": 0, "bytes": 0})
            colls[dim][kind] = {k: line(za[k], zb[k]) for k in ("count", "bytes")}
    return {**hi, "categories": cats, "simulated_peak_bytes": sum(cats.values()), "collectives": colls,
            "seconds": round(lo["seconds"] + hi["seconds"], 2),
            "cpu_seconds": round(lo["cpu_seconds"] + hi["cpu_seconds"], 2), "microbatches_run": [k_lo, k_hi]}


# ---------------------------------------------------------------------------------------------
# Step-1 checks that need no model


def check_shapes_divide(cfg, tp: int) -> None:
    """Tensor parallel splits heads, FFN columns and (sequence parallel) positions: each must divide."""
    from lmforge.model.layers import resolve_intermediate_size

    if tp == 1:
        return
    m = cfg.model
    sizes = {
        "model.num_heads": m.num_heads,
        "model.num_kv_heads": m.num_kv_heads,
        "model.intermediate_size": resolve_intermediate_size(m),
        "data.seq_len": cfg.data.seq_len,
        "model.vocab_size": m.vocab_size,
    }
    for key, value in sizes.items():
        if value % tp:
            raise ConfigError(
                f"{key}: {value} is not divisible by parallel.tp {tp}; every rank would hold a different "
                "shard size (or torch refuses); choose a tp that divides it"
            )


def representative_ranks(shape) -> list[int]:
    """One global rank per pipeline rank (its dp 0, tp 0)."""
    per_stage = shape.dp_size * shape.tp
    return [p * per_stage for p in range(shape.pp)]


def planned_by_pp_rank(cfg, world_size: int) -> tuple[list[dict] | None, str]:
    from lmforge.parallel.plan import rank_memory
    from lmforge.parallel.plan_search import configured_layout

    layout, why = configured_layout(cfg, world_size)
    if layout is None:
        return None, why
    lp = bool(cfg.parallel.loss_parallel)
    return [rank_memory(cfg, layout, r, lp) for r in range(layout.pp)], ""


# ---------------------------------------------------------------------------------------------
# The dry run


def simulate(cfg, world_size: int, ranks: list[int] | None = None, workers: int = 2,
             counts: list[int] | None = None) -> list[dict]:
    """One record per simulated rank (see `dry_run`). Each (rank, micro batch count) runs in a
    fresh process (torch caches process groups by name, so two fake worlds cannot follow each
    other in one process), `workers` at a time. `counts`: the micro batch counts to run (default
    `microbatch_counts`); two counts are extended linearly to the configured one."""
    import multiprocessing

    from lmforge.parallel.dryrun import require_fake_backend
    from lmforge.parallel.mesh import resolve_mesh_shape
    from lmforge.parallel.plan import OVERHEAD

    require_fake_backend()
    shape = resolve_mesh_shape(cfg.parallel, world_size)
    check_shapes_divide(cfg, shape.tp)
    cfg.micro_batch_size(shape.dp_size)  # the batch split, before any model work
    planned, why = planned_by_pp_rank(cfg, world_size)
    ranks = representative_ranks(shape) if ranks is None else ranks
    tree = cfg.model_dump(mode="json")
    n, default_counts = microbatch_counts(cfg, shape)
    counts = counts or default_counts
    trees = {k: tree if k == n else tree_with_microbatches(tree, cfg, shape, k) for k in counts}
    checkpoint, ckpt_problems = checkpoint_check(cfg)
    jobs = [(trees[k], world_size, r, k, checkpoint if k == counts[0] else None) for r in ranks for k in counts]
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), maxtasksperchild=1)
    try:
        results = pool.map(_rank_worker, jobs, chunksize=1)
    finally:
        pool.terminate()
    for res in results:
        if "error" in res:
            raise LmforgeError(res["error"])
    by = {(res["rank"], res["microbatches"]): res for res in results}
    records = []
    for r in ranks:
        if len(counts) == 1:
            res = by[(r, counts[0])]
        else:
            res = extend(by[(r, counts[0])], by[(r, counts[1])], counts[0], counts[1], n)
        res["microbatches"] = n
        if checkpoint is not None:
            res["checkpoint"] = str(checkpoint[0])
            res["checkpoint_problems"] = ckpt_problems + by[(r, counts[0])].get("checkpoint_problems", [])
        res["overhead_bytes"] = OVERHEAD
        res["needs_bytes"] = res["simulated_peak_bytes"] + OVERHEAD
        if planned is not None:
            plan = planned[res["pp_stage"]]
            res["planned_peak_bytes"] = int(plan["total"])
            res["planned_categories"] = {k: int(plan[k]) for k in CATEGORIES}
            res["planned_categories"]["temporaries"] -= OVERHEAD  # shown beside the simulation's
        else:
            res["planned_peak_bytes"] = None
            res["plan_note"] = why
        records.append(res)
    return records


def checkpoint_check(cfg) -> tuple[tuple[str, str, bool] | None, list[str]]:
    """The checkpoint the trainer would load at step 1, if any, as (path, key, with optimizer),
    its index vetted here once (an unsafe or damaged one is refused before any rank is built), and
    the model config keys it differs in."""
    from lmforge.train.dryrun_ckpt import checkpoint_to_load, config_problems
    from lmforge.weights.safe_meta import vetted_metadata

    found = checkpoint_to_load(cfg)
    if found is None:
        return None, []
    path, key, with_optim = found
    vetted_metadata(path)
    return (str(path), key, with_optim), config_problems(path, key, cfg)


def _rank_worker(job) -> dict:
    """Simulate one rank in this (fresh) process; errors come back as one line."""
    from lmforge.config import config_from_dict
    from lmforge.parallel import init_distributed

    tree, world_size, rank, k, checkpoint = job
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        with fake_rank(rank, world_size):
            cfg = config_from_dict(tree, "<dry run>")
            ctx = init_distributed(cfg.parallel, "cpu")  # fake CPU tensors, whatever the machine has
            ctx.gpu_rules = gpu_rules(cfg)
            where = f"rank {rank} (pp stage {ctx.pp_rank}, tp {ctx.tp_rank}, dp {ctx.dp_rank})"
            try:
                with fake_tensors():
                    measured = measure_rank(cfg, ctx, fake=True, checkpoint=checkpoint)
            except LmforgeError:
                raise
            except Exception as exc:  # noqa: BLE001 - torch refusing the layout is the finding
                text = str(exc).strip()
                first = text.splitlines()[0] if text else type(exc).__name__
                cause = exc.__cause__
                if cause is not None and str(cause).strip():
                    first += f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})"
                return {"error": f"dry run: {where} fails at step 1: {type(exc).__name__}: {first[:400]}; "
                        "change the parallel section (or report it if the layout should work)"}
    except LmforgeError as exc:
        return {"error": str(exc)}
    return {
        "rank": rank,
        "pp_stage": ctx.pp_rank,
        "tp_rank": ctx.tp_rank,
        "dp_rank": ctx.dp_rank,
        "microbatches": k,
        "dtype_rules": "cuda" if ctx.gpu_rules else "cpu",
        "simulated_peak_bytes": measured["peak_bytes"],
        "categories": measured["categories"],
        "collectives": measured["collectives"],
        "checkpoint_problems": measured.get("checkpoint_problems", []),
        "seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(time.process_time() - cpu0, 2),
    }


def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def report_lines(records: list[dict], gpu_memory_gib: float | None) -> list[str]:
    """Per rank: the simulated categories and, under them, the planner's; then the totals with the
    constant both add (`overhead_bytes`: CUDA context, NCCL buffers, allocator slack, which no
    fake tensor holds) and the planner's difference; then the collectives."""
    head = "rank  pp tp dp        " + "  ".join(f"{c[:6]:>7}" for c in CATEGORIES) + "   needs  planned   diff"
    lines = [head + "   (GiB)"]
    for r in records:
        sim = "  ".join(f"{r['categories'][c] / GIB:7.2f}" for c in CATEGORIES)
        needs, plan = r["needs_bytes"], r["planned_peak_bytes"]
        diff = f"{(plan - needs) / needs:+6.1%}" if plan and needs else "     -"
        lines.append(
            f"{r['rank']:>4} {r['pp_stage']:>3} {r['tp_rank']:>2} {r['dp_rank']:>2}  sim   {sim}  "
            f"{_gib(needs):>6}  {_gib(plan):>7}  {diff}"
        )
        if r.get("planned_categories"):
            planned = "  ".join(f"{r['planned_categories'][c] / GIB:7.2f}" for c in CATEGORIES)
            lines.append(f"{'':>14}plan  {planned}")
    if records:
        lines.append(f"needs = simulated peak + {records[0]['overhead_bytes'] / GIB:g} GiB for what the fake "
                     "backend cannot hold (CUDA context, NCCL buffers, allocator slack); the planner adds the same")
    lines.append("collectives per step (count, GiB) by mesh dimension, per simulated rank:")
    for r in records:
        parts = []
        for dim, kinds in r["collectives"].items():
            for kind, v in kinds.items():
                parts.append(f"{dim}:{kind} {v['count']} ({v['bytes'] / GIB:.3g})")
        lines.append(f"  rank {r['rank']}: " + (", ".join(parts) or "none"))
    return lines


def not_fitting(records: list[dict], gpu_memory_gib: float) -> list[str]:
    limit = gpu_memory_gib * GIB
    return [
        f"rank {r['rank']} (pp stage {r['pp_stage']}) needs {r['needs_bytes'] / GIB:.2f} GiB, "
        f"{(r['needs_bytes'] - limit) / GIB:.2f} GiB more than --gpu-memory {gpu_memory_gib:g}"
        for r in records
        if r["needs_bytes"] > limit
    ]


def dry_run(cfg, world_size: int, gpu_memory_gib: float | None = None, json_path: str | None = None,
            echo=print) -> list[dict]:
    """Simulate, print the table, write --json; a rank that does not fit is a ConfigError whose
    message holds one line per such rank (the CLI prints it, exits 2)."""
    t0 = time.perf_counter()
    records = simulate(cfg, world_size)
    for line in report_lines(records, gpu_memory_gib):
        echo(line)
    runs = records[0].get("microbatches_run")
    how = f"run at {runs[0]} and {runs[1]} micro batches, extended to {records[0]['microbatches']}" if runs else (
        f"{records[0]['microbatches']} micro batches")
    rules = ("dtypes as on a GPU (train.device auto/cuda; train.device=cpu for the CPU's fp32 FSDP2 rule)"
             if gpu_rules(cfg) else "dtypes as on the CPU (train.device cpu)")
    echo(f"dry run: {len(records)} ranks simulated of {world_size}, one step each ({how}), {rules}, "
         f"{time.perf_counter() - t0:.1f} s")
    if json_path:
        path = Path(json_path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"world_size": world_size, "ranks": records}, indent=1))
        tmp.replace(path)
    if records and records[0].get("checkpoint"):
        from lmforge.train.dryrun_ckpt import refusal

        problem = refusal([p for r in records for p in r["checkpoint_problems"]], records[0]["checkpoint"])
        if problem:
            raise CheckpointError(problem)
        echo(f"dry run: checkpoint {records[0]['checkpoint']} plans onto every simulated rank (DCP load plan)")
    if gpu_memory_gib is not None:
        short = not_fitting(records, gpu_memory_gib)
        if short:
            raise ConfigError("dry run: does not fit:\n" + "\n".join(short))
    return records
