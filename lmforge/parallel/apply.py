"""Turn a plain `lmforge.model.Transformer` into the parallel model for `cfg.parallel`, in one place.
It takes the config sections it reads (model, parallel) and the two values it needs from others
(run.seed, data.seq_len), never the whole run config.

Order (each step needs the previous one): build on the meta device -> tensor parallel (DTensor
plans) -> activation checkpointing -> torch.compile per block -> FSDP2 `fully_shard` per block and
at the root -> materialise (`to_empty` + `init_weights`) -> DDP (which needs real weights).
Because sharding happens before materialisation, a 70B model never exists whole on one rank.

Initialisation rule: the weights equal
    torch.manual_seed(seed); m = Transformer on meta; m.to_empty(device); m.init_weights()
run in a forked RNG so the caller's random streams are untouched. For `single` and `ddp` that is
exact. For sharded parameters `init_weights` runs on the local shards: on CUDA DTensor's RNG
tracker gives every shard its own slice of one random stream; on CPU (no tracker) the seed is
offset by the shard's (dp_shard, tp) coordinate so shards differ while dp_replicate replicas stay
equal. Neither equals the unsharded init value for value, so parity tests (and anyone who needs a
bit-exact start) load a full state dict with `load_full_state_dict` instead.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lmforge.parallel.distributed import ParallelContext
from lmforge.parallel.pipeline import PipelineModel, build_pipeline_model
from lmforge.parallel.sharding import init_seed, init_weights_seeded, shard_module


def build_parallel_model(model_cfg, pcfg, ctx: ParallelContext, *, seed: int, seq_len: int) -> nn.Module:
    """The model `model_cfg` for training under `pcfg` (cfg.parallel), materialised on `ctx.device`
    and initialised from `seed` (cfg.run.seed); `seq_len` (data.seq_len) is what tensor parallel
    splits. With `parallel.pp > 1` it is this rank's `pipeline.PipelineModel` (its stages' layers)."""
    from lmforge.model import build

    shape = ctx.shape
    if shape.pp > 1:
        return build_pipeline_model(model_cfg, pcfg, ctx, seed=seed, seq_len=seq_len)
    model = build(model_cfg)
    offload = shard_module(model, pcfg, ctx, seq_len=seq_len)
    init_device = torch.device("cpu") if offload else ctx.device
    model.to_empty(device=init_device)
    init_weights_seeded(model, init_seed(seed, ctx), ctx.device)
    if offload:  # buffers (RoPE tables) are not FSDP-managed and are used on the GPU
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(ctx.device)
    if shape.strategy == "ddp" and ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(
            model, device_ids=ids, process_group=ctx.mesh["dp_replicate"].get_group()
        )
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool = True):
    """Skip DDP's gradient all-reduce inside the block when `enabled` is False (early micro-steps
    of gradient accumulation); the reduction of the last micro-step then covers all of them.
    FSDP2 reduce-scatters every micro-step instead: skipping it would keep every parameter's
    unsharded fp32 gradient until the last micro-step (4 bytes per parameter of the whole model
    per rank, 24.6 GiB for Llama2-7B, measured by the dry run), the memory FSDP exists to save;
    the extra reduce-scatters overlap the backward. (DDP holds full gradients either way.)"""
    from torch.nn.parallel import DistributedDataParallel

    if not enabled and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` and return the norm before clipping as a plain
    tensor; `max_norm <= 0` only measures. Sharded (DTensor) gradients are reduced across ranks.
    (A pipeline's norm covers all stages: its schedule's clip_grad_norm, pipeline_step.py.)"""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    # max_norm=inf makes the clip coefficient exactly 1.0, so the gradients are unchanged.
    limit = float(max_norm) if max_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Transformer inside DDP / torch.compile wrappers (FSDP2 and TP work in place, so a sharded
    model stays sharded: use `full_state_dict` to gather its weights)."""
    while True:
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def full_state_dict(model: nn.Module, cpu_offload: bool = True) -> dict[str, torch.Tensor]:
    """Unsharded model weights (collective: every rank must call it; with cpu_offload only rank 0
    receives the tensors, the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = unwrap_model(model)
    if isinstance(module, PipelineModel) and module.pp_group is not None:
        return _pipeline_full_state_dict(module, cpu_offload)
    if not _has_dtensor(module):
        return {k: v.detach().cpu() if cpu_offload else v.detach() for k, v in module.state_dict().items()}
    return get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    )


def _pipeline_full_state_dict(module: nn.Module, cpu_offload: bool) -> dict[str, torch.Tensor]:
    """Every stage's weights gathered (within the stage) and collected along the pipeline: the
    ranks of the pipeline group through global rank 0 exchange their stages on the CPU."""
    import torch.distributed as dist

    if _has_dtensor(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        own = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    else:
        own = module.state_dict()
    if cpu_offload and not module.feeds_rank0:
        return {}  # not in rank 0's pipeline group; only rank 0 receives with cpu_offload
    parts: list = [None] * dist.get_world_size(module.pp_group)
    dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in own.items()}, group=module.pp_group)
    if cpu_offload and not module.is_rank0:
        return {}
    merged = {k: v for part in parts for k, v in part.items()}
    device = next(module.parameters()).device
    return merged if cpu_offload else {k: v.to(device) for k, v in merged.items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], from_rank0: bool = False) -> None:
    """Load an unsharded state dict into a (possibly sharded) model. With from_rank0 only rank 0
    needs `state` and it is broadcast shard by shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    module = unwrap_model(model)
    if isinstance(module, PipelineModel):  # a pipeline rank holds only its stages' tensors
        own = module.state_dict().keys()
        state = {k: v for k, v in state.items() if k in own}
    if not _has_dtensor(module):
        module.load_state_dict(state)
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
    # set_model_state_dict replaces the dict's values with shards; keep the caller's dict intact.
    set_model_state_dict(module, dict(state), options=options)


def _has_dtensor(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())
