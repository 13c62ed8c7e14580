"""Memory and throughput planner: what one GPU holds for a layout, and the smallest layout that fits.

Accounting (bytes per GPU; N_local = this rank's parameter elements after TP and FSDP sharding,
FSDP2 pads dim 0 of each shard up to a multiple of dp_shard):
  parameters   4 * N_local. Parameters stay fp32 in every layout: under FSDP2 mixed precision the
               sharded fp32 parameter *is* the master copy, and bf16 copies exist only while a
               block is all-gathered (counted in temporaries); single/DDP use autocast.
  gradients    4 * N_local (fp32: FSDP2 reduces in reduce_dtype fp32 into the fp32 shard).
  optimizer    AdamW exp_avg + exp_avg_sq in fp32, 8 * N_local, plus a 4-byte `step` per tensor.
  activations  saved for backward, per token of the micro batch (s = compute dtype bytes):
                 block, no AC  2 * norm + 4*q_dim*s + 4*heads + 4*I*s
                     norm = 4*h (fp32 input copy) + 4 (rsqrt) + 2*h*s (normalised, weighted)
                     attention saves q, k, v expanded to all heads and its output (flash-style
                     SDPA: no T x T matrix) plus fp32 log-sum-exp; SwiGLU saves w1, w3, silu,
                     product (4*I). RoPE saves nothing (its tables need no grad).
                 block, full AC  h*s (the block input), plus one block recomputed in backward
                 selective AC    h*s input + outputs of every matmul (q, k, v, wo, w1, w3, w2) and
                                 attention (q_dim*s + 4*heads)
                 outside blocks  final norm + 4*V (fp32 log-softmax) + 16 (input ids, targets)
               With TP (sequence parallel) the norms, heads and FFN columns divide by tp, but the
               all-gathered inputs of attention and FFN (2*h*s) and the logits are full size.
               This matches Korthikanti et al. (2022) with flash attention (no 5*a*s/h term).
  temporaries  logits: B*T*V*(s + 8) (model logits, their fp32 copy and fp32 gradient);
               FSDP: two all-gathered blocks in param dtype + one block's unsharded gradient
               (param dtype) + its fp32 reduce-scatter buffer; the root's embedding/output
               gathered; DDP: gradient buckets (4 * N); 2 GiB for CUDA context, NCCL, fragmentation.
Step time = max(compute, FSDP traffic) + TP traffic. Compute = FLOPs per step / (MFU * peak *
GPUs), with full AC adding a forward (x 4/3) and selective AC ~5%: the MFU you state is the
utilisation of the hardware on model FLOPs without recomputation. FSDP moves each micro-step
(2*s + 4) bytes per local-to-TP parameter (all-gather forward and backward, fp32 reduce-scatter)
and overlaps with compute; TP moves 8 * tokens * h * s bytes per layer and micro-step (two
all-gathers and two reduce-scatters each way) on NVLink and is not overlapped. Bandwidths: 300 GB/s
inside a node, 45 GB/s per GPU between nodes. Layouts are ranked by this step time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lmforge.model.flops import count_params, flops_per_token
from lmforge.model.layers import resolve_intermediate_size

GIB = 1024**3
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM (also H200); A100 is 312
NVLINK_BYTES_S = 300e9  # achievable per-GPU collective bandwidth inside an H100 node (NVLink 4)
NETWORK_BYTES_S = 45e9  # between nodes: one 400 Gb/s InfiniBand NIC per GPU
GPUS_PER_NODE = 8
OVERHEAD = 2 * GIB
AC_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    strategy: str = "single"  # single, ddp, fsdp, hsdp, fsdp+tp
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ac: str = "none"
    micro_batch: int = 1
    compute_bytes: int = 2  # 2 for bf16/fp16 compute, 4 for fp32

    @property
    def gpus(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def fsdp(self) -> bool:
        return self.strategy in ("fsdp", "hsdp", "fsdp+tp")

    def describe(self) -> str:
        parts = [self.strategy]
        if self.dp_replicate > 1:
            parts.append(f"rep{self.dp_replicate}")
        if self.fsdp:
            parts.append(f"shard{self.dp_shard}")
        if self.tp > 1:
            parts.append(f"tp{self.tp}")
        return f"{' '.join(parts)}, AC {self.ac}, micro batch {self.micro_batch}"


def param_shapes(m) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(name, shape, tensor-parallel dim) of every parameter of Transformer(m), without building it.
    TP dim 0 = column-wise (or vocab rows), 1 = row-wise, None = replicated."""
    h, hd = m.hidden_size, m.resolved_head_dim
    q, kv = m.num_heads * hd, m.num_kv_heads * hd
    out = [("tok_embeddings.weight", (m.vocab_size, h), 0)]

    def linear(name, n_in, n_out, dim, bias):
        out.append((f"{name}.weight", (n_out, n_in), dim))
        if bias:
            out.append((f"{name}.bias", (n_out,), 0 if dim == 0 else None))

    def ffn(prefix, width):
        linear(f"{prefix}.w1", h, width, 0, m.mlp_bias)
        linear(f"{prefix}.w2", width, h, 1, m.mlp_bias)
        linear(f"{prefix}.w3", h, width, 0, m.mlp_bias)

    for i in range(m.num_layers):
        p = f"layers.{i}"
        out.append((f"{p}.attention_norm.weight", (h,), None))
        for name, n_out in (("wq", q), ("wk", kv), ("wv", kv)):
            linear(f"{p}.attention.{name}", h, n_out, 0, m.attention_bias)
        linear(f"{p}.attention.wo", q, h, 1, m.attention_bias)
        if m.qk_norm:
            out += [
                (f"{p}.attention.q_norm.weight", (hd,), None),
                (f"{p}.attention.k_norm.weight", (hd,), None),
            ]
        out.append((f"{p}.ffn_norm.weight", (h,), None))
        if m.moe is None:
            ffn(f"{p}.feed_forward", resolve_intermediate_size(m))
        else:
            width = m.moe.expert_intermediate_size or resolve_intermediate_size(m)
            out.append((f"{p}.feed_forward.router.weight", (m.moe.num_experts, h), None))
            for e in range(m.moe.num_experts):
                ffn(f"{p}.feed_forward.experts.{e}", width)
            for s in range(m.moe.num_shared_experts):
                ffn(f"{p}.feed_forward.shared_experts.{s}", width)
    out.append(("norm.weight", (h,), None))
    if not m.tie_embeddings:
        out.append(("output.weight", (m.vocab_size, h), 0))
    return out


