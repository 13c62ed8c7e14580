"""`lmforge model-info NAME...`: a table of presets with their sizes and training cost."""

from __future__ import annotations

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.flops import count_params, flops_per_token
from lmforge.model.layers import resolve_intermediate_size
from lmforge.model.moe import expert_intermediate_size
from lmforge.model.presets import DEFAULT_SEQ_LEN, get_preset

COLUMNS = ("name", "params", "active", "hidden", "layers", "heads/kv", "ffn", "vocab", "seq", "FLOPs/token")


def human(n: float) -> str:
    """1234567 -> '1.23M' (K, M, B, T with three significant digits)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def preset_row(name: str) -> list[str]:
    try:
        cfg = ModelConfig(**get_preset(name))
    except KeyError as exc:
        raise LmforgeError(f"model-info: {exc.args[0]}") from None
    counts = count_params(cfg)
    seq = DEFAULT_SEQ_LEN.get(name, min(cfg.max_position_embeddings, 2048))
    ffn = str(resolve_intermediate_size(cfg))
    if cfg.moe is not None:
        moe = cfg.moe
        width = expert_intermediate_size(cfg)
        shared = f"+{moe.num_shared_experts}s" if moe.num_shared_experts else ""
        ffn = f"{moe.num_experts}x{width} top{moe.top_k}{shared}"
    return [
        name,
        human(counts["total"]),
        human(counts["active"]),
        str(cfg.hidden_size),
        str(cfg.num_layers),
        f"{cfg.num_heads}/{cfg.num_kv_heads}",
        ffn,
        str(cfg.vocab_size),
        str(seq),
        human(flops_per_token(cfg, seq)),
    ]


def model_info_table(names: list[str]) -> str:
    """A plain-text table, one row per preset name (LmforgeError for an unknown name)."""
    rows = [list(COLUMNS)] + [preset_row(n) for n in names]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for r, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if r == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
