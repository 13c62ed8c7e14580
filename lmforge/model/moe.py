"""Mixture-of-experts feed-forward: softmax router, top-k routing, optional shared experts and the
Switch/MiniMind load-balancing loss.

Dispatch sorts the token-to-expert assignments by expert and multiplies each expert's rows by
its weights without ever reading the per-expert counts on the host (no sync per layer, one
static-shape graph for torch.compile), dropless (no capacity): on CUDA with bf16 and
`torch._grouped_mm` one grouped GEMM per projection; on other accelerators and under
torch.compile `tiled_expert_matmul`, a batched fallback over fixed-size row tiles. Eager on the
CPU the counts are read on the host and each expert runs on its own rows (`DISPATCH = "auto"`):
there is no device to wait for there, and the tiled fallback's per-tile weight copies make it
~1.7x slower at minimind2-moe shapes (bench/moe_step.py). Every expert's weights take part in each
step (zero gradients when it got no tokens), so DDP needs no find_unused_parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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

    def stacked_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
        """(w1 [E, I, H], w3 [E, I, H], w2 [E, H, I], and the biases [E, out] or None)."""

        def stack(tensors):  # cast each expert's tensor first: no full-size copy in the stored dtype
            return torch.stack([t if dtype is None else t.to(dtype) for t in tensors])

        parts = []
        for name in ("w1", "w3", "w2"):
            weight = stack([getattr(e, name).weight for e in self.experts])
            bias = getattr(self.experts[0], name).bias
            if bias is not None:
                bias = stack([getattr(e, name).bias for e in self.experts])
            parts.append((weight, bias))
        return tuple(parts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        probs, weights, idx = self.route(x_flat)

        flat_idx = idx.reshape(-1)  # assignment a belongs to token a // k
        order = torch.argsort(flat_idx, stable=True)
        token_of = order // self.top_k
        expert_of = flat_idx[order]  # nondecreasing
        weight_of = weights.reshape(-1)[order]
        rows = x_flat[token_of]
        compute_dtype = _grouped_mm_dtype(x_flat)
        if DISPATCH == "loop" or (
            DISPATCH == "auto" and x_flat.device.type == "cpu" and not torch.compiler.is_compiling()
        ):
            y = self._per_expert(rows, flat_idx)
        elif compute_dtype is not None and self.experts[0].w1.bias is None:
            y = self._grouped(rows, flat_idx, expert_of, compute_dtype)
        else:  # "tiled", or "auto" on an accelerator without grouped GEMM
            y = tiled_expert_matmul(rows, expert_of, self.stacked_weights(), self.num_experts)
        y = y.to(x_flat.dtype) * weight_of[:, None]
        out = torch.zeros_like(x_flat).index_add_(0, token_of, y)
        for shared in self.shared_experts:
            out = out + shared(x_flat)

        aux = load_balancing_loss(probs, idx, self.num_experts, self.aux_loss_coef)
        return self.dropout(out.view(shape)), aux

    def _grouped(self, rows, flat_idx, expert_of, dtype):
        """One grouped GEMM per projection. Each expert's rows start at a multiple of
        _GROUP_ALIGN (the kernel's alignment, as torchtitan pads), placed without a host sync in a
        buffer of static size M + E * (_GROUP_ALIGN - 1)."""
        m, num_experts = rows.shape[0], self.num_experts
        counts = torch.bincount(flat_idx, minlength=num_experts)
        padded = (counts + _GROUP_ALIGN - 1) // _GROUP_ALIGN * _GROUP_ALIGN
        padded_ends = torch.cumsum(padded, 0)
        starts = torch.cumsum(counts, 0) - counts
        dest = (padded_ends - padded)[expert_of] + torch.arange(m, device=rows.device) - starts[expert_of]
        capacity = _GROUP_ALIGN * math.ceil((m + num_experts * (_GROUP_ALIGN - 1)) / _GROUP_ALIGN)
        buf = rows.new_zeros(capacity, rows.shape[1], dtype=dtype).index_copy(0, dest, rows.to(dtype))
        offsets = padded_ends.to(torch.int32)
        (w1, _), (w3, _), (w2, _) = self.stacked_weights(dtype)
        gate = torch._grouped_mm(buf, w1.transpose(-2, -1), offs=offsets)
        up = torch._grouped_mm(buf, w3.transpose(-2, -1), offs=offsets)
        out = torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)
        return out.index_select(0, dest)

    def _per_expert(self, rows: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
        """Each expert on its slice of the sorted rows; the slice sizes are read on the host."""
        counts = torch.bincount(flat_idx, minlength=self.num_experts).tolist()
        pieces = [expert(part) for expert, part in zip(self.experts, rows.split(counts))]
        return torch.cat(pieces)


# "auto": per-expert loop eager on the CPU, grouped GEMM on CUDA bf16, tiled elsewhere;
# "tiled" / "loop" force one (tests run the accelerators' sync-free path on the CPU with "tiled").
DISPATCH = "auto"
_GROUP_ALIGN = 16


def _grouped_mm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """bf16 when torch._grouped_mm can run here (CUDA sm90+, bf16 compute), else None."""
    if x.device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    if dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
        return None
    return dtype


def _linear(x, weight, bias):
    """x [P, R, in] @ weight[P].T (+ bias) for gathered per-tile weights [P, out, in]."""
    y = torch.bmm(x, weight.transpose(1, 2))
    return y if bias is None else y + bias[:, None, :]


def tiled_expert_matmul(rows, expert_of, stacked, num_experts: int, tile: int | None = None):
    """SwiGLU of each row with its own expert, rows sorted by expert, without host syncs.

    The M sorted rows are cut into T tiles of R rows. Sorted, a tile overlaps a run of consecutive
    experts, and all tiles together make at most T + E - 1 (tile, expert) pairs: a bound known
    without looking at the data. Each pair is one batched matmul of R rows against that expert's
    weights, rows of other experts masked to zero; unused pairs at the end compute on zeros. The
    extra work is (E - 1) * R rows, so R = M / (4E) costs ~1.25x the exact FLOPs.
    """
    (w1, b1), (w3, b3), (w2, b2) = stacked
    m, hidden = rows.shape
    if tile is None:
        tile = max(16, math.ceil(m / (4 * num_experts)))
    tiles = max(1, math.ceil(m / tile))
    pairs = tiles + num_experts - 1
    padded = tiles * tile
    x = torch.cat([rows, rows.new_zeros(padded - m, hidden)])
    # Padding rows get the sentinel expert id E, which no pair has.
    expert = torch.cat([expert_of, expert_of.new_full((padded - m,), num_experts)])
    first = expert[::tile]
    last = expert[tile - 1 :: tile].clamp(max=num_experts - 1)
    per_tile = last - first + 1
    ends = torch.cumsum(per_tile, 0)
    pair = torch.arange(pairs, device=rows.device)
    unused = pair >= ends[-1]
    tile_of = torch.searchsorted(ends, pair, right=True).clamp(max=tiles - 1)
    expert_of_pair = (first[tile_of] + pair - (ends - per_tile)[tile_of]).clamp(0, num_experts - 1)
    row_idx = tile_of[:, None] * tile + torch.arange(tile, device=rows.device)  # [P, R]
    keep = (expert[row_idx] == expert_of_pair[:, None]) & ~unused[:, None]
    xs = x[row_idx]  # [P, R, H]

    def gathered(bias):
        return None if bias is None else bias[expert_of_pair]

    h = F.silu(_linear(xs, w1[expert_of_pair], gathered(b1)))
    h = h * _linear(xs, w3[expert_of_pair], gathered(b3))
    y = _linear(h, w2[expert_of_pair], gathered(b2)) * keep[..., None].to(h.dtype)
    out = x.new_zeros(padded, y.shape[-1]).index_add_(0, row_idx.reshape(-1), y.reshape(-1, y.shape[-1]))
    return out[:m]
