"""Helpers of the matrix-memory chunk kernels (templates/triton_linear_*.py.j2; docs/kernels-matrix.md).

One program walks one head's sequence in tiles of BT tokens. These functions are the pieces the three
kernel pairs (per-head decay, momentum, per-channel decay) share: where a program's sequence lies, a
tile's offsets and log-decays, the momentum weights, the triangular inverse of the WY form, and the
level-by-level pair products of a per-channel decay; and the pieces of the token-by-token pair of a
retention map: a token's gates, the maps and their VJPs, the chunk's gradient point, the scratch states,
and the backward's phases (a token's read-out, its gradient point and the chunk's base, reversed).
"""
import triton
import triton.language as tl

from .common import _at_last, _mm, _mm32, _row_at_last


@triton.jit
def _program(cu_ptr, T, H, NC, BT: tl.constexpr):
    """Where program (sequence or batch row, head) works: (pid, h, bos, T, NC, st0). bos is its first
    token's row; st0 its first tile in the state store [B, H, NC, K, V]. With packed sequences
    (cu_ptr, the offsets [N + 1]), sequence b holds tokens [bos, bos + T) and its tiles start at
    h NC + bos // BT + b: the store holds T_total // BT + N tiles per head, and no two sequences
    overlap."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    if cu_ptr is not None:
        bos = tl.load(cu_ptr + b).to(tl.int32)
        T = tl.load(cu_ptr + b + 1).to(tl.int32) - bos
        st0 = h * NC + bos // BT + b
        NC = tl.cdiv(T, BT)
    else:
        bos = b * T
        st0 = pid * NC
    return pid, h, bos, T, NC, st0


@triton.jit
def _tile_offsets(c, rt, rk, rv, bos, h, T, H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr):
    """Tile c's token rows: (row [BT] (token and head), tmask [BT], q/k offsets and mask [BT, BK],
    v offsets and mask [BT, BV]), for [.., T, H, K] and [.., T, H, V] tensors."""
    t = c * BT + rt
    tmask = t < T
    row = (bos + t) * H + h
    qk_off = row[:, None] * K + rk[None, :]
    v_off = row[:, None] * V + rv[None, :]
    m_k = tmask[:, None] & (rk < K)[None, :]
    m_v = tmask[:, None] & (rv < V)[None, :]
    return row, tmask, qk_off, m_k, v_off, m_v


@triton.jit
def _load_gate(ptr, row, tmask, v_off, m_v, CHANNEL: tl.constexpr, other: tl.constexpr):
    """A gate of the tile's tokens in fp32: [BT, BV] per value channel (CHANNEL), else [BT, 1]."""
    if CHANNEL:
        x = tl.load(ptr + v_off, mask=m_v, other=other).to(tl.float32)
    else:
        x = tl.load(ptr + row, mask=tmask, other=other).to(tl.float32)[:, None]
    return x


@triton.jit
def _log_decays(alpha_ptr, row, tmask, rt, BT: tl.constexpr):
    """The tile's per-head decays: (alpha, la = log alpha, b = cumsum(la), b at the last token), [BT]
    each; no decay (alpha_ptr None) is alpha = 1."""
    if alpha_ptr is not None:
        alpha = tl.load(alpha_ptr + row, mask=tmask, other=1.0).to(tl.float32)
        la = tl.log(alpha)
    else:
        alpha = tl.full([BT], 1.0, dtype=tl.float32)
        la = tl.zeros([BT], dtype=tl.float32)
    bcum = tl.cumsum(la, axis=0)
    return alpha, la, bcum, _at_last(bcum, rt == BT - 1)


@triton.jit
def _log_decays_channel(alpha_ptr, v_off, m_v, rt, BT: tl.constexpr, BV: tl.constexpr):
    """As _log_decays for a decay per value channel: alpha, la, b [BT, BV] and b's last row [BV]."""
    if alpha_ptr is not None:
        alpha = tl.load(alpha_ptr + v_off, mask=m_v, other=1.0).to(tl.float32)
        la = tl.log(alpha)
    else:
        alpha = tl.full([BT, BV], 1.0, dtype=tl.float32)
        la = tl.zeros([BT, BV], dtype=tl.float32)
    bcum = tl.cumsum(la, axis=0)
    return alpha, la, bcum, _row_at_last(bcum, rt == BT - 1)


