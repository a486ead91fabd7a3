"""The MLP kernels' helpers (mirasc/codegen/triton_lib/mlp.py) under Triton's interpreter against torch:
tile loads and stores, the head sum (one program), the LayerNorm and its VJPs against torch.autograd, the
read-out's output and its backward (the NORM, RESIDUAL and LQ flags), the
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
    v_off = row[:, None] * D + rd[None, :]
    m_v = tmask[:, None] & (rd < D)[None, :]
    _st(eout_ptr + rt[:, None] * BD, rd, _ld_rows(k_ptr, row, tmask, v_off, m_v, 5.0, True), BD)
    _st(eout_ptr + T * BD + rt[:, None] * BD, rd, _ld_rows(x_ptr, row, tmask, v_off, m_v, 7.0, False)
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


_OUTPUT = """
@triton.jit
def output_kernel(p_ptr, q_ptr, do_ptr, n_ptr, o_ptr, dst_ptr, dn_ptr, BT: tl.constexpr, V: tl.constexpr,
                  BV: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, LQ: tl.constexpr):
    rt = tl.arange(0, BT)
    rv = tl.arange(0, BV)
    vmask = rv < V
    tmask = rt < BT - 1  # the last row is padding
    v_off = rt[:, None] * V + rv[None, :]
    m_v = tmask[:, None] & vmask[None, :]
    p = tl.load(p_ptr + v_off, mask=m_v, other=0.0)
    _mlp_output(o_ptr, p, q_ptr, rt, tmask, v_off, m_v, rv, vmask, V, V, NORM, RESIDUAL)
    do = tl.load(do_ptr + v_off, mask=m_v, other=0.0)
    dn = _output_vjp(do, p, dst_ptr + rt[:, None] * BV, tl.load(n_ptr + rt), tl.full([BT], -1.0, tl.float32),
                     rv, vmask, V, NORM, LQ)
    tl.store(dn_ptr + rt, dn)
"""


@pytest.mark.parametrize("norm,lq", [(True, True), (True, False), (False, True), (False, False)])
def test_output_and_its_vjp_match_autograd(norm, lq, tmp_path):
    """o = [q +] [LN](p) (the residual with the LN here) and its backward at dL/do: dL/du for
    p = u / n (with the lq map, else p = u) and dL/dn."""
    mod = load_with_library(["_mlp_output", "_output_vjp"], _OUTPUT, tmp_path)
    BT, V, BV = 16, 12, 16
    p, q, do = _rand(BT, V), _rand(BT, V), _rand(BT, V)
    n = _rand(BT).abs() + 0.5
    o, dst, dn = torch.full((BT, V), -9.0), torch.full((BT, BV), -9.0), torch.empty(BT)
    mod.output_kernel[(1,)](p, q, do, n, o, dst, dn, BT, V, BV, norm, norm, lq)
    u = (p.double() * n.double()[:, None] if lq else p.double()).requires_grad_()
    nn = n.double().requires_grad_()
    pp = u / nn[:, None] if lq else u
    want = torch.nn.functional.layer_norm(pp, (V,), eps=1e-5) if norm else pp
    if norm:
        want = want + q.double()
    du, dnn = torch.autograd.grad(want, (u, nn), do.double(), allow_unused=True)
    valid = slice(0, BT - 1)
    torch.testing.assert_close(o[valid].double(), want[valid].detach(), rtol=2e-4, atol=2e-5)
    assert torch.all(o[BT - 1] == -9.0)  # padded rows are not stored
    torch.testing.assert_close(dst[valid, :V].double(), du[valid], rtol=2e-4, atol=2e-5)
    if lq:
        torch.testing.assert_close(dn[valid].double(), dnn[valid], rtol=2e-4, atol=2e-5)
    else:
        assert torch.all(dn == -1.0)  # the placeholder, as passed


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


# ---- the phases of a chunk, one layer at a time ----------------------------------------------------
# Test kernels hold a layer's slots in a scratch tensor [slots, BT, DM] (slot i: rows scr + i BT DM + t DM)
# and the tokens' inputs as [BT, D] (row t). The activation is the generated modules' tanh.

BT, BD, DM = 16, 16, 32


def _act_src():
    from mirasc.codegen.printers import triton_activation_source as activation_source

    return activation_source("tanh") + "\n\n"


def _tanh_d(z):
    return 1 - torch.tanh(z) ** 2


def _tanh_d2(z):
    t = torch.tanh(z)
    return -2 * t * (1 - t * t)


def _lib(names, kernels, tmp_path):
    return load_with_library(names, _act_src() + kernels, tmp_path)


def _slots(n):
    return _rand(n, BT, DM) * 0.5


def _tril():
    return torch.ones(BT, BT, dtype=torch.bool).tril()


_SETUP = """
    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    tmask = rt < BT
    s0 = scr_ptr + rt[:, None] * DM
    E = tl.load(E_ptr + rt)
