"""Named model shapes. Each preset is a dict of ModelConfig fields; keys under `model:` in a run
config override them (`model: {preset: minimind2-26m, num_layers: 4}`).

MiniMind shapes follow MiniMind2 (jingyaogong/minimind) and the MiniMind-3 numbers in issue 2;
Llama shapes are the published Meta configs. FFN widths come from the same rules the originals
use (see resolve_intermediate_size), so changing hidden_size keeps the family's rule.
"""

from __future__ import annotations

import copy

from lmforge.errors import ConfigError

_MINIMIND = {
    "vocab_size": 6400,
    "num_heads": 8,
    "num_kv_heads": 2,
    "ffn_rule": "minimind",
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "norm_eps": 1e-5,
    "tie_embeddings": True,
}

_LLAMA = {
    "ffn_rule": "llama",
    "norm_eps": 1e-5,
    "tie_embeddings": False,
    "qk_norm": False,
}

_TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "ffn_rule": "minimind",
    "max_position_embeddings": 256,
    "rope_theta": 1e4,
    "tie_embeddings": True,
}

PRESETS: dict[str, dict] = {
    # For tests and smoke runs: a few hundred thousand parameters.
    "tiny": _TINY,
    # Same, with 4 routed experts (top 2) and no shared expert, so it exports to Qwen3-MoE.
    "tiny-moe": {
        **_TINY,
        "moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 0, "aux_loss_coef": 0.01},
    },
    "minimind2-26m": {**_MINIMIND, "hidden_size": 512, "num_layers": 8},
    "minimind2-104m": {**_MINIMIND, "hidden_size": 768, "num_layers": 16},
    # MiniMind2-MoE (~145M total): 4 routed experts, top-2, renormalised, 1 shared expert,
    # aux_loss_alpha 0.1.
    "minimind2-moe": {
        **_MINIMIND,
        "hidden_size": 640,
        "num_layers": 8,
        "moe": {
            "num_experts": 4,
            "top_k": 2,
            "num_shared_experts": 1,
            "norm_topk_prob": True,
            "aux_loss_coef": 0.1,
        },
    },
    "minimind3-64m": {
        **_MINIMIND,
        "hidden_size": 768,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 4,
        "ffn_rule": "minimind3",
        "qk_norm": True,
        "rope_theta": 1e6,
        "norm_eps": 1e-6,  # MiniMind's current MiniMindConfig default (MiniMind2 used 1e-5)
    },
    "llama2-7b": {
        **_LLAMA,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 32,
        "multiple_of": 256,  # -> 11008
        "max_position_embeddings": 4096,
        "rope_theta": 1e4,
    },
    "llama3-8b": {
        **_LLAMA,
        "vocab_size": 128256,
        "hidden_size": 4096,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 8,
        "multiple_of": 1024,
        "ffn_dim_multiplier": 1.3,  # -> 14336
        "max_position_embeddings": 8192,
        "rope_theta": 5e5,
    },
    "llama3-70b": {
        **_LLAMA,
        "vocab_size": 128256,
        "hidden_size": 8192,
        "num_layers": 80,
        "num_heads": 64,
        "num_kv_heads": 8,
        "multiple_of": 4096,
        "ffn_dim_multiplier": 1.3,  # -> 28672
        "max_position_embeddings": 8192,
        "rope_theta": 5e5,
    },
}

# Sequence length each family trains at, for FLOPs/token tables (not a model field).
DEFAULT_SEQ_LEN: dict[str, int] = {
    "tiny": 256,
    "tiny-moe": 256,
    "minimind2-26m": 512,
    "minimind2-104m": 512,
    "minimind2-moe": 512,
    "minimind3-64m": 512,
    "llama2-7b": 4096,
    "llama3-8b": 8192,
    "llama3-70b": 8192,
}


def get_preset(name: str) -> dict:
    """A fresh copy of the preset's ModelConfig fields; KeyError naming the choices otherwise."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return {**copy.deepcopy(PRESETS[name]), "preset": name}


# Model keys that describe no shape: a command-line preset keeps them from the file.
NOT_SHAPE_KEYS = ("preset", "init_std", "dropout")


def expand_preset(model: dict, source: str) -> dict:
    """A `model:` section with its preset's fields filled in under the section's own keys (a
    `moe:` mapping is merged key by key); the section itself when it names no preset."""
    if not model.get("preset"):
        return model
    try:
        base = get_preset(model["preset"])
    except KeyError as exc:
        raise ConfigError(f"{source}: model.preset: {exc.args[0]}") from None
    for key, value in model.items():
        if key == "moe" and isinstance(value, dict) and isinstance(base.get("moe"), dict):
            base["moe"] = {**base["moe"], **value}
        else:
            base[key] = value
    return base


def without_shape_keys(model: dict) -> tuple[dict, list[str]]:
    """(the section keeping only keys that are not shape, the shape keys dropped)."""
    dropped = [k for k in model if k not in NOT_SHAPE_KEYS]
    return {k: v for k, v in model.items() if k in NOT_SHAPE_KEYS}, dropped
