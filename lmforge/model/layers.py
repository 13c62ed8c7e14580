"""Building blocks: RMSNorm, rotary embeddings (rotate-half layout), the SwiGLU feed-forward and
the FFN width rules.

Numerics follow Hugging Face Llama/Qwen3 on purpose (norm in fp32 then cast back before the
weight, RoPE tables computed in fp32 with the same formula), so an exported model gives the
same logits in `transformers` to float32 rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge.model.config import ModelConfig, RopeScaling


def resolve_intermediate_size(cfg: ModelConfig) -> int:
    """Dense FFN width: an explicit `intermediate_size` wins, else `ffn_rule` derives it.

    minimind:  int(hidden * 8/3) rounded up to a multiple of 64 (MiniMind2: 512 -> 1408)
    minimind3: ceil(hidden * pi / 64) * 64 (MiniMind-3: 768 -> 2432)
    llama:     int(2 * 4 * hidden / 3), times ffn_dim_multiplier when set, rounded up to
               multiple_of (Llama2-7B 11008, Llama3-8B 14336, Llama3-70B 28672)
    """
    if cfg.intermediate_size is not None:
        return cfg.intermediate_size
    hidden = cfg.hidden_size
    if cfg.ffn_rule == "minimind":
        return 64 * math.ceil(int(hidden * 8 / 3) / 64)
    if cfg.ffn_rule == "minimind3":
        return 64 * math.ceil(hidden * math.pi / 64)
    width = int(2 * (4 * hidden) / 3)
    if cfg.ffn_dim_multiplier is not None:
        width = int(cfg.ffn_dim_multiplier * width)
    return cfg.multiple_of * math.ceil(width / cfg.multiple_of)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32 and the weight applied after casting back
    to the input dtype (the Llama/Qwen3 order, which matters for bf16 parity)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp32 = x.dtype == torch.float32 and self.weight.dtype == torch.float32
        if fp32 and not _sharded(x, self.weight) and not torch.compiler.is_compiling():
            # All fp32, the cast order cannot matter: _RMSNormFunction's hand-written backward
            # makes a few passes where autograd's walk of the formula makes a dozen.
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class _RMSNormFunction(torch.autograd.Function):
    """y = x * r * w with r = rsqrt(mean(x^2) + eps) per row, for fp32 x and w. Backward, with
    p = g * x: dw = sum over rows of r * p, and dx = r * (g * w - x * r^2 * (p . w) / D)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        out = torch.mul(x, r).mul_(weight)
        ctx.save_for_backward(x, weight, r)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        dim = x.shape[-1]
        p = (grad * x).reshape(-1, dim)
        rows = r.reshape(1, -1)
        grad_w = (rows @ p).reshape(weight.shape) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            coef = (p @ weight).reshape(r.shape).mul_(r * r / dim)  # r^2 (p . w) / D per row
            grad_x = torch.mul(grad, weight).addcmul_(x, coef, value=-1).mul_(r)
        return grad_x, grad_w, None


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) on the CPU in fp32, optionally with Llama-3.1 scaling:
    wavelengths longer than original_len/low_freq_factor are divided by `factor`, shorter than
    original_len/high_freq_factor are kept, and the band between is interpolated smoothly."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_position_embeddings, head_dim] (fp32, CPU), rotate-half layout:
    the frequency vector is repeated twice along the last dim, as in HF Llama."""
    inv_freq = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
    positions = torch.arange(cfg.max_position_embeddings, dtype=torch.int64, device="cpu").float()
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [T, head_dim] (or [B, 1, T, head_dim]) for the
    positions of those T tokens: x * cos + rotate_half(x) * sin.

    The tables come in the residual stream's dtype (the model casts them), as in HF: with bf16
    weights everything is bf16; under autocast the stream is fp32, so bf16 q/k are rotated in
    fp32 (type promotion) and rounded once afterwards, rather than rounded at every product.
    Eagerly this runs as _RotateHalf (two passes each way instead of the formula's five and its
    temporaries); compiled or on sharded tensors, as the formula (inductor fuses it)."""
    if torch.compiler.is_compiling() or _sharded(x, cos):
        return x * cos + rotate_half(x) * sin
    return _RotateHalf.apply(x, cos, sin)


class _RotateHalf(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin written half by half. rope_tables repeats its frequencies
    ([f, f] along head_dim), so with c, s the first halves of cos, sin and x = [x1, x2]:
    out = [x1 c - x2 s, x2 c + x1 s], and the gradient is the inverse rotation
    [g1 c + g2 s, g2 c - g1 s]."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., :half], x[..., half:]
        shape = torch.broadcast_shapes(x.shape, cos.shape)
        out = torch.empty(shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
        torch.mul(x1, c, out=out[..., :half]).addcmul_(x2, s, value=-1)
        torch.mul(x2, c, out=out[..., half:]).addcmul_(x1, s)
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        g1, g2 = grad[..., :half], grad[..., half:]
        out = torch.empty_like(grad)
        torch.mul(g1, c, out=out[..., :half]).addcmul_(g2, s)
        torch.mul(g2, c, out=out[..., half:]).addcmul_(g1, s, value=-1)
        return out.to(ctx.x_dtype), None, None


def _sharded(*tensors: torch.Tensor) -> bool:
    return any(isinstance(t, DTensor) for t in tensors)


# ---------------------------------------------------------------------------------------------
# Feed-forward


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down (HF gate/up/down_proj)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=bias)
        self.w3 = nn.Linear(hidden, intermediate, bias=bias)
        self.w2 = nn.Linear(intermediate, hidden, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def reset_parameters(self, std: float, residual_std: float) -> None:
        init_linear(self.w1, std)
        init_linear(self.w3, std)
        init_linear(self.w2, residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def init_linear(layer: nn.Linear, std: float) -> None:
    """normal(0, std) weight, zero bias."""
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
