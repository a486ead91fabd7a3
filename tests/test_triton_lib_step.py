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


_MAP = """
@triton.jit
def map_kernel(z_ptr, g_ptr, out_ptr, K, V, BK: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr,
               KL_AXIS: tl.constexpr, KL_SCALE: tl.constexpr, LQ_Q: tl.constexpr, LQ_QI: tl.constexpr,
               LQ_PW: tl.constexpr, LQ_EPS: tl.constexpr, LQ_R0: tl.constexpr):
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    smask = (rk < K)[:, None] & (rv < V)[None, :]
    z = tl.load(z_ptr + rk[:, None] * V + rv[None, :], mask=smask, other=0.0)
    gamma = tl.load(g_ptr + rv, mask=rv < V, other=1.0)[None, :]
    w = _step_map(z, smask, gamma, MAP, KL_AXIS, KL_SCALE, LQ_Q, LQ_QI, LQ_PW, LQ_EPS, LQ_R0)
    tl.store(out_ptr + rk[:, None] * BV + rv[None, :], w)
"""


def _lq_oracle(z, q, eps):
    """Z / max(||Z||_q^(q-2), eps) over the whole matrix, in float64 (the torch backend's _retention_map)."""
    s = z.abs().pow(q).sum()
    n = s.pow((q - 2) / q) if s > 0 else torch.tensor(0.0 if q > 2 else float("inf"), dtype=z.dtype)
    return z / n.clamp_min(eps)


@pytest.mark.parametrize(("map_", "axis", "scale", "q", "scale_z"), [
    ("softmax", "key", 1.0, 3.0, 1.0),
    ("softmax", "value", 2.0, 3.0, 1.0),
    ("softmax", "all", 0.5, 3.0, 1.0),
    ("sigmoid", "key", 1.0, 3.0, 1.0),
    ("soft_threshold", "key", 1.0, 3.0, 1.0),
    ("lq", "key", 1.0, 3.0, 1.0),
    ("lq", "key", 1.0, 2.5, 1.0),  # |z|^q through exp / log
    ("lq", "key", 1.0, 1.5, 1.0),
    ("lq", "key", 1.0, 3.0, 1e-8),  # ||Z||_q^(q-2) below eps: the clamp holds
    ("lq", "key", 1.0, 3.0, 0.0),  # Z = 0, q > 2: Z / eps = 0
    ("lq", "key", 1.0, 1.5, 0.0),  # Z = 0, q < 2: an infinite norm, W = 0 (never inf * 0)
])
def test_step_map_matches_torch(map_, axis, scale, q, scale_z, tmp_path):
    module = load_with_library(["_step_map"], _MAP, tmp_path)
    g = torch.Generator().manual_seed(23)
    K, V, BK, BV = 12, 20, 16, 32
    z = scale_z * 2.0 * torch.randn(K, V, generator=g, dtype=torch.float64)
    gamma = 0.5 * torch.rand(V, generator=g, dtype=torch.float64)  # per channel: the broadest layout
    eps = 1e-6
    out = torch.full((BK, BV), float("nan"))
    qi = int(q) if q == int(q) else 0
    module.map_kernel[(1,)](z.float(), gamma.float(), out, K, V, BK=BK, BV=BV, MAP=map_, KL_AXIS=axis,
                            KL_SCALE=scale, LQ_Q=q, LQ_QI=qi, LQ_PW=(q - 2) / q, LQ_EPS=eps,
                            LQ_R0=1 / eps if q > 2 else 0.0)
    zf = z.float().double()  # the values the kernel sees
    want = {
        "softmax": lambda: scale * (zf.softmax(0) if axis == "key" else zf.softmax(1) if axis == "value"
                                    else zf.flatten().softmax(0).reshape(K, V)),
        "sigmoid": lambda: torch.sigmoid(zf),
        "soft_threshold": lambda: zf - torch.minimum(torch.maximum(zf, -gamma.float().double()),
                                                     gamma.float().double()),
        "lq": lambda: _lq_oracle(zf, q, eps),
    }[map_]()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:K, :V].double(), want, rtol=1e-5, atol=1e-6)
    assert (out[K:] == 0).all() and (out[:, V:] == 0).all(), "padded entries must read 0"
    if scale_z:
        assert want.abs().max() > 1e-3  # a map that returned zeros could not pass


_LN = """
@triton.jit
def ln_kernel(z_ptr, g_ptr, n_ptr, rstd_ptr, dz_ptr, V, BV: tl.constexpr):
    rv = tl.arange(0, BV)
    vmask = rv < V
    z = tl.load(z_ptr + rv[None, :], mask=vmask[None, :], other=0.0)
    g = tl.load(g_ptr + rv[None, :], mask=vmask[None, :], other=0.0)
    n, rstd = _step_ln(z, vmask)
    tl.store(n_ptr + rv[None, :], n)
    tl.store(rstd_ptr + rv[None, :], tl.zeros([1, BV], dtype=tl.float32) + rstd)
    tl.store(dz_ptr + rv[None, :], _step_ln_vjp(g, n, rstd, vmask))
"""