"""

_LAYER_PRODUCT = """
@triton.jit
def layer_product_kernel(k_ptr, w_ptr, scr_ptr, E_ptr, ib, BT: tl.constexpr, DM: tl.constexpr, DIN: tl.constexpr,
                         DOUT: tl.constexpr, BD: tl.constexpr, INPUT: tl.constexpr, RETAINED: tl.constexpr,
                         LAST: tl.constexpr):
""" + _SETUP + """
    if INPUT:
        _layer_product(k_ptr, w_ptr, s0 + 1 * BT * DM, rt, tmask, E, ib, rd, 0, DIN, 0, DOUT, DIN, DOUT, BT, BD,
                       0, True, RETAINED)
    else:
        _layer_product(s0, w_ptr, s0 + 1 * BT * DM, rt, tmask, E, ib, rd, 0, DIN, 0, DOUT, DIN, DOUT, BT, BD,
                       0, False, RETAINED)
    _delta_product(s0 + 2 * BT * DM, s0 + 3 * BT * DM, w_ptr, s0 + 4 * BT * DM, E, ib, rd, 0, DIN, 0, DOUT, DIN,
                   DOUT, BT, BD, 0, LAST, RETAINED)
"""


@pytest.mark.parametrize("inp, retained, ib", [(True, False, None), (False, True, 0.7), (False, False, None)])
def test_layer_and_delta_products(inp, retained, ib, tmp_path):
    """_layer_product: z_l = a_(l-1) W_l (a from the input or tanh of a slot); _delta_product:
    d_(l+1) W_(l+1)^T with d_(l+1) a slot as it is (the last layer) or dt act'(z) times E."""
    mod = _lib(["_layer_product", "_delta_product"], _LAYER_PRODUCT, tmp_path)
    DIN, DOUT = 32, 24
    k, w, E = _rand(BT, DIN), _rand(DIN, DOUT) / 4, torch.rand(BT, generator=G) + 0.5
    scr = _slots(5)
    ref = scr.clone()
    mod.layer_product_kernel[(1,)](k, w, scr, E, ib, BT, DM, DIN, DOUT, BD, inp, retained, not retained)
    a = k if inp else torch.tanh(ref[0, :, :DIN])
    z = a @ w * (ib or 1.0) * (E[:, None] if retained else 1.0)
    torch.testing.assert_close(scr[1, :, :DOUT], z, rtol=1e-5, atol=1e-5)
    d = ref[2, :, :DOUT] * (_tanh_d(ref[3, :, :DOUT]) * E[:, None] if retained else 1.0)
    torch.testing.assert_close(scr[4, :, :DIN], d @ w.T * (ib or 1.0), rtol=1e-5, atol=1e-5)


_READOUT = """
@triton.jit
def readout_kernel(q_ptr, k_ptr, w_ptr, m_ptr, wo_ptr, mo_ptr, scr_ptr, E_ptr, C_ptr, Mm_ptr, cL_ptr, sL_ptr,
                   n_ptr, e, MmL, bcL, BT: tl.constexpr, DM: tl.constexpr, DIN: tl.constexpr, DOUT: tl.constexpr,
                   BD: tl.constexpr, MOM: tl.constexpr, LQ: tl.constexpr):
""" + _SETUP + """
    C = tl.load(C_ptr + rt[:, None] * BT + rt[None, :])
    cL = tl.load(cL_ptr + rt)
    if MOM:
        Mm = tl.load(Mm_ptr + rt)
        sL = tl.load(sL_ptr + rt)
        _readout_layer(w_ptr, m_ptr, wo_ptr, mo_ptr, q_ptr, k_ptr, s0, s0, s0 + BT * DM, rt, tmask, E, C, Mm, e,
                       MmL, bcL, cL, sL, None, rd, 0, DIN, 0, DOUT, DIN, DOUT, BT, BD, 0, True, True, False)
    elif LQ:
        n = tl.load(n_ptr + rt)
        _readout_layer(w_ptr, None, None, None, q_ptr, k_ptr, s0, s0, s0 + BT * DM, rt, tmask, E, C, None, None,
                       None, None, None, None, n, rd, 0, DIN, 0, DOUT, DIN, DOUT, BT, BD, 0, True, True, False)
    else:
        _readout_layer(w_ptr, None, wo_ptr, None, q_ptr, k_ptr, s0, s0, s0 + BT * DM, rt, tmask, E, C, None, e,
                       None, None, cL, None, None, rd, 0, DIN, 0, DOUT, DIN, DOUT, BT, BD, 0, True, True, False)
"""


