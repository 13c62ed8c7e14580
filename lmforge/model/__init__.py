"""The Llama-family decoder with optional MoE (pure PyTorch; no training or parallel code)."""

from lmforge.model.attention import KVCache
from lmforge.model.layers import resolve_intermediate_size
from lmforge.model.transformer import HiddenOutput, ModelOutput, Transformer, build

__all__ = [
    "HiddenOutput",
    "KVCache",
    "ModelOutput",
    "Transformer",
    "build",
    "resolve_intermediate_size",
]
