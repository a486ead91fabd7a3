"""Helpers of the MLP map read-out kernels (templates/triton_mlp_map.py.j2): one token of the walk over a
tile of a weight matrix, and a token's soft threshold. The map itself and its VJP are linear.py's
_map_fwd / _map_vjp (the matrix map kernels'). The math: docs/kernels-mlp.md, "Retention maps"."""
import triton
import triton.language as tl


@triton.jit
def _map_walk(z, m, a_ptr, d_ptr, alpha_ptr, beta_ptr, row, ri, co, rmask, cmask, DI, DO,
              DECAY: tl.constexpr, MOMENTUM: tl.constexpr):
    """One token of the walk on a [BI, BO] tile (rows ri of d_in, columns co of d_out): (Z_i, m_i)
    from (Z_(i-1), m_(i-1)) with u = a_i^T d_i: gd Z_i = alpha_i Z_(i-1) - u; momentum
    m_i = beta_i m_(i-1) + u, Z_i = alpha_i Z_(i-1) - m_i (alpha_i = 1 without DECAY; m is returned
    unchanged under gd). `row` is the token's row of a [N, C, d] input and of the gates [N, C]."""
    a = tl.load(a_ptr + row * DI + ri, mask=rmask, other=0.0)
    d = tl.load(d_ptr + row * DO + co, mask=cmask, other=0.0)
    u = a[:, None] * d[None, :]
    if MOMENTUM:
        m = tl.load(beta_ptr + row) * m + u
        u = m
    if DECAY:
        z = tl.load(alpha_ptr + row) * z - u
    else:
        z = z - u
    return z, m


@triton.jit
def _map_gamma(gamma_ptr, row, MAP: tl.constexpr):
    """A token's soft threshold as a [1, 1] tile (the gamma _map_fwd / _map_vjp take) for MAP 3, else a
    [1, 1] zero that no other map reads."""
    gamma = tl.zeros([1, 1], dtype=tl.float32)
    if MAP == 3:
        gamma = gamma + tl.load(gamma_ptr + row)
    return gamma
