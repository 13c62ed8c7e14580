"""MiniMind checkpoints both ways: the `.pth` state dicts MiniMind's trainer writes
(`torch.save({k: v.half() ...})`, read here with `weights_only=True`) and MiniMind's `config.json`.

What differs from lmforge and how it is bridged (MiniMind commit d65ef2c, model/model_minimind.py):
- QK-norm is always on in MiniMind: its models import as `qk_norm: true`, and only QK-norm
  models export.
- FFN width: MiniMind's default is ceil(hidden * pi / 64) * 64 (our `minimind3` rule); the
  width is read from the weights and written explicitly, so the rule never has to agree.
- RMSNorm eps 1e-6 and rope theta 1e6 by default (from config.json when given); YaRN
  (`inference_rope_scaling`) has no lmforge equivalent and is refused.
- Tied embeddings: MiniMind's state dict holds both `model.embed_tokens.weight` and
  `lm_head.weight` (the same tensor); tied on import when they are equal, both written on export.
- MoE: `mlp.gate` + `mlp.experts.{e}.{gate,up,down}_proj`, softmax router, top-k, renormalised
  by default, no shared experts. The load-balancing loss is computed over the whole batch in
  both, but MiniMind's `one_hot(topk).mean(0)` counts assignments per token (sums to top_k)
  where ours counts the share of all N*k assignments (sums to 1): ours = MiniMind's / top_k, so
  aux_loss_coef is multiplied by top_k on import and divided on export (same loss value).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.export import check_state, plain_state
from lmforge.interop.folder import write_weights_folder
from lmforge.model.layers import resolve_intermediate_size
from lmforge.model.moe import expert_intermediate_size
from lmforge.tokenizer import load_tokenizer
from lmforge.weights.dtypes import resolve_dtype
from lmforge.weights.outdir import check_output_dir, output_dir
from lmforge.weights.shapes import config_shapes
from lmforge.weights.tokenizer_files import copy_tokenizer_files
from lmforge.weights.torch_pickle import load_weights_only

_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    **{f"attention.w{p}.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.router.weight": "mlp.gate.weight",
}
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])\.weight")
_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
MINIMIND_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
    "num_experts_per_tok": 1,
    "norm_topk_prob": True,
    "router_aux_loss_coef": 5e-4,
}


def minimind_name(ours: str) -> str:
    top = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if ours in top:
        return top[ours]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", ours)
    local = m.group(2) if m else ""
    if local in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[local]}"
    e = _EXPERT.fullmatch(local)
    if e:
        return f"model.layers.{m.group(1)}.mlp.experts.{e.group(1)}.{_PROJ[e.group(2)]}.weight"
    raise LmforgeError(f"parameter '{ours}' has no place in a MiniMind model (shared experts? biases?)")


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file; pass the .pth MiniMind's trainer saved")
    data = load_weights_only(path, "a MiniMind checkpoint", error=LmforgeError)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):  # a *_resume.pth
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LmforgeError(f"{path}: expected a dict of tensors (torch.save(model.state_dict()))")
    return plain_state(data)


def _read_config_json(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LmforgeError(f"{path}: cannot read MiniMind config.json ({exc})") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a JSON object")
    return data


def _infer_config(sd: dict[str, torch.Tensor], hf: dict[str, Any], source: str) -> ModelConfig:
    """Shapes give the sizes; config.json (or MiniMind's defaults) gives what shapes cannot."""

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise LmforgeError(f"{source}: '{key}' is missing; not a MiniMind checkpoint")
        return sd[key]

    if hf.get("inference_rope_scaling") or hf.get("rope_scaling"):
        raise LmforgeError(
            f"{source}: YaRN rope scaling (inference_rope_scaling) has no lmforge equivalent; turn it off"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise LmforgeError(
            f"{source}: hidden_act {hf['hidden_act']!r} is not supported; lmforge uses SwiGLU (silu)"
        )
    vocab, hidden = need("model.embed_tokens.weight").shape
    layers = 1 + max(
        (int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k))), default=-1
    )
    if layers == 0:
        raise LmforgeError(f"{source}: no model.layers.* tensors; not a MiniMind checkpoint")
    head_dim = need("model.layers.0.self_attn.q_norm.weight").shape[0]
    heads = need("model.layers.0.self_attn.q_proj.weight").shape[0] // head_dim
    kv = need("model.layers.0.self_attn.k_proj.weight").shape[0] // head_dim
    moe = "model.layers.0.mlp.gate.weight" in sd
    defaults = {**MINIMIND_DEFAULTS, **hf}
    fields: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=None if hidden % heads == 0 and head_dim == hidden // heads else head_dim,
        max_position_embeddings=int(defaults["max_position_embeddings"]),
        rope_theta=float(defaults["rope_theta"]),
        norm_eps=float(defaults["rms_norm_eps"]),
        qk_norm=True,
        tie_embeddings="lm_head.weight" not in sd
        or torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]),
        dropout=float(hf.get("dropout", 0.0)),
    )
    if moe:
        experts = need("model.layers.0.mlp.gate.weight").shape[0]
        width = need("model.layers.0.mlp.experts.0.gate_proj.weight").shape[0]
        top_k = int(defaults["num_experts_per_tok"])
        fields["intermediate_size"] = int(hf.get("intermediate_size") or width)
        fields["moe"] = dict(
            num_experts=experts,
            top_k=top_k,
            num_shared_experts=0,
            expert_intermediate_size=width,
            norm_topk_prob=bool(defaults["norm_topk_prob"]),
            aux_loss_coef=float(defaults["router_aux_loss_coef"]) * top_k,
        )
    else:
        fields["intermediate_size"] = need("model.layers.0.mlp.gate_proj.weight").shape[0]
    checks = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "head_dim": head_dim,
        "use_moe": moe,
    }
    for key, got in checks.items():
        if key in hf and hf[key] != got:
            raise LmforgeError(f"{source}: config.json says {key}={hf[key]} but the weights have {got}")
    try:
        return ModelConfig.model_validate(fields)
    except Exception as exc:
        raise LmforgeError(f"{source}: the weights do not form a valid lmforge model ({exc})") from None


