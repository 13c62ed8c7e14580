"""Memory and step-time model of one training layout: what each GPU holds and how long a step takes.

Parameter shapes come from the model itself, built on the meta device (no memory), so the planner
cannot drift from `lmforge.model`. A layout is pp x dp_replicate x dp_shard x tp on the mesh
`parallel/mesh.py` builds (tp innermost: inside a node; pp outermost: across nodes).

Memory per GPU, on the pipeline rank that needs the most (bytes; N_local = that rank's parameter
elements after pipeline split, TP and FSDP sharding, FSDP2 padding dim 0 to a multiple of dp_shard):
  parameters   4 * N_local (fp32: under FSDP2 mixed precision the sharded fp32 parameter is the
               master copy; bf16 copies exist only while gathered, counted in temporaries).
  gradients    4 * N_local.  optimizer  AdamW exp_avg + exp_avg_sq, 8 * N_local + 4 bytes per tensor.
  activations  saved for backward per token and layer (s = compute dtype bytes):
                 no AC     2 * norm + 4*q_dim*s + 4*heads + 4*I*s, norm = 4*h + 4 + 2*h*s
                 full AC   h*s (the block input), plus one block recomputed in backward
                 selective h*s + every matmul output (q, k, v, wo, w1, w3, w2) + attention output
                 last stage: final norm + 4*V (fp32 log-softmax) + 16 (ids, targets)
               TP (sequence parallel) divides norms, heads and FFN columns by tp; the gathered
               inputs of attention and FFN (2*h*s) and the logits stay full size (Korthikanti et al.
               2022 with flash attention). Micro batches in flight on pipeline rank r (of p, m
               micro batches, v stages per rank, each in-flight chunk holding 1/v of its layers):
                 gpipe m; 1f1b min(m, p - r + 1) (dry run); interleaved_1f1b and zero_bubble
                 min(m*v, 2*(p - r - 1) + (v - 1)*p + 1) chunks (torch's warm-up count);
                 zbv min(2m, 2p) chunks on every rank (ZB-V keeps 1F1B's peak, balanced).
  temporaries  logits B*T*V*(s + 8) on the last stage (model logits, fp32 copy, fp32 gradient;
               / tp with loss_parallel); FSDP without PP: two gathered blocks + one block's
               unsharded gradient + its fp32 reduce-scatter buffer, the root's tensors gathered;
               FSDP with PP: the rank's whole stage stays gathered for the step with its unsharded
               gradients accumulating (torch.distributed.pipelining's FSDP handling), plus one
               block's fp32 reduce-scatter buffer; DDP: gradient buckets (4 * N_local);
               2 GiB for context, NCCL and fragmentation (the dry run adds the same: no fake
               tensor holds them). PP (in activations): torch's receive buffers, one per micro
               batch for each stage input and output gradient of the rank, tokens*h/tp each.
Step time = max(compute, data-parallel traffic) + tensor-parallel traffic + pipeline P2P.
  compute   FLOPs per token of the slowest pipeline rank (its layers; the output layer on the
            last stage) x tokens per data-parallel rank / (MFU * peak * tp), x 4/3 under full AC
            and x 1.05 under selective AC, x (1 + bubble). Bubble (idle time over useful time):
            gpipe and 1f1b (p-1)/m, interleaved_1f1b (p-1)/(v*m), zero_bubble (p-1)/(3*v*m)
            (ZB-H1: the weight-gradient pass fills a third), zbv (p-1)/(6*m) (ZB-V with v = 2).
  DP        FSDP without PP: (2*s + 4) bytes per local parameter per micro step (all-gather
            forward and backward, fp32 reduce-scatter); FSDP with PP: (s + 4) once per step;
            DDP: 4 once per step; ring cost (dp-1)/dp; overlapped with compute.
  TP        8 * tokens * h * s * (tp-1)/tp bytes per layer and micro step, not overlapped.
  PP P2P    2 * micro tokens * h * s / tp bytes (activation forward, gradient backward) per
            micro batch and stage boundary of the rank, counted as not overlapped (upper bound).
  Bandwidth inside a node: the accelerator's link; between nodes 45 GB/s per GPU. A data-parallel
            group leaves the node when tp * dp > GPUs per node; stage neighbours are tp * dp ranks
            apart, so P2P leaves the node when tp * dp >= GPUs per node.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from lmforge.hardware import NETWORK_GBS, Accelerator, find_accelerator
from lmforge.model.flops import count_params, flops_per_token
from lmforge.model.layers import resolve_intermediate_size
from lmforge.model.moe import expert_intermediate_size
from lmforge.parallel.mesh import MeshShape

GIB = 1024**3
OVERHEAD = 2 * GIB
AC_MODES = ("none", "selective", "full")
DEFAULT_GPU = "H100"


@dataclass(frozen=True)
class Layout(MeshShape):
    """A MeshShape (strategy and pp x dp_replicate x dp_shard x tp, `parallel/mesh.py`) plus what
    the planner also varies: activation checkpointing, micro batch, compute dtype, schedule."""

    ac: str = "none"
    micro_batch: int = 1
    compute_bytes: int = 2  # 2 for bf16/fp16 compute, 4 for fp32
    schedule: str = "1f1b"
    virtual: int = 1  # pipeline stages per rank
    pp_layers: tuple[int, ...] | None = None  # explicit layers per stage (parallel.pp_layers)

    @property
    def fsdp(self) -> bool:
        """Whether parameters are sharded (FSDP2 over dp_shard > 1 ranks under fsdp+tp)."""
        return self.strategy in ("fsdp", "hsdp") or (self.strategy == "fsdp+tp" and self.dp_shard > 1)


# ---------------------------------------------------------------------------------------------
# Parameters, from the model built on the meta device


@functools.lru_cache(maxsize=8)
def _meta_shapes(model_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from lmforge.model import build
    from lmforge.model.config import ModelConfig

    model = build(ModelConfig.model_validate_json(model_json))
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def _tp_dim(name: str) -> int | None:
    """Dimension tensor parallel splits, as parallel/tensor_parallel.py's plan does: column-wise
    (and the vocab rows of embedding/output) dim 0, row-wise dim 1; norms and routers replicated."""
    if name in ("tok_embeddings.weight", "output.weight"):
        return 0
    module, kind = name.split(".")[-2:]
    if module in ("wq", "wk", "wv", "w1", "w3"):
        return 0
    if module in ("wo", "w2"):
        return 1 if kind == "weight" else None
    return None


def param_shapes(m) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(name, shape, tensor-parallel dim) of every parameter of Transformer(m)."""
    return [(n, s, _tp_dim(n)) for n, s in _meta_shapes(m.model_dump_json())]


