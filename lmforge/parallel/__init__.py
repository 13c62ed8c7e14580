"""Distributed training support: process groups and the device mesh from torchrun's environment,
and DDP / FSDP2 / tensor parallel / activation checkpointing / compile applied to a plain model.

See docs/internals.md (Parallel) for the contract; `plan.py` is the memory and throughput planner.
"""

from lmforge.parallel.apply import (
    build_parallel_model,
    clip_grad_norm,
    full_state_dict,
    grad_sync,
    load_full_state_dict,
    unwrap_model,
)
from lmforge.parallel.distributed import LaunchEnv, ParallelContext, init_distributed, launch_env
from lmforge.parallel.mesh import MeshShape, resolve_mesh_shape
from lmforge.parallel.tensor_parallel import loss_parallel_context, plain

__all__ = [
    "LaunchEnv",
    "MeshShape",
    "ParallelContext",
    "build_parallel_model",
    "clip_grad_norm",
    "full_state_dict",
    "grad_sync",
    "init_distributed",
    "launch_env",
    "load_full_state_dict",
    "loss_parallel_context",
    "plain",
    "resolve_mesh_shape",
    "unwrap_model",
]
