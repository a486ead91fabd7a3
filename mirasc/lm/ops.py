"""The LM's RMSNorm and SwiGLU as autograd functions that keep less for the backward.

Written as plain torch operations, autograd keeps every intermediate an operation needs: the RMSNorm its
float32 input and its normalised output, SwiGLU its gate, silu(gate) and up. These functions keep only
their inputs (and the norm's per-token 1/rms) and recompute the rest in the backward, elementwise work
that costs far less than the memory it frees (docs/lm.md, "Activation memory").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.dtype:
    """The dtype the functions compute in: float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


class _RMSNorm(torch.autograd.Function):
    """y = (x / rms(x)).to(x.dtype) * weight, cast to out_dtype; computed in float32 (float64 stays)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
        xf = x.to(_acc(x))
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return ((xf * rstd).to(x.dtype) * weight).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        acc = _acc(x)
        n = x.to(acc) * rstd  # the normalised input, recomputed
        dy = dy.to(acc)
        dn = dy * weight.to(acc)
        dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
        dweight = (dy * n.to(x.dtype).to(acc)).reshape(-1, dy.shape[-1]).sum(0)
        return dx.to(x.dtype), dweight.to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension with a learned scale, in float32 (float64 stays); under autocast
    the output is in the autocast dtype (its consumers are projections, which would cast it each)."""
    if torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    else:  # what x.to(x.dtype) * weight gives
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return _RMSNorm.apply(x, weight, eps, out_dtype)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, computed in float32 (float64 stays) and rounded once to the inputs' dtype."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        ctx.save_for_backward(gate, up)
        acc = _acc(gate)
        return (F.silu(gate.to(acc)) * up.to(acc)).to(torch.promote_types(gate.dtype, up.dtype))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        acc = _acc(gate)
        g, u, dy = gate.to(acc), up.to(acc), dy.to(acc)
        s = torch.sigmoid(g)
        dgate = dy * u * s * (1 + g * (1 - s))  # d silu(g) / dg = s (1 + g (1 - s))
        dup = dy * g * s
        return dgate.to(gate.dtype), dup.to(up.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, keeping only gate and up for the backward."""
    return _SwiGLU.apply(gate, up)
