"""Tensor parallel (Megatron-style, with sequence parallelism) through DTensor `parallelize_module`.

Between blocks the residual stream is a local tensor holding this rank's slice of the sequence,
[B, T/tp, hidden]. Per block:
    attention_norm, ffn_norm   SequenceParallel (norm on the local sequence slice)
    attention, feed_forward    input all-gathered to the full sequence (Replicate)
    wq, wk, wv, w1, w3         column-wise: each rank computes its own heads / FFN columns
    wo, w2                     row-wise, output reduce-scattered back to sequence shards
    q_norm, k_norm (qk_norm)   per-head norm on local heads, weight replicated
The attention module infers head counts from its projected tensors, so it runs on local heads
(num_heads/tp query heads, num_kv_heads/tp key/value heads) unchanged.

Ends: tok_embeddings is row-wise (vocab-parallel: each rank looks up its vocab slice, partial
sums are reduce-scattered to sequence shards); the final norm is sequence parallel; the output
projection is column-wise over the vocabulary and its logits are all-gathered to a full
[B, T, vocab] tensor on every rank (Replicate). So the trainer computes its ordinary loss on plain
logits and needs no change; the price is one all-gather of B*T*V logits per micro-step and every
rank holding the full logits. `parallel.loss_parallel` avoids both: the logits stay sharded over
the vocabulary (a DTensor `Shard(-1)`, or this rank's local slice for a pipeline stage) and the
cross-entropy runs under torch's `loss_parallel()` (see `loss_context`), which only exchanges
[B, T] statistics (max, sum of exponentials, target logit).
Tied embeddings share the row-sharded table: the final norm's output is replicated, the logits
`F.linear(h, table)` come out vocab-sharded, and a forward hook on the root gathers them.

The same plan applies to a pipeline stage module (`pipeline.py`), which holds only some of
`tok_embeddings`, `layers`, `norm` and `output`; the residual stream between stages is the local
sequence slice, so stages exchange [B, T/tp, hidden] tensors.
"""

from __future__ import annotations

import contextlib

from torch import nn

from lmforge.errors import ConfigError


def check_tp_divisibility(model_cfg, seq_len: int, tp: int) -> None:
    m = model_cfg
    if m.moe is not None:
        raise ConfigError(
            f"parallel.tp: {tp} is not supported for MoE models (model.moe is set); "
            "use parallel.strategy=fsdp or hsdp"
        )
    from lmforge.model import resolve_intermediate_size

    checks = [
        ("model.num_heads", m.num_heads),
        ("model.num_kv_heads", m.num_kv_heads),
        ("model.vocab_size", m.vocab_size),
        ("model.intermediate_size", resolve_intermediate_size(m)),
        ("data.seq_len", seq_len),
    ]
    for key, value in checks:
        if value % tp:
            raise ConfigError(
                f"{key}: {value} is not divisible by parallel.tp {tp}; "
                "tensor parallelism splits it evenly across ranks, choose a tp that divides it"
            )


def _gather_logits(module, args, output):
    from torch.distributed.tensor import DTensor, Replicate

    logits = output if isinstance(output, DTensor) else getattr(output, "logits", None)
    if isinstance(logits, DTensor):
        logits = logits.redistribute(placements=[Replicate()]).to_local()
        return logits if isinstance(output, DTensor) else output._replace(logits=logits)
    return output


def _local_logits(module, args, output):
    from torch.distributed.tensor import DTensor

    logits = getattr(output, "logits", None)
    if isinstance(logits, DTensor):
        return output._replace(logits=logits.to_local())
    return output


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a model (ModuleList) or pipeline stage (ModuleDict by layer id)."""
    layers = model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def loss_parallel_context(model: nn.Module):
    """The context a training or validation loss (forward and backward) of `model` runs in:
    torch's vocab-parallel cross-entropy when its logits are vocab-sharded DTensors, else nothing."""
    return loss_context(bool(getattr(model, "vocab_parallel_logits", False)))


def plain(t):
    """A replicated DTensor loss as a plain tensor (differentiable); other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def loss_context(enabled: bool):
    """torch's vocab-parallel cross-entropy for DTensor logits sharded on the vocabulary; the
    forward AND backward of the loss must run inside it."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def apply_tensor_parallel(
    model: nn.Module, tp_mesh, *, seq_len: int, loss_parallel: bool = False, local_logits: bool = False
) -> None:
    """Shard `model` (on any device, meta included) over the 1-D `tp_mesh` in place, for sequences
    of `seq_len` tokens. With `loss_parallel` (parallel.loss_parallel) the logits stay vocab-sharded:
    a DTensor, or with `local_logits` this rank's plain [B, T, V/tp] slice (what a pipeline stage
    hands its loss function)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    check_tp_divisibility(model.cfg, seq_len, tp_mesh.size())
    vocab_parallel = bool(loss_parallel)
    model.vocab_parallel_logits = vocab_parallel and not local_logits
    model.seq_shards = tp_mesh.size()  # a pipeline stage receives [B, T/tp, hidden] (sequence parallel)
    has = {name: getattr(model, name, None) is not None for name in ("tok_embeddings", "norm", "output")}
    tied = not has["output"] and model.cfg.tie_embeddings
    top = {}
    if has["tok_embeddings"]:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if has["norm"]:
        top["norm"] = SequenceParallel()
    if has["output"]:
        logits_layout = Shard(-1) if vocab_parallel else Replicate()
        top["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=logits_layout,
            use_local_output=local_logits or not vocab_parallel,
        )
    if top:
        parallelize_module(model, tp_mesh, top)
    if tied and has["norm"]:
        # Logits are F.linear(h, tok_embeddings.weight) in the model's forward: a replicated h
        # times the vocab-sharded table gives vocab-sharded logits with no communication.
        parallelize_module(
            model.norm,
            tp_mesh,
            PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False
            ),
        )
        if not vocab_parallel:
            model.register_forward_hook(_gather_logits)
        elif local_logits:
            model.register_forward_hook(_local_logits)

    none = (None, None, None, None)  # cos, sin, kv_cache, start_pos pass through untouched
    for block in blocks_of(model):
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), *none), desired_input_layouts=(Replicate(), *none)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        }
        if block.attention.q_norm is not None:
            # q/k are local [B, T, heads/tp, head_dim]: dim 2 is the sharded one.
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