@pytest.mark.parametrize("V", [5, 8])
def test_step_ln_and_its_vjp_match_torch(V, tmp_path):
    """The MLP step's LayerNorm (no affine, eps 1e-5) of one row and its VJP against F.layer_norm and
    autograd, in float64 for the oracle; padded columns read 0."""
    module = load_with_library(["_step_ln", "_step_ln_vjp"], _LN, tmp_path)
    g = torch.Generator().manual_seed(23)
    BV = 8
    z = 3.0 * torch.randn(V, generator=g) + 0.5
    cot = torch.randn(V, generator=g)
    n, rstd, dz = (torch.full((BV,), float("nan")) for _ in range(3))
    module.ln_kernel[(1,)](z, cot, n, rstd, dz, V, BV=BV)
    z64 = z.double().requires_grad_()
    want = torch.nn.functional.layer_norm(z64, (V,), eps=1e-5)
    (want_dz,) = torch.autograd.grad(want, z64, cot.double())
    torch.testing.assert_close(n[:V].double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz[:V].double(), want_dz, rtol=1e-5, atol=1e-6)
    want_rstd = 1.0 / torch.sqrt(z.double().var(unbiased=False) + 1e-5)
    torch.testing.assert_close(rstd[0].double(), want_rstd, rtol=1e-5, atol=0)
    assert (n[V:] == 0).all() and (dz[V:] == 0).all()


_LQ_R = """
@triton.jit
def lq_r_kernel(z_ptr, out_ptr, K, V, BK: tl.constexpr, BV: tl.constexpr, Q: tl.constexpr, QI: tl.constexpr,
                PW: tl.constexpr, EPS: tl.constexpr, R0: tl.constexpr):
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    z = tl.load(z_ptr + rk[:, None] * V + rv[None, :], mask=(rk < K)[:, None] & (rv < V)[None, :], other=0.0)
    s = tl.sum(tl.zeros([BK], dtype=tl.float32), axis=0)
    for i in range(0, 2):  # the sum of two half tiles, as a kernel sums a matrix tile by tile
        half = tl.where((rk >= i * BK // 2) & (rk < (i + 1) * BK // 2), 1.0, 0.0)[:, None]
        s += tl.sum(tl.sum(_lq_pow(z * half, Q, QI), axis=1), axis=0)
    tl.store(out_ptr + tl.arange(0, 2), tl.join(_step_lq_r(s, PW, EPS, R0),
                                                _step_lq_rnorm(z, Q, QI, PW, EPS, R0)))
"""


@pytest.mark.parametrize("q", [3.0, 2.5])
def test_step_lq_r_from_a_tiled_sum_equals_the_whole_matrix_norm(q, tmp_path):
    module = load_with_library(["_step_lq_r", "_step_lq_rnorm"], _LQ_R, tmp_path)
    g = torch.Generator().manual_seed(24)
    K, V, BK, BV = 6, 5, 8, 8
    z = torch.randn(K, V, generator=g)
    out = torch.full((2,), float("nan"))
    qi = int(q) if q == int(q) else 0
    module.lq_r_kernel[(1,)](z, out, K, V, BK=BK, BV=BV, Q=q, QI=qi, PW=(q - 2) / q, EPS=1e-6, R0=1e6)
    want = 1.0 / z.double().abs().pow(q).sum().pow((q - 2) / q).clamp_min(1e-6)
    torch.testing.assert_close(out.double(), want.expand(2), rtol=1e-5, atol=0)


_OPERAND = """
@triton.jit
def operand_kernel(x_ptr, out_ptr, s_b, s_h, H, V, BV: tl.constexpr, LIT: tl.constexpr, CHANNEL: tl.constexpr):
    pid = tl.program_id(0)
    rv = tl.arange(0, BV)
    x = _step_operand(x_ptr, (pid // H) * s_b + (pid % H) * s_h, rv, rv < V, LIT, CHANNEL)
    tl.store(out_ptr + pid * BV + rv[None, :], tl.zeros([1, BV], dtype=tl.float32) + x)
"""


@pytest.mark.parametrize("layout", ["literal", "head", "channel"])
def test_step_operand_is_the_literal_or_the_input(layout, tmp_path):
    module = load_with_library(["_step_operand"], _OPERAND, tmp_path)
    g = torch.Generator().manual_seed(25)
    B, H, V, BV = 2, 3, 5, 8
    x = {"literal": None, "head": torch.randn(B, H, generator=g),
         "channel": torch.randn(B, H, V, generator=g)}[layout]
    s_b, s_h = (0, 0) if x is None else (x.stride(0), x.stride(1))
    out = torch.full((B * H, BV), float("nan"))
    module.operand_kernel[(B * H,)](x, out, s_b, s_h, H, V, BV=BV, LIT=0.75, CHANNEL=layout == "channel")
    if layout == "literal":
        assert (out == 0.75).all()
    elif layout == "head":
        torch.testing.assert_close(out, x.reshape(-1, 1).expand(B * H, BV), rtol=0, atol=0)
    else:
        torch.testing.assert_close(out[:, :V], x.reshape(B * H, V), rtol=0, atol=0)