def _part(name: str) -> str | int:
    """Layer index for block parameters, else 'embedding' / 'head' (final norm and output)."""
    if name.startswith("layers."):
        return int(name.split(".")[1])
    return "embedding" if name.startswith("tok_embeddings") else "head"


def _local_numel(shape, tp_dim, tp: int, shard: int) -> int:
    dims = list(shape)
    if tp > 1 and tp_dim is not None:
        dims[tp_dim] //= tp
    if shard > 1:
        dims[0] = math.ceil(dims[0] / shard)  # FSDP2 pads dim 0 to a multiple of the shard count
    return math.prod(dims)


@functools.lru_cache(maxsize=256)
def _part_numel(model_json: str, tp: int, shard: int) -> dict:
    """{part: (local elements, tensor count)} for parts = layer indices, 'embedding', 'head'."""
    out: dict = {}
    for name, shape in _meta_shapes(model_json):
        n, c = out.get(_part(name), (0, 0))
        out[_part(name)] = (n + _local_numel(shape, _tp_dim(name), tp, shard), c + 1)
    return out


# ---------------------------------------------------------------------------------------------
# Pipeline stages


def stage_layers(m, layout: Layout) -> list[int]:
    """Layers per stage by the pipeline builder's own rule (parallel/pipeline.py)."""
    stages = layout.pp * layout.virtual
    if layout.pp_layers is not None and len(layout.pp_layers) == stages:
        return list(layout.pp_layers)
    return list(_split(m.model_dump_json(), stages))