def _readout_inputs(DIN, DOUT):
    E = torch.rand(BT, generator=G) + 0.5
    C = torch.where(_tril(), torch.rand(BT, BT, generator=G), 0.0)
    vec = [torch.rand(BT, generator=G) for _ in range(4)]  # Mm, cL, sL, n
    return (_rand(BT, DIN), _rand(BT, DIN), _rand(DIN, DOUT) / 4, _rand(DIN, DOUT) / 4, E, C, *vec)


@pytest.mark.parametrize("mom, lq", [(True, False), (False, True), (False, False)])
def test_readout_layer(mom, lq, tmp_path):
    """p = E (h W) - Mm (h m) - ((h a^T) C) d [/ n], and the state update e W - Mm_L m - (a c)^T d,
    bc_L m + (a s)^T d (h = q, a = k: a first layer; d = slot 0 as it is: the last)."""
    mod = _lib(["_readout_layer"], _READOUT, tmp_path)
    DIN, DOUT = 32, 24
    q, k, w, m, E, C, Mm, cL, sL, n = _readout_inputs(DIN, DOUT)
    wo, mo = torch.zeros(DIN, DOUT), torch.zeros(DIN, DOUT)
    scr = _slots(2)
    d = scr[0, :, :DOUT].clone()
    e, MmL, bcL = 0.9, 0.3, 0.8
    mod.readout_kernel[(1,)](q, k, w, m, wo, mo, scr, E, C, Mm, cL, sL, n, e, MmL, bcL, BT, DM, DIN, DOUT, BD,
                             mom, lq)
    p = E[:, None] * (q @ w) - ((q @ k.T) * C) @ d
    if mom:
        p = p - Mm[:, None] * (q @ m)
    if lq:
        p = p / n[:, None]
    torch.testing.assert_close(scr[1, :, :DOUT], p, rtol=1e-5, atol=1e-5)
    if not lq:
        upd = e * w - (k * cL[:, None]).T @ d - (MmL * m if mom else 0.0)
        torch.testing.assert_close(wo, upd, rtol=1e-5, atol=1e-5)
    if mom:
        torch.testing.assert_close(mo, bcL * m + (k * sL[:, None]).T @ d, rtol=1e-5, atol=1e-5)


_READOUT_VJP = """
@triton.jit
def readout_vjp_kernel(q_ptr, k_ptr, w_ptr, m_ptr, gw_ptr, gm_ptr, scr_ptr, E_ptr, C_ptr, Mm_ptr, cL_ptr,
                       sL_ptr, out_ptr, BT: tl.constexpr, DM: tl.constexpr, DIN: tl.constexpr, DOUT: tl.constexpr,
                       BD: tl.constexpr, MOM: tl.constexpr):
""" + _SETUP + """
    causal = rt[:, None] >= rt[None, :]
    C = tl.load(C_ptr + rt[:, None] * BT + rt[None, :])
    cL = tl.load(cL_ptr + rt)
    zb = tl.zeros([BT], dtype=tl.float32)
    sq = rt[:, None] * BT + rt[None, :]
    if MOM:
        Mm = tl.load(Mm_ptr + rt)
        sL = tl.load(sL_ptr + rt)
        dC, dE, dcL, dMm, dsL, dn = _readout_layer_vjp(
            w_ptr, m_ptr, gw_ptr, gm_ptr, q_ptr, k_ptr, s0, s0, s0 + BT * DM, s0 + 2 * BT * DM, s0 + 3 * BT * DM,
            s0 + 4 * BT * DM, None, rt, tmask, E, C, Mm, cL, sL, None, tl.zeros([BT, BT], dtype=tl.float32), zb,
            zb, zb, zb, None, causal, rd, 0, DIN, 0, DOUT, DIN, DOUT, BT, BD, 0, True, True, False)
        tl.store(out_ptr + BT * BT + 2 * BT + rt, dMm)
        tl.store(out_ptr + BT * BT + 3 * BT + rt, dsL)
    else:
        dC, dE, dcL, dMm, dsL, dn = _readout_layer_vjp(
            w_ptr, None, gw_ptr, None, q_ptr, k_ptr, s0, s0, s0 + BT * DM, s0 + 2 * BT * DM, s0 + 3 * BT * DM,
            s0 + 4 * BT * DM, None, rt, tmask, E, C, None, cL, None, None, tl.zeros([BT, BT], dtype=tl.float32),
            zb, zb, None, None, None, causal, rd, 0, DIN, 0, DOUT, DIN, DOUT, BT, BD, 0, True, True, False)
    tl.store(out_ptr + sq, dC)
    tl.store(out_ptr + BT * BT + rt, dE)
    tl.store(out_ptr + BT * BT + BT + rt, dcL)
"""


