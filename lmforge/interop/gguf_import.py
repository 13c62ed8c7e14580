"""Import a GGUF file (llama.cpp's `llama`, `qwen3` or `qwen3moe` architecture) as lmforge weights.

Quantised tensors are dequantised to float32 with the `gguf` package (every type it can
dequantise: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...); f32/f16/bf16 tensors keep their
stored values bit for bit. llama.cpp's q/k row permutation is undone for `llama`. The tokenizer
is rebuilt as a `tokenizer.json` that splits text like llama.cpp's named pre-tokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig, RopeScaling
from lmforge.errors import LmforgeError
from lmforge.interop.folder import write_weights_folder
from lmforge.interop.gguf_export import (
    LAYER_NAMES,
    ROPE_KEYS,
    TOP_NAMES,
    llama_unpermute,
    require_gguf,
    rope_factors,
)
from lmforge.interop.gguf_reader import GGUFTensor, read_gguf
from lmforge.interop.gguf_vocab import tokenizer_files_from_gguf
from lmforge.weights.shapes import config_shapes

ARCHES = ("llama", "qwen3", "qwen3moe")
# Llama-3.x scalings seen in published GGUFs that carry only `rope_freqs` (no parameters).
KNOWN_LLAMA3_SCALINGS = [
    {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": n}
    for n in (8192, 4096, 2048, 16384, 32768)
]


def _tensor(t: GGUFTensor, source: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType(t.kind)
    if kind == GGMLQuantizationType.F32:
        return torch.from_numpy(t.data.view(np.float32).reshape(t.shape).copy())
    if kind == GGMLQuantizationType.F16:
        return torch.from_numpy(t.data.view(np.float16).reshape(t.shape).copy())
    if kind == GGMLQuantizationType.BF16:
        return torch.from_numpy(t.data.view(np.int16).reshape(t.shape).copy()).view(torch.bfloat16)
    rows = int(np.prod(t.shape[:-1], dtype=np.int64))
    try:
        values = quants.dequantize(t.data.reshape(rows, -1), kind)
    except NotImplementedError:
        raise LmforgeError(
            f"{source}: tensor '{t.name}' is {kind.name}, which the gguf package cannot dequantise; "
            "requantise the file to Q8_0/Q4_K/Q6_K or f16"
        ) from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(t.shape))


def _rope_scaling(meta: dict, freqs: torch.Tensor | None, head_dim: int, theta: float, source: str):

    arch = meta["general.architecture"]
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear", 1.0))
    # Linear scaling by 1 (some converters write it) is no scaling at all.
    if kind not in ("none", "linear") or factor not in (0.0, 1.0):
        raise LmforgeError(
            f"{source}: rope scaling '{kind}' (factor {factor}) is not "
            "supported; lmforge models use plain or Llama-3 RoPE"
        )
    if all(f"lmforge.rope_scaling.{k}" in meta for k in ROPE_KEYS):
        return RopeScaling(**{k: meta[f"lmforge.rope_scaling.{k}"] for k in ROPE_KEYS})
    if freqs is None:
        return None
    factor = float(freqs.max())
    for guess in KNOWN_LLAMA3_SCALINGS:
        scaling = RopeScaling(factor=factor, **guess)
        probe = ModelConfig(
            hidden_size=head_dim, num_heads=1, num_kv_heads=1, rope_theta=theta, rope_scaling=scaling
        )
        if torch.allclose(rope_factors(probe), freqs.float(), rtol=1e-5, atol=0):
            return scaling
    raise LmforgeError(
        f"{source}: rope_freqs does not match Llama-3 scaling with factor {factor} and the usual "
        "parameters; lmforge cannot reproduce these rope frequencies"
    )


# Hyperparameters no real model reaches; a larger claim is a damaged or hostile file (checked before
# anything is sized by it).
MAX_HPARAM = 1 << 24


def _config(
    meta: dict, shapes: dict[str, tuple[int, ...]], freqs: torch.Tensor | None, source: str
) -> ModelConfig:
    arch = meta["general.architecture"]

    def key(name: str, default: Any = None, count: bool = False) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise LmforgeError(f"{source}: metadata '{arch}.{name}' is missing; the file is incomplete")
        if count and isinstance(value, list):
            raise LmforgeError(f"{source}: per-layer {name} is not supported (all layers must match)")
        if count and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_HPARAM):
            raise LmforgeError(
                f"{source}: metadata '{arch}.{name}' is {value!r}; it must be a whole number from 1 to "
                f"{MAX_HPARAM}: the file is damaged"
            )
        return value

    hidden = key("embedding_length", count=True)
    heads = key("attention.head_count", count=True)
    kv = key("attention.head_count_kv", heads, count=True)
    head_dim = key("attention.key_length", hidden // heads, count=True)
    if meta.get(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise LmforgeError(
            f"{source}: key_length and value_length differ; lmforge attention needs them equal"
        )
    if meta.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise LmforgeError(
            f"{source}: partial rotary embeddings (rope.dimension_count < head_dim) are not supported"
        )
    theta = float(meta.get("lmforge.rope_theta") or key("rope.freq_base", 10000.0))
    scaling = _rope_scaling(meta, freqs, head_dim, theta, source)
    fields: dict[str, Any] = dict(
        vocab_size=int(shapes["token_embd.weight"][0]),
        hidden_size=hidden,
        num_layers=key("block_count", count=True),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=None if hidden % heads == 0 and head_dim == hidden // heads else head_dim,
        intermediate_size=meta.get("lmforge.intermediate_size") or key("feed_forward_length", count=True),
        max_position_embeddings=key("context_length", count=True),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=meta.get("lmforge.norm_eps") or key("attention.layer_norm_rms_epsilon"),
        qk_norm=arch in ("qwen3", "qwen3moe"),
        tie_embeddings="output.weight" not in shapes,
        init_std=meta.get("lmforge.init_std", 0.02),
    )
    experts = meta.get(f"{arch}.expert_count", 0)
    if experts:
        key("expert_count", count=True)
        key("expert_used_count", count=True)
        fields["moe"] = _moe_fields(meta, arch, experts, source)
    try:
        return ModelConfig.model_validate(fields)
    except Exception as exc:  # pydantic: a value lmforge's config cannot hold
        raise LmforgeError(f"{source}: hyperparameters do not form a valid lmforge model ({exc})") from None


def _moe_fields(meta: dict, arch: str, experts: int, source: str) -> dict[str, Any]:
    if meta.get(f"{arch}.expert_shared_count", 0):
        raise LmforgeError(
            f"{source}: shared experts ({arch}.expert_shared_count) are not in llama/qwen3moe graphs"
        )
    if (
        meta.get(f"{arch}.expert_weights_norm", True) is False
        or meta.get(f"{arch}.expert_gating_func", 1) != 1
    ):
        raise LmforgeError(
            f"{source}: expert gating other than softmax + renormalised top-k is not supported"
        )
    # llama's (Mixtral) experts are feed_forward_length wide; qwen3moe has its own key.
    width_key = "feed_forward_length" if arch == "llama" else "expert_feed_forward_length"
    if f"{arch}.{width_key}" not in meta or f"{arch}.expert_used_count" not in meta:
        raise LmforgeError(f"{source}: MoE metadata ({arch}.{width_key}, expert_used_count) is missing")
    return dict(
        num_experts=experts,
        top_k=meta[f"{arch}.expert_used_count"],
        expert_intermediate_size=meta[f"{arch}.{width_key}"],
        norm_topk_prob=True,
        aux_loss_coef=meta.get("lmforge.moe.aux_loss_coef", 0.001),  # Qwen3-MoE's default
    )


def _unstacked_names(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """ffn_{gate,up,down}_exps [experts, out, in] -> (one name per expert, [out, in]), under names
    `_our_name` maps (`blk.{i}.expert.{e}.ffn_gate` style keys that only this module uses)."""
    m = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight", name)
    if not m:
        return [(name, shape)]
    return [(f"blk.{m.group(1)}.expert.{e}.ffn_{m.group(2)}.weight", shape[1:]) for e in range(shape[0])]


def _our_name(gguf: str) -> str | None:
    for ours, theirs in TOP_NAMES.items():
        if gguf == theirs:
            return ours
    m = re.fullmatch(r"blk\.(\d+)\.expert\.(\d+)\.ffn_(gate|up|down)\.weight", gguf)
    if m:
        w = {"gate": "w1", "up": "w3", "down": "w2"}[m.group(3)]
        return f"layers.{m.group(1)}.feed_forward.experts.{m.group(2)}.{w}.weight"
    parts = gguf.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk":
        for ours, theirs in LAYER_NAMES.items():
            if parts[2] == theirs:
                return f"layers.{parts[1]}.{ours}"
    return None


def import_gguf(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, str | bytes]]:
    """(state dict with our names, ModelConfig, {tokenizer file name: text}) from a GGUF file."""

    require_gguf()  # block sizes and dequantisation
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file; pass a .gguf file")
    source = str(path)
    meta, raw_tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHES:
        raise LmforgeError(
            f"{path}: architecture '{arch}' is not supported; lmforge imports {' and '.join(ARCHES)}"
        )
    raw = {t.name: t for t in raw_tensors}
    if "token_embd.weight" not in raw:
        raise LmforgeError(f"{path}: no token_embd.weight tensor; the file is incomplete")
    freqs = _tensor(raw["rope_freqs.weight"], source) if "rope_freqs.weight" in raw else None
    cfg = _config(meta, {t.name: t.shape for t in raw_tensors}, freqs, source)
    expected = config_shapes(cfg)
    # Every shape is checked against the metadata before any tensor is dequantised or copied.
    placed = []
    for t in raw_tensors:
        if t.name == "rope_freqs.weight":
            continue
        names = _unstacked_names(t.name, t.shape)
        for name, shape in names:
            ours = _our_name(name)
            if ours is None or ours not in expected:
                raise LmforgeError(
                    f"{path}: tensor '{t.name}' has no place in an lmforge {arch} model (biases, shared experts ...)"
                )
            if tuple(shape) != tuple(expected[ours]):
                raise LmforgeError(
                    f"{path}: tensor '{t.name}' has shape {tuple(shape)} but the metadata implies "
                    f"{tuple(expected[ours])}; the file is inconsistent"
                )
        placed.append((t, [_our_name(name) for name, _ in names]))
    missing = sorted(set(expected) - {ours for _, names in placed for ours in names})
    if missing:
        raise LmforgeError(f"{path}: tensor for '{missing[0]}' is missing ({len(missing)} in all)")
    state = {}
    for t, names in placed:
        value = _tensor(t, source)
        for e, ours in enumerate(names):
            part = value[e] if len(names) > 1 or value.ndim == 3 else value
            if arch == "llama" and ours.endswith("attention.wq.weight"):
                part = llama_unpermute(part, cfg.num_heads)
            elif arch == "llama" and ours.endswith("attention.wk.weight"):
                part = llama_unpermute(part, cfg.num_kv_heads)
            state[ours] = part.contiguous()
    return state, cfg, tokenizer_files_from_gguf(meta, source)


def import_gguf_to_folder(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`lmforge import --gguf FILE --out DIR`."""
    state, cfg, files = import_gguf(path)
    return write_weights_folder(state, cfg, files, out, overwrite)