def _local_numel(shape, tp_dim, tp: int, shard: int) -> int:
    dims = list(shape)
    if tp > 1 and tp_dim is not None:
        dims[tp_dim] //= tp
    if shard > 1:
        dims[0] = math.ceil(dims[0] / shard)  # FSDP2 pads dim 0 to a multiple of the shard count
    return math.prod(dims)


def state_bytes(model_cfg, layout: Layout) -> dict[str, int]:
    shapes = param_shapes(model_cfg)
    shard = layout.dp_shard if layout.fsdp else 1
    n_local = sum(_local_numel(s, d, layout.tp, shard) for _, s, d in shapes)
    return {"parameters": 4 * n_local, "gradients": 4 * n_local, "optimizer": 8 * n_local + 4 * len(shapes)}


def activation_bytes(
    model_cfg, seq_len: int, micro_batch: int, ac: str, s: int = 2, tp: int = 1
) -> dict[str, int]:
    """Saved-for-backward bytes of one micro batch: {"saved", "recompute"} (recompute: the one block
    whose activations exist again during backward under full AC)."""
    m = model_cfg
    h, heads = m.hidden_size, m.num_heads
    q = heads * m.resolved_head_dim
    width = (
        resolve_intermediate_size(m)
        if m.moe is None
        else (m.moe.expert_intermediate_size or resolve_intermediate_size(m))
    )
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
    outside = norm_local / tp + gathered + 4 * m.vocab_size + 16
    tokens = micro_batch * seq_len
    saved = int(tokens * (m.num_layers * per_layer + outside))
    recompute = int(tokens * block) if ac == "full" else 0
    return {"saved": saved, "recompute": recompute}