@pytest.mark.parametrize("mom", [True, False])
def test_readout_layer_vjp_matches_autograd(mom, tmp_path):
    """The gradients of <dp, p> + <gw, W_next> [+ <gm, m_next>] (p, the next state as _readout_layer computes
    them from h = q, a = k, d) in d, a, h, C (its causal part), E, c [, Mm, s]."""
    mod = _lib(["_readout_layer_vjp"], _READOUT_VJP, tmp_path)
    DIN, DOUT = 32, 24
    q, k, w, m, E, C, Mm, cL, sL, _ = _readout_inputs(DIN, DOUT)
    gw, gm = _rand(DIN, DOUT), _rand(DIN, DOUT)
    scr = _slots(5)
    d, dp = scr[0, :, :DOUT].clone(), scr[1, :, :DOUT].clone()
    out = torch.zeros(BT * BT + 4 * BT)
    mod.readout_vjp_kernel[(1,)](q, k, w, m, gw, gm, scr, E, C, Mm, cL, sL, out, BT, DM, DIN, DOUT, BD, mom)
    leaves = [x.double().requires_grad_() for x in (d, k, q, C, E, cL, Mm, sL)]
    dd, kk, qq, CC, EE, cc, MM, ss = leaves
    p = EE[:, None] * (qq @ w.double()) - ((qq @ kk.T) * CC) @ dd
    loss = (dp.double() * p).sum() - (gw.double() * ((kk * cc[:, None]).T @ dd)).sum()
    if mom:
        p_m = -MM[:, None] * (qq @ m.double())
        loss = loss + (dp.double() * p_m).sum() + (gm.double() * ((kk * ss[:, None]).T @ dd)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    got = [scr[2, :, :DOUT], scr[3, :, :DIN], scr[4, :, :DIN], out[:BT * BT].view(BT, BT),
           out[BT * BT:BT * BT + BT], out[BT * BT + BT:BT * BT + 2 * BT]]
    want = [grads[0], grads[1], grads[2], torch.where(_tril(), grads[3], 0.0), grads[4], grads[5]]
    if mom:
        got += [out[BT * BT + 2 * BT:BT * BT + 3 * BT], out[BT * BT + 3 * BT:]]
        want += [grads[6], grads[7]]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"gradient {i}")


_BASE_VJP = """
@triton.jit
def base_vjp_kernel(w_ptr, wn_ptr, scr_ptr, E_ptr, out_ptr, ib, BT: tl.constexpr, DM: tl.constexpr,
                    DIN: tl.constexpr, DOUT: tl.constexpr, BD: tl.constexpr, RETAINED: tl.constexpr):
""" + _SETUP + """
    first = rt >= 0
    dl = tl.zeros([BT], dtype=tl.float32)
    # slots: 0 dz_l, 1 z_l, 2 z_(l-1), 3 da_(l-1), 4 dz_(l-1); then 5 dd_l, 6 dt_l, 7 dd_(l+1), 8 dz_l out
    dl = _layer_vjp(w_ptr, s0, s0 + BT * DM, s0 + 2 * BT * DM, s0 + 3 * BT * DM, s0 + 4 * BT * DM, first, E, ib,
                    dl, rd, 0, DIN, 0, DOUT, DIN, DOUT, BT, BD, 0, False, True, RETAINED)
    dl = _delta_vjp_layer(wn_ptr, s0 + 5 * BT * DM, s0 + 6 * BT * DM, s0 + 1 * BT * DM, s0 + 7 * BT * DM,
                          s0 + 8 * BT * DM, E, ib, dl, rd, 0, DOUT, 0, DIN, DOUT, DIN, BT, BD, 0, RETAINED)
    tl.store(out_ptr + rt, dl)
"""


