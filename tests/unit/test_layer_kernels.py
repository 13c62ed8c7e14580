"""The eager RMSNorm and RoPE autograd Functions (model/layers.py) against their formulas: the
same values and gradients, promotion under autocast-style mixed dtypes, and gradcheck."""

from __future__ import annotations

import torch

from lmforge.model.layers import RMSNorm, _RMSNormFunction, _RotateHalf, apply_rope, rotate_half


def _tables(seq=16, head_dim=8):
    angles = torch.randn(seq, head_dim // 2, dtype=torch.float64)
    angles = torch.cat((angles, angles), dim=-1)  # rope_tables' [f, f] layout
    return angles.cos(), angles.sin()


def test_rms_norm_function_matches_the_formula_and_gradchecks():
    norm = RMSNorm(32, eps=1e-5)
    norm.weight.data = torch.randn(32)
    x = torch.randn(2, 7, 32, requires_grad=True)
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    out = norm(x)
    assert out.grad_fn.name().endswith("_RMSNormFunctionBackward")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(ref, (x, norm.weight), g), torch.autograd.grad(out, (x, norm.weight), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    args = (torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True), torch.randn(8, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormFunction.apply(a, w, 1e-6), args)


def test_bf16_rms_norm_keeps_the_hf_order():
    norm = RMSNorm(16)
    norm.reset_parameters()
    x = torch.randn(3, 16).bfloat16().requires_grad_()
    out = norm(x)
    assert out.dtype == torch.float32  # fp32 weight times the bf16-rounded normalised x
    assert not out.grad_fn.name().startswith("_RMSNorm")
    h = x.float()
    torch.testing.assert_close(out, norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)).bfloat16())


def test_rope_function_matches_the_formula_and_gradchecks():
    cos, sin = _tables()
    x = torch.randn(2, 3, 16, 8, dtype=torch.float64, requires_grad=True)
    formula = x * cos + rotate_half(x) * sin
    out = apply_rope(x, cos, sin)
    assert out.grad_fn.name().endswith("_RotateHalfBackward")
    torch.testing.assert_close(out, formula)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(formula, x, g)[0])
    assert torch.autograd.gradcheck(lambda a: _RotateHalf.apply(a, cos, sin), (x,))
    # per-sample positions: tables [B, 1, T, head_dim]
    per_sample_cos, per_sample_sin = cos.expand(2, 1, 16, 8), sin.expand(2, 1, 16, 8)
    torch.testing.assert_close(apply_rope(x, per_sample_cos, per_sample_sin), formula)


def test_rope_promotes_like_the_formula():
    cos, sin = (t.float() for t in _tables())
    x = torch.randn(1, 2, 16, 8).bfloat16().requires_grad_()
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.float32  # bf16 q/k rotated in fp32 under autocast, as the formula
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, x.float() * cos + rotate_half(x.float()) * sin)