@functools.lru_cache(maxsize=256)
def _split(model_json: str, stages: int) -> tuple[int, ...]:
    from lmforge.model.config import ModelConfig
    from lmforge.parallel.pipeline import end_costs, split_layers

    m = ModelConfig.model_validate_json(model_json)
    return tuple(split_layers(m.num_layers, stages, *end_costs(m)))


def rank_stages(layout: Layout, rank: int) -> list[int]:
    """Stage indices pipeline rank `rank` runs (looped, or V-shaped for zbv), as the builder does."""
    from lmforge.parallel.pipeline import stages_of_rank

    return stages_of_rank(layout.schedule, rank, layout.pp, layout.virtual)


def _head_flops(m) -> float:
    return 6.0 * m.vocab_size * m.hidden_size + 6.0 * m.hidden_size


def _layer_flops(m, seq_len: int) -> float:
    return _layer_flops_cached(m.model_dump_json(), seq_len)


@functools.lru_cache(maxsize=64)
def _layer_flops_cached(model_json: str, seq_len: int) -> float:
    from lmforge.model.config import ModelConfig

    m = ModelConfig.model_validate_json(model_json)
    return (flops_per_token(m, seq_len) - _head_flops(m)) / m.num_layers


# ---------------------------------------------------------------------------------------------
# Memory


def activation_bytes(model_cfg, seq_len: int, micro_batch: int, ac: str, s: int = 2, tp: int = 1) -> dict:
    """Saved-for-backward bytes of one micro batch through the whole model: {"saved", "recompute",
    "per_layer", "head"} (recompute: the block whose activations exist again in backward under
    full AC; per_layer / head: the parts per token, for pipeline stages)."""
    m = model_cfg
    h, heads = m.hidden_size, m.num_heads
    q = heads * m.resolved_head_dim
    width = resolve_intermediate_size(m) if m.moe is None else expert_intermediate_size(m)
    ffn_mult = 1 if m.moe is None else m.moe.top_k + m.moe.num_shared_experts  # tokens' expert passes
    kv = m.num_kv_heads * m.resolved_head_dim
    norm_local = 4 * h + 4 + (h * s if tp > 1 else 2 * h * s)
    gathered = h * s if tp > 1 else 0  # SP: the all-gathered input saved by the first matmul
    block = 2 * (norm_local / tp + gathered) + (4 * q * s + 4 * heads) / tp + ffn_mult * 4 * width * s / tp
    if ac == "full":
        per_layer = h * s / tp
    elif ac == "selective":
        matmuls = (q + 2 * kv) / tp + h + ffn_mult * 2 * width / tp + h
        per_layer = h * s / tp + matmuls * s + (q * s + 4 * heads) / tp
    else:
        per_layer = block
    head = norm_local / tp + gathered + 4 * m.vocab_size + 16
    tokens = micro_batch * seq_len
    return {
        "saved": int(tokens * (m.num_layers * per_layer + head)),
        "recompute": int(tokens * block) if ac == "full" else 0,
        "per_layer": per_layer,
        "head": head,
    }


def in_flight(layout: Layout, rank: int, micro_batches: int) -> float:
    """Micro batches' worth of this rank's layers whose activations are alive at its peak."""
    p, v, m = layout.pp, layout.virtual, micro_batches
    if p == 1:
        return 1.0
    if layout.schedule == "gpipe":
        return float(m)
    if layout.schedule == "1f1b":  # p - rank warm-up forwards, then one more before a backward
        return float(min(m, p - rank + 1))
    if layout.schedule == "zbv":
        return min(2 * m, 2 * p) / 2
    return min(m * v, 2 * (p - rank - 1) + (v - 1) * p + 1) / v


