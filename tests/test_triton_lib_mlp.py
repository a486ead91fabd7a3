"""The MLP kernels' helpers (mirasc/codegen/triton_lib/mlp.py) under Triton's interpreter against torch:
tile loads and stores, the head sum (one program), the LayerNorm and its VJPs against torch.autograd, the
lq map's powers and norms, a program's tokens, and a chunk's gate products and their log-gradients."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from test_triton_lib import load_with_library

G = torch.Generator().manual_seed(31)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=G, dtype=torch.float64).to(dtype)


_TILES = """
@triton.jit
def tiles_kernel(x_ptr, w_ptr, k_ptr, out_ptr, wout_ptr, kout_ptr, eout_ptr, row_ptr, T: tl.constexpr,
                 D: tl.constexpr, BD: tl.constexpr, NR: tl.constexpr, NCOL: tl.constexpr, BW: tl.constexpr):
    rt = tl.arange(0, T)
    rd = tl.arange(0, BD)
    rows = x_ptr + rt[:, None] * D
    _st(out_ptr + rt[:, None] * D, rd, _ld(rows, rd, D) * 2.0, D)
    rw = tl.arange(0, BW)
    _stw(wout_ptr, _ldw(w_ptr, rw, rw, NR, NCOL) + 1.0, rw, rw, NR, NCOL)
    row = tl.load(row_ptr + rt)
    tmask = rt < T - 1
    _st(kout_ptr + rt[:, None] * BD, rd, _ldk(k_ptr, row, tmask, rd, D), BD)
    _st(eout_ptr + rt[:, None] * BD, rd, _ld_rows(k_ptr, row, tmask, rd, D, 5.0, True), BD)
    _st(eout_ptr + T * BD + rt[:, None] * BD, rd, _ld_rows(x_ptr, row, tmask, rd, D, 7.0, False)
        + tl.zeros([T, BD], dtype=tl.float32), BD)
"""


def test_tile_loads_and_stores(tmp_path):
    mod = load_with_library(["_ld", "_st", "_ldw", "_stw", "_ldk", "_ld_rows"], _TILES, tmp_path)
    T, D, BD, NR, NCOL, BW = 16, 12, 16, 10, 13, 16
    x, w = _rand(T, D), _rand(NR, NCOL)
    k = _rand(40, D, dtype=torch.bfloat16)
    row = torch.randperm(40, generator=G)[:T].to(torch.int32)
    out = torch.full((T, D), -9.0)
    wout = torch.full((NR, NCOL), -9.0)
    kout, eout = torch.full((T, BD), -9.0), torch.full((2, T, BD), -9.0)
    mod.tiles_kernel[(1,)](x, w, k, out, wout, kout, eout, row, T, D, BD, NR, NCOL, BW)
    torch.testing.assert_close(out, 2 * x)
    torch.testing.assert_close(wout, w + 1)
    ref = torch.zeros(T, BD)
    ref[:T - 1, :D] = k[row[:T - 1].long()].float()
    torch.testing.assert_close(kout, ref)
    ref_e = torch.full((T, BD), 5.0)  # OTHER outside the valid rows and columns
    ref_e[:T - 1, :D] = k[row[:T - 1].long()].float()
    torch.testing.assert_close(eout[0], ref_e)
    per_row = x.reshape(-1)[row.long()]  # a [B, T, H] tensor read at the rows, as a [BT, 1] column
    torch.testing.assert_close(eout[1, :T - 1], per_row[:T - 1, None].expand(T - 1, BD))
    assert torch.all(eout[1, T - 1] == 7.0)


_LN = """
@triton.jit
def ln_kernel(z_ptr, g_ptr, e_ptr, n_ptr, vjp_ptr, dg_ptr, dz_ptr, BT: tl.constexpr, V: tl.constexpr,
              BV: tl.constexpr):
    rt = tl.arange(0, BT)
    rv = tl.arange(0, BV)
    vmask = rv < V
    off = rt[:, None] * V + rv[None, :]
    m = vmask[None, :] & (rt[:, None] >= 0)
    z = tl.load(z_ptr + off, mask=m, other=0.0)
    g = tl.load(g_ptr + off, mask=m, other=0.0)
    e = tl.load(e_ptr + off, mask=m, other=0.0)
    n, rstd = _ln(z, vmask, V)
    d = _ln_vjp(n, rstd, g, vmask, V)
    dg, dz = _ln_vjp_vjp(n, rstd, g, d, e, vmask, V)
    tl.store(n_ptr + off, n, mask=m)
    tl.store(vjp_ptr + off, d, mask=m)
    tl.store(dg_ptr + off, dg, mask=m)
    tl.store(dz_ptr + off, dz, mask=m)
