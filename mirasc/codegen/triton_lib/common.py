"""Helpers every kernel family uses: matrix products at the precision the inputs call for, and the
reductions along a tile's token axis."""
import triton
import triton.language as tl


@triton.jit
def _mm(a, b, LOWP: tl.constexpr):
    """Matrix product, fp32 accumulation. LOWP 1: bf16 operands, 2: fp16 operands, 3: tf32 (tensor
    cores); 0: exact fp32 (fp32 inputs and Triton's CPU interpreter)."""
    if LOWP == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif LOWP == 2:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif LOWP == 3:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _mm32(a, b, LOWP: tl.constexpr):
    """Matrix product of fp32 operands: tf32 tensor cores for bf16 / fp16 inputs, exact fp32 otherwise.
    Products that lose too much with bf16 operands (the triangular inverse) use it."""
    if LOWP == 0:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _at_last(x, islast):
    """x_i of a [BT] vector at the one row i where islast [BT] is true, as a scalar."""
    return tl.sum(tl.where(islast, x, 0.0), axis=0)


@triton.jit
def _row_at_last(x, islast):
    """Row i of a [BT, N] tile at the one row i where islast [BT] is true: [N]."""
    return tl.sum(tl.where(islast[:, None], x, 0.0), axis=0)


@triton.jit
def _suffix_sum(x):
    """sum_{i >= t} x_i along axis 0 of a [BT] vector or [BT, N] tile: what a cumulative sum's
    cotangent becomes (d log alpha_t from d b_i, b = cumsum(log alpha))."""
    return tl.sum(x, axis=0) - tl.cumsum(x, axis=0) + x
