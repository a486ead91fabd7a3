"""Helpers of the fused decode step (templates/triton_step.py.j2): one token of one (batch, head)."""
import triton
import triton.language as tl

from .mlp import _lq_pow


@triton.jit
def _step_input(ptr, off, rv, vmask, CHANNEL: tl.constexpr):
    """One token's value of a runtime input (lr, decay, a bias parameter) at offset `off`, in fp32:
    a scalar, or [1, BV] for a per-channel input (padded channels read 1.0, which no result keeps)."""
    if CHANNEL:
        return tl.load(ptr + off + rv, mask=vmask, other=1.0).to(tl.float32)[None, :]
    else:
        return tl.load(ptr + off).to(tl.float32)


@triton.jit
def _step_vecmat(x, m):
    """The row vector x [BK] times the matrix m [BK, BV]: [BV] (a reduction: one row is too little
    for tensor cores)."""
    return tl.sum(x[:, None] * m, axis=0)


@triton.jit
def _step_lq_rnorm(z, Q: tl.constexpr, QI: tl.constexpr, PW: tl.constexpr, EPS: tl.constexpr,
                   R0: tl.constexpr):
    """1 / n(Z) of a whole matrix z [BK, BV] (padded entries 0), n(Z) = max(||Z||_q^(q-2), EPS): Moneta's
    lq map is W = Z * this. PW = (q - 2) / q; R0 is the value at Z = 0 (1 / EPS for q > 2; 0 for q < 2,
    where the norm's power is infinite there), so no infinity is formed."""
    return _step_lq_r(tl.sum(tl.sum(_lq_pow(z, Q, QI), axis=1), axis=0), PW, EPS, R0)


@triton.jit
def _step_lq_r(s, PW: tl.constexpr, EPS: tl.constexpr, R0: tl.constexpr):
    """1 / n(Z) from s = ||Z||_q^q (a matrix summed tile by tile): min(s^(-PW), 1 / EPS), R0 at s = 0."""
    r = tl.where(s > 0.0, tl.exp(-PW * tl.log(tl.maximum(s, 1e-30))), R0)
    return tl.minimum(r, 1.0 / EPS)


@triton.jit
def _step_map(z, smask, gamma, MAP: tl.constexpr, KL_AXIS: tl.constexpr, KL_SCALE: tl.constexpr,
              LQ_Q: tl.constexpr, LQ_QI: tl.constexpr, LQ_PW: tl.constexpr, LQ_EPS: tl.constexpr,
              LQ_R0: tl.constexpr):
    """The retention map W = map(Z) of a whole matrix z [BK, BV] (docs/semantics.md, "Retention maps"),
    0 at the padded entries (smask False): "lq" Z / n(Z), "softmax" KL_SCALE * softmax over KL_AXIS
    ("key": each column over the rows, "value": each row over the columns, "all"), "sigmoid", or
    "soft_threshold" S_gamma(Z) = Z - clamp(Z, -gamma, gamma) (gamma a scalar or [1, BV])."""
    if MAP == "lq":
        w = z * _step_lq_rnorm(z, LQ_Q, LQ_QI, LQ_PW, LQ_EPS, LQ_R0)
    elif MAP == "softmax":
        # padded entries hold a large negative logit and are zeroed after the exp: a padded row or
        # column sums to 0, and reads 0 (never 0 / 0)
        zm = tl.where(smask, z, -1e30)
        if KL_AXIS == "key":
            e = tl.where(smask, tl.exp(zm - tl.max(zm, axis=0)[None, :]), 0.0)
            s = tl.sum(e, axis=0)[None, :]
        elif KL_AXIS == "value":
            e = tl.where(smask, tl.exp(zm - tl.max(zm, axis=1)[:, None]), 0.0)
            s = tl.sum(e, axis=1)[:, None]
        else:
            e = tl.where(smask, tl.exp(zm - tl.max(tl.max(zm, axis=1), axis=0)), 0.0)
            s = tl.sum(tl.sum(e, axis=1), axis=0)
        w = KL_SCALE * e / tl.where(s > 0.0, s, 1.0)
    elif MAP == "sigmoid":
        w = tl.where(smask, tl.sigmoid(z), 0.0)
    else:
        w = z - tl.minimum(tl.maximum(z, -gamma), gamma)
    return w


@triton.jit
def _step_softmax_rows(z, mask, x, mx, sm, acc):
    """One [BX, BV] tile of a softmax over the rows of a matrix that spans several tiles (kl over the key
    axis of W_2 [X, V]), online as in attention: the running column max mx [BV], the sums of exp(z - mx)
    sm [BV] and of x exp(z - mx) acc [BV] (x [BX]: the tile's rows of the vector the matrix multiplies),
    rescaled when the max grows -> (mx, sm, acc). After the last tile, x W = scale * acc / sm."""
    zm = tl.where(mask, z, -1e30)
    new = tl.maximum(mx, tl.max(zm, axis=0))
    c = tl.exp(mx - new)
    e = tl.where(mask, tl.exp(zm - new[None, :]), 0.0)
    return new, sm * c + tl.sum(e, axis=0), acc * c + tl.sum(x[:, None] * e, axis=0)