"""


def test_layernorm_and_its_vjps_match_autograd(tmp_path):
    mod = load_with_library(["_ln", "_ln_vjp", "_ln_vjp_vjp"], _LN, tmp_path)
    BT, V, BV = 16, 12, 16  # padded columns
    z, g, e = (_rand(BT, V) for _ in range(3))
    outs = [torch.empty(BT, V) for _ in range(4)]
    mod.ln_kernel[(1,)](z, g, e, *outs, BT, V, BV)
    zz, gg = z.double().requires_grad_(), g.double().requires_grad_()
    n = torch.nn.functional.layer_norm(zz, (V,), eps=1e-5)
    (d,) = torch.autograd.grad(n, zz, gg, create_graph=True)
    dz, dg = torch.autograd.grad(d, (zz, gg), e.double())
    for got, want in zip(outs, (n, d, dg, dz), strict=True):
        torch.testing.assert_close(got.double(), want.detach(), rtol=2e-4, atol=2e-5)


_LQ = """
@triton.jit
def lq_kernel(z_ptr, s_ptr, pow_ptr, grad_ptr, norm_ptr, dnorm_ptr, N: tl.constexpr, Q: tl.constexpr,
              QI: tl.constexpr, PW: tl.constexpr, AT0: tl.constexpr, EPS: tl.constexpr):
    r = tl.arange(0, N)
    z = tl.load(z_ptr + r)
    s = tl.load(s_ptr + r)
    tl.store(pow_ptr + r, _lq_pow(z, Q, QI))
    tl.store(grad_ptr + r, _lq_pow_grad(z, Q, QI))
    n = _lq_norm(s, PW, AT0, EPS)
    tl.store(norm_ptr + r, n)
    tl.store(dnorm_ptr + r, _lq_dnorm(s, n, PW, EPS))
"""


@pytest.mark.parametrize("q", [2.0, 3.0, 4.0, 5.0, 2.5])
def test_lq_powers_and_norms(q, tmp_path):
    mod = load_with_library(["_lq_pow", "_lq_pow_grad", "_lq_norm", "_lq_dnorm"], _LQ, tmp_path)
    N = 64
    z = _rand(N)
    z[0] = 0.0  # the power and its gradient at 0
    s = _rand(N).abs() * 3
    s[1] = 0.0
    eps = 0.4
    qi = int(q) if q == int(q) else 0
    outs = [torch.empty(N) for _ in range(4)]
    mod.lq_kernel[(1,)](z, s, *outs, N, q, qi, (q - 2) / q, 0.0 if q > 2 else 1.0, eps)
    zz = z.double().requires_grad_()
    p = zz.abs() ** q
    (grad,) = torch.autograd.grad(p.sum(), zz)
    ss = s.double().requires_grad_()
    raw = torch.where(ss > 0, ss.clamp_min(1e-30) ** ((q - 2) / q), torch.full_like(ss, 0.0 if q > 2 else 1.0))
    n = raw.clamp_min(eps)
    (dn,) = torch.autograd.grad(n.sum(), ss)
    for got, want in zip(outs, (p, grad, n, dn), strict=True):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)


_TOKENS = """
@triton.jit
def tokens_kernel(cu_ptr, out_ptr, T, H, NC, NSL, CH: tl.constexpr):
    hid = tl.program_id(0)
    h, bos, TN, srow0, NCN = _mlp_tokens(hid, cu_ptr, T, H, NC, NSL, CH)
    tl.store(out_ptr + hid * 5 + 0, h)
    tl.store(out_ptr + hid * 5 + 1, bos)
    tl.store(out_ptr + hid * 5 + 2, TN)
    tl.store(out_ptr + hid * 5 + 3, srow0)
    tl.store(out_ptr + hid * 5 + 4, NCN)
"""


def test_program_tokens_in_batch_rows_and_packed_sequences(tmp_path):
    mod = load_with_library(["_mlp_tokens"], _TOKENS, tmp_path)
    H, CH = 3, 16
    T, N = 40, 2
    out = torch.empty(N * H, 5, dtype=torch.int64)
    mod.tokens_kernel[(N * H,)](None, out, T, H, 3, 0, CH)
    for hid in range(N * H):
        assert out[hid].tolist() == [hid % H, (hid // H) * T, T, hid * 4, 3]
    cu = torch.tensor([0, 5, 37, 45], dtype=torch.int32)
    N, T = 3, 45
    nsl = T // CH + 2 * N
    out = torch.empty(N * H, 5, dtype=torch.int64)
    mod.tokens_kernel[(N * H,)](cu, out, T, H, 0, nsl, CH)
    for hid in range(N * H):
        b, h = divmod(hid, H)
        bos, tn = int(cu[b]), int(cu[b + 1] - cu[b])
        assert out[hid].tolist() == [h, bos, tn, h * nsl + bos // CH + 2 * b, -(-tn // CH)]


_GATES = """
@triton.jit
def gates_kernel(alpha_ptr, beta_ptr, row_ptr, out_ptr, dlog_ptr, dw_ptr, dlw_ptr, BT: tl.constexpr,
                 NVALID: tl.constexpr, LAST: tl.constexpr):
    rt = tl.arange(0, BT)
    tmask = rt < NVALID
    row = tl.load(row_ptr + rt)
    causal = rt[:, None] >= rt[None, :]
    alpha, E, D = _decay_coefs(alpha_ptr, row, tmask, causal, BT)
    beta, bc, Bs, C, Mm = _momentum_coefs(beta_ptr, row, tmask, causal, D)
    sq = rt[:, None] * BT + rt[None, :]
    tl.store(out_ptr + rt, E)
    tl.store(out_ptr + BT + sq, D)
    tl.store(out_ptr + BT + BT * BT + rt, bc)
    tl.store(out_ptr + 2 * BT + BT * BT + sq, Bs)
    tl.store(out_ptr + 2 * BT + 2 * BT * BT + sq, C)
    tl.store(out_ptr + 2 * BT + 3 * BT * BT + rt, Mm)
    islast = rt == LAST
    tl.store(out_ptr + 3 * BT + 3 * BT * BT, _at_last(E, islast))
    tl.store(out_ptr + 3 * BT + 3 * BT * BT + 1 + rt, _row_at_last(C, islast))
    alpha2, E2, D2 = _decay_coefs(None, row, tmask, causal, BT)
    tl.store(out_ptr + 4 * BT + 3 * BT * BT + 1 + rt, E2)
    dw = tl.load(dw_ptr + sq)
    dlw = tl.load(dlw_ptr + rt)
    tl.store(dlog_ptr + rt, _dlog_gate(dw, D, causal, dlw))