@triton.jit
def _momentum_weights(beta, bcum, tmask, rt, BT: tl.constexpr, LOWP: tl.constexpr):
    """The momentum tile's weights from its decays b and momentum decays beta [BT] (c = cumsum log beta):
    m_i = exp(c_i) m + sum_{j <= i} Db_ij G_j and Z_i = exp(b_i) S - sum_{l <= i} Da_il m_l, so
        Z_i = exp(b_i) S - mv_i m - sum_{j <= i} W_ij G_j,   W = Da Db,  mv = Da exp(c).
    Padded tokens must not write: their columns of Da are zero.
    Returns (c, c_last, exp(c), Da, Db, W, mv).
    """
    ccum = tl.cumsum(tl.log(beta), axis=0)
    clast = _at_last(ccum, rt == BT - 1)
    ec = tl.exp(ccum)
    causal = rt[:, None] >= rt[None, :]
    Da = tl.where(causal & tmask[None, :], tl.exp(bcum[:, None] - bcum[None, :]), 0.0)
    Db = tl.where(causal, tl.exp(ccum[:, None] - ccum[None, :]), 0.0)
    Wm = _mm(Da, Db, LOWP)
    mv = tl.sum(Da * ec[None, :], axis=1)
    return ccum, clast, ec, Da, Db, Wm, mv


@triton.jit
def _pairs(rt, W: tl.constexpr):
    """[BT, BT] mask of the pairs (i, j) whose indices first differ in bit W: i in the second half of a
    2W-block, j in its first half (so j < i)."""
    return ((rt[:, None] ^ rt[None, :]) < 2 * W) & ((rt[:, None] & W) != 0) & ((rt[None, :] & W) == 0)


@triton.jit
def _unit_tril_inverse(L, rt, LOG_CS: tl.constexpr, LOG_BT: tl.constexpr, LOWP: tl.constexpr):
    """(I + L)^-1 for a [BT, BT] L that is zero on and above its diagonal blocks of CS = 2^LOG_CS rows,
    by doubling the block size: with Ti the inverse of the block-diagonal part in blocks of W rows,
        Ti <- Ti - Ti L_W Ti,   L_W = L on the pairs whose indices first differ in bit W
    is the inverse in blocks of 2W: [[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]. Two products
    per level and no power series, so no entry grows beyond those of the inverse itself."""
    Ti = tl.where(rt[:, None] == rt[None, :], 1.0, 0.0)
    for lvl in tl.static_range(LOG_CS, LOG_BT):
        Ti = Ti - _mm32(_mm32(Ti, tl.where(_pairs(rt, 1 << lvl), L, 0.0), LOWP), Ti, LOWP)
    return Ti


