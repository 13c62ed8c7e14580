"""Parameter counts and training FLOPs computed from a ModelConfig alone (no tensors), for
model-info tables, MFU and the parallel planner. Tests check them against the real modules."""

from __future__ import annotations

from lmforge.model.config import ModelConfig
from lmforge.model.layers import resolve_intermediate_size
from lmforge.model.moe import expert_intermediate_size


def _ffn_params(hidden: int, width: int, bias: bool) -> int:
    return 3 * hidden * width + ((2 * width + hidden) if bias else 0)


def _attention_params(cfg: ModelConfig) -> int:
    q_dim = cfg.num_heads * cfg.resolved_head_dim
    kv_dim = cfg.num_kv_heads * cfg.resolved_head_dim
    n = 2 * cfg.hidden_size * q_dim + 2 * cfg.hidden_size * kv_dim
    if cfg.attention_bias:
        n += q_dim + 2 * kv_dim + cfg.hidden_size
    if cfg.qk_norm:
        n += 2 * cfg.resolved_head_dim
    return n


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """-> {total, active, embedding}.

    total: unique parameters (a tied embedding counts once). active: those a token uses (routed
    experts it is not sent to are left out). embedding: the token embedding table.
    """
    hidden = cfg.hidden_size
    attn = _attention_params(cfg)
    norms = 2 * hidden
    if cfg.moe is None:
        ffn_total = ffn_active = _ffn_params(hidden, resolve_intermediate_size(cfg), cfg.mlp_bias)
    else:
        moe = cfg.moe
        width = expert_intermediate_size(cfg)
        expert = _ffn_params(hidden, width, cfg.mlp_bias)
        router = moe.num_experts * hidden
        ffn_total = router + (moe.num_experts + moe.num_shared_experts) * expert
        ffn_active = router + (moe.top_k + moe.num_shared_experts) * expert
    embedding = cfg.vocab_size * hidden
    outer = embedding + hidden + (0 if cfg.tie_embeddings else embedding)
    return {
        "total": outer + cfg.num_layers * (attn + norms + ffn_total),
        "active": outer + cfg.num_layers * (attn + norms + ffn_active),
        "embedding": embedding,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len:

        6 * N + 12 * L * (num_heads * head_dim) * seq_len

    N = active parameters that multiply the token's activations: everything except the
    embedding lookup, with the output projection always included (for tied models the
    embedding matrix is used again as the output projection, so V * hidden is added back).
    The second term is attention's QK^T and AV matmuls (PaLM appendix B / Chinchilla), counted
    over the full T x T square as is customary (causal masking would halve the useful part).
    """
    counts = count_params(cfg)
    matmul_params = counts["active"] - counts["embedding"]
    if cfg.tie_embeddings:
        matmul_params += counts["embedding"]
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
    return float(6 * matmul_params + attention)
