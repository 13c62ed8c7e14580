"""ModelConfig <-> Hugging Face config.json for the Llama, Qwen3, Qwen3-MoE and Mixtral families.

The family is chosen from the shape of the model: QK-norm selects the Qwen3 classes, MoE selects
the sparse classes. Anything the target class cannot reproduce exactly is refused with a
one-line `LmforgeError` that says what to change, rather than exported to something that
silently computes different logits.

config.json is written so transformers 4.x and 5.x both read it the same way: RoPE appears as
the 4.x `rope_theta`/`rope_scaling` pair and as the 5.x `rope_parameters`, and the dtype both as
`torch_dtype` (4.x) and `dtype` (5.x).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lmforge.config import ModelConfig, RopeScaling
from lmforge.errors import LmforgeError

# family -> (architecture class name, model_type)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
}
# What transformers assumes when a config.json leaves these out (they differ for Mixtral).
HF_DEFAULT_THETA = {"mixtral": 1e6}
HF_DEFAULT_EPS = {"mixtral": 1e-5}
HF_DEFAULT_KV_HEADS = {"qwen3": 32, "qwen3_moe": 4, "mixtral": 8}  # llama: as many as query heads


def choose_family(cfg: ModelConfig) -> str:
    """Pick the HF family that reproduces `cfg` exactly, or raise naming what to change."""
    moe = cfg.moe
    if moe is not None and moe.num_shared_experts:
        raise LmforgeError(
            f"model.moe.num_shared_experts={moe.num_shared_experts}: neither Qwen3-MoE nor Mixtral has "
            "always-on shared experts; set it to 0 to export to Hugging Face"
        )
    if moe is None:
        family = "qwen3" if cfg.qk_norm else "llama"
    elif cfg.qk_norm:
        family = "qwen3_moe"
    elif moe.norm_topk_prob:
        family = "mixtral"
    else:
        raise LmforgeError(
            "model.moe.norm_topk_prob=false without model.qk_norm: Mixtral always renormalises the "
            "top-k weights and Qwen3-MoE needs QK-norm; set norm_topk_prob true or qk_norm true to export"
        )
    if cfg.mlp_bias and family != "llama":
        raise LmforgeError(
            f"model.mlp_bias=true: {FAMILIES[family][0]} has no MLP biases (only LlamaForCausalLM does); "
            "set mlp_bias false to export"
        )
    if cfg.attention_bias and family == "mixtral":
        raise LmforgeError(
            "model.attention_bias=true: MixtralForCausalLM has no attention biases; set attention_bias "
            "false, or qk_norm true to export as Qwen3-MoE"
        )
    if family in ("llama", "mixtral") and cfg.hidden_size % cfg.num_heads:
        # transformers 5 validates hidden % heads for these classes even when head_dim is explicit.
        raise LmforgeError(
            f"model.head_dim={cfg.head_dim}: {FAMILIES[family][0]} requires hidden_size {cfg.hidden_size} "
            f"divisible by num_heads {cfg.num_heads}; change the head count or use qk_norm (Qwen3)"
        )
    return family


def _rope_fields(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    scaling = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
        params = {**scaling, "rope_theta": cfg.rope_theta}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def to_hf_config(
    cfg: ModelConfig,
    family: str,
    *,
    dtype: str,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """config.json contents for `family` (from `choose_family`)."""
    from lmforge.model.layers import resolve_intermediate_size  # late: keeps config import light
    from lmforge.model.moe import expert_intermediate_size

    arch, model_type = FAMILIES[family]
    dense_width = resolve_intermediate_size(cfg)
    expert_width = expert_intermediate_size(cfg) if cfg.moe is not None else None
    # Mixtral has one width, the experts'; Qwen3-MoE keeps a dense width for mlp_only_layers.
    intermediate_size = expert_width if family == "mixtral" else dense_width
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        # Always explicit: Qwen3 defaults to 128, the others to hidden // heads.
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        **_rope_fields(cfg),
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if family != "mixtral":
        out["attention_bias"] = cfg.attention_bias
    if family == "llama":
        out.update(mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    if family in ("qwen3", "qwen3_moe"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    moe = cfg.moe
    if family == "qwen3_moe":
        assert moe is not None
        out.update(
            moe_intermediate_size=expert_width,
            # 4.x reads num_experts; 5.x maps it onto num_local_experts. Both spellings, same value.
            num_experts=moe.num_experts,
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            norm_topk_prob=moe.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=moe.aux_loss_coef,
            output_router_logits=False,
        )
    if family == "mixtral":
        assert moe is not None
        out.update(
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            router_aux_loss_coef=moe.aux_loss_coef,
            router_jitter_noise=0.0,
            sliding_window=None,
            output_router_logits=False,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Import


def family_of(hf: dict[str, Any], source: str) -> str:
    model_type = hf.get("model_type")
    for family, (arch, mt) in FAMILIES.items():
        if model_type == mt:
            archs = hf.get("architectures") or [arch]
            if arch not in archs:
                raise LmforgeError(
                    f"{source}: architectures {archs} is not {arch}; only causal-LM checkpoints can be imported"
                )
            return family
    names = ", ".join(a for a, _ in FAMILIES.values())
    raise LmforgeError(f"{source}: model_type {model_type!r} is not supported; lmforge imports {names}")


def _require(hf: dict[str, Any], key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise LmforgeError(f"{source}: key '{key}' is missing; a {hf.get('model_type')} config needs it")
    return hf[key]


def _rope_from_hf(hf: dict[str, Any], family: str, source: str) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise LmforgeError(f"{source}: rope_parameters / rope_scaling must be JSON objects")
    if any(isinstance(v, dict) for v in params.values()):
        raise LmforgeError(f"{source}: per-layer-type rope_parameters are not supported; use one global RoPE")
    default = HF_DEFAULT_THETA.get(family, 10000.0)
    theta = params.get("rope_theta", hf.get("rope_theta", scaling.get("rope_theta", default)))
    spec = scaling or params
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise LmforgeError(
            f"{source}: rope scaling type {kind!r} is not supported; lmforge implements only 'llama3' "
            "frequency scaling (or none)"
        )
    try:
        rs = RopeScaling(
            factor=spec["factor"],
            low_freq_factor=spec["low_freq_factor"],
            high_freq_factor=spec["high_freq_factor"],
            original_max_position_embeddings=spec.get(
                "original_max_position_embeddings", hf.get("max_position_embeddings")
            ),
        )
    except KeyError as exc:
        raise LmforgeError(f"{source}: llama3 rope scaling lacks '{exc.args[0]}'") from None
    except ValidationError as exc:
        raise LmforgeError(f"{source}: bad llama3 rope scaling: {exc.errors()[0]['msg']}") from None
    return float(theta), rs


def _refuse_sliding_window(hf: dict[str, Any], family: str, source: str) -> None:
    window = hf.get("sliding_window")
    if family in ("qwen3", "qwen3_moe"):
        used = bool(hf.get("use_sliding_window")) or "sliding_attention" in (hf.get("layer_types") or [])
    else:
        used = window is not None and window < hf.get("max_position_embeddings", 0)
    if used:
        raise LmforgeError(
            f"{source}: sliding-window attention (sliding_window={window}) is not supported; lmforge "
            "attends over the full context"
        )


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> tuple[str, ModelConfig]:
    """Map an HF config dict to (family, ModelConfig)."""
    family = family_of(hf, source)
    if hf.get("hidden_act", "silu") != "silu":
        raise LmforgeError(
            f"{source}: hidden_act {hf['hidden_act']!r} is not supported; lmforge uses SwiGLU (silu)"
        )
    _refuse_sliding_window(hf, family, source)
    hidden = _require(hf, "hidden_size", source)
    heads = _require(hf, "num_attention_heads", source)
    default_head_dim = 128 if family == "qwen3" else hidden // heads
    head_dim = hf.get("head_dim") or default_head_dim
    theta, rope_scaling = _rope_from_hf(hf, family, source)
    fields: dict[str, Any] = dict(
        vocab_size=_require(hf, "vocab_size", source),
        hidden_size=hidden,
        num_layers=_require(hf, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or HF_DEFAULT_KV_HEADS.get(family, heads),
        # Explicit only when it differs from what lmforge would derive.
        head_dim=None if hidden % heads == 0 and head_dim == hidden // heads else head_dim,
        max_position_embeddings=_require(hf, "max_position_embeddings", source),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        norm_eps=hf.get("rms_norm_eps", HF_DEFAULT_EPS.get(family, 1e-6)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)) if family == "llama" else False,
        init_std=hf.get("initializer_range", 0.02),
    )
    if family in ("llama", "qwen3"):
        fields["intermediate_size"] = _require(hf, "intermediate_size", source)
    elif family == "qwen3_moe":
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise LmforgeError(
                f"{source}: decoder_sparse_step/mlp_only_layers mix dense and MoE layers; lmforge MoE "
                "models make every layer sparse"
            )
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        width = _require(hf, "moe_intermediate_size", source)
        # The dense width is unused (every layer is sparse) but kept so a round trip is exact.
        fields["intermediate_size"] = hf.get("intermediate_size") or width
        fields["moe"] = dict(
            num_experts=experts if experts is not None else _require(hf, "num_experts", source),
            top_k=_require(hf, "num_experts_per_tok", source),
            expert_intermediate_size=width,
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        )
    else:  # mixtral
        width = _require(hf, "intermediate_size", source)
        fields["intermediate_size"] = width
        fields["moe"] = dict(
            num_experts=_require(hf, "num_local_experts", source),
            top_k=_require(hf, "num_experts_per_tok", source),
            expert_intermediate_size=width,
            norm_topk_prob=True,
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        )
    try:
        return family, ModelConfig.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise LmforgeError(f"{source}: cannot map to model.{key}: {err['msg']}") from None