def bubble_fraction(layout: Layout, micro_batches: int) -> float:
    """Pipeline idle time over useful time."""
    p, v, m = layout.pp, layout.virtual, micro_batches
    if p == 1:
        return 0.0
    return {
        "gpipe": (p - 1) / m,
        "1f1b": (p - 1) / m,
        "interleaved_1f1b": (p - 1) / (v * m),
        "zero_bubble": (p - 1) / (3 * v * m),
        "zbv": (p - 1) / (6 * m),
    }[layout.schedule]


def rank_memory(cfg, layout: Layout, rank: int, loss_parallel: bool = False) -> dict[str, float]:
    """Bytes per GPU on pipeline rank `rank` by category, plus its FLOPs per token and P2P load."""
    m, seq, s = cfg.model, cfg.data.seq_len, layout.compute_bytes
    key = m.model_dump_json()
    shard = layout.dp_shard if layout.fsdp else 1
    parts, full = _part_numel(key, layout.tp, shard), _part_numel(key, layout.tp, 1)
    layers_per_stage = stage_layers(m, layout)
    stages = rank_stages(layout, rank)
    starts = [sum(layers_per_stage[:i]) for i in range(len(layers_per_stage) + 1)]
    layers = [i for st in stages for i in range(starts[st], starts[st + 1])]
    first, last = 0 in stages, len(layers_per_stage) - 1 in stages
    owned = (
        list(layers)
        + (["embedding"] if first or (last and m.tie_embeddings) else [])
        + (["head"] if last else [])
    )
    n_local = sum(parts[k][0] for k in owned)
    tensors = sum(parts[k][1] for k in owned)
    out = {"parameters": 4 * n_local, "gradients": 4 * n_local, "optimizer": 8 * n_local + 4 * tensors}
    micro = cfg.train.global_batch_size // (layout.micro_batch * layout.dp_size)
    tokens = layout.micro_batch * seq
    act = activation_bytes(m, seq, layout.micro_batch, layout.ac, s, layout.tp)
    flight = in_flight(layout, rank, micro)
    saved = tokens * len(layers) * act["per_layer"] * flight
    if last:
        saved += tokens * act["head"] * (micro if layout.schedule == "gpipe" and layout.pp > 1 else 1)
    out["activations"] = int(saved)
    temp = float(act["recompute"]) if layers else 0.0
    if last:
        temp += tokens * m.vocab_size * (s + 8) / (layout.tp if loss_parallel and layout.tp > 1 else 1)
    full_local = sum(full[k][0] for k in owned)
    block = max((full[i][0] for i in layers), default=0)
    if layout.fsdp and layout.pp > 1:
        # torch.distributed.pipelining keeps an FSDP stage unsharded through the step and
        # accumulates unsharded gradients until the last micro batch, then reduce-scatters block
        # by block through an fp32 buffer.
        temp += full_local * 2 * s + block * 4
    elif layout.fsdp:
        root = sum(full[k][0] for k in ("embedding", "head") if k in owned)
        temp += block * (3 * s + 4) + root * s
    elif layout.strategy == "ddp" and layout.dp_size > 1:
        temp += out["gradients"]
    if layout.pp > 1:
        # torch.distributed.pipelining allocates, at the first step, a receive buffer per micro
        # batch for every stage input (all stages but the first) and every output gradient (all
        # but the last), in the stage's activation dtype (fp32 unless FSDP casts parameters).
        n_bufs = sum((st != 0) + (st != len(layers_per_stage) - 1) for st in stages)
        act_bytes = s if layout.fsdp_wrapped else 4
        out["activations"] += int(micro * n_bufs * tokens * m.hidden_size * act_bytes / layout.tp)
    out["temporaries"] = int(temp + OVERHEAD)
    out["total"] = sum(out[k] for k in ("parameters", "gradients", "optimizer", "activations", "temporaries"))
    out["flops_per_token"] = len(layers) * _layer_flops(m, seq) + (_head_flops(m) if last else 0.0)
    out["layers"] = len(layers)
    out["params_local_tp"] = full_local
    return out


