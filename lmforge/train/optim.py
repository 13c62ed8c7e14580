"""AdamW with weight decay on weight matrices only.

Decay is applied to parameters with two or more dimensions (linear weights, expert weights),
never to norms or biases, and to embedding tables only when `optim.decay_embeddings` is set.
Embeddings are recognised by their module type (nn.Embedding), so the trainer needs no knowledge
of the model's parameter names. A tied output head shares the embedding's Parameter and is
therefore treated like the embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import OptimConfig


def _embedding_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group (shared ones once)."""
    embeddings = _embedding_param_ids(model)
    decay, no_decay, seen = [], [], set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        is_embedding = id(param) in embeddings
        if param.ndim >= 2 and (not is_embedding or cfg.decay_embeddings):
            decay.append(param)
        else:
            no_decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": cfg.weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _implementation(model: nn.Module, choice: str) -> dict:
    """Fused kernels on CUDA, and on the CPU for plain (non-DTensor) parameters (torch >= 2.4:
    4.5x faster than foreach there); foreach works everywhere else."""
    if choice == "off":
        return {"foreach": False}
    if choice == "foreach":
        return {"foreach": True}
    params = list(model.parameters())
    on_cuda = all(p.is_cuda for p in params)
    plain_cpu = all(p.device.type == "cpu" and type(p) is nn.Parameter for p in params)
    if on_cuda or plain_cpu:
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        **_implementation(model, cfg.fused),
    )
