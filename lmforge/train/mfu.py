"""Model FLOPs utilisation: achieved model FLOP/s over the device's dense peak.

Peaks are the vendors' dense (no sparsity) tensor-core figures per GPU, by training dtype;
float32 training is measured against the TF32 peak only when TF32 matmuls are enabled
(`torch.set_float32_matmul_precision("high")`); at PyTorch's default "highest" the matmuls run
on the far slower non-tensor-core units, no listed peak applies and MFU is n/a. CPUs have no
meaningful single peak, so MFU is reported as n/a there (None).
"""

from __future__ import annotations

import torch

from lmforge.hardware import ACCELERATORS
from lmforge.model.flops import flops_per_token

# name fragment -> (bf16/fp16 dense TFLOP/s, tf32 dense TFLOP/s), from the one accelerator table the
# planner also uses; first match wins (torch.cuda.get_device_name gives e.g. "NVIDIA H100 80GB HBM3").
_PEAKS_TFLOPS = [(a.match, a.bf16_tflops, a.tf32_tflops) for a in ACCELERATORS]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one device for `dtype` training, or None when unknown / CPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, half, tf32 in _PEAKS_TFLOPS:
        if fragment in name:
            return (tf32 if dtype == torch.float32 else half) * 1e12
    return None


def model_flops_per_token(model_cfg, seq_len: int, model: torch.nn.Module | None = None) -> float:
    """Training FLOPs per token (forward + backward) from the model config; 6 x parameters when
    the model package's estimate is unavailable."""
    try:
        return float(flops_per_token(model_cfg, seq_len))
    except ImportError:
        if model is None:
            return 0.0
        return 6.0 * sum(p.numel() for p in model.parameters())


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, world_size: int) -> float | None:
    if not peak or not flops_per_token:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size)
