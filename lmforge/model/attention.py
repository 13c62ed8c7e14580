"""Grouped-query attention through `F.scaled_dot_product_attention`, with optional QK-norm, a
preallocated KV cache for token-by-token generation and document masking for packed batches.

Document masking: the model builds one mask per forward (`document_mask`) and every block uses it.
On CUDA with FlexAttention (torch >= 2.5) it is a BlockMask, so fully masked tiles are skipped;
elsewhere it is an exact boolean SDPA mask [B, 1, T, T] (causal AND same document).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.layers import RMSNorm, apply_rope, init_linear

# SDPA's enable_gqa arrived in torch 2.5: K/V heads are shared without materialising repeats.
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)

try:  # FlexAttention: torch >= 2.5; only used on CUDA, where its compiled kernels exist
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = None

_compiled_flex = None


def _flex(q, k, v, block_mask):
    # flex_attention is only fast compiled; compile once per process (shapes recompile as needed).
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def use_flex_attention(device: torch.device) -> bool:
    return BlockMask is not None and device.type == "cuda"


def document_mask(doc_ids: torch.Tensor, flex: bool | None = None):
    """Causal attention restricted to each token's own document, for doc_ids [B, T] (any ids that
    are equal exactly within one document). A FlexAttention BlockMask on CUDA, else a boolean
    [B, 1, T, T] SDPA mask (True = may attend). Built without any host sync."""
    bsz, seq = doc_ids.shape
    if flex is None:
        flex = use_flex_attention(doc_ids.device)
    if flex:
        def same_doc_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        return create_block_mask(same_doc_causal, bsz, None, seq, seq, device=doc_ids.device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


class KVCache:
    """Per-layer key/value buffers [B, kv_heads, max_len, head_dim] for incremental decoding.

    Each layer's buffers are allocated in full on its first write, with the batch size, head
    count, dtype and device of the keys written (so autocast and tensor-parallel shards just
    work). Positions are explicit: `model(ids, kv_cache=cache, start_pos=p)` writes the new keys
    at p.. and attends over 0..p+T, so a caller may rewind by passing a smaller start_pos.
    """

    def __init__(self, max_len: int):
        if max_len < 1:
            raise LmforgeError(f"KVCache max_len must be positive, got {max_len}")
        self.max_len = max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, T, head_dim] at start_pos and return all keys/values so far."""
        end = start_pos + k.shape[2]
        if start_pos < 0 or end > self.max_len:
            raise LmforgeError(
                f"KV cache holds {self.max_len} positions but tokens {start_pos}..{end - 1} were "
                "requested; allocate a longer cache or shorten the generation"
            )
        if layer not in self.keys:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        keys, values = self.keys[layer], self.values[layer]
        if keys.shape[0] != k.shape[0]:
            raise LmforgeError(
                f"KV cache was filled with batch size {keys.shape[0]}, got {k.shape[0]}; "
                "use a new cache for a new batch"
            )
        keys[:, :, start_pos:end] = k
        values[:, :, start_pos:end] = v
        return keys[:, :, :end], values[:, :, :end]


class Attention(nn.Module):
    """Multi-head attention with num_kv_heads <= num_heads key/value heads (GQA/MQA).

    Head counts are read from the projected tensors (view(..., -1, head_dim)) rather than the
    config, so a tensor-parallel plan that shards wq/wk/wv column-wise runs the same code on its
    local heads.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.resolved_head_dim
        q_dim = cfg.num_heads * self.head_dim
        kv_dim = cfg.num_kv_heads * self.head_dim
        bias = cfg.attention_bias
        self.wq = nn.Linear(cfg.hidden_size, q_dim, bias=bias)
        self.wk = nn.Linear(cfg.hidden_size, kv_dim, bias=bias)
        self.wv = nn.Linear(cfg.hidden_size, kv_dim, bias=bias)
        self.wo = nn.Linear(q_dim, cfg.hidden_size, bias=bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def reset_parameters(self, std: float, residual_std: float) -> None:
        for proj in (self.wq, self.wk, self.wv):
            init_linear(proj, std)
        init_linear(self.wo, residual_std)
        if self.q_norm is not None:
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        attn_mask=None,
    ) -> torch.Tensor:
        """x [B, T, hidden]; cos/sin [T, head_dim] for positions start_pos..start_pos+T-1 (or
        [B, 1, T, head_dim] for per-sample positions); attn_mask from `document_mask` (training
        only, no cache)."""
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        if self.q_norm is not None:  # Qwen3 order: normalise each head, then rotate
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        # Under autocast q/k leave RoPE (and QK-norm, whose fp32 weight promotes) in fp32 while v
        # is bf16. SDPA's autocast would round them to bf16 anyway; doing it here keeps the KV
        # cache and the repeated GQA heads in one dtype at half the memory, and no-ops otherwise.
        q, k = q.to(v.dtype), k.to(v.dtype)

        mask, causal = None, True
        if attn_mask is not None:
            if kv_cache is not None:
                raise LmforgeError("document masking is for training; generate without doc_ids")
            if BlockMask is not None and isinstance(attn_mask, BlockMask):
                out = _flex(q, k, v, attn_mask)
                return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(bsz, seq, -1)))
            mask, causal = attn_mask, False
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, start_pos, k, v)
            if seq == 1:
                causal = False  # one new token sees every cached position
            elif start_pos > 0:
                # A chunk after a cached prefix: query i sits at start_pos + i and may see keys
                # 0..start_pos+i. (is_causal would align the triangle top-left, which is wrong.)
                key_pos = torch.arange(k.shape[2], device=x.device)
                query_pos = torch.arange(seq, device=x.device) + start_pos
                mask = key_pos[None, :] <= query_pos[:, None]
                causal = False

        # Query head h uses kv head h // rep (HF repeat_kv order). Without a mask SDPA shares the
        # heads itself (enable_gqa: flash and CPU kernels, no repeated K/V in memory); with a mask
        # only the math/efficient kernels apply, and they want the heads expanded.
        rep = q.shape[1] // k.shape[1]
        gqa = {}
        if rep > 1:
            if _SDPA_GQA and mask is None:
                gqa = {"enable_gqa": True}
            else:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=causal,
            **gqa,
        )
        out = out.transpose(1, 2).reshape(bsz, seq, -1)
        return self.resid_dropout(self.wo(out))