_TILES = """
@triton.jit
def tiles_kernel(z1_ptr, z2_ptr, b1_ptr, b2_ptr, g1_ptr, g2_ptr, m1_ptr, m2_ptr, z1_out_ptr, z2_out_ptr,
                 m1_out_ptr, m2_out_ptr, b1_out_ptr, b2_out_ptr, s_ptr, decay, beta, K, X, V,
                 BK: tl.constexpr, BX: tl.constexpr, BV: tl.constexpr, AT_RETAINED: tl.constexpr,
                 MOMENTUM: tl.constexpr):
    pid = tl.program_id(0)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    rx = tl.arange(0, BX)
    w1_off = pid * K * X + rk[:, None] * X
    w2_off = pid * X * V + rv[None, :]
    s1 = tl.sum(tl.zeros([BX], dtype=tl.float32), axis=0)
    s2 = s1
    for x0 in range(0, X, BX):
        off1, off2, mask1, mask2 = _step_tile(x0, rx, X, rk < K, rv < V, w1_off, w2_off, V)
        s1 += _step_lq_sum(_step_base(z1_ptr, b1_ptr, off1, mask1), 3.0, 3)
        s2 += _step_lq_sum(_step_base(z2_ptr, b2_ptr, off2, mask2), 3.0, 3)
        Z1 = tl.load(z1_ptr + off1, mask=mask1, other=0.0)
        Z2 = tl.load(z2_ptr + off2, mask=mask2, other=0.0)
        w1 = _step_retain(_step_base_or(Z1, b1_ptr, off1, mask1), decay, b1_out_ptr, off1, mask1, AT_RETAINED)
        w2 = _step_retain(_step_base_or(Z2, b2_ptr, off2, mask2), decay, b2_out_ptr, off2, mask2, AT_RETAINED)
        # a gradient that depends on the gradient point, so that a wrong base shows
        g1 = tl.load(g1_ptr + off1, mask=mask1, other=0.0) * w1
        g2 = tl.load(g2_ptr + off2, mask=mask2, other=0.0) * w2
        _step_update(Z1, g1, decay, beta, m1_ptr, m1_out_ptr, z1_out_ptr, off1, mask1, MOMENTUM)
        _step_update(Z2, g2, decay, beta, m2_ptr, m2_out_ptr, z2_out_ptr, off2, mask2, MOMENTUM)
    tl.store(s_ptr + pid * 2 + tl.arange(0, 2), tl.join(s1, s2))
"""


@pytest.mark.parametrize("first,retained,momentum", [(True, True, True), (False, True, False),
                                                     (False, False, True), (True, False, False)])
def test_step_tiles_read_the_base_retain_and_update_like_torch(first, retained, momentum, tmp_path):
    """A depth-2 memory walked in hidden tiles (X no multiple of BX, K and V no powers of two): the base
    (z at a chunk's first token, else b), the at=retained gradient point and next base, the gd / momentum
    update and the lq sums, against torch."""
    module = load_with_library(["_step_tile", "_step_base", "_step_base_or", "_step_retain", "_step_update",
                                "_step_lq_sum"], _TILES, tmp_path)
    gen = torch.Generator().manual_seed(26)
    P, K, X, V, BK, BX, BV = 3, 5, 7, 6, 8, 4, 8
    decay, beta = 0.9, 0.8

    def rand(*shape):
        return torch.randn(P, *shape, generator=gen)

    z, b, g, m = ([rand(K, X), rand(X, V)] for _ in range(4))
    zo, mo, bo = ([torch.full_like(x, float("nan")) for x in z] for _ in range(3))
    s = torch.full((P, 2), float("nan"))
    module.tiles_kernel[(P,)](*z, *((None, None) if first else b), *g, *(m if momentum else (None, None)),
                              *zo, *(mo if momentum else (None, None)), *(bo if retained else (None, None)),
                              s, decay, beta, K, X, V, BK=BK, BX=BX, BV=BV, AT_RETAINED=retained,
                              MOMENTUM=momentum)
    for i in range(2):
        base = (z if first else b)[i].double()
        w = decay * base if retained else base
        grad = g[i].double() * w
        if momentum:
            m_new = beta * m[i].double() + grad
            torch.testing.assert_close(mo[i].double(), m_new, rtol=1e-6, atol=1e-6)
            want = decay * z[i].double() - m_new
        else:
            want = decay * z[i].double() - grad
        torch.testing.assert_close(zo[i].double(), want, rtol=1e-6, atol=1e-6)
        if retained:
            torch.testing.assert_close(bo[i].double(), w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s[:, i].double(), base.abs().pow(3).sum(dim=(1, 2)), rtol=1e-5, atol=0)
