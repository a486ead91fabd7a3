"""The matrix-memory kernels' library functions (mirasc/codegen/triton_lib/linear.py and the token-axis
reductions of common.py), each under Triton's interpreter against a torch oracle on fresh random data."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_triton_lib import load_with_library

BT, BV = 16, 16


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _tril_idx():
    r = torch.arange(BT)
    return r[:, None] >= r[None, :]


_REDUCTIONS = """
@triton.jit
def red_kernel(x_ptr, X_ptr, last_ptr, lrow_ptr, suf_ptr, suf2_ptr, BT: tl.constexpr, N: tl.constexpr):
    rt, rn = tl.arange(0, BT), tl.arange(0, N)
    x = tl.load(x_ptr + rt)
    X = tl.load(X_ptr + rt[:, None] * N + rn[None, :])
    tl.store(last_ptr, _at_last(x, rt == BT - 1))
    tl.store(lrow_ptr + rn, _row_at_last(X, rt == BT - 1))
    tl.store(suf_ptr + rt, _suffix_sum(x))
    tl.store(suf2_ptr + rt[:, None] * N + rn[None, :], _suffix_sum(X))
"""


def test_last_and_suffix_sums(tmp_path):
    m = load_with_library(["_at_last", "_row_at_last", "_suffix_sum"], _REDUCTIONS, tmp_path)
    g = _gen(1)
    x, X = torch.randn(BT, generator=g), torch.randn(BT, 8, generator=g)
    last, lrow, suf, suf2 = torch.empty(1), torch.empty(8), torch.empty(BT), torch.empty(BT, 8)
    m.red_kernel[(1,)](x, X, last, lrow, suf, suf2, BT, 8)
    torch.testing.assert_close(last[0], x[-1])
    torch.testing.assert_close(lrow, X[-1])
    torch.testing.assert_close(suf, x.flip(0).cumsum(0).flip(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(suf2, X.flip(0).cumsum(0).flip(0), rtol=1e-5, atol=1e-5)


_PROGRAM = """
@triton.jit
def program_kernel(cu_ptr, out_ptr, T, H, NC, BT: tl.constexpr):
    pid, h, bos, T, NC, st0 = _program(cu_ptr, T, H, NC, BT)
    tl.store(out_ptr + pid * 5 + 0, h)
    tl.store(out_ptr + pid * 5 + 1, bos)
    tl.store(out_ptr + pid * 5 + 2, T)
    tl.store(out_ptr + pid * 5 + 3, NC)
    tl.store(out_ptr + pid * 5 + 4, st0)
