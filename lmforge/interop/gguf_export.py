"""Export an lmforge model to one GGUF file that llama.cpp, Ollama and LM Studio run.

Three llama.cpp architectures hold our models exactly: `llama` (plain attention; with experts it
is llama.cpp's Mixtral layout), `qwen3` (QK-norm) and `qwen3moe` (QK-norm + experts). llama.cpp
always renormalises the top-k expert weights (softmax gating) and has no always-on shared expert
in these graphs, so only MoE models with norm_topk_prob and no shared experts export. Experts
are stacked into one [experts, out, in] tensor per projection (`ffn_{gate,up,down}_exps`).
llama.cpp's `llama` rotates q/k pairs interleaved (GPT-J style) while we and HF rotate
halves, so llama.cpp's converter permutes the rows of wq/wk per head; we do the same. `qwen3`
uses the half-rotation itself, so its tensors are written as they are. Llama-3 RoPE scaling is
the `rope_freqs` tensor (per-frequency divisors) llama.cpp reads for `llama`; its four parameters
also go in `lmforge.rope_scaling.*` keys so an import rebuilds the config exactly.
Written with the `gguf` package (the writer llama.cpp ships); nothing is laid out by hand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.export import check_state, plain_state
from lmforge.interop.gguf_quantize import K_QUANTS, llama_quantize, require_llama_cpp
from lmforge.interop.gguf_vocab import gguf_vocab, write_vocab
from lmforge.model.layers import resolve_intermediate_size, rope_inv_freq
from lmforge.model.moe import expert_intermediate_size
from lmforge.weights.outdir import check_output_file

# f32 ... q4_0 are written here with the gguf package; the K-quants (better 4-6 bit files) by
# llama.cpp's own quantiser (gguf_quantize.py, the `llamacpp` extra).
DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", *K_QUANTS)
ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# lmforge name -> llama.cpp name (per layer: the part after `layers.{i}.`)
TOP_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "attention.q_norm.weight": "attn_q_norm.weight",
    "attention.k_norm.weight": "attn_k_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.router.weight": "ffn_gate_inp.weight",
}
EXPERT_NAMES = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
EXPERT_KEY = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight")


def require_gguf():
    """The gguf package, or one line saying how to install it (it is an optional extra)."""
    try:
        import gguf
    except ImportError:
        raise LmforgeError("GGUF export/import needs the gguf package: pip install 'lmforge[gguf]'") from None
    return gguf


def gguf_name(ours: str) -> str:
    if ours in TOP_NAMES:
        return TOP_NAMES[ours]
    parts = ours.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in LAYER_NAMES:
        return f"blk.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    raise LmforgeError(f"parameter '{ours}' has no place in a GGUF llama/qwen3 model; it cannot be exported")


def llama_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from [first halves | second halves] to interleaved pairs (llama.cpp)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_arch(cfg: ModelConfig) -> str:
    """`llama`, `qwen3` or `qwen3moe`, or a one-line refusal naming what GGUF cannot hold."""
    if cfg.moe is not None and cfg.moe.num_shared_experts:
        raise LmforgeError(
            "model.moe.num_shared_experts: llama.cpp's llama/qwen3moe graphs have no shared experts; "
            "set it to 0 or export with --format hf"
        )
    if cfg.moe is not None and not cfg.moe.norm_topk_prob:
        raise LmforgeError(
            "model.moe.norm_topk_prob=false: llama.cpp renormalises the top-k expert weights; "
            "export with --format hf instead"
        )
    if cfg.attention_bias or cfg.mlp_bias:
        raise LmforgeError(
            "model.attention_bias/mlp_bias: llama.cpp's llama and qwen3 graphs have no such biases; "
            "export with --format hf"
        )
    if cfg.qk_norm and cfg.rope_scaling is not None:
        raise LmforgeError(
            "model.rope_scaling: llama.cpp's qwen3 graphs ignore Llama-3 rope frequency factors; "
            "export without rope_scaling or use a model without qk_norm"
        )
    if cfg.qk_norm:
        return "qwen3moe" if cfg.moe is not None else "qwen3"
    return "llama"


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor in llama.cpp's layout, in llama.cpp's order (embedding, blocks, head)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for ours in sorted(state, key=_tensor_order):
        value = state[ours]
        m = EXPERT_KEY.fullmatch(ours)
        if m:
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = value
            continue
        if arch == "llama" and ours.endswith("attention.wq.weight"):
            value = llama_permute(value, cfg.num_heads)
        elif arch == "llama" and ours.endswith("attention.wk.weight"):
            value = llama_permute(value, cfg.num_kv_heads)
        out[gguf_name(ours)] = value
    for (layer, w), per_expert in sorted(experts.items()):
        out[f"blk.{layer}.{EXPERT_NAMES[w]}.weight"] = torch.stack(
            [per_expert[e] for e in sorted(per_expert)]
        )
    return out


def rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """Per-frequency divisors llama.cpp applies (`rope_freqs`): unscaled / scaled inverse frequency."""

    plain = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta)
    scaled = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
    return (plain.double() / scaled.double()).float()


def _state(model_or_state: Any, cfg: ModelConfig) -> dict[str, torch.Tensor]:

    return check_state(plain_state(model_or_state), cfg)


def _encode(name: str, value: torch.Tensor, dtype: str, head: bool = False):
    """(numpy data, raw gguf type or None) for one tensor; 1-D tensors and the router stay f32 as
    llama.cpp's converter keeps them (routing is sensitive to rounding). `head`: the tensor that
    makes the logits (output, or the embedding when tied); at 4/5 bits llama-quantize gives it
    Q6_K (Q8_0 when rows are not a multiple of 256), since its error lands on every logit. The gguf
    package cannot write Q6_K, so it is Q8_0 here: at least as accurate, a little larger."""
    from gguf import GGMLQuantizationType, quants

    value = value.detach().cpu()
    if value.ndim == 1 or dtype == "f32" or name.endswith("ffn_gate_inp.weight"):
        return value.float().numpy(), None
    if dtype == "f16":
        return value.half().numpy(), None
    if dtype == "bf16":
        return value.bfloat16().view(torch.int16).numpy().view(np.uint8), GGMLQuantizationType.BF16
    if value.shape[-1] % 32:  # the block types are 32 wide; llama.cpp falls back to f16 too
        return value.half().numpy(), None
    kind = GGMLQuantizationType["Q8_0" if head else dtype.upper()]
    return quants.quantize(value.float().numpy(), kind), kind


def _write_hparams(writer, cfg: ModelConfig, arch: str, name: str, dtype: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    file_type = LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType[f"MOSTLY_{dtype.upper()}"]
    writer.add_name(name)
    writer.add_file_type(file_type)
    if dtype.startswith("q"):
        writer.add_quantization_version(GGML_QUANT_VERSION)
    head_dim = cfg.resolved_head_dim
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    if cfg.moe is not None:
        width = expert_intermediate_size(cfg)
        writer.add_expert_count(cfg.moe.num_experts)
        writer.add_expert_used_count(cfg.moe.top_k)
        writer.add_expert_feed_forward_length(width)
        writer.add_float64("lmforge.moe.aux_loss_coef", cfg.moe.aux_loss_coef)
    # llama.cpp's llama graph sizes its experts by feed_forward_length (Mixtral's convention).
    if cfg.moe is not None and arch == "llama":
        writer.add_feed_forward_length(width)
        writer.add_uint32("lmforge.intermediate_size", resolve_intermediate_size(cfg))  # unused, kept exact
    else:
        writer.add_feed_forward_length(resolve_intermediate_size(cfg))
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.rope_scaling is not None:  # llama.cpp reads rope_freqs; these keys are for our import
        for key in ROPE_KEYS:
            value = getattr(cfg.rope_scaling, key)
            if key == "original_max_position_embeddings":
                writer.add_uint32(f"lmforge.rope_scaling.{key}", int(value))
            else:
                writer.add_float64(f"lmforge.rope_scaling.{key}", float(value))
    # GGUF's own keys are float32; these float64 copies let an import rebuild the config exactly.
    writer.add_float64("lmforge.rope_theta", cfg.rope_theta)
    writer.add_float64("lmforge.norm_eps", cfg.norm_eps)
    writer.add_float64("lmforge.init_std", cfg.init_std)


def export_gguf(
    model_or_state: Any,
    model_cfg: ModelConfig,
    tokenizer: Any,
    out_file: str | Path,
    dtype: str = "f32",
    *,
    name: str = "lmforge",
    overwrite: bool = False,
) -> Path:
    """Write `out_file` (.gguf) for llama.cpp: weights (f32/f16/bf16/q8_0/...), hyperparameters and the
    tokenizer (a folder/tokenizer.json/loaded tokenizer; required: llama.cpp needs a vocabulary).
    Everything is checked before writing; the file appears only when complete."""

    GGUFWriter = require_gguf().GGUFWriter

    dtype = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(
        str(dtype).lower(), str(dtype).lower()
    )
    if dtype not in DTYPES:
        raise LmforgeError(f"GGUF dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}")

    if Path(out_file).is_dir():
        raise LmforgeError(
            f"{out_file}: is a folder; GGUF export writes one file, e.g. {Path(out_file) / 'model.gguf'}"
        )
    out = check_output_file(out_file, overwrite)
    if tokenizer is None:
        raise LmforgeError(
            "GGUF export needs the model's tokenizer (llama.cpp reads the vocabulary from the file)"
        )
    if dtype in K_QUANTS:
        require_llama_cpp()  # before anything is written
    arch = gguf_arch(model_cfg)
    state = _state(model_or_state, model_cfg)
    vocab = gguf_vocab(tokenizer, model_cfg.vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    f32 = out.with_name(f"{out.name}.f32-{os.getpid()}")
    try:
        writer = GGUFWriter(str(f32 if dtype in K_QUANTS else tmp), arch)
        _write_hparams(writer, model_cfg, arch, name, "f32" if dtype in K_QUANTS else dtype)
        write_vocab(writer, vocab)
        if model_cfg.rope_scaling is not None:
            writer.add_tensor("rope_freqs.weight", rope_factors(model_cfg).numpy())
        tensors = gguf_tensors(state, model_cfg, arch)
        head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        for gguf_key, value in tensors.items():
            data, raw = _encode(gguf_key, value, "f32" if dtype in K_QUANTS else dtype, head=gguf_key == head)
            writer.add_tensor(gguf_key, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if dtype in K_QUANTS:
            llama_quantize(f32, tmp, dtype)
        os.replace(tmp, out)
    finally:
        for left in (tmp, f32):
            if left.exists():
                left.unlink()
    return out


def _tensor_order(name: str) -> tuple:
    """Embedding first, then layers in numeric order, then the final norm and head (llama.cpp's)."""
    if name.startswith("layers."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("tok_") else 2, 0, name)