def import_minimind(pth: str | Path, config_json: str | Path | None = None):
    """(state dict with our names, in the dtype MiniMind saved (fp16 from its trainer), ModelConfig)."""

    path = Path(pth)
    sd = _load_pth(path)
    cfg = _infer_config(sd, _read_config_json(config_json), str(path))
    expected = config_shapes(cfg)
    state = {}
    used = set()
    for ours, shape in expected.items():
        theirs = minimind_name(ours)
        if theirs not in sd:
            raise LmforgeError(f"{path}: '{theirs}' is missing (layers must all have the same layout)")
        if tuple(sd[theirs].shape) != tuple(shape):
            raise LmforgeError(
                f"{path}: '{theirs}' has shape {tuple(sd[theirs].shape)}, expected {tuple(shape)}"
            )
        state[ours] = sd[theirs]
        used.add(theirs)
    if cfg.tie_embeddings:
        used.add("lm_head.weight")
    extra = sorted(set(sd) - used)
    if extra:
        raise LmforgeError(
            f"{path}: tensor '{extra[0]}' ({len(extra)} in all) has no place in the inferred model"
        )
    return state, cfg


def minimind_config(cfg: ModelConfig, bos_id: int | None = 1, eos_id: int | None = 2) -> dict[str, Any]:
    """MiniMindConfig kwargs / config.json for `cfg`, or a one-line refusal."""

    if not cfg.qk_norm:
        raise LmforgeError(
            "model.qk_norm=false: MiniMind's attention always applies QK-norm; export --format hf instead"
        )
    if cfg.attention_bias or cfg.mlp_bias:
        raise LmforgeError(
            "model.attention_bias/mlp_bias: MiniMind has no biases; export --format hf instead"
        )
    if cfg.rope_scaling is not None:
        raise LmforgeError("model.rope_scaling: MiniMind only has YaRN; export without Llama-3 rope scaling")
    out: dict[str, Any] = {
        "model_type": "minimind",
        "architectures": ["MiniMindForCausalLM"],
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "vocab_size": cfg.vocab_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "intermediate_size": resolve_intermediate_size(cfg),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "dropout": cfg.dropout,
        "flash_attn": True,
        "inference_rope_scaling": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_moe": cfg.moe is not None,
    }
    if cfg.moe is not None:
        if cfg.moe.num_shared_experts:
            raise LmforgeError(
                "model.moe.num_shared_experts: this MiniMind has no shared experts; set it to 0"
            )

        out.update(
            num_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            moe_intermediate_size=expert_intermediate_size(cfg),
            norm_topk_prob=cfg.moe.norm_topk_prob,
            router_aux_loss_coef=cfg.moe.aux_loss_coef / cfg.moe.top_k,
        )
    return out


