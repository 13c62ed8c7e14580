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
rank holding the full logits (vocab-parallel loss with `loss_parallel()` would avoid both).
Tied embeddings share the row-sharded table: the final norm's output is replicated, the logits
`F.linear(h, table)` come out vocab-sharded, and a forward hook on the root gathers them.
"""

from __future__ import annotations

from torch import nn

from lmforge.errors import ConfigError


def check_tp_divisibility(cfg, tp: int) -> None:
    m = cfg.model
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
        ("data.seq_len", cfg.data.seq_len),
    ]
    for key, value in checks:
        if value % tp:
            raise ConfigError(
                f"{key}: {value} is not divisible by parallel.tp {tp}; "
                "tensor parallelism splits it evenly across ranks, choose a tp that divides it"
            )


def _gather_logits(module, args, output):
    from torch.distributed.tensor import DTensor, Replicate

    logits = output.logits
    if isinstance(logits, DTensor):
        logits = logits.redistribute(placements=[Replicate()]).to_local()
        return output._replace(logits=logits)
    return output


def apply_tensor_parallel(model: nn.Module, tp_mesh, cfg) -> None:
    """Shard `model` (on any device, meta included) over the 1-D `tp_mesh` in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    check_tp_divisibility(cfg, tp_mesh.size())
    tied = model.output is None
    top = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
    }
    if tied:
        # Logits are F.linear(h, tok_embeddings.weight) in the model's forward: a replicated h
        # times the vocab-sharded table gives vocab-sharded logits with no communication.
        parallelize_module(model, tp_mesh, top)
        parallelize_module(
            model.norm,
            tp_mesh,
            PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False
            ),
        )
        model.register_forward_hook(_gather_logits)
    else:
        top["output"] = ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Replicate(), use_local_output=True
        )
        parallelize_module(model, tp_mesh, top)

    none = (None, None, None, None)  # cos, sin, kv_cache, start_pos pass through untouched
    for block in model.layers:
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