"""


def test_program_places_packed_sequences_in_disjoint_tiles(tmp_path):
    m = load_with_library(["_program"], _PROGRAM, tmp_path)
    H, bt = 3, 16
    # padded batch: B = 2 rows of T = 40 tokens
    out = torch.zeros(2 * H, 5, dtype=torch.int32)
    m.program_kernel[(2 * H,)](None, out, 40, H, 3, bt)
    for pid in range(2 * H):
        b, h = divmod(pid, H)
        assert out[pid].tolist() == [h, b * 40, 40, 3, pid * 3]
    # packed: lengths 5, 32, 3, 17 in one row; the store holds T_total // BT + N tiles per head
    lengths = [5, 32, 3, 17]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total, n = int(cu[-1]), len(lengths)
    nc_store = total // bt + n
    out = torch.zeros(n * H, 5, dtype=torch.int32)
    m.program_kernel[(n * H,)](cu, out, total, H, nc_store, bt)
    used = set()
    for pid in range(n * H):
        seq, h = divmod(pid, H)
        _, bos, T, nc, st0 = out[pid].tolist()
        assert (bos, T, nc) == (int(cu[seq]), lengths[seq], -(-lengths[seq] // bt))
        tiles = set(range(st0, st0 + nc))
        assert all(h * nc_store <= t < (h + 1) * nc_store for t in tiles)  # inside the head's block
        assert not tiles & used  # no two sequences share a stored tile
        used |= tiles


_OFFSETS = """
@triton.jit
def offsets_kernel(x_ptr, y_ptr, gh_ptr, gc_ptr, xo_ptr, yo_ptr, gho_ptr, gco_ptr, c, bos, h, T, H,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    rt, rk, rv = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    row, tmask, qk_off, m_k, v_off, m_v = _tile_offsets(c, rt, rk, rv, bos, h, T, H, K, V, BT)
    t_off = rt[:, None] * BK + rk[None, :]
    tv_off = rt[:, None] * BV + rv[None, :]
    tl.store(xo_ptr + t_off, tl.load(x_ptr + qk_off, mask=m_k, other=0.0))
    tl.store(yo_ptr + tv_off, tl.load(y_ptr + v_off, mask=m_v, other=0.0))
    gh = _load_gate(gh_ptr, row, tmask, v_off, m_v, False, 1.0)  # [BT, 1]
    gc = _load_gate(gc_ptr, row, tmask, v_off, m_v, True, 1.0)  # [BT, BV]
    tl.store(gho_ptr + rt, tl.sum(gh, axis=1))
    tl.store(gco_ptr + tv_off, gc)
"""


def test_tile_offsets_and_gate_loads(tmp_path):
    m = load_with_library(["_tile_offsets", "_load_gate"], _OFFSETS, tmp_path)
    g = _gen(2)
    T, H, K, V, BK = 37, 3, 12, 10, 16  # padded dims: K < BK, V < BV; the tile runs past T
    x, y = torch.randn(T, H, K, generator=g), torch.randn(T, H, V, generator=g)
    gh, gc = torch.rand(T, H, generator=g) + 0.5, torch.rand(T, H, V, generator=g) + 0.5
    c, bos, h = 2, 0, 1
    xo, yo = torch.zeros(BT, BK), torch.zeros(BT, BV)
    gho, gco = torch.zeros(BT), torch.zeros(BT, BV)
    m.offsets_kernel[(1,)](x, y, gh, gc, xo, yo, gho, gco, c, bos, h, T, H, K, V, BK, BV, BT)
    t = torch.arange(c * BT, c * BT + BT)
    inside = t < T
    n = int(inside.sum())
    torch.testing.assert_close(xo[:n, :K], x[t[:n], h])
    assert not xo[n:].any() and not xo[:, K:].any()
    torch.testing.assert_close(yo[:n, :V], y[t[:n], h])
    torch.testing.assert_close(gho[:n], gh[t[:n], h])
    assert (gho[n:] == 1.0).all()  # padded tokens read the neutral gate
    torch.testing.assert_close(gco[:n, :V], gc[t[:n], h])
    assert (gco[n:] == 1.0).all() and (gco[:, V:] == 1.0).all()


_DECAYS = """
@triton.jit
def decays_kernel(a_ptr, ac_ptr, o_ptr, oc_ptr, BT: tl.constexpr, BV: tl.constexpr, HAS: tl.constexpr):
    rt, rv = tl.arange(0, BT), tl.arange(0, BV)
    tmask = rt < BT - 3
    v_off = rt[:, None] * BV + rv[None, :]
    m_v = tmask[:, None] & (rv < BV)[None, :]
    if HAS:
        alpha, la, bcum, blast = _log_decays(a_ptr, rt, tmask, rt, BT)
        alpha_c, la_c, bcum_c, blast_c = _log_decays_channel(ac_ptr, v_off, m_v, rt, BT, BV)
    else:
        alpha, la, bcum, blast = _log_decays(None, rt, tmask, rt, BT)
        alpha_c, la_c, bcum_c, blast_c = _log_decays_channel(None, v_off, m_v, rt, BT, BV)
    tl.store(o_ptr + rt * 4 + 0, alpha)
    tl.store(o_ptr + rt * 4 + 1, la)
    tl.store(o_ptr + rt * 4 + 2, bcum)
    tl.store(o_ptr + rt * 4 + 3, bcum * 0 + blast)
    tl.store(oc_ptr + 0 * BT * BV + v_off, alpha_c)
    tl.store(oc_ptr + 1 * BT * BV + v_off, la_c)
    tl.store(oc_ptr + 2 * BT * BV + v_off, bcum_c)
    tl.store(oc_ptr + 3 * BT * BV + v_off, bcum_c * 0 + blast_c[None, :])
"""


@pytest.mark.parametrize("has", [True, False])
def test_log_decays(has, tmp_path):
    m = load_with_library(["_log_decays", "_log_decays_channel"], _DECAYS, tmp_path)
    g = _gen(3)
    a, ac = torch.rand(BT, generator=g) * 0.5 + 0.45, torch.rand(BT, BV, generator=g) * 0.5 + 0.45
    o, oc = torch.empty(BT, 4), torch.empty(4, BT, BV)
    m.decays_kernel[(1,)](a, ac, o, oc, BT, BV, has)
    valid = torch.arange(BT) < BT - 3
    ea = torch.where(valid, a, 1.0) if has else torch.ones(BT)
    eac = torch.where(valid[:, None], ac, 1.0) if has else torch.ones(BT, BV)
    for out, ref in ((o.T, ea), (oc, eac)):
        b = ref.log().cumsum(0)
        torch.testing.assert_close(out[0], ref)
        torch.testing.assert_close(out[1], ref.log())
        torch.testing.assert_close(out[2], b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[3], b[-1].expand_as(b), rtol=1e-5, atol=1e-6)


_MOMENTUM = """
@triton.jit
def momentum_kernel(a_ptr, b_ptr, o_ptr, mats_ptr, BT: tl.constexpr):
    rt = tl.arange(0, BT)
    tmask = rt < BT - 2
    bcum = tl.cumsum(tl.log(tl.load(a_ptr + rt)), axis=0)
    beta = tl.load(b_ptr + rt)
    ccum, clast, ec, Da, Db, Wm, mv = _momentum_weights(beta, bcum, tmask, rt, BT, 0)
    tl.store(o_ptr + rt * 4 + 0, ccum)
    tl.store(o_ptr + rt * 4 + 1, ccum * 0 + clast)
    tl.store(o_ptr + rt * 4 + 2, ec)
    tl.store(o_ptr + rt * 4 + 3, mv)
    off = rt[:, None] * BT + rt[None, :]
    tl.store(mats_ptr + off, Da)
    tl.store(mats_ptr + BT * BT + off, Db)
    tl.store(mats_ptr + 2 * BT * BT + off, Wm)
"""


def test_momentum_weights_reproduce_the_recurrence(tmp_path):
    m = load_with_library(["_momentum_weights"], _MOMENTUM, tmp_path)
    g = _gen(4)
    a, beta = torch.rand(BT, generator=g) * 0.4 + 0.55, torch.rand(BT, generator=g) * 0.4 + 0.55
    o, mats = torch.empty(BT, 4), torch.empty(3, BT, BT)
    m.momentum_kernel[(1,)](a, beta, o, mats, BT)
    c = beta.log().cumsum(0)
    torch.testing.assert_close(o[:, 0], c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o[:, 1], c[-1].expand(BT), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o[:, 2], c.exp(), rtol=1e-5, atol=1e-6)
    Da, Db, W = mats
    # Z_i = exp(b_i) S - mv_i m - sum_j W_ij G_j against the token recurrence m <- beta m + G,
    # Z <- alpha Z - m, for scalar S, m and gradients G of the valid tokens (padded ones write nothing)
    S0, M0 = 0.7, -0.4
    G = torch.randn(BT, generator=g, dtype=torch.float64)
    G[BT - 2:] = 0.0
    Z, mm, zs = S0, M0, []
    for i in range(BT):
        mm = beta[i].double() * mm + G[i]
        Z = a[i].double() * Z - (mm if i < BT - 2 else 0.0)
        zs.append(Z)
    b = a.double().log().cumsum(0)
    closed = b.exp() * S0 - o[:, 3].double() * M0 - W.double() @ G
    torch.testing.assert_close(closed[: BT - 2], torch.stack(zs)[: BT - 2], rtol=1e-4, atol=1e-5)
    tril = _tril_idx()
    torch.testing.assert_close(Db, torch.where(tril, (c[:, None] - c[None, :]).exp(), 0.0), rtol=1e-5,
                               atol=1e-6)
    assert not Da[:, BT - 2:].any()


_TRIL = """
@triton.jit
def tril_kernel(L_ptr, o_ptr, p_ptr, BT: tl.constexpr, LOG_CS: tl.constexpr, LOG_BT: tl.constexpr,
                W: tl.constexpr):
    rt = tl.arange(0, BT)
    off = rt[:, None] * BT + rt[None, :]
    tl.store(o_ptr + off, _unit_tril_inverse(tl.load(L_ptr + off), rt, LOG_CS, LOG_BT, 0))
    tl.store(p_ptr + off, _pairs(rt, W).to(tl.int32))
"""


@pytest.mark.parametrize("log_cs", [0, 2])
def test_unit_tril_inverse_and_pairs(log_cs, tmp_path):
    m = load_with_library(["_unit_tril_inverse", "_pairs"], _TRIL, tmp_path)
    cs = 1 << log_cs
    blk = torch.arange(BT) // cs
    L = torch.randn(BT, BT, generator=_gen(5)) * 0.3
    L = torch.where(blk[None, :] < blk[:, None], L, 0.0)  # zero on and above the diagonal blocks
    out, pairs = torch.empty(BT, BT), torch.empty(BT, BT, dtype=torch.int32)
    m.tril_kernel[(1,)](L, out, pairs, BT, log_cs, 4, 4)
    torch.testing.assert_close(out, torch.linalg.inv(torch.eye(BT) + L), rtol=1e-4, atol=1e-5)
    i, j = torch.arange(BT)[:, None], torch.arange(BT)[None, :]
    first_diff = torch.where(i != j, (i ^ j).float().log2().floor().long(), -1)  # highest differing bit
    expect = (first_diff == 2) & ((i & 4) != 0)
    assert torch.equal(pairs.bool(), expect)


_CHANNEL = """
@triton.jit
def channel_kernel(la_ptr, A_ptr, X_ptr, do_ptr, seg_ptr, lv_ptr, out_ptr, it_ptr, itT_ptr, dA_ptr,
                   BT: tl.constexpr, BV: tl.constexpr, LOG_BT: tl.constexpr, W: tl.constexpr):
    rt, rv = tl.arange(0, BT), tl.arange(0, BV)
    tv = rt[:, None] * BV + rv[None, :]
    tt = rt[:, None] * BT + rt[None, :]
    la = tl.load(la_ptr + tv)
    A = tl.load(A_ptr + tt)
    X = tl.load(X_ptr + tv)
    do = tl.load(do_ptr + tv)
    cum, tot = _seg(la, W, BT, BV)
    tl.store(seg_ptr + tv, cum)
    tl.store(seg_ptr + BT * BV + tv, tot)
    mask, rf, cf = _level(la, rt, W, BT, BV)
    tl.store(lv_ptr + tv, rf)
    tl.store(lv_ptr + BT * BV + tv, cf)
    tl.store(out_ptr + tv, _decay_mm(A, X, la, rt, LOG_BT, BT, BV, 0))
    it, itT, dA = _decay_mm_bwd(A, X, do, la, rt, LOG_BT, BT, BV, 0)
    tl.store(it_ptr + tv, it)
    tl.store(itT_ptr + tv, itT)
    tl.store(dA_ptr + tt, dA)
"""


def test_per_channel_decay_pair_sums(tmp_path):
    m = load_with_library(["_seg", "_level", "_decay_mm", "_decay_mm_bwd"], _CHANNEL, tmp_path)
    g = _gen(6)
    W = 4
    la = (torch.rand(BT, BV, generator=g) * 0.5 + 0.45).log()
    A, X, do = (torch.randn(s, generator=g) for s in ((BT, BT), (BT, BV), (BT, BV)))
    seg, lv = torch.empty(2, BT, BV), torch.empty(2, BT, BV)
    out, it, itT, dA = torch.empty(BT, BV), torch.empty(BT, BV), torch.empty(BT, BV), torch.empty(BT, BT)
    m.channel_kernel[(1,)](la, A, X, do, seg, lv, out, it, itT, dA, BT, BV, 4, W)
    segs = la.view(BT // W, W, BV)
    torch.testing.assert_close(seg[0], segs.cumsum(1).view(BT, BV), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seg[1], segs.sum(1, keepdim=True).expand(-1, W, -1).reshape(BT, BV),
                               rtol=1e-5, atol=1e-6)
    # the level's factors: rf_i cf_j = exp(b_i - b_j) on its pairs (j in the even W-segment right before i's)
    b = la.double().cumsum(0)
    for i in range(BT):
        for j in range(BT):
            if (i // W) % 2 == 1 and j // (2 * W) == i // (2 * W) and (j // W) % 2 == 0:
                torch.testing.assert_close(lv[0, i].double() * lv[1, j].double(), (b[i] - b[j]).exp(),
                                           rtol=1e-5, atol=1e-7)
    D = torch.where(_tril_idx()[:, :, None], (b[:, None, :] - b[None, :, :]).exp(), 0.0)  # [i, j, v]
    Ad = A.double()
    expect_it = torch.einsum("ij,ijv,jv->iv", Ad, D, X.double())
    torch.testing.assert_close(out.double(), expect_it, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(it.double(), expect_it, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(itT.double(), torch.einsum("ij,ijv,iv->jv", Ad, D, do.double()), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(dA.double(), torch.einsum("iv,ijv,jv->ij", do.double(), D, X.double()),
                               rtol=1e-4, atol=1e-5)


_MAPS = """
@triton.jit
def map_kernel(z_ptr, dw_ptr, g_ptr, w_ptr, dz_ptr, dg_ptr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, MAP: tl.constexpr, AXIS: tl.constexpr, SCALE: tl.constexpr,
               GAMMA_CHANNEL: tl.constexpr):
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    vmask = rv < V
    smask = (rk < K)[:, None] & vmask[None, :]
    off = rk[:, None] * V + rv[None, :]
    Z = tl.load(z_ptr + off, mask=smask, other=0.0)
    dW = tl.load(dw_ptr + off, mask=smask, other=0.0)
    gamma = _token_gate(g_ptr, 0, rv, vmask, V, GAMMA_CHANNEL, 0.0)
    W = _map_fwd(Z, smask, gamma, MAP, AXIS, SCALE)
    dZ, dgamma = _map_vjp(Z, W, dW, gamma, MAP, AXIS, SCALE)
    tl.store(w_ptr + off, W, mask=smask)
    tl.store(dz_ptr + off, dZ, mask=smask)
    tl.store(dg_ptr + rv[None, :], dgamma + tl.zeros([1, BV], dtype=tl.float32), mask=vmask[None, :])
"""


def _torch_map(z, gamma, kind, axis, scale):
    if kind == 1:
        dims = {0: (0,), 1: (1,), 2: (0, 1)}[axis]
        e = (z - z.amax(dim=dims, keepdim=True)).exp()
        return scale * e / e.sum(dim=dims, keepdim=True)
    if kind == 2:
        return torch.sigmoid(z)
    return z - torch.clamp(z, min=-gamma, max=gamma)


@pytest.mark.parametrize(("kind", "axis", "scale", "gamma_channel"), [
    pytest.param(1, 0, 1.0, False, id="softmax-key"), pytest.param(1, 1, 2.0, False, id="softmax-value-scaled"),
    pytest.param(1, 2, 0.5, False, id="softmax-all"), pytest.param(2, 0, 1.0, False, id="sigmoid"),
    pytest.param(3, 0, 1.0, False, id="soft-threshold"), pytest.param(3, 0, 1.0, True, id="soft-threshold-channel")])
def test_retention_maps_and_vjps(kind, axis, scale, gamma_channel, tmp_path):
    """_map_fwd and _map_vjp on a padded [K, V] state (K = 12, V = 10 in 16 x 16) against torch.autograd in
    float64, the threshold's gradient included; padded entries stay zero."""
    m = load_with_library(["_token_gate", "_map_fwd", "_map_vjp"], _MAPS, tmp_path)
    g = _gen(7 + kind + 3 * axis)
    K, V = 12, 10
    z, dw = torch.randn(K, V, generator=g), torch.randn(K, V, generator=g)
    gamma = 0.2 + 0.6 * torch.rand(V if gamma_channel else 1, generator=g)
    w, dz, dg = torch.empty(K, V), torch.empty(K, V), torch.empty(16)
    m.map_kernel[(1,)](z, dw, gamma, w, dz, dg, K, V, 16, 16, kind, axis, scale, gamma_channel)
    zd, gd = z.double().requires_grad_(), gamma.double().requires_grad_()
    ref = _torch_map(zd, gd if gamma_channel else gd[0], kind, axis, scale)
    ref.backward(dw.double())
    torch.testing.assert_close(w.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz.double(), zd.grad, rtol=1e-5, atol=1e-6)
    if kind == 3:
        assert (ref.detach() == 0).any() and (ref.detach() != 0).any()  # both sides of the threshold
        got = dg[:V].double() if gamma_channel else dg[:V].double().sum(0, keepdim=True)
        torch.testing.assert_close(got, gd.grad, rtol=1e-5, atol=1e-6)


_GATES = """
@triton.jit
def gates_kernel(g_ptr, a_ptr, s_ptr, go_ptr, ao_ptr, so_ptr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, CHANNEL: tl.constexpr):
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    vmask = rv < V
    smask = (rk < K)[:, None] & vmask[None, :]
    s_off = rk[:, None] * V + rv[None, :]
    gamma, alpha = _retention_gates(g_ptr, a_ptr, 1, rv, vmask, V, BV, CHANNEL, CHANNEL)
    tl.store(go_ptr + rv[None, :], gamma + tl.zeros([1, BV], dtype=tl.float32), mask=vmask[None, :])
    tl.store(ao_ptr + rv[None, :], alpha + tl.zeros([1, BV], dtype=tl.float32), mask=vmask[None, :])
    tl.store(so_ptr + s_off, _load_state(s_ptr, 1, s_off, smask, K * V, BK, BV), mask=smask)
"""


@pytest.mark.parametrize(("present", "channel"), [(True, False), (True, True), (False, False)])
def test_retention_gates_and_optional_state(present, channel, tmp_path):
    """_retention_gates reads token row 1's gamma and alpha (per head or per value channel) and gives 0 and 1
    for absent tensors; _load_state reads program 1's state, or zeros for an absent tensor."""
    m = load_with_library(["_retention_gates", "_load_state"], _GATES, tmp_path)
    g = _gen(31 + 2 * present + channel)
    K, V = 12, 10
    shape = (2, V) if channel else (2,)
    gam, alpha, s = torch.rand(shape, generator=g), torch.rand(shape, generator=g), torch.randn(2, K, V, generator=g)
    go, ao, so = torch.full((V,), 7.0), torch.full((V,), 7.0), torch.full((K, V), 7.0)
    args = (gam, alpha, s) if present else (None, None, None)
    m.gates_kernel[(1,)](*args, go, ao, so, K, V, 16, 16, channel)
    if present:
        torch.testing.assert_close(go, gam[1].expand(V))
        torch.testing.assert_close(ao, alpha[1].expand(V))
        torch.testing.assert_close(so, s[1])
    else:
        assert (go == 0).all() and (ao == 1).all() and (so == 0).all()


def _row(name, other):
    return f"{name} = tl.load({name}_ptr + rv[None, :], mask=vmask[None, :], other={other})"


_READOUT = f"""
@triton.jit
def readout_kernel(z_ptr, dz_ptr, q_ptr, do_ptr, gamma_ptr, e_ptr, dzo_ptr, dg_ptr, dq_ptr, K: tl.constexpr,
                   V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr, AXIS: tl.constexpr,
                   SCALE: tl.constexpr, PROX: tl.constexpr):
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    vmask = rv < V
    smask = (rk < K)[:, None] & vmask[None, :]
    off = rk[:, None] * V + rv[None, :]
    Z = tl.load(z_ptr + off, mask=smask, other=0.0)
    dZ = tl.load(dz_ptr + off, mask=smask, other=0.0)
    q = tl.load(q_ptr + rk, mask=rk < K, other=0.0)
    do = tl.load(do_ptr + rv, mask=vmask, other=0.0)
    {_row("gamma", 0.0)}
    dZ, dgam, dq = _readout_bwd(Z, dZ, q, do, gamma, tl.load(e_ptr) != 0, smask, BV, MAP, AXIS, SCALE, PROX)
    tl.store(dzo_ptr + off, dZ, mask=smask)
    tl.store(dg_ptr + rv[None, :], dgam, mask=vmask[None, :])
    tl.store(dq_ptr + rk, dq, mask=rk < K)
"""


@pytest.mark.parametrize(("kind", "axis", "prox", "ends"), [
    pytest.param(1, 0, False, True, id="softmax-key"), pytest.param(2, 0, False, True, id="sigmoid"),
    pytest.param(3, 0, False, True, id="soft-threshold"), pytest.param(3, 0, True, True, id="prox-chunk-end"),
    pytest.param(3, 0, True, False, id="prox-inside-chunk")])
def test_readout_bwd(kind, axis, prox, ends, tmp_path):
    """_readout_bwd against torch.autograd in float64: the read-out o = q map(Z) and, at a PROX chunk's end,
    the carried S_gamma(Z), reversed to Z, gamma (per value channel) and q on a padded 12 x 10 state."""
    m = load_with_library(["_readout_bwd"], _READOUT, tmp_path)
    g = _gen(50 + kind + 3 * prox + ends)
    K, V = 12, 10
    z, dz_in = torch.randn(K, V, generator=g), torch.randn(K, V, generator=g)
    q, do, gamma = torch.randn(K, generator=g), torch.randn(V, generator=g), 0.2 + 0.6 * torch.rand(V, generator=g)
    dz, dg, dq = torch.empty(K, V), torch.empty(V), torch.empty(K)
    m.readout_kernel[(1,)](z, dz_in, q, do, gamma, torch.tensor([int(ends)]), dz, dg, dq, K, V, 16, 16, kind, axis,
                           1.0, prox)
    zd, qd, gd = (x.double().requires_grad_() for x in (z, q, gamma))
    carried = _torch_map(zd, gd, kind, axis, 1.0) if prox and ends else zd
    loss = (carried * dz_in.double()).sum() + (qd @ _torch_map(zd, gd, kind, axis, 1.0) * do.double()).sum()
    loss.backward()
    torch.testing.assert_close(dz.double(), zd.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dq.double(), qd.grad, rtol=1e-5, atol=1e-6)
    if kind == 3:
        assert gd.grad.abs().sum() > 0
        torch.testing.assert_close(dg.double(), gd.grad, rtol=1e-5, atol=1e-6)


_POINT = f"""
@triton.jit
def point_kernel(k_ptr, dy_ptr, acum_ptr, zb_ptr, alpha_ptr, gamma_ptr, dp_ptr, r_ptr, dalpha_ptr, dgam_ptr,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr,
                 PROX: tl.constexpr, AT_RETAINED: tl.constexpr):
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    vmask = rv < V
    smask = (rk < K)[:, None] & vmask[None, :]
    off = rk[:, None] * V + rv[None, :]
    k = tl.load(k_ptr + rk, mask=rk < K, other=0.0)
    Zb = tl.load(zb_ptr + off, mask=smask, other=0.0)
    dP = tl.load(dp_ptr + off, mask=smask, other=0.0)
    {_row("dy", 0.0)}
    {_row("acum", 1.0)}
    {_row("alpha", 1.0)}
    {_row("gamma", 0.0)}
    R = tl.load(r_ptr + rv[None, :], mask=vmask[None, :], other=0.0)
    dalpha = tl.load(dalpha_ptr + rv[None, :], mask=vmask[None, :], other=0.0)
    dgam = tl.load(dgam_ptr + rv[None, :], mask=vmask[None, :], other=0.0)
    P = _base_point(acum * Zb, smask, gamma, MAP, 0, 1.0, PROX)
    dP, R, dalpha, dgam = _point_bwd(k, dy, acum, Zb, P, alpha, gamma, dP, R, dalpha, dgam, MAP, 0, 1.0, PROX,
                                     AT_RETAINED)
    tl.store(dp_ptr + off, dP, mask=smask)
    tl.store(r_ptr + rv[None, :], R, mask=vmask[None, :])
    tl.store(dalpha_ptr + rv[None, :], dalpha, mask=vmask[None, :])
    tl.store(dgam_ptr + rv[None, :], dgam, mask=vmask[None, :])
"""


@pytest.mark.parametrize(("kind", "prox", "at_retained"), [
    pytest.param(1, False, True, id="softmax-retained"), pytest.param(3, False, True, id="soft-threshold-retained"),
    pytest.param(3, True, True, id="prox-retained"), pytest.param(2, False, False, id="previous")])
def test_point_bwd(kind, prox, at_retained, tmp_path):
    """_point_bwd against torch.autograd in float64: y = k P with P = map(a Z_b) (at=retained; PROX: a Z_b) or
    P itself, reversed from dL/dy to Z_b (or P), to log a (R, and R / alpha to alpha) and to gamma, added to
    random running sums."""
    m = load_with_library(["_base_point", "_point_bwd"], _POINT, tmp_path)
    g = _gen(70 + kind + 3 * prox + at_retained)
    K, V = 12, 10
    k, dy, zb = torch.randn(K, generator=g), torch.randn(V, generator=g), torch.randn(K, V, generator=g)
    acum, alpha = 0.3 + 0.7 * torch.rand(V, generator=g), 0.5 + 0.5 * torch.rand(V, generator=g)
    gamma = 0.1 + 0.3 * torch.rand(V, generator=g)
    dp0, r0 = torch.randn(K, V, generator=g), torch.randn(V, generator=g)
    da0, dg0 = torch.randn(V, generator=g), torch.randn(V, generator=g)
    dp, r, da, dg = dp0.clone(), r0.clone(), da0.clone(), dg0.clone()
    m.point_kernel[(1,)](k, dy, acum, zb, alpha, gamma, dp, r, da, dg, K, V, 16, 16, kind, prox, at_retained)
    ad, zd, gd = (x.double().requires_grad_() for x in (acum, zb, gamma))
    if at_retained:
        P = ad * zd if prox else _torch_map(ad * zd, gd, kind, 0, 1.0)
    else:
        P = zd
    (k.double() @ P * dy.double()).sum().backward()
    r_ref = r0.double() + (ad.grad * ad.detach() if at_retained else 0.0)
    torch.testing.assert_close(dp.double(), dp0.double() + zd.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.double(), r_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(da.double(), da0.double() + (r_ref / alpha.double() if at_retained else 0.0),
                               rtol=1e-5, atol=1e-6)
    dg_ref = dg0.double() + (gd.grad if gd.grad is not None else 0.0)
    if kind == 3 and not prox:
        assert gd.grad.abs().sum() > 0
    torch.testing.assert_close(dg.double(), dg_ref, rtol=1e-5, atol=1e-6)


_BASE = f"""
@triton.jit
def base_kernel(zb_ptr, dp_ptr, gamma_ptr, dz_ptr, dg_ptr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, MAP: tl.constexpr, PROX: tl.constexpr, AT_RETAINED: tl.constexpr):
    rk, rv = tl.arange(0, BK), tl.arange(0, BV)
    vmask = rv < V
    smask = (rk < K)[:, None] & vmask[None, :]
    off = rk[:, None] * V + rv[None, :]
    Zb = tl.load(zb_ptr + off, mask=smask, other=0.0)
    dP = tl.load(dp_ptr + off, mask=smask, other=0.0)
    {_row("gamma", 0.0)}
    P = _base_point(Zb, smask, gamma, MAP, 0, 1.0, PROX)
    dZb, dgb = _base_bwd(Zb, P, dP, gamma, MAP, 0, 1.0, PROX, AT_RETAINED)
    tl.store(dz_ptr + off, dZb, mask=smask)
    tl.store(dg_ptr + rv[None, :], dgb, mask=vmask[None, :])
"""


@pytest.mark.parametrize(("kind", "prox", "at_retained"), [
    pytest.param(1, False, False, id="softmax"), pytest.param(3, False, False, id="soft-threshold"),
    pytest.param(3, True, False, id="prox"), pytest.param(2, False, True, id="retained")])
def test_base_bwd(kind, prox, at_retained, tmp_path):
    """_base_bwd against torch.autograd in float64: dL/dP through P = map(Z_b) to Z_b and gamma; with PROX or
    at=retained, dL/dP passes to Z_b unchanged and gamma gets nothing."""
    m = load_with_library(["_base_point", "_base_bwd"], _BASE, tmp_path)
    g = _gen(90 + kind + 3 * prox + at_retained)
    K, V = 12, 10
    zb, dp, gamma = torch.randn(K, V, generator=g), torch.randn(K, V, generator=g), 0.2 + 0.4 * torch.rand(V, generator=g)
    dz, dg = torch.full((K, V), 7.0), torch.full((V,), 7.0)
    m.base_kernel[(1,)](zb, dp, gamma, dz, dg, K, V, 16, 16, kind, prox, at_retained)
    if prox or at_retained:
        torch.testing.assert_close(dz, dp)
        assert (dg == 0).all()
        return
    zd, gd = zb.double().requires_grad_(), gamma.double().requires_grad_()
    (_torch_map(zd, gd, kind, 0, 1.0) * dp.double()).sum().backward()
    torch.testing.assert_close(dz.double(), zd.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dg.double(), gd.grad if kind == 3 else torch.zeros(V, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
