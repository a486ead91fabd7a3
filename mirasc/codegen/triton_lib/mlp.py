"""Helpers of the MLP-memory kernels (templates/triton_mlp*.py.j2): tile loads and stores, the sum over a
head's programs, the LayerNorm and its VJPs, the lq map's norms, a program's tokens and a chunk's decay
and momentum coefficients. The kernels' math is in docs/kernels-mlp.md."""
import triton
import triton.language as tl

from .common import _mm, _suffix_sum


@triton.jit
def _ld(rows, cols, D: tl.constexpr):
    """Columns `cols` (those < D) of a scratch slot, given by its row pointers [BT, 1]."""
    return tl.load(rows + cols[None, :], mask=(cols < D)[None, :], other=0.0)


@triton.jit
def _st(rows, cols, x, D: tl.constexpr):
    """Store x [BT, len(cols)] into columns `cols` (those < D) of a scratch slot."""
    tl.store(rows + cols[None, :], x, mask=(cols < D)[None, :])


@triton.jit
def _ldk(ptr, row, tmask, cols, D: tl.constexpr):
    """Columns `cols` of the chunk's tokens of a [B, T, H, D] input in fp32 (zero on padded rows)."""
    return tl.load(ptr + row[:, None] * D + cols[None, :], mask=tmask[:, None] & (cols < D)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _ldw(ptr, rows, cols, NR: tl.constexpr, NCOL: tl.constexpr):
    """The tile rows x cols of a row-major [NR, NCOL] fp32 matrix (zero outside it)."""
    return tl.load(ptr + rows[:, None] * NCOL + cols[None, :],
                   mask=(rows < NR)[:, None] & (cols < NCOL)[None, :], other=0.0)


@triton.jit
def _stw(ptr, x, rows, cols, NR: tl.constexpr, NCOL: tl.constexpr):
    """Store x as the tile rows x cols of a row-major [NR, NCOL] fp32 matrix."""
    tl.store(ptr + rows[:, None] * NCOL + cols[None, :], x,
             mask=(rows < NR)[:, None] & (cols < NCOL)[None, :])


@triton.jit
def _ld_rows(ptr, row, tmask, v_off, m_v, OTHER: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """A per-token input of the chunk in fp32: a [B, T, H, V] tensor's [BT, BV] tile at offsets v_off with
    mask m_v (PER_CHANNEL), else a [B, T, H] one as a [BT, 1] column; OTHER on padded rows."""
    if PER_CHANNEL:
        return tl.load(ptr + v_off, mask=m_v, other=OTHER).to(tl.float32)
    else:
        return tl.load(ptr + row, mask=tmask, other=OTHER).to(tl.float32)[:, None]


@triton.jit
def _head_sum(x, red_ptr, cnt_ptr, hid, n, sl, rt, rv, NS: tl.constexpr, BT: tl.constexpr,
              BV: tl.constexpr):
    """The sum of x [BT, BV] over the NS programs of head `hid`, each of which holds the part of a sum
    over its slice `sl` of the hidden columns; n counts the head's sums so far (0, 1, ...).

    Each program stores its part in the head's buffer (two halves, alternating with n: a program can
    only write sum n + 2's part after every program has passed sum n + 1, so after all read sum n),
    arrives at the head's counter and waits until all NS have arrived, then adds the NS parts in slice
    order, so every program gets the same bits. The wait needs the head's programs resident together:
    they are consecutive program ids, and the GPU starts programs in id order, so every program that
    waits on another has it running or about to run. Triton's interpreter runs programs one at a time:
    there NS is 1 and nothing waits (red_ptr and cnt_ptr may then be None)."""
    if NS == 1:
        tot = x
    else:
        red = red_ptr + hid.to(tl.int64) * (2 * NS * BT * BV)
        cnt = cnt_ptr + hid
        half = red + (n % 2) * (NS * BT * BV) + rt[:, None] * BV + rv[None, :]
        tl.store(half + sl * (BT * BV), x)
        tl.debug_barrier()  # every thread's part is stored before the release below
        arrived = tl.atomic_add(cnt, 1, sem="release") + 1
        while arrived < (n + 1) * NS:
            arrived = tl.atomic_add(cnt, 0, sem="acquire")
        tot = tl.zeros([BT, BV], dtype=tl.float32)
        for j in tl.static_range(NS):
            tot += tl.load(half + j * (BT * BV), cache_modifier=".cg")  # from L2: others wrote it
    return tot


@triton.jit
def _ln(z, vmask, V: tl.constexpr):
    """LayerNorm without affine parameters (eps 1e-5) over the V true columns: (normed, rstd [BT, 1])."""
    mean = tl.sum(tl.where(vmask[None, :], z, 0.0), axis=1)[:, None] / V
    centred = tl.where(vmask[None, :], z - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1)[:, None] / V + 1e-5)
    return centred * rstd, rstd


@triton.jit
def _ln_vjp(n, rstd, g, vmask, V: tl.constexpr):
    """J^T g for the LayerNorm's Jacobian J at normed n: rstd (g - mean(g) - n mean(g n))."""
    g = tl.where(vmask[None, :], g, 0.0)
    g_mean = tl.sum(g, axis=1)[:, None] / V
    gn_mean = tl.sum(g * n, axis=1)[:, None] / V
    return tl.where(vmask[None, :], rstd * (g - g_mean - n * gn_mean), 0.0)


@triton.jit
def _ln_vjp_vjp(n, rstd, g, d, e, vmask, V: tl.constexpr):
    """The VJP of (z, g) -> d = J(z)^T g at the cotangent e: (dg, dz). J is symmetric, so dg = J e."""
    e = tl.where(vmask[None, :], e, 0.0)
    dg = _ln_vjp(n, rstd, e, vmask, V)
    gn_mean = tl.sum(g * n, axis=1)[:, None] / V
    en_mean = tl.sum(e * n, axis=1)[:, None] / V
    cov = tl.sum(e * g, axis=1)[:, None] / V - tl.sum(e, axis=1)[:, None] * tl.sum(
        tl.where(vmask[None, :], g, 0.0), axis=1)[:, None] / (V * V)
    dz = rstd * rstd * n * (gn_mean * en_mean - cov) - rstd * (en_mean * d + gn_mean * dg)
    return dg, tl.where(vmask[None, :], dz, 0.0)


@triton.jit
def _lq_pow(z, Q: tl.constexpr, QI: tl.constexpr):
    """|z|^Q (summed over a weight matrix: ||Z||_q^q). QI = Q when Q is an integer from 2 to 8 (then a
    product of QI factors), else 0."""
    if QI >= 2:
        p = z
        for _ in tl.static_range(QI - 2):
            p = p * z
        if QI % 2 == 0:
            return p * z
        else:
            return p * tl.abs(z)
    else:
        return tl.where(z == 0.0, 0.0, tl.exp(Q * tl.log(tl.maximum(tl.abs(z), 1e-30))))


@triton.jit
def _lq_pow_grad(z, Q: tl.constexpr, QI: tl.constexpr):
    """d |z|^Q / dz = Q sign(z) |z|^(Q-1)."""
    if QI == 2:
        return 2.0 * z
    elif QI > 2:
        g = QI * 1.0 * z
        for _ in tl.static_range(QI - 3):
            g = g * z
        if QI % 2 == 0:
            return g * z
        else:
            return g * tl.abs(z)
    else:
        return tl.where(z == 0.0, 0.0, Q * tl.where(z > 0.0, 1.0, -1.0)
                        * tl.exp((Q - 1.0) * tl.log(tl.maximum(tl.abs(z), 1e-30))))


@triton.jit
def _lq_norm(s, PW: tl.constexpr, AT0: tl.constexpr, EPS: tl.constexpr):
    """n = max(s^PW, EPS) from s = ||Z||_q^q, PW = (q - 2) / q (the torch backend's _retention_map);
    AT0 at s = 0 before the clamp."""
    n = tl.where(s > 0.0, tl.exp(PW * tl.log(tl.maximum(s, 1e-30))), AT0)
    return tl.maximum(n, EPS)


@triton.jit
def _lq_dnorm(s, n, PW: tl.constexpr, EPS: tl.constexpr):
    """dn / ds (zero where the EPS clamp holds)."""
    return tl.where((s > 0.0) & (n > EPS), PW * n / tl.maximum(s, 1e-30), 0.0)


@triton.jit
def _mlp_tokens(hid, cu_ptr, T, H, NC, NSL, CH: tl.constexpr):
    """The tokens of (batch row or packed sequence, head) pair `hid` -> (h, bos, TN, srow0, NCN): head h;
    tokens bos .. bos + TN - 1 of one row in NCN chunks (batch row b, or packed sequence b when cu_ptr
    holds the offsets); its chunks' base states are rows srow0 .. srow0 + NCN of `states` (see
    _mlp_state_rows)."""
    b = hid // H
    h = hid % H
    if cu_ptr is not None:
        bos = tl.load(cu_ptr + b).to(tl.int32)
        TN = tl.load(cu_ptr + b + 1).to(tl.int32) - bos
        srow0 = h.to(tl.int64) * NSL + bos // CH + 2 * b
    else:
        bos = b * T
        TN = T
        srow0 = hid.to(tl.int64) * (NC + 1)
    return h, bos, TN, srow0, tl.cdiv(TN, CH)


@triton.jit
def _mlp_program(cu_ptr, T, H, NC, NSL, NS: tl.constexpr, XS: tl.constexpr, CH: tl.constexpr):
    """This program's work -> (pid, hid, sl, x0, h, bos, TN, srow0, NCN): NS consecutive programs per
    (batch row or sequence, head) pair hid (_head_sum), program sl of them holding the hidden columns
    x0 .. x0 + XS - 1; the pair's tokens and chunks as _mlp_tokens gives them."""
    pid = tl.program_id(0)
    hid = pid // NS
    sl = pid % NS
    h, bos, TN, srow0, NCN = _mlp_tokens(hid, cu_ptr, T, H, NC, NSL, CH)
    return pid, hid, sl, sl * XS, h, bos, TN, srow0, NCN


@triton.jit
def _decay_coefs(alpha_ptr, row, tmask, causal, BT: tl.constexpr):
    """A chunk's decay: (alpha, E, D) with E_i = prod_{s <= i} alpha_s, D_ij = prod_{j < s <= i} alpha_s
    (padded rows: alpha = 1; no decay when alpha_ptr is None)."""
    if alpha_ptr is not None:
        alpha = tl.load(alpha_ptr + row, mask=tmask, other=1.0).to(tl.float32)
    else:
        alpha = tl.full([BT], 1.0, dtype=tl.float32)
    bcum = tl.cumsum(tl.log(alpha), axis=0)
    E = tl.exp(bcum)
    D = tl.where(causal, tl.exp(bcum[:, None] - bcum[None, :]), 0.0)
    return alpha, E, D


@triton.jit
def _momentum_coefs(beta_ptr, row, tmask, causal, D):
    """A chunk's momentum: (beta, bc, Bs, C, Mm) with bc_i = prod_{s <= i} beta_s,
    Bs_ij = prod_{j < s <= i} beta_s, C = D Bs and Mm = D bc (a token's update weights on the chunk's
    gradients and on m_b)."""
    beta = tl.load(beta_ptr + row, mask=tmask, other=1.0).to(tl.float32)
    gcum = tl.cumsum(tl.log(beta), axis=0)
    bc = tl.exp(gcum)
    Bs = tl.where(causal, tl.exp(gcum[:, None] - gcum[None, :]), 0.0)
    C = _mm(D, Bs, 0)
    Mm = tl.sum(D * bc[None, :], axis=1)
    return beta, bc, Bs, C, Mm


@triton.jit
def _dlog_gate(dw, W, causal, dlw):
    """dL/d log g_s of a chunk's per-token gate g: W_ij = prod_{j < s <= i} g_s has cotangent dw [BT, BT]
    (log g_s enters W_ij for j < s <= i), dlw [BT] holds dL/d log P_i of the other products P_i = prod_{s
    <= i} g_s; every log g_s enters P_i for i >= s."""
    dws = tl.where(causal, dw * W, 0.0)
    dlw = dlw + tl.sum(dws, axis=1) - tl.sum(dws, axis=0)
    return _suffix_sum(dlw)


# The phases of a chunk, one weight matrix W_l at a time (the kernels unroll the depth). A layer's
# quantities live in scratch slots, each given by its row pointers [BT, 1] (see docs/kernels-mlp.md);
# loops over a dimension run from lo to hi in tiles of BD columns (a program's slice of the hidden
# columns, or all columns of K and V). They call the generated module's activation _tl_act / _tl_dact
# (mirasc.codegen.plan.mlp.activation_source), pasted beside them.


@triton.jit
def _lin(src, row, tmask, cols, D: tl.constexpr, INPUT: tl.constexpr):
    """A layer's input on columns `cols`: for the first layer (INPUT) the tokens' k or q (src: the
    [B, T, H, D] input), else the activation of a slot of pre-activations (src: its rows)."""
    if INPUT:
        return _ldk(src, row, tmask, cols, D)
    else:
        return _tl_act(_ld(src, cols, D))  # noqa: F821 (the module's activation)


@triton.jit
def _delta(dt, za, E, cols, D: tl.constexpr, LAST: tl.constexpr, RETAINED: tl.constexpr):
    """The base pass's delta d_l on columns `cols`: slot dt as it is for the last layer (LAST: d_L), else
    dt act'(z_l) with z_l from slot za (times E_i at=retained, RETAINED)."""
    if LAST:
        return _ld(dt, cols, D)
    else:
        d = _ld(dt, cols, D) * _tl_dact(_ld(za, cols, D))  # noqa: F821 (the module's activation)
        if RETAINED:
            d = d * E[:, None]
        return d


@triton.jit
def _layer_product(a_src, w, dst, row, tmask, E, ib, rd, i_lo, i_hi, o_lo, o_hi, DIN: tl.constexpr,
                   DOUT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, LOWP: tl.constexpr,
                   INPUT: tl.constexpr, RETAINED: tl.constexpr):
    """The base pass through W_l: slot dst = a_(l-1) W_l (a_(l-1) as _lin reads it from a_src; times the
    lq map's 1 / n(Z_b) where ib is not None; times E_i at=retained)."""
    for o0 in range(o_lo, o_hi, BD):
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        for i0 in range(i_lo, i_hi, BD):
            aa = _lin(a_src, row, tmask, i0 + rd, DIN, INPUT)
            acc += _mm(aa, _ldw(w, i0 + rd, o0 + rd, DIN, DOUT), LOWP)
        if ib is not None:
            acc = acc * ib
        if RETAINED:
            acc = acc * E[:, None]
        _st(dst, o0 + rd, acc, DOUT)
    tl.debug_barrier()


@triton.jit
def _delta_product(dt_next, za_next, w_next, dst, E, ib, rd, x_lo, x_hi, o_lo, o_hi, X: tl.constexpr,
                   DOUT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, LOWP: tl.constexpr,
                   LAST: tl.constexpr, RETAINED: tl.constexpr):
    """The base pass's backward through W_(l+1) [X, DOUT]: slot dst = d_(l+1) W_(l+1)^T (d_(l+1) as _delta
    reads it from dt_next and za_next, LAST for the last layer; times 1 / n(Z_b) where ib is not None)."""
    for x0 in range(x_lo, x_hi, BD):
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        for o0 in range(o_lo, o_hi, BD):
            dlt = _delta(dt_next, za_next, E, o0 + rd, DOUT, LAST, RETAINED)
            acc += _mm(dlt, tl.trans(_ldw(w_next, x0 + rd, o0 + rd, X, DOUT)), LOWP)
        if ib is not None:
            acc = acc * ib
        _st(dst, x0 + rd, acc, X)
    tl.debug_barrier()


@triton.jit
def _readout_layer(w, m, wo, mo, h_src, a_src, dt, za, dst, row, tmask, E, C, Mm, e, MmL, bcL, cL, sL,
                   n, rd, i_lo, i_hi, o_lo, o_hi, DIN: tl.constexpr, DOUT: tl.constexpr, BT: tl.constexpr,
                   BD: tl.constexpr, LOWP: tl.constexpr, INPUT: tl.constexpr, LAST: tl.constexpr,
                   RETAINED: tl.constexpr):
    """The read-out through W_l: slot dst = p_l = E (h W_b) - Mm (h m_b) - ((h a^T) C) d_l, over the lq
    map's n(Z_i) where n is not None (h = h_(l-1) from h_src, a = a_(l-1) from a_src as _lin reads them,
    d_l as _delta reads it). With momentum m (m_b's tile rows) is not None. Where wo is not None, the
    state update too: wo = e W_b - Mm_L m_b - (a c)^T d (and mo = bc_L m_b + (a s)^T d),
    c = cL, s = sL."""
    hs = tl.zeros([BT, BT], dtype=tl.float32)
    for i0 in range(i_lo, i_hi, BD):
        hh = _lin(h_src, row, tmask, i0 + rd, DIN, INPUT)
        aa = _lin(a_src, row, tmask, i0 + rd, DIN, INPUT)
        hs += _mm(hh, tl.trans(aa), LOWP)
    hs = hs * C
    for o0 in range(o_lo, o_hi, BD):
        dlt = _delta(dt, za, E, o0 + rd, DOUT, LAST, RETAINED)
        accp = tl.zeros([BT, BD], dtype=tl.float32)
        if m is not None:
            accm = tl.zeros([BT, BD], dtype=tl.float32)
        for i0 in range(i_lo, i_hi, BD):
            hh = _lin(h_src, row, tmask, i0 + rd, DIN, INPUT)
            wt = _ldw(w, i0 + rd, o0 + rd, DIN, DOUT)
            accp += _mm(hh, wt, LOWP)
            if m is not None:
                mt = _ldw(m, i0 + rd, o0 + rd, DIN, DOUT)
                accm += _mm(hh, mt, LOWP)
            if wo is not None:
                aa = _lin(a_src, row, tmask, i0 + rd, DIN, INPUT)
                if m is not None:
                    upd = e * wt - MmL * mt - _mm(tl.trans(aa * cL[:, None]), dlt, LOWP)
                    _stw(wo, upd, i0 + rd, o0 + rd, DIN, DOUT)
                    upm = bcL * mt + _mm(tl.trans(aa * sL[:, None]), dlt, LOWP)
                    _stw(mo, upm, i0 + rd, o0 + rd, DIN, DOUT)
                else:
                    upd = e * wt - _mm(tl.trans(aa * cL[:, None]), dlt, LOWP)
                    _stw(wo, upd, i0 + rd, o0 + rd, DIN, DOUT)
        p = E[:, None] * accp
        if m is not None:
            p = p - Mm[:, None] * accm
        p = p - _mm(hs, dlt, LOWP)
        if n is not None:
            p = p / n[:, None]
        _st(dst, o0 + rd, p, DOUT)
    tl.debug_barrier()


@triton.jit
def _readout_layer_vjp(w, m, gw, gm, h_src, a_src, dt, za, dp_src, dd, da, dh_dst, pp_src, row, tmask,
                       E, C, Mm, cL, sL, n_prev, dC, dE, dcL, dMm, dsL, dn_prev, causal, rd, i_lo, i_hi,
                       o_lo, o_hi, DIN: tl.constexpr, DOUT: tl.constexpr, BT: tl.constexpr,
                       BD: tl.constexpr, LOWP: tl.constexpr, INPUT: tl.constexpr, LAST: tl.constexpr,
                       RETAINED: tl.constexpr):
    """The backward of _readout_layer (without its lq division) and of the state update through W_l, at
    dL/dp_l in slot dp_src (dL/d(h Z_i)) and dL/dW at the chunk's end gw (gm: dL/dm, with momentum,
    where m is not None). Writes dL/dd_l (slot dd), dL/da_(l-1) (slot da) and dL/dh_(l-1): for the first
    layer (INPUT) dq into slot dh_dst, else dL/dp_(l-1) = dL/dh_(l-1) act'(p_(l-1)) (p_(l-1) from slot
    pp_src; divided by the lq map's n(Z_i) of W_(l-1) where n_prev is not None, whose gradient goes to
    dn_prev). Returns the updated sums (dC, dE, dcL, dMm, dsL, dn_prev): dL/dC, dL/dE, dL/dc, dL/dMm,
    dL/ds; dMm and dsL (without momentum) and dn_prev (where n_prev is None) come back as passed: a [BT]
    placeholder, never None (Triton 3.6 cannot return None in a tuple; docs/kernels-mlp.md)."""
    pm = tl.zeros([BT, BT], dtype=tl.float32)  # dp d^T
    for o0 in range(o_lo, o_hi, BD):
        dlt = _delta(dt, za, E, o0 + rd, DOUT, LAST, RETAINED)
        pm += _mm(_ld(dp_src, o0 + rd, DOUT), tl.trans(dlt), LOWP)
    hs = tl.zeros([BT, BT], dtype=tl.float32)  # h a^T
    for i0 in range(i_lo, i_hi, BD):
        hh = _lin(h_src, row, tmask, i0 + rd, DIN, INPUT)
        aa = _lin(a_src, row, tmask, i0 + rd, DIN, INPUT)
        hs += _mm(hh, tl.trans(aa), LOWP)
    dC -= tl.where(causal, pm * hs, 0.0)
    pm = pm * C
    hs = hs * C
    # dL/dd_l from the read-out and the state update
    for o0 in range(o_lo, o_hi, BD):
        dlt = _delta(dt, za, E, o0 + rd, DOUT, LAST, RETAINED)
        acc = -_mm(tl.trans(hs), _ld(dp_src, o0 + rd, DOUT), LOWP)
        adw = tl.zeros([BT, BD], dtype=tl.float32)
        if m is not None:
            adm = tl.zeros([BT, BD], dtype=tl.float32)
        for i0 in range(i_lo, i_hi, BD):
            aa = _lin(a_src, row, tmask, i0 + rd, DIN, INPUT)
            adw += _mm(aa, _ldw(gw, i0 + rd, o0 + rd, DIN, DOUT), LOWP)
            if m is not None:
                adm += _mm(aa, _ldw(gm, i0 + rd, o0 + rd, DIN, DOUT), LOWP)
        acc -= cL[:, None] * adw
        dcL -= tl.sum(dlt * adw, axis=1)
        if m is not None:
            acc += sL[:, None] * adm
            dsL += tl.sum(dlt * adm, axis=1)
        _st(dd, o0 + rd, acc, DOUT)
    # dL/dh_(l-1) and dL/da_(l-1)
    for i0 in range(i_lo, i_hi, BD):
        tw = tl.zeros([BT, BD], dtype=tl.float32)
        dwd = tl.zeros([BT, BD], dtype=tl.float32)
        if m is not None:
            tm = tl.zeros([BT, BD], dtype=tl.float32)
            dmd = tl.zeros([BT, BD], dtype=tl.float32)
        for o0 in range(o_lo, o_hi, BD):
            dpo = _ld(dp_src, o0 + rd, DOUT)
            dlt = _delta(dt, za, E, o0 + rd, DOUT, LAST, RETAINED)
            tw += _mm(dpo, tl.trans(_ldw(w, i0 + rd, o0 + rd, DIN, DOUT)), LOWP)
            dwd += _mm(dlt, tl.trans(_ldw(gw, i0 + rd, o0 + rd, DIN, DOUT)), LOWP)
            if m is not None:
                tm += _mm(dpo, tl.trans(_ldw(m, i0 + rd, o0 + rd, DIN, DOUT)), LOWP)
                dmd += _mm(dlt, tl.trans(_ldw(gm, i0 + rd, o0 + rd, DIN, DOUT)), LOWP)
        hh = _lin(h_src, row, tmask, i0 + rd, DIN, INPUT)
        aa = _lin(a_src, row, tmask, i0 + rd, DIN, INPUT)
        dE += tl.sum(hh * tw, axis=1)
        dh = E[:, None] * tw - _mm(pm, aa, LOWP)
        dat = -_mm(tl.trans(pm), hh, LOWP) - cL[:, None] * dwd
        if m is not None:
            dMm -= tl.sum(hh * tm, axis=1)
            dh -= Mm[:, None] * tm
            dat += sL[:, None] * dmd
        _st(da, i0 + rd, dat, DIN)
        if INPUT:
            _st(dh_dst, i0 + rd, dh, DIN)
        else:
            pp = _ld(pp_src, i0 + rd, DIN)
            dpp = dh * _tl_dact(pp)  # noqa: F821 (the module's activation)
            if n_prev is not None:
                dn_prev -= tl.sum(dpp * pp, axis=1) / n_prev
                dpp = dpp / n_prev[:, None]
            _st(dh_dst, i0 + rd, dpp, DIN)
    tl.debug_barrier()
    return dC, dE, dcL, dMm, dsL, dn_prev


@triton.jit
def _weight_grad_layer(w, m, gw, gm, go, gmo, h_src, a_src, dp_src, dz_src, dd_prev, za_prev, dt, za, row,
                       tmask, E, Mm, e, MmL, bcL, ib, kap, de, dMmL, dbcL, rd, i_lo, i_hi, o_lo, o_hi,
                       DIN: tl.constexpr, DOUT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                       LOWP: tl.constexpr, INPUT: tl.constexpr, LAST: tl.constexpr,
                       RETAINED: tl.constexpr, LQ_Q: tl.constexpr, LQ_QI: tl.constexpr,
                       LQ_CHUNK: tl.constexpr):
    """dL/dW_b of W_l at the chunk's start into go (and dL/dm_b into gmo where m is not None): the state
    update's e dL/dW_end, the read-out's (h E)^T dp and the base pass's a^T dz [+ u^T d_l, u = dL/dd_(l-1)
    act'(z_(l-1)) from slots dd_prev, za_prev]; with the lq map (ib = 1 / n(Z_b) not None) through
    W_b = Z_b / n(Z_b), added to what the token norms' backward left in go / gmo (norm=token; with
    LQ_CHUNK, norm=chunk, the norms' part is in kap and in gw already). Returns the sums (de, dMmL,
    dbcL) of <W_b, dL/dW_end>, -<m_b, dL/dW_end> and <m_b, dL/dm_end> (the gates' gradients); without
    momentum dMmL and dbcL come back as passed (a scalar placeholder: a tuple cannot return None)."""
    for i0 in range(i_lo, i_hi, BD):
        hh = _lin(h_src, row, tmask, i0 + rd, DIN, INPUT)
        aa = _lin(a_src, row, tmask, i0 + rd, DIN, INPUT)
        if dd_prev is not None:
            uu = _delta(dd_prev, za_prev, E, i0 + rd, DIN, False, RETAINED)
        for o0 in range(o_lo, o_hi, BD):
            gwt = _ldw(gw, i0 + rd, o0 + rd, DIN, DOUT)
            wt = _ldw(w, i0 + rd, o0 + rd, DIN, DOUT)
            dpo = _ld(dp_src, o0 + rd, DOUT)
            dzo = _ld(dz_src, o0 + rd, DOUT)
            if RETAINED:
                dzo = dzo * E[:, None]
            gb = _mm(tl.trans(aa), dzo, LOWP)  # the base pass's dL/dW_b
            if dd_prev is not None:
                dlt = _delta(dt, za, E, o0 + rd, DOUT, LAST, RETAINED)
                gb += _mm(tl.trans(uu), dlt, LOWP)
            acc = e * gwt + _mm(tl.trans(hh * E[:, None]), dpo, LOWP)
            if ib is not None:
                glq = gb * ib + kap * _lq_pow_grad(wt, LQ_Q, LQ_QI)
                if not LQ_CHUNK:
                    glq += _ldw(go, i0 + rd, o0 + rd, DIN, DOUT)
                acc += glq
            else:
                acc += gb
            _stw(go, acc, i0 + rd, o0 + rd, DIN, DOUT)
            de += tl.sum(tl.sum(wt * gwt, axis=1), axis=0)
            if m is not None:
                gmt = _ldw(gm, i0 + rd, o0 + rd, DIN, DOUT)
                mt = _ldw(m, i0 + rd, o0 + rd, DIN, DOUT)
                dMmL -= tl.sum(tl.sum(mt * gwt, axis=1), axis=0)
                dbcL += tl.sum(tl.sum(mt * gmt, axis=1), axis=0)
                accm = bcL * gmt - MmL * gwt - _mm(tl.trans(hh * Mm[:, None]), dpo, LOWP)
                if ib is not None and not LQ_CHUNK:
                    accm += _ldw(gmo, i0 + rd, o0 + rd, DIN, DOUT)
                _stw(gmo, accm, i0 + rd, o0 + rd, DIN, DOUT)
    return de, dMmL, dbcL


@triton.jit
def _delta_vjp_layer(w_next, dd, dt, za, dd_next, dz, E, ib_next, dlogE, rd, x_lo, x_hi, o_lo, o_hi,
                     X: tl.constexpr, DOUT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     LOWP: tl.constexpr, RETAINED: tl.constexpr):
    """The base pass's backward through d_l = (d_(l+1) W_(l+1)^T) act'(z_l) (l < L) at dL/dd_l (slot dd):
    with u = dL/dd_l act'(z_l), d_(l+1) gets u W_(l+1) (added to slot dd_next; times 1 / n(Z_b) where
    ib_next is not None) and z_l gets dL/dd_l (d_(l+1) W^T) act''(z_l) (slot dz, from slots dt, za). At
    =retained (E_i scales d_l) also returns dlogE plus the sum over the row of that scaling's part, else
    dlogE as passed (a placeholder, never None: Triton 3.6 cannot bind None to the caller's name)."""
    for o0 in range(o_lo, o_hi, BD):
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        for x0 in range(x_lo, x_hi, BD):
            uu = _delta(dd, za, E, x0 + rd, X, False, RETAINED)
            acc += _mm(uu, _ldw(w_next, x0 + rd, o0 + rd, X, DOUT), LOWP)
        if ib_next is not None:
            acc = acc * ib_next
        _st(dd_next, o0 + rd, _ld(dd_next, o0 + rd, DOUT) + acc, DOUT)
    for x0 in range(x_lo, x_hi, BD):
        ddl = _ld(dd, x0 + rd, X)
        dtl = _ld(dt, x0 + rd, X)
        zl = _ld(za, x0 + rd, X)
        if RETAINED:
            _st(dz, x0 + rd, ddl * dtl * _tl_d2act(zl) * E[:, None], X)  # noqa: F821 (the activation)
            dlogE += tl.sum(ddl * dtl * _tl_dact(zl) * E[:, None], axis=1)  # noqa: F821
        else:
            _st(dz, x0 + rd, ddl * dtl * _tl_d2act(zl), X)  # noqa: F821 (the activation)
    tl.debug_barrier()
    return dlogE


@triton.jit
def _layer_vjp(w, dz, za, za_prev, da_prev, dz_prev, first, E, ib, dlogE, rd, i_lo, i_hi, o_lo, o_hi,
               DIN: tl.constexpr, DOUT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
               LOWP: tl.constexpr, INPUT: tl.constexpr, LAST: tl.constexpr, RETAINED: tl.constexpr):
    """The base pass's backward through z_l = a_(l-1) W_l at dL/dz_l (slot dz): dL/da_(l-1) = dz W_l^T
    (times 1 / n(Z_b) where ib is not None) plus what slot da_prev holds goes to dL/dk (the first layer,
    INPUT: added to slot da_prev) or through act'(z_(l-1)) (za_prev) into slot dz_prev. At=retained
    (z_l carries E_i) returns dlogE plus the sum over the row of dz z_l (the last layer's full rows
    counted by the first slice only, `first`), else dlogE as passed (a placeholder, never None)."""
    for i0 in range(i_lo, i_hi, BD):
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        for o0 in range(o_lo, o_hi, BD):
            dzo = _ld(dz, o0 + rd, DOUT)
            if RETAINED:
                dzo = dzo * E[:, None]
            acc += _mm(dzo, tl.trans(_ldw(w, i0 + rd, o0 + rd, DIN, DOUT)), LOWP)
        if ib is not None:
            acc = acc * ib
        if INPUT:
            _st(da_prev, i0 + rd, _ld(da_prev, i0 + rd, DIN) + acc, DIN)
        else:
            zp = _ld(za_prev, i0 + rd, DIN)
            dzp = (acc + _ld(da_prev, i0 + rd, DIN)) * _tl_dact(zp)  # noqa: F821 (the activation)
            _st(dz_prev, i0 + rd, _ld(dz_prev, i0 + rd, DIN) + dzp, DIN)
    if RETAINED:
        for o0 in range(o_lo, o_hi, BD):
            dzz = tl.sum(_ld(dz, o0 + rd, DOUT) * _ld(za, o0 + rd, DOUT), axis=1)
            if LAST:  # full rows, alike in every slice: counted once
                dlogE += tl.where(first, dzz, 0.0)
            else:
                dlogE += dzz
    tl.debug_barrier()
    return dlogE


@triton.jit
def _lq_base_norm(w, zero, rd, DIN: tl.constexpr, DOUT: tl.constexpr, BD: tl.constexpr, Q: tl.constexpr,
                  QI: tl.constexpr, PW: tl.constexpr, AT0: tl.constexpr, EPS: tl.constexpr):
    """The lq map of a base weight matrix Z_b [DIN, DOUT]: (s_b = ||Z_b||_q^q, n(Z_b), 1 / n(Z_b)); the
    base pass runs at W_b = Z_b / n(Z_b). zero: an fp32 scalar 0 (the loop-carried sum's type)."""
    sb = zero
    for i0 in range(0, DIN, BD):
        for o0 in range(0, DOUT, BD):
            zp = _lq_pow(_ldw(w, i0 + rd, o0 + rd, DIN, DOUT), Q, QI)
            sb += tl.sum(tl.sum(zp, axis=1), axis=0)
    nb = _lq_norm(sb, PW, AT0, EPS)
    return sb, nb, 1.0 / nb


@triton.jit
def _lq_tile_index(QA: tl.constexpr, QB: tl.constexpr):
    """The token norms' [QA, QB] weight tile, flattened: (row, column) of each of its QA QB entries."""
    rf = tl.arange(0, QA * QB)
    return rf // QB, rf % QB


@triton.jit
def _lq_tile(w, m, a_src, dt, za, i0, o0, fa, fb, row, tmask, E, C, Mm, DIN: tl.constexpr,
             DOUT: tl.constexpr, LOWP: tl.constexpr, INPUT: tl.constexpr, LAST: tl.constexpr,
             RETAINED: tl.constexpr):
    """Every token's own weights Z_i = E_i Z_b - Mm_i m_b - sum_j C_ij R_j on the [QA, QB] tile of W_l at
    rows i0 + fa, columns o0 + fb (flattened), with R_j = a_j^T d_j -> (ca, cb, fmask: the tile's rows,
    columns and mask; aexp, dexp: a and d on them; rr: R; zb: Z_b; zt: Z_i [BT, QA QB]; mb: m_b where m
    is not None)."""
    ca = i0 + fa
    cb = o0 + fb
    fmask = (ca < DIN) & (cb < DOUT)
    aexp = _lin(a_src, row, tmask, ca, DIN, INPUT)
    dexp = _delta(dt, za, E, cb, DOUT, LAST, RETAINED)
    rr = aexp * dexp
    zb = tl.load(w + ca * DOUT + cb, mask=fmask, other=0.0)
    zt = E[:, None] * zb[None, :] - _mm(C, rr, LOWP)
    mb = zb  # without momentum: a stand-in of m_b's shape, unread (a branch cannot bind None)
    if m is not None:
        mb = tl.load(m + ca * DOUT + cb, mask=fmask, other=0.0)
        zt -= Mm[:, None] * mb[None, :]
    return ca, cb, fmask, aexp, dexp, rr, zb, zt, mb


@triton.jit
def _lq_token_norms(w, m, a_src, dt, za, row, tmask, E, C, Mm, BT: tl.constexpr, QA: tl.constexpr,
                    QB: tl.constexpr, DIN: tl.constexpr, DOUT: tl.constexpr, LOWP: tl.constexpr,
                    INPUT: tl.constexpr, LAST: tl.constexpr, RETAINED: tl.constexpr, Q: tl.constexpr,
                    QI: tl.constexpr, PW: tl.constexpr, AT0: tl.constexpr, EPS: tl.constexpr):
    """The lq map of every token's own weights Z_i of W_l: (s_i = ||Z_i||_q^q, n(Z_i)) [BT], Z_i never
    held whole (_lq_tile: one [QA, QB] tile of it for every token at a time)."""
    fa, fb = _lq_tile_index(QA, QB)
    s = tl.zeros([BT], dtype=tl.float32)
    for i0 in range(0, DIN, QA):
        for o0 in range(0, DOUT, QB):
            zt = _lq_tile(w, m, a_src, dt, za, i0, o0, fa, fb, row, tmask, E, C, Mm, DIN, DOUT, LOWP,
                          INPUT, LAST, RETAINED)[7]
            s += tl.sum(_lq_pow(zt, Q, QI), axis=1)
    return s, _lq_norm(s, PW, AT0, EPS)


@triton.jit
def _lq_norms_vjp(w, m, a_src, dt, za, row, tmask, E, C, Mm, dd, da, go, gmo, s, n, dn, dE, dC,
                  dMm, causal, BT: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, DIN: tl.constexpr,
                  DOUT: tl.constexpr, LOWP: tl.constexpr, INPUT: tl.constexpr, LAST: tl.constexpr,
                  RETAINED: tl.constexpr, Q: tl.constexpr, QI: tl.constexpr, PW: tl.constexpr,
                  EPS: tl.constexpr):
    """The backward of the token norms n(Z_i) of W_l at dL/dn = dn: dL/dZ_i = ds_i q sign(Z_i)
    |Z_i|^(q-1), ds = dn n'(s), through Z_i = E_i Z_b - Mm_i m_b - C R: added to slots dd (dL/dd_l) and da
    (dL/da_(l-1)), written to go / gmo (dL/dZ_b, dL/dm_b at the chunk's start, to which the weight sweep
    adds), and returned in the sums (dE, dC, dMm); without momentum dMm comes back as passed (a [BT]
    placeholder: a returned tuple cannot hold None)."""
    ds = dn * _lq_dnorm(s, n, PW, EPS)
    fa, fb = _lq_tile_index(QA, QB)
    r16 = tl.arange(0, 16)
    sel_b = tl.where(fb[:, None] == r16[None, :], 1.0, 0.0)  # [QA QB, 16]: sums a tile per column
    sel_a = tl.where(fa[:, None] == r16[None, :], 1.0, 0.0)  # ... per row (QA <= 16)
    for o0 in range(0, DOUT, QB):
        accd = tl.zeros([BT, 16], dtype=tl.float32)
        for i0 in range(0, DIN, QA):
            _ca, _cb, _fm, aexp, _dexp, _rr, _zb, zt, _mb = _lq_tile(
                w, m, a_src, dt, za, i0, o0, fa, fb, row, tmask, E, C, Mm, DIN, DOUT, LOWP, INPUT, LAST,
                RETAINED)
            dzt = ds[:, None] * _lq_pow_grad(zt, Q, QI)
            dr = -_mm(tl.trans(C), dzt, LOWP)
            accd += _mm(dr * aexp, sel_b, LOWP)
        _st(dd, o0 + r16, _ld(dd, o0 + r16, DOUT) + accd, DOUT)
    tl.debug_barrier()
    for i0 in range(0, DIN, QA):
        acca = tl.zeros([BT, 16], dtype=tl.float32)
        for o0 in range(0, DOUT, QB):
            ca, cb, fmask, _aexp, dexp, rr, zb, zt, mb = _lq_tile(
                w, m, a_src, dt, za, i0, o0, fa, fb, row, tmask, E, C, Mm, DIN, DOUT, LOWP, INPUT, LAST,
                RETAINED)
            dzt = ds[:, None] * _lq_pow_grad(zt, Q, QI)
            dr = -_mm(tl.trans(C), dzt, LOWP)
            acca += _mm(dr * dexp, sel_a, LOWP)
            tl.store(go + ca * DOUT + cb, tl.sum(E[:, None] * dzt, axis=0), mask=fmask)
            if m is not None:
                tl.store(gmo + ca * DOUT + cb, -tl.sum(Mm[:, None] * dzt, axis=0), mask=fmask)
                dMm -= tl.sum(dzt * mb[None, :], axis=1)
            dE += tl.sum(dzt * zb[None, :], axis=1)
            dC -= tl.where(causal, _mm(dzt, tl.trans(rr), LOWP), 0.0)
        ma = ((r16 < QA) & (i0 + r16 < DIN))[None, :]
        tl.store(da + i0 + r16[None, :], tl.load(da + i0 + r16[None, :], mask=ma) + acca, mask=ma)
    tl.debug_barrier()
    return dE, dC, dMm


@triton.jit
def _lq_kappa(dz, za, dd_prev, za_prev, dt_prev, E, ib, sb, nb, dsb, zero, rd, DOUT: tl.constexpr,
              X: tl.constexpr, BD: tl.constexpr, RETAINED: tl.constexpr, PW: tl.constexpr,
              EPS: tl.constexpr):
    """The lq map's part of dL/dZ_b of W_l: the base pass ran at W_b = Z_b / n(Z_b), so dL/dZ_b gets
    kap q sign(Z_b) |Z_b|^(q-1) with kap = -<dL/dW_b, Z_b> n'(s_b) / n_b^2 (+ dsb, dL/ds_b from the
    read-out, where dsb is not None: norm=chunk's _lq_chunk_vjp). <dL/dW_b, Z_b> comes from the rows
    (z_l = a Z_b / n_b from slots dz, za; for l > 1 also dt_(l-1) = d Z_b^T / n_b against u =
    dL/dd_(l-1) act'(z_(l-1)) from slots dd_prev, za_prev, dt_prev, where dd_prev is not None)."""
    gz = zero
    for o0 in range(0, DOUT, BD):
        dzo = _ld(dz, o0 + rd, DOUT)
        gz += tl.sum(tl.sum(dzo * _ld(za, o0 + rd, DOUT), axis=1), axis=0)
    if dd_prev is not None:
        for i0 in range(0, X, BD):
            uu = _delta(dd_prev, za_prev, E, i0 + rd, X, False, RETAINED)
            gz += tl.sum(tl.sum(uu * _ld(dt_prev, i0 + rd, X), axis=1), axis=0)
    kap = -gz * ib * _lq_dnorm(sb, nb, PW, EPS)
    if dsb is not None:
        kap += dsb
    return kap


@triton.jit
def _lq_chunk_end(we, dst, isend, sb, nb, zero, rd, DIN: tl.constexpr, DOUT: tl.constexpr,
                  BD: tl.constexpr, Q: tl.constexpr, QI: tl.constexpr, PW: tl.constexpr,
                  AT0: tl.constexpr, EPS: tl.constexpr):
    """lq(norm=chunk) on W_l after its read-out through n(Z_b) (slot dst: p_l = (h Z_i) / n_b for every
    token): the token that ends a whole chunk (isend) reads its own state, Z_end / n(Z_end), so its row of
    dst is scaled by n_b / n(Z_end), Z_end = the chunk's end state at `we` (docs/semantics.md, "Decision,
    Moneta"). Returns (s, n) [BT]: ||Z||_q^q and n(Z) of the state whose norm each token read."""
    se, ne, _ie = _lq_base_norm(we, zero, rd, DIN, DOUT, BD, Q, QI, PW, AT0, EPS)
    r = tl.where(isend, nb / ne, 1.0)
    for o0 in range(0, DOUT, BD):
        _st(dst, o0 + rd, _ld(dst, o0 + rd, DOUT) * r[:, None], DOUT)
    tl.debug_barrier()
    return tl.where(isend, se, sb), tl.where(isend, ne, nb)


@triton.jit
def _lq_chunk_vjp(we, gw, isend, s, n, dn, rd, DIN: tl.constexpr, DOUT: tl.constexpr, BD: tl.constexpr,
                  Q: tl.constexpr, QI: tl.constexpr, PW: tl.constexpr, EPS: tl.constexpr):
    """The backward of lq(norm=chunk)'s norms of W_l (s, n: _lq_chunk_end's) at dL/dn = dn [BT]: the
    chunk-ending token's n(Z_end) adds ds_e q sign(Z_end) |Z_end|^(q-1) to dL/dZ_end (gw, before the
    read-out's backward and the weight sweep read it: Z_end is the state update's result, at `we`).
    Returns dL/ds_b, the sum over the tokens that read n(Z_b) (to _lq_kappa)."""
    ds = dn * _lq_dnorm(s, n, PW, EPS)
    dse = tl.sum(tl.where(isend, ds, 0.0), axis=0)
    for i0 in range(0, DIN, BD):
        for o0 in range(0, DOUT, BD):
            g = _ldw(gw, i0 + rd, o0 + rd, DIN, DOUT)
            g += dse * _lq_pow_grad(_ldw(we, i0 + rd, o0 + rd, DIN, DOUT), Q, QI)
            _stw(gw, g, i0 + rd, o0 + rd, DIN, DOUT)
    tl.debug_barrier()
    return tl.sum(tl.where(isend, 0.0, ds), axis=0)


@triton.jit
def _chunk_rows(c, rt, rv, vmask, bos, TN, h, H, V: tl.constexpr, CH: tl.constexpr):
    """Chunk c of a program's tokens -> (tmask: its valid rows [BT], row: their rows of a [B, T, H] input,
    v_off: offsets of a [B, T, H, V] one, m_v: its mask, islast: the chunk's last valid token, whose Z_i
    is the next base state)."""
    t = c * CH + rt
    tmask = (rt < CH) & (t < TN)
    row = (bos + t) * H + h
    v_off = row[:, None] * V + rv[None, :]
    m_v = tmask[:, None] & vmask[None, :]
    islast = rt == tl.minimum(CH, TN - c * CH) - 1
    return tmask, row, v_off, m_v, islast


@triton.jit
def _momentum_gate_vjp(D, Bs, bc, dC, dMm, dbcL, dsL, islast, causal):
    """The backward of C = D Bs and Mm = D bc (_momentum_coefs) and of the last token's bc_L and row s_L
    of Bs, at their cotangents dC, dMm, dbcL, dsL -> (dL/dD, dL/d log beta)."""
    dbc = tl.where(islast, dbcL, 0.0) + tl.sum(D * dMm[:, None], axis=0)  # Mm = D bc
    dBs = tl.where(islast[:, None], dsL[None, :], 0.0) + _mm(tl.trans(D), dC, 0)  # C = D Bs
    dD = _mm(dC, tl.trans(Bs), 0) + dMm[:, None] * bc[None, :]
    return dD, _dlog_gate(dBs, Bs, causal, bc * dbc)


@triton.jit
def _st_rows(ptr, row, tmask, x, D: tl.constexpr, BD: tl.constexpr):
    """Store x [BT, BD] as the chunk's valid rows of a [B, T, H, D] output (columns < D)."""
    rk = tl.arange(0, BD)
    tl.store(ptr + row[:, None] * D + rk[None, :], x, mask=tmask[:, None] & (rk < D)[None, :])


@triton.jit
def _output_vjp(do, p, dst, n, dn_none, rv, vmask, V: tl.constexpr, NORM: tl.constexpr, LQ: tl.constexpr):
    """The backward of the read-out's output o = [q +] [LN](p_L) at do = dL/do: stores dL/dp_L into slot
    dst (with the lq map, LQ, dL/d(h Z_i) before the division by n(Z_i) of W_L, n) -> dL/dn(Z_i) of W_L,
    dn_none as passed without the map (a [BT] placeholder, never None)."""
    dp = do
    if NORM:
        pn, prstd = _ln(p, vmask, V)
        dp = _ln_vjp(pn, prstd, do, vmask, V)
    dn = dn_none
    if LQ:
        dn = -tl.sum(dp * p, axis=1) / n
        dp = dp / n[:, None]
    _st(dst, rv, dp, V)
    tl.debug_barrier()
    return dn


@triton.jit
def _gates_vjp(dE, dC, dcL, de, islast, alpha_ptr, dalpha_ptr, alpha, D, E, dlogE, beta_ptr, dbeta_ptr,
               part, beta, Bs, bc, dMm, dMmL, dbcL, dsL, row, tmask, causal, RETAINED: tl.constexpr):
    """The gates' gradients of a chunk from the sums of its phases: dL/dE, dL/dC (plus the state
    update's de, dcL of the last token) -> d log alpha (where alpha_ptr is not None; plus dlogE, the
    base pass's part, at=retained: RETAINED) and, with momentum (beta_ptr not None), through C = D Bs
    and Mm = D bc (dMm, dMmL, dbcL, dsL) d log beta; stored as dL/dalpha, dL/dbeta (this slice's part:
    rows part + row)."""
    dE += tl.where(islast, de, 0.0)
    dC += tl.where(islast[:, None], dcL[None, :], 0.0)
    dD = dC
    if beta_ptr is not None:
        dMm += tl.where(islast, dMmL, 0.0)
        dD, dlb = _momentum_gate_vjp(D, Bs, bc, dC, dMm, dbcL, dsL, islast, causal)
        tl.store(dbeta_ptr + part + row, dlb / beta, mask=tmask)
    if alpha_ptr is not None:
        dlE = E * dE
        if RETAINED:
            dlE += dlogE
        dla = _dlog_gate(dD, D, causal, dlE)  # d log alpha
        tl.store(dalpha_ptr + part + row, dla / alpha, mask=tmask)


@triton.jit
def _mlp_output(o_ptr, p, q_ptr, row, tmask, v_off, mask, rv, vmask, K: tl.constexpr, V: tl.constexpr,
                NORM: tl.constexpr, RESIDUAL: tl.constexpr):
    """Store the read-out's output o = [q +] [LN](p_L) (p: [BT, BV]) where mask holds."""
    if NORM:
        p = _ln(p, vmask, V)[0]
    if RESIDUAL:
        p += _ldk(q_ptr, row, tmask, rv, K)
    tl.store(o_ptr + v_off, p.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _st_dqk(dq_ptr, dk_ptr, part, dq, da0, do, first, row, tmask, K: tl.constexpr, BK: tl.constexpr,
            RESIDUAL: tl.constexpr):
    """Store a chunk's dL/dq and dL/dk from slots dq and da0 (this slice's part: rows part + row); the
    residual's dL/dq (do, K = V) counted by the first slice only."""
    rk = tl.arange(0, BK)
    dqt = _ld(dq, rk, K)
    if RESIDUAL:
        dqt = dqt + tl.where(first[:, None], do, 0.0)
    _st_rows(dq_ptr + part * K, row, tmask, dqt, K, BK)
    _st_rows(dk_ptr + part * K, row, tmask, _ld(da0, rk, K), K, BK)


@triton.jit
def _retained(x, E, RETAINED: tl.constexpr):
    """x [BT, *], times E_i at=retained (RETAINED: the gradient point E_i W_b scales the base pass)."""
    if RETAINED:
        x = x * E[:, None]
    return x


@triton.jit
def _pre_slots(pre_ptr, row0, rt, PRE: tl.constexpr, BT: tl.constexpr, X: tl.constexpr, V: tl.constexpr):
    """The split forward's stored rows of a chunk as slots (row pointers [BT, 1]): (p_1, p_2, z_2) from
    row row0 of pre_ptr ([BT, X + 2 V] each: p_1 [BT, X], p_2 [BT, V], z_2 [BT, V])."""
    pre = pre_ptr + row0 * PRE
    return pre + rt[:, None] * X, pre + BT * X + rt[:, None] * V, pre + BT * (X + V) + rt[:, None] * V