def minimind_script_differences(cfg: ModelConfig) -> list[str]:
    """Fields where `cfg` differs from the MiniMindConfig that MiniMind's trainer scripts build from
    --hidden_size/--num_hidden_layers/--use_moe alone (their load_state_dict then fails on shapes)."""
    ours = minimind_config(cfg)
    defaults = {
        "vocab_size": 6400,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": cfg.hidden_size // 8,
        "intermediate_size": math.ceil(cfg.hidden_size * math.pi / 64) * 64,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
    }
    if cfg.moe is not None:
        defaults.update(
            num_experts=4,
            num_experts_per_tok=1,
            moe_intermediate_size=defaults["intermediate_size"],
            norm_topk_prob=True,
        )
    return [f"{k}={ours[k]} (MiniMind default {v})" for k, v in defaults.items() if ours[k] != v]


def export_minimind(
    model_or_state: Any,
    model_cfg: ModelConfig,
    out_dir: str | Path,
    *,
    weight: str = "pretrain",
    dtype: str | torch.dtype = "float16",
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write `out_dir/{weight}_{hidden}[_moe].pth` (the name MiniMind's `init_model` looks for,
    fp16 by default like its trainer) and `config.json`, plus tokenizer files when given.
    MiniMindForCausalLM loads the .pth with strict=True."""

    hf = minimind_config(model_cfg)
    target = resolve_dtype(dtype)
    state = check_state(plain_state(model_or_state), model_cfg)
    check_output_dir(out_dir, overwrite)
    theirs = {minimind_name(k): v.detach().cpu().to(target or v.dtype).clone() for k, v in state.items()}
    if model_cfg.tie_embeddings:
        theirs["lm_head.weight"] = theirs["model.embed_tokens.weight"]  # one tensor, both names (as MiniMind)
    name = f"{weight}_{model_cfg.hidden_size}{'_moe' if model_cfg.moe else ''}.pth"
    with output_dir(out_dir, overwrite, kind="minimind") as tmp:
        torch.save(theirs, str(tmp / name))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            src = Path(getattr(tokenizer, "path", tokenizer))  # a folder, a file or a loaded tokenizer
            copy_tokenizer_files(src.parent if src.name == "tokenizer.json" else src, tmp)
    return Path(out_dir).resolve() / name


def import_minimind_to_folder(
    pth: str | Path,
    out: str | Path,
    config_json: str | Path | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """`lmforge import --minimind FILE.pth --out DIR`: lmforge weights + config.yaml, with the
    tokenizer files (MiniMind keeps them in its model/ folder) copied when given."""

    state, cfg = import_minimind(pth, config_json)
    src = None
    if tokenizer is not None:
        src = Path(getattr(tokenizer, "path", tokenizer))
        src = src.parent if src.name == "tokenizer.json" else src
        if not src.exists():
            raise LmforgeError(f"{src}: tokenizer not found; pass MiniMind's model/ folder (tokenizer.json)")
        size = load_tokenizer(src).vocab_size
        if size > cfg.vocab_size:
            raise LmforgeError(
                f"{src}: {size} tokens but {pth} embeds {cfg.vocab_size}; pass the tokenizer it was trained with"
            )
    return write_weights_folder(state, cfg, {}, out, overwrite, tokenizer_src=src)