def state_bytes(model_cfg, layout: Layout) -> dict[str, int]:
    """Parameter, gradient and optimizer bytes of the whole model under TP and FSDP (no pipeline)."""
    parts = _part_numel(model_cfg.model_dump_json(), layout.tp, layout.dp_shard if layout.fsdp else 1)
    n_local, tensors = sum(n for n, _ in parts.values()), sum(c for _, c in parts.values())
    return {"parameters": 4 * n_local, "gradients": 4 * n_local, "optimizer": 8 * n_local + 4 * tensors}


# ---------------------------------------------------------------------------------------------
# Step time


def plan(cfg, layout: Layout, gpu: Accelerator | None = None, mfu: float = 0.4) -> dict:
    """Per-GPU bytes (of the pipeline rank that needs most) and per-step costs of `layout`."""
    gpu = gpu or find_accelerator(DEFAULT_GPU)
    m, seq, s = cfg.model, cfg.data.seq_len, layout.compute_bytes
    loss_parallel = bool(getattr(cfg.parallel, "loss_parallel", False))
    ranks = [rank_memory(cfg, layout, r, loss_parallel) for r in range(layout.pp)]
    worst = max(range(layout.pp), key=lambda r: ranks[r]["total"])
    out = {
        k: ranks[worst][k]
        for k in ("parameters", "gradients", "optimizer", "activations", "temporaries", "total")
    }
    out["stage_totals"] = [r["total"] for r in ranks]
    link, net = gpu.link_gbs * 1e9, NETWORK_GBS * 1e9
    dp, gb = layout.dp_size, cfg.train.global_batch_size
    micro_steps = gb // (layout.micro_batch * dp)
    tokens_per_dp = gb * seq / dp
    recompute = {"none": 1.0, "selective": 1.05, "full": 4 / 3}[layout.ac]
    bubble = bubble_fraction(layout, micro_steps)
    slowest = max(r["flops_per_token"] for r in ranks)
    compute = slowest * tokens_per_dp * recompute * (1 + bubble) / (mfu * gpu.bf16_tflops * 1e12 * layout.tp)
    heavy = max(ranks, key=lambda r: r["params_local_tp"])
    comm = 0.0
    if dp > 1:
        if layout.fsdp:
            volume = heavy["params_local_tp"] * ((s + 4) if layout.pp > 1 else micro_steps * (2 * s + 4))
        else:
            volume = heavy["params_local_tp"] * 4
        comm = volume * (dp - 1) / dp / (net if layout.tp * dp > gpu.per_node else link)
    tokens = layout.micro_batch * seq
    tp_time = 0.0
    if layout.tp > 1:
        busiest = max(r["layers"] for r in ranks)
        tp_time = micro_steps * busiest * 8 * tokens * m.hidden_size * s * (layout.tp - 1) / layout.tp / link
    p2p = 0.0
    if layout.pp > 1:
        per_boundary = 2 * tokens * m.hidden_size * s / layout.tp
        p2p = micro_steps * layout.virtual * per_boundary / (net if layout.tp * dp >= gpu.per_node else link)
    step = max(compute, comm) + tp_time + p2p
    out.update(
        compute_time_s=compute,
        dp_comm_time_s=comm,
        tp_comm_time_s=tp_time,
        pp_p2p_time_s=p2p,
        bubble=bubble,
        flops_per_step=flops_per_token(m, seq) * gb * seq,
        grad_accum_steps=micro_steps,
        step_time_s=step,
        tokens_per_s=gb * seq / step,
        params_total=count_params(m)["total"],
    )
    return out
