"""Model FLOPs utilisation: achieved model FLOP/s over the device's dense peak.

Peaks are the vendors' dense (no sparsity) tensor-core figures per GPU, by training dtype;
float32 training is measured against the TF32 peak only when TF32 matmuls are enabled
(`torch.set_float32_matmul_precision("high")`); at PyTorch's default "highest" the matmuls run
on the far slower non-tensor-core units, no listed peak applies and MFU is n/a. CPUs have no
meaningful single peak, so MFU is reported as n/a there (None).
"""

from __future__ import annotations

import torch

from lmforge.hardware import accelerator_of_device
from lmforge.model.flops import flops_per_token


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one device for `dtype` training, or None when unknown / CPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return None
    acc = accelerator_of_device(torch.cuda.get_device_name(device))
    if acc is None:
        return None
    return (acc.tf32_tflops if dtype == torch.float32 else acc.bf16_tflops) * 1e12


def model_flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) from the model config."""
    return float(flops_per_token(model_cfg, seq_len))


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, world_size: int) -> float | None:
    if not peak or not flops_per_token:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size)