@pytest.mark.parametrize("retained, ib", [(False, None), (True, 0.6)])
def test_base_pass_vjps(retained, ib, tmp_path):
    """_layer_vjp: dz_(l-1) += (dz_l W_l^T [ib] + da_(l-1)) act'(z_(l-1)) (dz_l times E at=retained);
    _delta_vjp_layer: dd_(l+1) += u W_(l+1) [ib] with u = dd_l act'(z_l) [E], dz_l = dd_l dt_l act''(z_l) [E];
    at=retained both add to d log E: <dz_l, z_l> and <dd_l dt_l act'(z_l), E>."""
    mod = _lib(["_layer_vjp", "_delta_vjp_layer"], _BASE_VJP, tmp_path)
    DIN, DOUT = 32, 24
    w, wn = _rand(DIN, DOUT) / 4, _rand(DOUT, DIN) / 4
    E = torch.rand(BT, generator=G) + 0.5
    scr = _slots(9)
    r = scr.clone()
    out = torch.zeros(BT)
    mod.base_vjp_kernel[(1,)](w, wn, scr, E, out, ib, BT, DM, DIN, DOUT, BD, retained)
    s = ib or 1.0
    ev = E[:, None] if retained else 1.0
    dz = r[0, :, :DOUT] * ev
    dzp = (dz @ w.T * s + r[3, :, :DIN]) * _tanh_d(r[2, :, :DIN])
    torch.testing.assert_close(scr[4, :, :DIN], r[4, :, :DIN] + dzp, rtol=1e-5, atol=1e-5)
    ddl, dtl, zl = r[5, :, :DOUT], r[6, :, :DOUT], r[1, :, :DOUT]
    u = ddl * _tanh_d(zl) * ev
    torch.testing.assert_close(scr[7, :, :DIN], r[7, :, :DIN] + u @ wn * s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scr[8, :, :DOUT], ddl * dtl * _tanh_d2(zl) * ev, rtol=1e-5, atol=1e-5)
    dlog = ((r[0, :, :DOUT] * zl).sum(1) + (ddl * dtl * _tanh_d(zl) * E[:, None]).sum(1)) if retained else 0 * E
    torch.testing.assert_close(out, dlog, rtol=1e-5, atol=1e-5)


_WEIGHT_GRAD = """
@triton.jit
def weight_grad_kernel(w_ptr, m_ptr, gw_ptr, gm_ptr, go_ptr, gmo_ptr, scr_ptr, E_ptr, Mm_ptr, out_ptr, e, MmL, bcL,
                       ib, kap, BT: tl.constexpr, DM: tl.constexpr, DIN: tl.constexpr, DOUT: tl.constexpr,
                       BD: tl.constexpr, MOM: tl.constexpr, LQ: tl.constexpr, LQC: tl.constexpr):
""" + _SETUP + """
    zero = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    # slots: 0 h_(l-1) pre-activations, 1 a_(l-1) pre-activations, 2 dp_l, 3 dz_l, 4 dd_(l-1), 5 dt_l, 6 z_l
    if MOM:
        Mm = tl.load(Mm_ptr + rt)
        de, dMmL, dbcL = _weight_grad_layer(
            w_ptr, m_ptr, gw_ptr, gm_ptr, go_ptr, gmo_ptr, s0, s0 + BT * DM, s0 + 2 * BT * DM, s0 + 3 * BT * DM,
            s0 + 4 * BT * DM, s0 + BT * DM, s0 + 5 * BT * DM, s0 + 6 * BT * DM, rt, tmask, E, Mm, e, MmL, bcL,
            None, None, zero, zero, zero, rd, 0, DIN, 0, DOUT, DIN, DOUT, BT, BD, 0, False, False, False, None,
            None, None)
        tl.store(out_ptr + 1, dMmL)
        tl.store(out_ptr + 2, dbcL)
    elif LQ:
        de, _a, _b = _weight_grad_layer(
            w_ptr, None, gw_ptr, None, go_ptr, None, s0, s0 + BT * DM, s0 + 2 * BT * DM, s0 + 3 * BT * DM,
            s0 + 4 * BT * DM, s0 + BT * DM, s0 + 5 * BT * DM, s0 + 6 * BT * DM, rt, tmask, E, None, e, None, None,
            ib, kap, zero, None, None, rd, 0, DIN, 0, DOUT, DIN, DOUT, BT, BD, 0, False, False, False, 3.0, 3, LQC)
    else:
        de, _a, _b = _weight_grad_layer(
            w_ptr, None, gw_ptr, None, go_ptr, None, s0, s0 + BT * DM, s0 + 2 * BT * DM, s0 + 3 * BT * DM,
            s0 + 4 * BT * DM, s0 + BT * DM, s0 + 5 * BT * DM, s0 + 6 * BT * DM, rt, tmask, E, None, e, None, None,
            None, None, zero, None, None, rd, 0, DIN, 0, DOUT, DIN, DOUT, BT, BD, 0, False, False, False, None,
            None, None)
    tl.store(out_ptr, de)
"""


