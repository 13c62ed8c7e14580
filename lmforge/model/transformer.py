"""The decoder-only transformer: token embedding, pre-norm blocks (attention + SwiGLU or MoE
feed-forward), final RMSNorm and the output projection.

Tied embeddings: there is no `output` module at all (`model.output is None`); the logits are
`F.linear(h, tok_embeddings.weight)`. So the tied matrix is one parameter in one place,
`state_dict()` has no `output.weight`, `to_empty()` cannot untie it, and optimizers see it once.
A sharding wrapper must keep `tok_embeddings` in the same unit as the final projection (the root).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.attention import Attention, KVCache, document_mask
from lmforge.model.config import ModelConfig
from lmforge.model.layers import (
    FeedForward,
    RMSNorm,
    init_linear,
    resolve_intermediate_size,
    rope_tables,
)
from lmforge.model.moe import MoEFeedForward


class ModelOutput(NamedTuple):
    # [B, T, vocab] in the compute dtype (fp32 model -> fp32; bf16 params/autocast -> bf16).
    # Upcast before the loss (F.cross_entropy(logits.float(), ...)); keeping bf16 here saves a
    # full fp32 copy of the largest activation.
    logits: torch.Tensor
    # Load-balancing loss summed over the MoE layers (MiniMind sums too), fp32 scalar with
    # gradients; a zero tensor for dense models. Add it to the LM loss when training.
    aux_loss: torch.Tensor


class HiddenOutput(NamedTuple):
    """`model(ids, return_hidden=True)`: the final-normed hidden states [B, T, hidden] and the output
    projection's weight [vocab, hidden] exactly as this forward used it (the tied embedding or
    `output.weight`; under FSDP2 the gathered parameter), so a fused linear + cross-entropy can
    compute the loss without ever holding [B, T, vocab] logits."""

    hidden: torch.Tensor
    output_weight: torch.Tensor
    aux_loss: torch.Tensor


@torch.no_grad()
def init_decoder_parts(cfg: ModelConfig, parts: nn.Module, layers) -> None:
    """The init rule of `Transformer.init_weights` on whichever of `tok_embeddings`, `norm`, `output`
    `parts` holds (None where absent: a pipeline stage holds some of them), the blocks `layers`, and
    its `rope_cos`/`rope_sin` buffers."""
    std = cfg.init_std
    residual_std = std / math.sqrt(2 * cfg.num_layers)
    if parts.tok_embeddings is not None:
        nn.init.normal_(parts.tok_embeddings.weight, mean=0.0, std=std)
    for layer in layers:
        layer.reset_parameters(std, residual_std)
    if parts.norm is not None:
        parts.norm.reset_parameters()
    if parts.output is not None:
        init_linear(parts.output, std)
    cos, sin = rope_tables(cfg)
    parts.rope_cos.copy_(cos)
    parts.rope_sin.copy_(sin)


class TransformerBlock(nn.Module):
    """h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if cfg.moe is not None:
            self.feed_forward = MoEFeedForward(cfg)
        else:
            width = resolve_intermediate_size(cfg)
            self.feed_forward = FeedForward(cfg.hidden_size, width, cfg.mlp_bias, cfg.dropout)

    def reset_parameters(self, std: float, residual_std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.reset_parameters(std, residual_std)
        self.feed_forward.reset_parameters(std, residual_std)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        attn_mask=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (hidden states, this block's MoE aux loss or None for a dense block)."""
        # attn_mask by keyword: tensor-parallel input plans match the positional arguments.
        h = x + self.attention(
            self.attention_norm(x), cos, sin, kv_cache, start_pos, attn_mask=attn_mask
        )
        ff = self.feed_forward(self.ffn_norm(h))
        if isinstance(ff, tuple):
            ff, aux = ff
            return h + ff, aux
        return h + ff, None


class Transformer(nn.Module):
    """Llama-family decoder (Llama 2/3, Qwen3-style QK-norm, MiniMind2/3, optional MoE).

    Initialised on construction unless built under `torch.device("meta")`; then
    `m.to_empty(device=...); m.init_weights()` materialises it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # RoPE tables are derived, not learned: non-persistent, so they stay out of checkpoints
        # and are refilled by init_weights() after a meta build.
        table = (cfg.max_position_embeddings, cfg.resolved_head_dim)
        self.register_buffer("rope_cos", torch.empty(table), persistent=False)
        self.register_buffer("rope_sin", torch.empty(table), persistent=False)
        # Sequence-parallel shards of the hidden states a pipeline stage receives (tensor parallel
        # sets it to tp): their positions are T = received length x seq_shards.
        self.seq_shards = 1
        if not self.tok_embeddings.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE tables.

        Linear and embedding weights ~ normal(0, init_std); the projections that write into the
        residual stream (attention.wo, feed-forward w2 of dense, routed and shared experts) use
        init_std / sqrt(2 * num_layers) so the residual variance does not grow with depth
        (GPT-2); RMSNorm weights 1, biases 0.
        """
        init_decoder_parts(self.cfg, self, self.blocks())

    def output_weight(self) -> torch.Tensor:
        """The [vocab, hidden] matrix of the output projection (the embedding table when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def blocks(self) -> list[TransformerBlock]:
        """The blocks this model holds, in order (all of them; a pipeline stage: its own)."""
        layers = self.layers
        return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        aux_in: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
    ):
        """input_ids [B, T] at positions start_pos..start_pos+T-1.

        Training: kv_cache=None, start_pos=0 (causal attention over the T tokens). Generation:
        prefill the prompt with a cache at start_pos=0, then feed one token (or a chunk) at a
        time with start_pos = number of tokens already in the cache.
        Packed training with document masking: doc_ids [B, T] (equal within a document) limits
        attention to each token's own document; position_ids [B, T] (optional) gives each token's
        RoPE position, e.g. restarting at 0 per document. return_hidden: see HiddenOutput.

        A pipeline stage (parallel/pipeline.py) is this same module with the parts it does not own
        set to None and `layers` a ModuleDict of its blocks under their global index. A stage after
        the first takes the previous stage's hidden states (floating point [B, T/seq_shards, H])
        instead of token ids, plus for MoE models `aux_in`, the aux-loss sum so far; a stage
        without the final norm returns its hidden states (and, for MoE, the aux sum as [1]).
        """
        if torch.is_floating_point(input_ids):  # hidden states from the previous pipeline stage
            h = input_ids
            seq = h.shape[1] * self.seq_shards  # sequence parallel: this rank holds T / tp positions
        else:
            h = self.dropout(self.tok_embeddings(input_ids))
            seq = input_ids.shape[1]
        end = start_pos + seq
        if end > self.cfg.max_position_embeddings:
            raise LmforgeError(
                f"positions up to {end} exceed model.max_position_embeddings "
                f"{self.cfg.max_position_embeddings}; shorten the input"
            )
        # RoPE tables in the residual stream's dtype (HF's rule): fp32 under autocast, bf16 for a
        # bf16 model. The tables themselves stay fp32 unless the whole model is cast.
        if position_ids is None:
            cos = self.rope_cos[start_pos:end].to(h.dtype)
            sin = self.rope_sin[start_pos:end].to(h.dtype)
        else:  # per-sample positions: [B, 1, T, head_dim] broadcasts over the heads
            cos = self.rope_cos[position_ids].to(h.dtype).unsqueeze(1)
            sin = self.rope_sin[position_ids].to(h.dtype).unsqueeze(1)
        attn_mask = None if doc_ids is None else document_mask(doc_ids)
        aux_loss = None if aux_in is None else aux_in.reshape(())
        for layer in self.blocks():
            h, layer_aux = layer(h, cos, sin, kv_cache, start_pos, attn_mask=attn_mask)
            if layer_aux is not None:
                layer_aux = layer_aux.float()
                aux_loss = layer_aux if aux_loss is None else aux_loss + layer_aux
        if aux_loss is None:
            aux_loss = torch.zeros((), device=h.device, dtype=torch.float32)
        if self.norm is None:  # a pipeline stage before the last: hand on what the next one needs
            return (h, aux_loss.reshape(1)) if self.cfg.moe is not None else h
        h = self.norm(h)
        if return_hidden:
            return HiddenOutput(h, self.output_weight(), aux_loss)
        if self.output is None:
            logits = F.linear(h, self.tok_embeddings.weight)
        else:
            logits = self.output(h)
        return ModelOutput(logits, aux_loss)

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        """A cache for up to max_len positions (default max_position_embeddings; pass
        prompt + new tokens to keep memory small). Buffers are allocated per layer on first use."""
        return KVCache(max_len or self.cfg.max_position_embeddings)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied matrix counts once); exclude_embeddings drops the token
        embedding table (an untied output projection still counts: it does compute)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total

    def num_active_params(self) -> int:
        """Parameters used per token: all of them minus the routed experts a token skips."""
        total = self.num_params()
        for layer in self.blocks():
            ff = layer.feed_forward
            if isinstance(ff, MoEFeedForward):
                per_expert = sum(p.numel() for p in ff.experts[0].parameters())
                total -= (ff.num_experts - ff.top_k) * per_expert
        return total


def build(
    cfg: ModelConfig, device: torch.device | str = "meta", *, init: bool = False, dtype: torch.dtype | None = None
) -> Transformer:
    """The one meta-first build: a Transformer whose tensors exist only as shapes until
    materialised on `device` (nothing is allocated on "meta"), in `dtype` (None: fp32), and with
    `init` its weights and RoPE tables set by `init_weights()` (else the parameters are left empty
    for weights that are loaded next, and the RoPE tables still filled)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if dtype is not None:
        model.to(dtype)  # on meta: only the recorded dtypes change
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    if init:
        model.init_weights()
    else:
        cos, sin = rope_tables(cfg)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model
