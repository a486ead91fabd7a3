"""Helpers of the fused decode step (templates/triton_step.py.j2): one token of one (batch, head)."""
import triton
import triton.language as tl


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