def plan(cfg, layout: Layout, peak_tflops: float = H100_BF16_TFLOPS, mfu: float = 0.4) -> dict:
    """Per-GPU bytes and per-step costs of training cfg's model under `layout`."""
    m, seq, s = cfg.model, cfg.data.seq_len, layout.compute_bytes
    out = state_bytes(m, layout)
    act = activation_bytes(m, seq, layout.micro_batch, layout.ac, s, layout.tp)
    out["activations"] = act["saved"]
    out["activations_no_ac"] = activation_bytes(m, seq, layout.micro_batch, "none", s, layout.tp)["saved"]
    tokens = layout.micro_batch * seq
    temp = tokens * m.vocab_size * (s + 8) + act["recompute"]
    shapes = param_shapes(m)
    if layout.fsdp:
        block = sum(_local_numel(sh, d, layout.tp, 1) for n, sh, d in shapes if n.startswith("layers.0."))
        root = sum(_local_numel(sh, d, layout.tp, 1) for n, sh, d in shapes if not n.startswith("layers."))
        temp += block * (3 * s + 4) + root * s
    elif layout.strategy == "ddp":
        temp += out["gradients"]
    out["temporaries"] = temp + OVERHEAD
    out["total"] = sum(out[k] for k in ("parameters", "gradients", "optimizer", "activations", "temporaries"))
    dp = layout.dp_replicate * layout.dp_shard
    global_batch = cfg.train.global_batch_size
    step_flops = flops_per_token(m, seq) * global_batch * seq
    recompute = {"none": 1.0, "selective": 1.05, "full": 4 / 3}[layout.ac]
    compute_time = step_flops * recompute / (mfu * peak_tflops * 1e12 * layout.gpus)
    micro_steps = global_batch // (layout.micro_batch * dp)
    comm = 0.0
    if dp > 1:
        tp_local = sum(_local_numel(sh, d, layout.tp, 1) for _, sh, d in shapes)
        per_micro = (2 * s + 4) if layout.fsdp else 4 / micro_steps  # DDP all-reduces once per step
        volume = micro_steps * tp_local * per_micro * (dp - 1) / dp  # ring collectives, bytes sent per GPU
        bandwidth = NETWORK_BYTES_S if layout.gpus > GPUS_PER_NODE else NVLINK_BYTES_S
        comm = volume / bandwidth
    tp_time = 0.0
    if layout.tp > 1:
        tp_bytes = 8 * tokens * m.hidden_size * s * (layout.tp - 1) / layout.tp
        tp_time = micro_steps * m.num_layers * tp_bytes / NVLINK_BYTES_S
    step_time = max(compute_time, comm) + tp_time
    out.update(
        compute_time_s=compute_time,
        dp_comm_time_s=comm,
        tp_comm_time_s=tp_time,
        flops_per_step=step_flops,
        grad_accum_steps=global_batch // (layout.micro_batch * dp),
        step_time_s=step_time,
        tokens_per_s=global_batch * seq / step_time,
        params_total=count_params(m)["total"],
    )
    return out


def _compute_bytes(cfg) -> int:
    return 4 if cfg.parallel.param_dtype == "float32" else 2