@pytest.mark.parametrize("mom, lq, lqc", [(True, False, False), (False, True, False), (False, True, True),
                                          (False, False, False)])
def test_weight_grad_layer(mom, lq, lqc, tmp_path):
    """dL/dW_b = e gw + (h E)^T dp + a^T dz + u^T d (u = dd_(l-1) act'(z_(l-1)), d = dt_l act'(z_l)); with
    lq, gb / n + kap q sign(W)|W|^(q-1) + what go held (norm=token; not with norm=chunk, lqc); with momentum dL/dm_b = bc_L gm - Mm_L gw - (h Mm)^T dp;
    the sums <W, gw>, -<m, gw>, <m, gm>."""
    mod = _lib(["_weight_grad_layer"], _WEIGHT_GRAD, tmp_path)
    DIN, DOUT = 32, 24
    w, m, gw, gm = (_rand(DIN, DOUT) / 4 for _ in range(4))
    go0, gmo0 = _rand(DIN, DOUT), _rand(DIN, DOUT)
    go, gmo = go0.clone(), gmo0.clone()
    E, Mm = torch.rand(BT, generator=G) + 0.5, torch.rand(BT, generator=G)
    scr = _slots(7)
    r = scr.clone()
    out = torch.zeros(3)
    e, MmL, bcL, ib, kap = 0.9, 0.3, 0.8, 0.7, -0.2
    mod.weight_grad_kernel[(1,)](w, m, gw, gm, go, gmo, scr, E, Mm, out, e, MmL, bcL, ib, kap, BT, DM, DIN, DOUT, BD,
                                 mom, lq, lqc)
    h, a = torch.tanh(r[0, :, :DIN]), torch.tanh(r[1, :, :DIN])
    dp, dz = r[2, :, :DOUT], r[3, :, :DOUT]
    u = r[4, :, :DIN] * _tanh_d(r[1, :, :DIN])
    d = r[5, :, :DOUT] * _tanh_d(r[6, :, :DOUT])
    gb = a.T @ dz + u.T @ d
    want = e * gw + (h * E[:, None]).T @ dp + (gb * ib + kap * 3 * w * w.abs() + (0 if lqc else go0) if lq else gb)
    torch.testing.assert_close(go, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], (w * gw).sum(), rtol=1e-5, atol=1e-5)
    if mom:
        torch.testing.assert_close(gmo, bcL * gm - MmL * gw - (h * Mm[:, None]).T @ dp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1:], torch.stack([-(m * gw).sum(), (m * gm).sum()]), rtol=1e-5, atol=1e-5)


_LQ_PASSES = """
@triton.jit
def lq_passes_kernel(k_ptr, w_ptr, scr_ptr, E_ptr, C_ptr, dn_ptr, go_ptr, out_ptr, BT: tl.constexpr,
                     DM: tl.constexpr, DIN: tl.constexpr, DOUT: tl.constexpr, BD: tl.constexpr, QA: tl.constexpr,
                     QB: tl.constexpr, Q: tl.constexpr, QI: tl.constexpr, PW: tl.constexpr, EPS: tl.constexpr):
""" + _SETUP + """
    causal = rt[:, None] >= rt[None, :]
    zero = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    C = tl.load(C_ptr + rt[:, None] * BT + rt[None, :])
    sb, nb, ib = _lq_base_norm(w_ptr, zero, rd, DIN, DOUT, BD, Q, QI, PW, 0.0, EPS)
    tl.store(out_ptr, sb)
    tl.store(out_ptr + 1, ib)
    # slots: 0 d_l (the last layer's, as it is), 1 dd_l, 2 da_(l-1)
    s, n = _lq_token_norms(w_ptr, None, k_ptr, s0, s0, rt, tmask, E, C, None, BT, QA, QB, DIN, DOUT, 0,
                           True, True, False, Q, QI, PW, 0.0, EPS)
    tl.store(out_ptr + 2 + rt, n)
    dn = tl.load(dn_ptr + rt)
    dE, dC, dMm = _lq_norms_vjp(w_ptr, None, k_ptr, s0, s0, rt, tmask, E, C, None, s0 + BT * DM,
                                s0 + 2 * BT * DM, go_ptr, None, s, n, dn, tl.zeros([BT], dtype=tl.float32),
                                tl.zeros([BT, BT], dtype=tl.float32), None, causal, BT, QA, QB, DIN, DOUT, 0, True,
                                True, False, Q, QI, PW, EPS)
    tl.store(out_ptr + 2 + BT + rt, dE)
    tl.store(out_ptr + 2 + 2 * BT + rt[:, None] * BT + rt[None, :], dC)
"""


