"""Activation checkpointing of transformer blocks, applied in place so parameter names stay
`layers.{i}...` (no wrapper module, no `_checkpoint_wrapped_module` prefix).

    full       every `ac_every`-th block keeps only its input; everything inside is recomputed
               in backward (about one extra forward of the block).
    selective  every block saves the outputs of its matrix multiplies and of attention and
               recomputes the cheap element-wise work (norms, RoPE, SiLU, products, residual adds);
               torch's selective-checkpoint policy, so it composes with compile and FSDP2.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_aten = torch.ops.aten
# Outputs of these ops are kept under selective checkpointing; everything else is recomputed.
_SAVE_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.linear.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}
for _name in ("_scaled_dot_product_flash_attention_for_cpu",):
    if hasattr(_aten, _name):
        _SAVE_OPS.add(getattr(_aten, _name).default)


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _checkpointed_forward(forward, selective: bool):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)  # eval / generation: nothing to save
        extra = {"context_fn": _selective_context} if selective else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    run.checkpoint_mode = "selective" if selective else "full"  # lets tests and tools see what is applied
    return run


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> None:
    """Checkpoint `model.layers` per `mode` ("none", "full", "selective")."""
    if mode == "none":
        return
    from lmforge.parallel.tensor_parallel import blocks_of

    for i, block in enumerate(blocks_of(model)):
        if mode == "full" and i % every:
            continue
        block.forward = _checkpointed_forward(block.forward, selective=mode == "selective")
