"""Sharding one module in place (tensor parallel, activation checkpointing, compile per block, FSDP2)
and the seeded initialisation rule, shared by the whole-model path (`apply`) and the pipeline stages
(`pipeline`). Kept apart from both so neither imports the other.

Initialisation rule: see `apply`'s module docstring; `init_seed` offsets the seed per shard on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.parallel.activation import apply_activation_checkpointing
from lmforge.parallel.distributed import ParallelContext
from lmforge.weights.dtypes import DTYPES as _DTYPES  # the one dtype table


def init_seed(seed: int, ctx: ParallelContext) -> int:
    shape = ctx.shape
    if ctx.device.type == "cuda" or not (shape.uses_fsdp or shape.tp > 1):
        return seed
    shard_index = (ctx.rank // shape.tp) % shape.dp_shard  # position along dp_shard, same for replicas
    return seed + 1_000_003 * (shard_index * shape.tp + ctx.tp_rank)


def init_weights_seeded(model: nn.Module, seed: int, device: torch.device) -> None:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.no_grad():
            model.init_weights()


def shard_module(
    model: nn.Module, pcfg, ctx: ParallelContext, *, seq_len: int, local_logits: bool = False
) -> bool:
    """TP -> AC -> compile per block -> FSDP2 on a meta model or pipeline stage, in place, for
    `pcfg` (cfg.parallel); `seq_len` (data.seq_len) is what sequence parallel splits. Returns
    whether parameters are offloaded to host memory."""
    from lmforge.parallel.tensor_parallel import blocks_of

    shape = ctx.shape
    if shape.tp > 1:
        from lmforge.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(
            model,
            ctx.mesh["tp"],
            seq_len=seq_len,
            loss_parallel=pcfg.loss_parallel,
            local_logits=local_logits,
        )
    apply_activation_checkpointing(model, pcfg.activation_checkpoint, pcfg.ac_every)
    if pcfg.compile:
        from lmforge.parallel.compile import apply_compile

        apply_compile(model, blocks_of(model), pcfg.compile_mode)
    if pcfg.cpu_offload and not shape.uses_fsdp:
        raise ConfigError(
            f"parallel.cpu_offload: offloading needs FSDP sharding (strategy is {shape.strategy}); "
            "use parallel.strategy=fsdp or turn cpu_offload off"
        )
    # CPU offload keeps sharded parameters (and so their init) in host memory; on a CPU device they
    # are there already, and FSDP2's pinned-memory offload needs an accelerator, so it is skipped.
    offload = pcfg.cpu_offload and ctx.device.type == "cuda"
    if shape.fsdp_wrapped:
        # Under a pipeline, DDP too: FSDP2 on the (dp_replicate, dp_shard=1) mesh is replication
        # with a gradient all-reduce, which the pipeline schedules drive correctly.
        apply_fsdp(model, ctx, pcfg, offload)
    return offload


def fsdp_param_dtype(pcfg, device: torch.device) -> torch.dtype:
    """FSDP2 compute dtype of the parameters. On CPU it is always fp32: gloo and the CPU kernels are
    for tests, which compare against an fp32 single-process run; bf16 is for GPUs."""
    return _DTYPES[pcfg.param_dtype] if device.type == "cuda" else torch.float32


def apply_fsdp(model: nn.Module, ctx: ParallelContext, pcfg, offload: bool = False) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    shape = ctx.shape
    mesh = ctx.mesh["dp_replicate", "dp_shard"] if shape.dp_replicate > 1 else ctx.mesh["dp_shard"]
    reduce_dtype = _DTYPES[pcfg.reduce_dtype] if ctx.precision_device.type == "cuda" else torch.float32
    kwargs = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=fsdp_param_dtype(pcfg, ctx.precision_device), reduce_dtype=reduce_dtype
        ),
    }
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    from lmforge.parallel.tensor_parallel import blocks_of

    blocks = blocks_of(model)
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at the start of backward; keeping them
        # gathered saves one all-gather per step.
        fully_shard(block, reshard_after_forward=i < last, **kwargs)
    fully_shard(model, **kwargs)