@triton.jit
def _step_ln(z, vmask):
    """LayerNorm without affine parameters (eps 1e-5) of one row z [1, BV] (padded columns 0) over the
    true V columns: (the normalized row, 0 at padded columns; 1 / std, [1, 1])."""
    n_v = tl.sum(vmask.to(tl.float32), axis=0)
    c = tl.where(vmask[None, :], z - tl.sum(z, axis=1)[:, None] / n_v, 0.0)
    rstd = tl.rsqrt(tl.sum(c * c, axis=1)[:, None] / n_v + 1e-5)
    return c * rstd, rstd


@triton.jit
def _step_ln_vjp(g, n, rstd, vmask):
    """The cotangent of _step_ln's input from g [1, BV] (padded columns 0), its output n and 1 / std:
    rstd (g - mean(g) - n mean(g n)), means over the true V columns."""
    n_v = tl.sum(vmask.to(tl.float32), axis=0)
    mean_g = tl.sum(g, axis=1)[:, None] / n_v
    mean_gn = tl.sum(g * n, axis=1)[:, None] / n_v
    return tl.where(vmask[None, :], rstd * (g - mean_g - n * mean_gn), 0.0)


@triton.jit
def _step_operand(ptr, off, rv, vmask, LIT: tl.constexpr, CHANNEL: tl.constexpr):
    """A rule operand (lr, decay, beta): the literal LIT where ptr is None (a constant, or absent), else
    the token's input at offset `off` (_step_input)."""
    if ptr is None:
        return LIT
    else:
        return _step_input(ptr, off, rv, vmask, CHANNEL)


@triton.jit
def _step_tile(x0, rx, X, kmask, vmask, w1_off, w2_off, V):
    """The hidden tile of columns x0 .. x0 + BX - 1 of a depth-2 memory -> (off1, off2, mask1, mask2):
    the offsets and masks of its columns of W_1 [BK, BX] and its rows of W_2 [BX, BV] (w1_off, w2_off:
    the (batch, head)'s matrices, w1_off over rows [BK, 1] and w2_off over columns [1, BV])."""
    cols = x0 + rx
    xmask = cols < X
    return (w1_off + cols[None, :], w2_off + cols[:, None] * V,
            kmask[:, None] & xmask[None, :], xmask[:, None] & vmask[None, :])


@triton.jit
def _step_base(z_ptr, b_ptr, off, mask):
    """A tile of the chunk's base Z_b: read from z_ptr at the chunk's first token (b_ptr None), else
    from b_ptr."""
    if b_ptr is None:
        return tl.load(z_ptr + off, mask=mask, other=0.0)
    else:
        return tl.load(b_ptr + off, mask=mask, other=0.0)


@triton.jit
def _step_base_or(z, b_ptr, off, mask):
    """_step_base where the tile z of Z is already read: z itself at the chunk's first token."""
    if b_ptr is None:
        return z
    else:
        return tl.load(b_ptr + off, mask=mask, other=0.0)


@triton.jit
def _step_retain(w, decay, b_out_ptr, off, mask, AT_RETAINED: tl.constexpr):
    """The gradient point of a base tile w: alpha Z_b at=retained (Z_b already carries the chunk's earlier
    alphas), also stored as the next token's base where b_out_ptr is not None; else w itself."""
    if AT_RETAINED:
        w = decay * w
        if b_out_ptr is not None:
            tl.store(b_out_ptr + off, w, mask=mask)
    return w


@triton.jit
def _step_update(z, grad, decay, beta, m_ptr, m_out_ptr, z_out_ptr, off, mask, MOMENTUM: tl.constexpr):
    """The update of a tile z of Z by its gradient G: gd Z' = alpha Z - G; momentum m' = beta m + G
    (m read from m_ptr, stored to m_out_ptr), Z' = alpha Z - m'. Stores Z' to z_out_ptr and returns it."""
    if MOMENTUM:
        mom = beta * tl.load(m_ptr + off, mask=mask, other=0.0) + grad
        tl.store(m_out_ptr + off, mom, mask=mask)
        z = decay * z - mom
    else:
        z = decay * z - grad
    tl.store(z_out_ptr + off, z, mask=mask)
    return z


@triton.jit
def _step_lq_sum(z, Q: tl.constexpr, QI: tl.constexpr):
    """||z||_q^q of a tile z (padded entries 0): one term of a matrix's sum over its tiles
    (_step_lq_r)."""
    return tl.sum(tl.sum(_lq_pow(z, Q, QI), axis=1), axis=0)
