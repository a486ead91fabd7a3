"""mirasc.lm.ops: the LM's RMSNorm and SwiGLU autograd functions against the plain torch formulas they
replace (autograd through every intermediate), in float64 and under bf16 autocast, and what they keep."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from mirasc.lm.ops import rms_norm, swiglu


def plain_rms_norm(x, weight, eps):
    """The formula in plain torch ops, in float32 (float64 stays)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def grads(fn, inputs, dy):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, dy)]


def test_rms_norm_equals_the_plain_formula_in_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 12, dtype=torch.float64, generator=gen) * 3
    w = torch.rand(12, dtype=torch.float64, generator=gen) + 0.5
    dy = torch.randn(2, 7, 12, dtype=torch.float64, generator=gen)
    got = grads(lambda a, b: rms_norm(a, b, 1e-6), [x, w], dy)
    want = grads(lambda a, b: plain_rms_norm(a, b, 1e-6), [x, w], dy)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and torch.allclose(g, r, rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x.requires_grad_(), w.requires_grad_()))


def test_swiglu_equals_the_plain_formula_in_float64():
    gen = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(3, 5, 8, dtype=torch.float64, generator=gen) * 2 for _ in range(2))
    dy = torch.randn(3, 5, 8, dtype=torch.float64, generator=gen)
    got = grads(swiglu, [gate, up], dy)
    want = grads(lambda g, u: F.silu(g) * u, [gate, up], dy)
    for g, r in zip(got, want):
        assert torch.allclose(g, r, rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(swiglu, (gate.requires_grad_(), up.requires_grad_()))


def test_under_bf16_autocast_the_norm_feeds_projections_in_bf16_and_matches():
    """The norm's output comes out in bf16 (cast once), equal to the plain formula's cast; the MLP's
    gradients agree with the plain ops within bf16 rounding."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, 32, generator=gen)
    w = torch.rand(32, generator=gen) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, plain_rms_norm(x, w, 1e-6).to(torch.bfloat16))
    gate, up = (torch.randn(4, 16, 64, generator=gen).bfloat16() for _ in range(2))
    dy = torch.randn(4, 16, 64, generator=gen).bfloat16()
    got = grads(swiglu, [gate, up], dy)
    want = grads(lambda g, u: F.silu(g) * u, [gate, up], dy)
    for g, r in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert ((g.float() - r.float()).norm() / r.float().norm()) < 1e-2


def test_they_keep_only_their_inputs():
    """What the backward keeps: the norm its input and 1/rms per token, SwiGLU its two inputs."""
    x = torch.randn(3, 10, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        rms_norm(x, w, 1e-6)
    assert [tuple(t.shape) for t in kept] == [(3, 10, 16), (16,), (3, 10, 1)]
    kept.clear()
    gate, up = (torch.randn(3, 10, 16, requires_grad=True) for _ in range(2))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        swiglu(gate, up)
    assert len(kept) == 2 and kept[0] is gate and kept[1] is up
