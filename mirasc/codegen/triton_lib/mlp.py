"""Helpers of the MLP-memory kernels (templates/triton_mlp*.py.j2): tile loads and stores, the sum over a
head's programs, the LayerNorm and its VJPs, the lq map's norms, a program's tokens and a chunk's decay
and momentum coefficients. The kernels' math is in docs/kernels-mlp.md."""
import triton
import triton.language as tl

from .common import _mm


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
def _ld_rows(ptr, row, tmask, cols, D: tl.constexpr, OTHER: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """A per-token input of the chunk in fp32: [BT, len(cols)] columns of a [B, T, H, D] tensor
    (PER_CHANNEL), else a [B, T, H] one as a [BT, 1] column; OTHER on padded rows."""
    if PER_CHANNEL:
        return tl.load(ptr + row[:, None] * D + cols[None, :], mask=tmask[:, None] & (cols < D)[None, :],
                       other=OTHER).to(tl.float32)
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
def _at_last(x, islast):
    """x_i [BT] at the chunk's last token i."""
    return tl.sum(tl.where(islast, x, 0.0), axis=0)


@triton.jit
def _row_at_last(x, islast):
    """Row i [BT] of x [BT, BT] at the chunk's last token i."""
    return tl.sum(tl.where(islast[:, None], x, 0.0), axis=0)


@triton.jit
def _dlog_gate(dw, W, causal, dlw):
    """dL/d log g_s of a chunk's per-token gate g: W_ij = prod_{j < s <= i} g_s has cotangent dw [BT, BT]
    (log g_s enters W_ij for j < s <= i), dlw [BT] holds dL/d log P_i of the other products P_i = prod_{s
    <= i} g_s; every log g_s enters P_i for i >= s."""
    dws = tl.where(causal, dw * W, 0.0)
    dlw = dlw + tl.sum(dws, axis=1) - tl.sum(dws, axis=0)
    return tl.sum(dlw, axis=0) - tl.cumsum(dlw, axis=0) + dlw
