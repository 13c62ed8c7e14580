"""The one table of floating-point dtypes lmforge reads and writes, and how names map to it."""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from a name (float32/bf16/...) or a dtype; None stays None ("keep as stored")."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise LmforgeError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    name = ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise LmforgeError(f"dtype '{dtype}' is not supported; use float32, bfloat16 or float16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """train.dtype: auto is bf16 on a CUDA device that supports it, else fp32 (CPU included)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return resolve_dtype(name)
