"""K-quant GGUF files (Q4_K_M, Q5_K_M, Q6_K: what Ollama and LM Studio users pick) through
llama.cpp's own quantiser, `llama_model_quantize`, which llama-cpp-python exposes.

The `gguf` package cannot write K-quants, and a K-quant file is more than its block format: the
_M mixes give some tensors more bits (attn_v, ffn_down, the output) by llama.cpp's rules, which
only llama.cpp's quantiser applies exactly. So export writes an f32 GGUF and hands it over.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.errors import LmforgeError

# lmforge --dtype -> llama_ftype (include/llama.h)
K_QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def require_llama_cpp():
    """llama-cpp-python, or one line saying how to install it (an optional extra)."""
    try:
        import llama_cpp
    except ImportError:
        raise LmforgeError(
            "GGUF K-quant export (q4_k_m, q5_k_m, q6_k) runs llama.cpp's quantiser from "
            "llama-cpp-python: pip install 'lmforge[llamacpp]' (it compiles llama.cpp, minutes)"
        ) from None
    try:  # llama-cpp-python prints llama.cpp's log to stderr unless told otherwise
        from llama_cpp import _logger

        _logger.set_verbose(False)
    except (ImportError, AttributeError):
        pass
    return llama_cpp


def llama_quantize(src: Path, dst: Path, dtype: str, threads: int | None = None) -> None:
    """Quantise the f32/f16 GGUF `src` to `dst` with llama.cpp's rules for `dtype`."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[dtype]
    params.nthread = threads or min(os.cpu_count() or 1, 8)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise LmforgeError(f"{dst}: llama.cpp's quantiser failed (code {rc}) on {src}; nothing was written")
