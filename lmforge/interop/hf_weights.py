"""State-dict names: lmforge (docs/internals.md) <-> Hugging Face Llama/Qwen3/Qwen3-MoE/Mixtral.

Only names change; tensors are never transposed or permuted (our RoPE already uses HF's
rotate-half layout and our linears store [out, in] like HF's). MoE experts are written in the
per-expert layout of the published checkpoints (`mlp.experts.{e}.gate_proj.weight`,
`block_sparse_moe.experts.{e}.w1.weight`), which transformers 4.x loads natively and 5.x fuses
on load; 5.x's fused layout (`mlp.experts.gate_up_proj`) is also accepted on import.
"""

from __future__ import annotations

import re

import torch

from lmforge.errors import LmforgeError

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Per-layer names shared by every family (bias entries only exist when the config has biases).
_LAYER_COMMON = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    **{f"attention.w{p}.{kind}": f"self_attn.{p}_proj.{kind}" for p in "qkvo" for kind in ("weight", "bias")},
}
_DENSE = {
    f"feed_forward.{ours}.{kind}": f"mlp.{theirs}.{kind}"
    for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    for kind in ("weight", "bias")
}
# MoE: (router name, per-expert prefix, our w1/w3/w2 -> their names)
_MOE = {
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}),
    "mixtral": (
        "block_sparse_moe.gate.weight",
        "block_sparse_moe.experts",
        {"w1": "w1", "w3": "w3", "w2": "w2"},
    ),
}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT_KEY = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])\.weight")


def _layer_to_hf(local: str, family: str) -> str | None:
    if local in _LAYER_COMMON:
        return _LAYER_COMMON[local]
    if family in _MOE:
        router, prefix, names = _MOE[family]
        if local == "feed_forward.router.weight":
            return router
        m = _EXPERT_KEY.fullmatch(local)
        if m:
            return f"{prefix}.{m.group(1)}.{names[m.group(2)]}.weight"
        return None
    return _DENSE.get(local)


def hf_name(ours: str, family: str) -> str:
    """The HF name of one of our parameters; LmforgeError if the family has no place for it."""
    if ours in _TOP_LEVEL:
        return _TOP_LEVEL[ours]
    m = _LAYER_KEY.fullmatch(ours)
    theirs = _layer_to_hf(m.group(2), family) if m else None
    if theirs is None:
        raise LmforgeError(
            f"parameter '{ours}' has no counterpart in the {family} format; it cannot be exported"
        )
    return f"model.layers.{m.group(1)}.{theirs}"


def to_hf(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    return {hf_name(k, family): v for k, v in state.items()}


def split_fused_experts(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Turn transformers-5 fused expert tensors ([E, 2I, H] gate_up, [E, H, I] down) into the
    per-expert names of the published layout, so one reverse mapping serves both."""
    if family not in _MOE:
        return tensors
    _, prefix, names = _MOE[family]
    out = {}
    for key, value in tensors.items():
        # Mixtral files saved fused by 5.x use the mlp. prefix; legacy ones block_sparse_moe.
        m = re.fullmatch(
            r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)", key
        )
        if not m:
            out[key] = value
            continue
        layer, which = m.groups()
        base = f"model.layers.{layer}.{prefix}"
        for e in range(value.shape[0]):
            if which == "down_proj":
                out[f"{base}.{e}.{names['w2']}.weight"] = value[e].contiguous()
            else:
                gate, up = value[e].chunk(2, dim=0)
                out[f"{base}.{e}.{names['w1']}.weight"] = gate.contiguous()
                out[f"{base}.{e}.{names['w3']}.weight"] = up.contiguous()
    if family == "mixtral":
        # A 5.x-saved Mixtral names its router mlp.gate; the legacy name is block_sparse_moe.gate.
        out = {re.sub(r"\.mlp\.gate\.weight$", ".block_sparse_moe.gate.weight", k): v for k, v in out.items()}
    return out


def from_hf(
    tensors: dict[str, torch.Tensor],
    family: str,
    expected: dict[str, torch.Size],
    tie_embeddings: bool,
    source: str,
) -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors. `expected` maps each of our parameter names to its shape
    (from the model built on the meta device); every name must be found with that shape, and
    every HF tensor must be used, so a mismatch is an error naming the tensor, not a silent skip."""
    tensors = split_fused_experts(tensors, family)
    # Old Llama checkpoints carry the RoPE table as a buffer; we recompute it.
    unused = {k for k in tensors if not k.endswith("rotary_emb.inv_freq")}
    state = {}
    for ours, shape in expected.items():
        theirs = hf_name(ours, family)
        if theirs not in tensors:
            raise LmforgeError(f"{source}: tensor '{theirs}' is missing (needed for {ours})")
        value = tensors[theirs]
        if tuple(value.shape) != tuple(shape):
            raise LmforgeError(
                f"{source}: tensor '{theirs}' has shape {tuple(value.shape)} but config.json implies "
                f"{tuple(shape)}; the config and the weights disagree"
            )
        state[ours] = value
        unused.discard(theirs)
    if tie_embeddings and "lm_head.weight" in unused:
        # Some exporters write the tied head anyway; harmless only when it really is the embedding.
        if not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise LmforgeError(
                f"{source}: lm_head.weight differs from embed_tokens although tie_word_embeddings is true"
            )
        unused.discard("lm_head.weight")
    if unused:
        first = sorted(unused)[0]
        raise LmforgeError(
            f"{source}: tensor '{first}' (and {len(unused) - 1} more) has no place in the model "
            "config.json describes; the config and the weights disagree"
        )
    return state