def candidate_layouts(cfg, gpus: int) -> list[Layout]:
    """Cheapest first: DDP before FSDP, smaller TP (less communication per layer), less recomputation,
    larger micro batches. TP stays within an 8-GPU node."""
    s = _compute_bytes(cfg)
    m, seq, gb = cfg.model, cfg.data.seq_len, cfg.train.global_batch_size
    shapes: list[Layout] = []
    if gpus == 1:
        shapes.append(Layout("single"))
    else:
        shapes.append(Layout("ddp", dp_replicate=gpus))
        shapes.append(Layout("fsdp", dp_shard=gpus))
    for tp in (2, 4, 8):
        ok = gpus % tp == 0 and gpus >= tp and m.moe is None
        ok = ok and all(v % tp == 0 for v in (m.num_heads, m.num_kv_heads, m.vocab_size, seq))
        if ok:
            shapes.append(Layout("fsdp+tp", dp_shard=gpus // tp, tp=tp))
    out = []
    for base in shapes:
        dp = base.dp_replicate * base.dp_shard
        if gb % dp:
            continue
        per_rank = gb // dp
        micro = [b for b in (per_rank, 16, 8, 4, 2, 1) if b <= per_rank and per_rank % b == 0]
        for ac in AC_MODES:
            for b in dict.fromkeys(micro):
                out.append(replace(base, ac=ac, micro_batch=b, compute_bytes=s))
    return out


def recommend(cfg, gpus: int, gpu_memory_gib: float = 80, mfu: float = 0.4) -> tuple[Layout | None, list]:
    rows = [(lay, plan(cfg, lay, mfu=mfu)) for lay in candidate_layouts(cfg, gpus)]
    limit = gpu_memory_gib * GIB
    fitting = [(p["step_time_s"], i) for i, (lay, p) in enumerate(rows) if p["total"] <= limit]
    best = rows[min(fitting)[1]][0] if fitting else None
    return best, rows


def _gib(x: float) -> str:
    return f"{x / GIB:7.1f}"


def _groups(rows, limit):
    """(strategy, tp, AC) groups in cheapest-first order, each with its largest fitting micro batch
    (or, when none fits, its smallest micro batch) and whether it fits."""
    groups: dict[tuple, list] = {}
    for lay, p in rows:
        groups.setdefault((lay.strategy, lay.tp, lay.ac), []).append((lay, p))
    out = []
    for members in groups.values():
        fitting = [(lay, p) for lay, p in members if p["total"] <= limit]
        lay, p = fitting[0] if fitting else members[-1]
        out.append((lay, p, bool(fitting)))
    return out


def plan_report(cfg, gpus: int, gpu_memory_gib: float = 80, mfu: float = 0.4) -> str:
    """Human-readable plan: one row per layout, the recommendation, and why the cheaper ones fail."""
    from lmforge.errors import ConfigError

    if gpus < 1 or gpu_memory_gib <= 0 or not 0 < mfu <= 1:
        raise ConfigError(
            f"plan: --gpus {gpus}, --gpu-memory {gpu_memory_gib}, --mfu {mfu}; need gpus >= 1, memory > 0, 0 < mfu <= 1"
        )
    best, rows = recommend(cfg, gpus, gpu_memory_gib, mfu)
    if not rows:
        raise ConfigError(
            f"train.global_batch_size: {cfg.train.global_batch_size} is not divisible by any data-parallel size "
            f"possible on {gpus} GPUs; choose a global batch that is a multiple of the GPU count"
        )
    m, limit = cfg.model, gpu_memory_gib * GIB
    lines = [
        f"model: {m.preset or 'custom'} {count_params(m)['total'] / 1e9:.2f}B params, seq {cfg.data.seq_len}, "
        f"global batch {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens; "
        f"{gpus} GPU(s) x {gpu_memory_gib:g} GiB",
        f"FLOPs/token {flops_per_token(m, cfg.data.seq_len):.3e}; peak {H100_BF16_TFLOPS:g} TFLOP/s bf16 "
        f"per GPU (H100), MFU {mfu:g}",
        "",
        f"{'layout':<48}{'params':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'temp':>8}{'total':>8}"
        f"{'step s':>8}  (GiB per GPU)",
    ]
    keys = ("parameters", "gradients", "optimizer", "activations", "temporaries", "total")
    groups = _groups(rows, limit)
    for lay, p, fits in groups:
        vals = "".join(_gib(p[k]).rjust(8) for k in keys) + f"{p['step_time_s']:8.1f}"
        lines.append(f"{lay.describe():<48}{vals}  {'fits' if fits else 'too big'}")
    lines.append("")
    if best is None:
        lines.append(
            f"nothing fits in {gpu_memory_gib:g} GiB per GPU on {gpus} GPU(s): add GPUs, or offload "
            "parameters and optimizer states to the CPU (parallel.cpu_offload=true, much slower)"
        )
        return "\n".join(lines)
    p = plan(cfg, best, mfu=mfu)
    lines.append(f"recommended: {best.describe()}, grad_accum_steps {p['grad_accum_steps']}")
    lines.append(
        f"  {_gib(p['total']).strip()} GiB per GPU; {p['flops_per_step']:.3e} FLOPs/step; step "
        f"{p['step_time_s']:.2f} s; {p['tokens_per_s']:,.0f} tokens/s ({p['tokens_per_s'] / gpus:,.0f} per GPU)"
    )
    lines.append(
        f"  compute {p['compute_time_s']:.1f} s, data-parallel traffic {p['dp_comm_time_s']:.1f} s (overlapped), "
        f"tensor-parallel traffic {p['tp_comm_time_s']:.1f} s"
    )
    for lay, q, fits in groups:
        if (lay.strategy, lay.tp, lay.ac) == (best.strategy, best.tp, best.ac):
            continue
        if fits:
            why = f"fits ({_gib(q['total']).strip()} GiB) but its step takes {q['step_time_s']:.1f} s"
        else:
            why = f"needs {_gib(q['total']).strip()} GiB > {gpu_memory_gib:g} even at micro batch {lay.micro_batch}"
        lines.append(f"  not {lay.strategy} tp{lay.tp} AC {lay.ac}: {why}")
    return "\n".join(lines)
