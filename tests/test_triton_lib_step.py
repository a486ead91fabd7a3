"""The decode step's Triton helpers (mirasc/codegen/triton_lib/step.py) under the interpreter, against
torch on fresh random inputs; sizes that are no powers of two exercise the masked lanes."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_triton_lib import load_with_library

_INPUT = """
@triton.jit
def input_kernel(x_ptr, out_ptr, s_b, s_h, H, V, BV: tl.constexpr, CHANNEL: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    rv = tl.arange(0, BV)
    vmask = rv < V
    x = _step_input(x_ptr, b * s_b + h * s_h, rv, vmask, CHANNEL)
    tl.store(out_ptr + pid * BV + rv[None, :], tl.zeros([1, BV], dtype=tl.float32) + x)
"""


@pytest.mark.parametrize("layout", ["head", "channel", "learnable"])
def test_step_input_reads_one_token_of_each_layout(layout, tmp_path):
    module = load_with_library(["_step_input"], _INPUT, tmp_path)
    g = torch.Generator().manual_seed(21)
    B, H, V, BV = 3, 2, 5, 8
    shape = {"head": (B, H), "channel": (B, H, V), "learnable": (H,)}[layout]
    # a strided view in bf16: the helper must follow the strides and return fp32
    full = torch.randn(*shape, 2, generator=g).to(torch.bfloat16)
    x = full[..., 0]
    if layout == "channel":
        x = torch.randn(B, 2 * H, V, generator=g).to(torch.bfloat16)[:, ::2]  # unit stride along V only
    s_b, s_h = (0, x.stride(0)) if x.dim() == 1 else (x.stride(0), x.stride(1))
    out = torch.full((B * H, BV), float("nan"))
    module.input_kernel[(B * H,)](x, out, s_b, s_h, H, V, BV=BV, CHANNEL=layout == "channel")
    want = x.float().expand(B, H) if layout == "learnable" else x.float()
    want = want.reshape(B * H, -1)
    if layout == "channel":
        torch.testing.assert_close(out[:, :V], want, rtol=0, atol=0)
        assert (out[:, V:] == 1.0).all()  # padded channels: 1.0
    else:
        torch.testing.assert_close(out, want.expand(B * H, BV), rtol=0, atol=0)


_VECMAT = """
@triton.jit
def vecmat_kernel(x_ptr, m_ptr, out_ptr, K, V, BK: tl.constexpr, BV: tl.constexpr):
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
    m = tl.load(m_ptr + rk[:, None] * V + rv[None, :], mask=(rk < K)[:, None] & (rv < V)[None, :], other=0.0)
    tl.store(out_ptr + rv, _step_vecmat(x, m), mask=rv < V)
"""


def test_step_vecmat_is_a_row_times_a_matrix(tmp_path):
    module = load_with_library(["_step_vecmat"], _VECMAT, tmp_path)
    g = torch.Generator().manual_seed(22)
    K, V = 12, 20
    x, m = torch.randn(K, generator=g), torch.randn(K, V, generator=g)
    out = torch.full((V,), float("nan"))
    module.vecmat_kernel[(1,)](x, m, out, K, V, BK=16, BV=32)
    torch.testing.assert_close(out.double(), x.double() @ m.double(), rtol=1e-5, atol=1e-5)