"""


def test_chunk_gate_products_and_their_log_gradients(tmp_path):
    mod = load_with_library(["_decay_coefs", "_momentum_coefs", "_at_last", "_row_at_last", "_dlog_gate"],
                            _GATES, tmp_path)
    BT, NVALID, LAST = 16, 13, 12
    alpha = torch.rand(50, generator=G) * 0.5 + 0.5
    beta = torch.rand(50, generator=G) * 0.5 + 0.4
    row = torch.randperm(50, generator=G)[:BT].to(torch.int32)
    out = torch.empty(5 * BT + 3 * BT * BT + 1)
    dw, dlw = _rand(BT, BT), _rand(BT)
    dlog = torch.empty(BT)
    mod.gates_kernel[(1,)](alpha, beta, row, out, dlog, dw, dlw, BT, NVALID, LAST)

    def products(g):
        lg = torch.log(torch.where(torch.arange(BT) < NVALID, g[row.long()].double(), 1.0))
        cum = lg.cumsum(0)
        tril = torch.ones(BT, BT).tril().bool()
        return cum.exp(), torch.where(tril, (cum[:, None] - cum[None, :]).exp(), 0.0), lg

    E, D, la = products(alpha)
    bc, Bs, _ = products(beta)
    C = D @ Bs
    o = out.double()
    sq = BT * BT
    for got, want in [(o[:BT], E), (o[BT:BT + sq].view(BT, BT), D), (o[BT + sq:2 * BT + sq], bc),
                      (o[2 * BT + sq:2 * BT + 2 * sq].view(BT, BT), Bs),
                      (o[2 * BT + 2 * sq:2 * BT + 3 * sq].view(BT, BT), C),
                      (o[2 * BT + 3 * sq:3 * BT + 3 * sq], (D * bc[None, :]).sum(1)),
                      (o[3 * BT + 3 * sq], E[LAST]), (o[3 * BT + 3 * sq + 1:4 * BT + 3 * sq + 1], C[LAST]),
                      (o[4 * BT + 3 * sq + 1:], torch.ones(BT, dtype=torch.float64))]:
        torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-6)
    # _dlog_gate: the gradient in log alpha of <dw, D> + <dlw, log P> with P_i = prod_{s <= i} alpha_s
    lg = la.clone().requires_grad_()
    cum = lg.cumsum(0)
    Dg = torch.where(torch.ones(BT, BT).tril().bool(), (cum[:, None] - cum[None, :]).exp(), 0.0)
    (want,) = torch.autograd.grad((dw.double() * Dg).sum() + (dlw.double() * cum).sum(), lg)
    torch.testing.assert_close(dlog.double(), want, rtol=1e-4, atol=1e-5)


_HEAD_SUM = """
@triton.jit
def head_sum_kernel(x_ptr, out_ptr, BT: tl.constexpr, BV: tl.constexpr):
    rt = tl.arange(0, BT)
    rv = tl.arange(0, BV)
    off = rt[:, None] * BV + rv[None, :]
    x = tl.load(x_ptr + off)
    tl.store(out_ptr + off, _head_sum(x, None, None, tl.program_id(0), 0, 0, rt, rv, 1, BT, BV))
"""


def test_head_sum_of_one_program_is_its_part(tmp_path):
    """One program per head (the interpreter runs programs one at a time, so NS > 1 needs a GPU: that case
    is tests/test_triton_mlp.py's sliced-heads tests)."""
    mod = load_with_library(["_head_sum"], _HEAD_SUM, tmp_path)
    x = _rand(16, 16)
    out = torch.empty(16, 16)
    mod.head_sum_kernel[(1,)](x, out, 16, 16)
    assert torch.equal(out, x)
