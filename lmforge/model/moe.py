"""Mixture-of-experts feed-forward: softmax router, top-k routing, optional shared experts and the
Switch/MiniMind load-balancing loss.

Dispatch sorts the token-to-expert assignments by expert and runs each expert once on its
gathered tokens, so nothing loops over tokens in Python. Every expert runs even when it got no
tokens (on an empty batch), so each step touches every parameter and DDP needs no
find_unused_parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import FeedForward, init_linear, resolve_intermediate_size


def expert_intermediate_size(cfg: ModelConfig) -> int:
    """Width of each routed and shared expert: moe.expert_intermediate_size, else the dense rule."""
    assert cfg.moe is not None
    return cfg.moe.expert_intermediate_size or resolve_intermediate_size(cfg)


def load_balancing_loss(
    probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, coef: float
) -> torch.Tensor:
    """coef * E * sum_i P_i * f_i over the tokens of a batch (Switch Transformer, MiniMind).

    probs [N, E]: router softmax per token; topk_idx [N, k]: chosen experts.
    P_i = mean router probability of expert i; f_i = share of the N*k assignments that went to
    expert i. Exactly uniform routing (P_i = f_i = 1/E) gives coef, the balanced value the loss
    pulls toward; sending more tokens and probability to fewer experts raises it (all on one
    expert: coef * E). Gradients flow through P only (f is a count).
    """
    counts = torch.zeros(num_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, topk_idx.reshape(-1), torch.ones(topk_idx.numel(), device=probs.device))
    fraction = counts / topk_idx.numel()
    mean_prob = probs.float().mean(dim=0)
    return coef * num_experts * (mean_prob * fraction).sum()


class MoEFeedForward(nn.Module):
    """router -> softmax over experts -> top-k (optionally renormalised) -> weighted sum of the
    chosen SwiGLU experts, plus the unweighted sum of the shared experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.moe is not None
        moe = cfg.moe
        width = expert_intermediate_size(cfg)
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.norm_topk_prob = moe.norm_topk_prob
        self.aux_loss_coef = moe.aux_loss_coef
        self.router = nn.Linear(cfg.hidden_size, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(cfg.hidden_size, width, cfg.mlp_bias) for _ in range(moe.num_experts)
        )
        self.shared_experts = nn.ModuleList(
            FeedForward(cfg.hidden_size, width, cfg.mlp_bias) for _ in range(moe.num_shared_experts)
        )
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def reset_parameters(self, std: float, residual_std: float) -> None:
        init_linear(self.router, std)
        for expert in (*self.experts, *self.shared_experts):
            expert.reset_parameters(std, residual_std)

    def route(self, x_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (probs [N, E] fp32, weights [N, k] in x's dtype, expert ids [N, k])."""
        probs = torch.softmax(self.router(x_flat).float(), dim=-1)
        weights, idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights.to(x_flat.dtype), idx

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        probs, weights, idx = self.route(x_flat)

        flat_idx = idx.reshape(-1)  # assignment a belongs to token a // k
        order = torch.argsort(flat_idx, stable=True)
        token_of = order // self.top_k
        weight_of = weights.reshape(-1)[order]
        counts = torch.bincount(flat_idx, minlength=self.num_experts).tolist()

        out = torch.zeros_like(x_flat)
        start = 0
        for expert, count in zip(self.experts, counts):
            tokens = token_of[start : start + count]
            y = expert(x_flat[tokens]) * weight_of[start : start + count, None]
            out.index_add_(0, tokens, y)
            start += count
        for shared in self.shared_experts:
            out = out + shared(x_flat)

        aux = load_balancing_loss(probs, idx, self.num_experts, self.aux_loss_coef)
        return self.dropout(out.view(shape)), aux