@triton.jit
def _seg(x, W: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """Segments of W rows of a [BT, BV] tile: (the cumulative sums inside each segment, its sum)."""
    x3 = tl.reshape(x, [BT // W, W, BV])
    cum = tl.reshape(tl.cumsum(x3, axis=1), [BT, BV])
    tot = tl.reshape(tl.broadcast_to(tl.sum(x3, axis=1)[:, None, :], [BT // W, W, BV]), [BT, BV])
    return cum, tot


@triton.jit
def _level(la, rt, W: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """The pairs j < i whose indices first differ in bit W (j in an even W-segment, i in the odd one
    right after it): (their mask [BT, BT], row factors exp(b_i - b_p), column factors exp(b_p - b_j)),
    p the last token of j's segment, so that exp(b_i - b_j) = rf_i * cf_j per value channel. Both come
    from sums of log-decays inside one segment (no differences of large cumulative sums)."""
    cum, tot = _seg(la, W, BT, BV)
    odd = ((rt & W) != 0)[:, None]
    rf = tl.where(odd, tl.exp(cum), 0.0)
    cf = tl.where(odd, 0.0, tl.exp(tot - cum))
    return _pairs(rt, W), rf, cf


@triton.jit
def _decay_mm(A, X, la, rt, LOG_BT: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr):
    """sum_{j <= i} A_ij exp(b_i - b_j) X_j per value channel (b = cumsum(la)): the diagonal, then one
    masked tile product per level of _level."""
    out = tl.sum(tl.where(rt[:, None] == rt[None, :], A, 0.0), axis=1)[:, None] * X
    for lvl in tl.static_range(LOG_BT):
        mask, rf, cf = _level(la, rt, 1 << lvl, BT, BV)
        out += rf * _mm(tl.where(mask, A, 0.0), X * cf, LOWP)
    return out


@triton.jit
def _decay_mm_bwd(A, g, do, la, rt, LOG_BT: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                  LOWP: tl.constexpr):
    """The in-tile pair sums of a per-channel decay, D_ij = exp(b_i - b_j) per value channel, level by
    level (_level): (it, itT, dA) with it_i = sum_{j <= i} A_ij D_ij g_j (= _decay_mm(A, g)), its
    transpose applied to do, itT_j = sum_{i >= j} A_ij D_ij do_i, and dA_ij = sum_v do_i D_ij g_j."""
    eye = rt[:, None] == rt[None, :]
    adiag = tl.sum(tl.where(eye, A, 0.0), axis=1)[:, None]
    it = adiag * g
    itT = adiag * do
    dA = tl.where(eye, tl.sum(do * g, axis=1)[:, None], 0.0)
    for lvl in tl.static_range(LOG_BT):
        mask, rf, cf = _level(la, rt, 1 << lvl, BT, BV)
        Am = tl.where(mask, A, 0.0)
        gc = g * cf
        dor = do * rf
        it += rf * _mm(Am, gc, LOWP)
        itT += cf * _mm(tl.trans(Am), dor, LOWP)
        dA += tl.where(mask, _mm(dor, tl.trans(gc), LOWP), 0.0)
    return it, itT, dA


# The retention maps of the per-token map kernels (templates/triton_linear_map.py.j2), on a program's
# [BK, BV] state; MAP: 1 scale * softmax(Z) (kl; AXIS 0 over keys, 1 over values, 2 over the matrix),
# 2 sigmoid(Z) (bregman), 3 S_gamma(Z) (elastic net). docs/semantics.md, "Retention maps".

@triton.jit
def _token_gate(ptr, row, rv, vmask, V: tl.constexpr, CHANNEL: tl.constexpr, other: tl.constexpr):
    """One token's gate in fp32: its value channels as a [1, BV] row (CHANNEL, `other` in padded ones),
    else its scalar as [1, 1] (the shape of a per-head gate in the bias's [BT, 1] columns)."""
    if CHANNEL:
        x = tl.load(ptr + row * V + rv[None, :], mask=vmask[None, :], other=other).to(tl.float32)
    else:
        x = tl.load(ptr + row + tl.zeros([1, 1], dtype=tl.int32)).to(tl.float32)
    return x


@triton.jit
def _softmax_map(Z, smask, AXIS: tl.constexpr, SCALE: tl.constexpr):
    """SCALE * softmax(Z) over AXIS (0: each column over the keys, 1: each row over the values, 2: the
    whole matrix); padded entries are 0 and take no share."""
    x = tl.where(smask, Z, -1e30)
    if AXIS == 0:
        e = tl.where(smask, tl.exp(x - tl.max(x, axis=0)[None, :]), 0.0)
        s = tl.sum(e, axis=0)[None, :]
    elif AXIS == 1:
        e = tl.where(smask, tl.exp(x - tl.max(x, axis=1)[:, None]), 0.0)
        s = tl.sum(e, axis=1)[:, None]
    else:
        e = tl.where(smask, tl.exp(x - tl.max(tl.max(x, axis=1), axis=0)), 0.0)
        s = tl.sum(tl.sum(e, axis=1), axis=0)
    return SCALE * e / tl.where(s > 0.0, s, 1.0)


@triton.jit
def _map_fwd(Z, smask, gamma, MAP: tl.constexpr, AXIS: tl.constexpr, SCALE: tl.constexpr):
    """W = map(Z), zero in padded entries; gamma ([1, BV] per value channel, or [1, 1]) is the threshold
    of MAP 3, unused otherwise."""
    if MAP == 1:
        W = _softmax_map(Z, smask, AXIS, SCALE)
    elif MAP == 2:
        W = tl.where(smask, tl.sigmoid(Z), 0.0)
    else:
        W = Z - tl.minimum(tl.maximum(Z, -gamma), gamma)
    return W


@triton.jit
def _map_vjp(Z, W, dW, gamma, MAP: tl.constexpr, AXIS: tl.constexpr, SCALE: tl.constexpr):
    """The VJP of W = _map_fwd(Z) at dW: (dZ, d gamma per value channel [1, BV]). softmax:
    W (dW - sum_axis(W dW) / SCALE); sigmoid: W (1 - W) dW; soft threshold: dW where |Z| > gamma, and
    d gamma = -sum_k sign(Z) dW there (torch's clamp passes no gradient to Z at |Z| = gamma)."""
    dgamma = tl.zeros_like(gamma)
    if MAP == 1:
        wd = W * dW
        if AXIS == 0:
            dZ = W * (dW - tl.sum(wd, axis=0)[None, :] / SCALE)
        elif AXIS == 1:
            dZ = W * (dW - tl.sum(wd, axis=1)[:, None] / SCALE)
        else:
            dZ = W * (dW - tl.sum(tl.sum(wd, axis=1), axis=0) / SCALE)
    elif MAP == 2:
        dZ = W * (1.0 - W) * dW
    else:
        dZ = tl.where((Z > gamma) | (Z < -gamma), dW, 0.0)
        dgamma = tl.sum(tl.where(Z > gamma, -dW, 0.0) + tl.where(Z < -gamma, dW, 0.0), axis=0)[None, :]
    return dZ, dgamma


@triton.jit
def _base_point(Z, smask, gamma, MAP: tl.constexpr, AXIS: tl.constexpr, SCALE: tl.constexpr,
                PROX: tl.constexpr):
    """The chunk's gradient point from its base Z_b: map(Z_b), or Z_b itself when the carried state is
    already the weights (PROX, elastic_net(form=retain))."""
    if PROX:
        P = Z
    else:
        P = _map_fwd(Z, smask, gamma, MAP, AXIS, SCALE)
    return P


@triton.jit
def _state_before(scr_ptr, st_ptr, i, s_off, smask, KV: tl.constexpr):
    """The state before token i of a segment: the scratch's Z_(i-1), or for i = 0 the segment's stored
    first state."""
    if i > 0:
        x = tl.load(scr_ptr + (i - 1) * KV + s_off, mask=smask, other=0.0)
    else:
        x = tl.load(st_ptr + s_off, mask=smask, other=0.0)
    return x


@triton.jit
def _store_gate_grad(ptr, row, rv, vmask, x, V: tl.constexpr, CHANNEL: tl.constexpr):
    """Store one token's gradient of a gate from its [1, BV] row: the row (CHANNEL) or its sum (padded
    columns hold zeros)."""
    if CHANNEL:
        tl.store(ptr + row * V + rv[None, :], x, mask=vmask[None, :])
    else:
        tl.store(ptr + row, tl.sum(tl.sum(x, axis=1), axis=0))


@triton.jit
def _retention_gates(gamma_ptr, alpha_ptr, row, rv, vmask, V: tl.constexpr, BV: tl.constexpr,
                     GAMMA_CHANNEL: tl.constexpr, ALPHA_CHANNEL: tl.constexpr):
    """One token's threshold gamma and decay alpha (each [1, BV] per value channel, else [1, 1]); an
    absent tensor (None) gives gamma = 0 (no threshold) and alpha = 1 (no decay), as [1, BV] rows."""
    if gamma_ptr is not None:
        gamma = _token_gate(gamma_ptr, row, rv, vmask, V, GAMMA_CHANNEL, 0.0)
    else:
        gamma = tl.zeros([1, BV], dtype=tl.float32)
    if alpha_ptr is not None:
        alpha = _token_gate(alpha_ptr, row, rv, vmask, V, ALPHA_CHANNEL, 1.0)
    else:
        alpha = tl.full([1, BV], 1.0, dtype=tl.float32)
    return gamma, alpha


@triton.jit
def _load_state(ptr, pid, s_off, smask, KV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Program pid's [BK, BV] state from a [.., K, V] tensor in fp32, or zeros when the tensor is absent
    (None: a zero initial state, or no gradient of a final one)."""
    if ptr is not None:
        x = tl.load(ptr + pid * KV + s_off, mask=smask, other=0.0).to(tl.float32)
    else:
        x = tl.zeros([BK, BV], dtype=tl.float32)
    return x


@triton.jit
def _readout_bwd(Zi, dZ, q, do, gamma, ends, smask, BV: tl.constexpr, MAP: tl.constexpr,
                 AXIS: tl.constexpr, SCALE: tl.constexpr, PROX: tl.constexpr):
    """Token i's read-out o_i = q_i map(Z_i) and, at a chunk's end (`ends`, PROX), the carried
    S_gamma(Z_i), reversed: dZ, the gradient of what follows Z_i (of S_gamma(Z_i) where it ends a
    chunk), becomes dL/dZ_i; returns (dL/dZ_i, d gamma [1, BV], dq_i [BK])."""
    W = _map_fwd(Zi, smask, gamma, MAP, AXIS, SCALE)
    dgam = tl.zeros([1, BV], dtype=tl.float32)
    if PROX:
        dZe, dge = _map_vjp(Zi, W, dZ, gamma, MAP, AXIS, SCALE)
        dZ = tl.where(ends, dZe, dZ)
        dgam = tl.where(ends, dge, dgam)
    dZm, dgm = _map_vjp(Zi, W, q[:, None] * do[None, :], gamma, MAP, AXIS, SCALE)
    dq = tl.sum(W * do[None, :], axis=1)
    return dZ + dZm, dgam + dgm, dq


@triton.jit
def _point_bwd(k, dy, acum, Zb, P, alpha, gamma, dP, R, dalpha, dgam, MAP: tl.constexpr,
               AXIS: tl.constexpr, SCALE: tl.constexpr, PROX: tl.constexpr, AT_RETAINED: tl.constexpr):
    """Token i's y_i = k_i P reversed to the chunk's gradient point P, with dy = dL/dy_i [1, BV]: adds
    to dP (dL/dP, or with AT_RETAINED dL/dZ_b through P = map(a_i Z_b)), R (AT_RETAINED: the chunk's
    suffix sum of dL/d log a_i, per value channel), dalpha (R / alpha_i: a_i holds alpha_i) and dgam
    (the map's threshold). Returns (dP, R, dalpha, dgam)."""
    if AT_RETAINED:
        if PROX:
            dX = k[:, None] * dy
        else:
            dX, dgb = _map_vjp(acum * Zb, P, k[:, None] * dy, gamma, MAP, AXIS, SCALE)
            dgam += dgb
        dP += acum * dX
        R += tl.sum(Zb * dX, axis=0)[None, :] * acum
        dalpha += R / alpha
    else:
        dP += k[:, None] * dy
    return dP, R, dalpha, dgam


@triton.jit
def _base_bwd(Zb, P, dP, gamma, MAP: tl.constexpr, AXIS: tl.constexpr, SCALE: tl.constexpr,
              PROX: tl.constexpr, AT_RETAINED: tl.constexpr):
    """dL/dP reversed to the chunk's base Z_b through P = map(Z_b): (dL/dZ_b, d gamma). With PROX
    (P = Z_b) or AT_RETAINED (_point_bwd carried dP to Z_b already) dP is dL/dZ_b itself."""
    if PROX or AT_RETAINED:
        dZb = dP
        dgb = tl.zeros_like(gamma)
    else:
        dZb, dgb = _map_vjp(Zb, P, dP, gamma, MAP, AXIS, SCALE)
    return dZb, dgb