def test_lq_passes_match_autograd(tmp_path):
    """The lq map of the base weights and of every token's Z_i = E_i Z_b - sum_j C_ij k_j^T d_j, and the
    gradients of <dn, n(Z_i)> in d, k, Z_b, E and C (its causal part) against autograd."""
    mod = _lib(["_lq_base_norm", "_lq_token_norms", "_lq_norms_vjp"], _LQ_PASSES, tmp_path)
    DIN, DOUT, QA, QB, q, eps = 32, 24, 8, 16, 3.0, 1e-3
    k, w = _rand(BT, DIN), _rand(DIN, DOUT) / 4
    E = torch.rand(BT, generator=G) + 0.5
    C = torch.where(_tril(), torch.rand(BT, BT, generator=G), 0.0)
    dn = _rand(BT)
    scr = _slots(3)
    r = scr.clone()
    go = torch.full((DIN, DOUT), -7.0)
    out = torch.zeros(2 + 2 * BT + BT * BT)
    mod.lq_passes_kernel[(1,)](k, w, scr, E, C, dn, go, out, BT, DM, DIN, DOUT, BD, QA, QB, q, 3, (q - 2) / q, eps)

    def norm(s):
        return s.clamp_min(1e-30) ** ((q - 2) / q)

    sb = (w.double().abs() ** q).sum()
    torch.testing.assert_close(out[:2].double(), torch.stack([sb, 1 / norm(sb).clamp_min(eps)]), rtol=1e-5, atol=1e-6)
    leaves = [x.double().requires_grad_() for x in (r[0, :, :DOUT], k, w, E, C)]
    dd, kk, ww, EE, CC = leaves
    R = kk[:, :, None] * dd[:, None, :]  # [BT, DIN, DOUT]: k_j^T d_j
    Z = EE[:, None, None] * ww[None] - torch.einsum("ij,jab->iab", CC, R)
    n = norm((Z.abs() ** q).sum((1, 2))).clamp_min(eps)
    torch.testing.assert_close(out[2:2 + BT].double(), n.detach(), rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad((dn.double() * n).sum(), leaves)
    torch.testing.assert_close(scr[1, :, :DOUT].double(), r[1, :, :DOUT].double() + g[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scr[2, :, :DIN].double(), r[2, :, :DIN].double() + g[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(go.double(), g[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[2 + BT:2 + 2 * BT].double(), g[3], rtol=1e-4, atol=1e-5)
    dC = out[2 + 2 * BT:].view(BT, BT).double()
    torch.testing.assert_close(dC, torch.where(_tril(), g[4], 0.0), rtol=1e-4, atol=1e-5)


_KAPPA = """
@triton.jit
def kappa_kernel(scr_ptr, E_ptr, out_ptr, ib, sb, nb, dsb, BT: tl.constexpr, DM: tl.constexpr, DOUT: tl.constexpr,
                 X: tl.constexpr, BD: tl.constexpr, PW: tl.constexpr, EPS: tl.constexpr):
""" + _SETUP + """
    zero = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    kap = _lq_kappa(s0, s0 + BT * DM, s0 + 2 * BT * DM, s0 + 3 * BT * DM, s0 + 4 * BT * DM, E, ib, sb, nb, dsb,
                    zero, rd, DOUT, X, BD, False, PW, EPS)
    tl.store(out_ptr, kap)
"""


@pytest.mark.parametrize("dsb", [None, 0.3])
def test_lq_kappa(dsb, tmp_path):
    """kap = [dsb] - (<dz, z> + <dd_(l-1) act'(z_(l-1)), dt_(l-1)>) ib n'(s_b)."""
    mod = _lib(["_lq_kappa"], _KAPPA, tmp_path)
    DOUT, X, q, eps = 24, 32, 4.0, 1e-3
    scr = _slots(5)
    E = torch.rand(BT, generator=G) + 0.5
    out = torch.zeros(1)
    sb, ib = 2.5, 0.8
    nb = sb ** ((q - 2) / q)
    mod.kappa_kernel[(1,)](scr, E, out, ib, sb, nb, dsb, BT, DM, DOUT, X, BD, (q - 2) / q, eps)
    gz = (scr[0, :, :DOUT] * scr[1, :, :DOUT]).sum() + (scr[2, :, :X] * _tanh_d(scr[3, :, :X]) * scr[4, :, :X]).sum()
    dnorm = (q - 2) / q * nb / sb
    torch.testing.assert_close(out[0], (dsb or 0.0) - gz * ib * dnorm, rtol=1e-5, atol=1e-6)


_CHUNK_NORMS = """
@triton.jit
def chunk_norms_kernel(we_ptr, gw_ptr, scr_ptr, E_ptr, dn_ptr, out_ptr, sb, nb, END: tl.constexpr,
                       BT: tl.constexpr, DM: tl.constexpr, DIN: tl.constexpr, DOUT: tl.constexpr, BD: tl.constexpr, Q: tl.constexpr,
                       QI: tl.constexpr, PW: tl.constexpr, EPS: tl.constexpr):
""" + _SETUP + """
    zero = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    isend = rt == END
    s, n = _lq_chunk_end(we_ptr, s0, isend, sb, nb, zero, rd, DIN, DOUT, BD, Q, QI, PW, 0.0, EPS)
    tl.store(out_ptr + rt, s)
    tl.store(out_ptr + BT + rt, n)
    dsb = _lq_chunk_vjp(we_ptr, gw_ptr, isend, s, n, tl.load(dn_ptr + rt), rd, DIN, DOUT, BD, Q, QI, PW, EPS)
    tl.store(out_ptr + 2 * BT, dsb)
"""


@pytest.mark.parametrize("end", [BT - 1, -1])
def test_lq_chunk_end_and_vjp(end, tmp_path):
    """lq(norm=chunk): the chunk-ending row (end; -1: a partial chunk has none) of a read-out through n_b
    is rescaled to read through n(Z_end), (s, n) per row are those of the state each row read, and the
    backward of <dn, n> adds dL/dZ_end to gw (against autograd) and returns dL/ds_b of the other rows."""
    mod = _lib(["_lq_chunk_end", "_lq_chunk_vjp"], _CHUNK_NORMS, tmp_path)
    DIN, DOUT, q, eps = 32, 24, 3.0, 1e-3
    pw = (q - 2) / q
    we, gw0 = _rand(DIN, DOUT) / 4, _rand(DIN, DOUT)
    gw = gw0.clone()
    scr = _slots(1)
    p0 = scr[0, :, :DOUT].clone()
    dn = _rand(BT)
    sb = 2.5
    nb = sb ** pw
    out = torch.zeros(2 * BT + 1)
    mod.chunk_norms_kernel[(1,)](we, gw, scr, torch.ones(BT), dn, out, sb, nb, end, BT, DM, DIN, DOUT, BD, q, 3, pw,
                                 eps)
    zz = we.double().requires_grad_()
    se = (zz.abs() ** q).sum()
    ne = (se ** pw).clamp_min(eps)
    is_end = torch.arange(BT) == end
    want_p = torch.where(is_end[:, None], p0 * nb / ne.item(), p0)
    torch.testing.assert_close(scr[0, :, :DOUT], want_p.float(), rtol=1e-5, atol=1e-6)
    base = torch.tensor([sb, nb], dtype=torch.float64)
    torch.testing.assert_close(out[:BT].double(), torch.where(is_end, se.detach(), base[0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[BT:2 * BT].double(), torch.where(is_end, ne.detach(), base[1]), rtol=1e-5,
                               atol=1e-6)
    (g,) = torch.autograd.grad((dn.double() * is_end).sum() * ne, [zz])
    torch.testing.assert_close(gw.double(), gw0.double() + g, rtol=1e-4, atol=1e-5)
    sbt = torch.tensor(sb, dtype=torch.float64, requires_grad=True)
    (gsb,) = torch.autograd.grad((dn.double() * ~is_end).sum() * (sbt ** pw).clamp_min(eps), [sbt])
    torch.testing.assert_close(out[2 * BT].double(), gsb, rtol=1e-5, atol=1e-6)
