"""What the Triton kernels for MLP memories (templates/triton_mlp.py.j2) need from a LayerIR.

The kernels cover a depth-2 MLP memory M(x) = [x +] [LN](act(x W_1) W_2) with gradient descent and
retention `none` or a per-head `decay`; `mlp_unsupported_reason` names what they do not cover (the
generated module then runs those layers on the torch backend, and backend="auto" picks it by itself).
The bias code is the same pair of @triton.jit functions (`_bias_grad`, `_bias_vjp`) that the matrix
memory's kernels call, printed here with the helpers of mirasc.codegen.triton.
"""
from __future__ import annotations

from ..ir import LayerIR
from .printers import triton_bias_source
from .triton import _VSUM, _body, operand_source

MIN_CHUNK = 16  # tl.dot needs tiles of at least 16 rows
MAX_CHUNK = 64  # [BT, BT] and [BT, hidden-tile] tiles beyond this spill registers
ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")


def mlp_unsupported_reason(ir: LayerIR) -> str | None:
    """Why this MLP-memory layer has no Triton kernels (None: it has them)."""
    mem, ret, alg = ir.memory, ir.retention, ir.algorithm
    params = {p.name: p for p in ir.params}

    def per_channel(op) -> bool:
        p = params.get(op) if isinstance(op, str) else None
        return p is not None and p.kind == "gate" and p.shape == "channel"

    if mem.kind != "mlp":
        return "not an MLP memory"
    if ir.bias.vjp is None:
        return "the bias carries no derived VJP for the backward kernel"
    if mem.depth != 2:
        return f"the MLP kernels cover depth 2, got depth {mem.depth}; use backend='torch'"
    if mem.act not in ACTIVATIONS:
        return f"the activation '{mem.act}' has no triton kernel"
    if ret.map != "id":
        return f"the retention map '{ret.map}' has no triton kernel for MLP memories yet"
    if alg.kind != "gd":
        return "momentum has no triton kernel for MLP memories yet"
    if per_channel(ret.alpha):
        return "per-channel decay has no triton kernel for MLP memories"
    if alg.at == "retained" and not (isinstance(ret.alpha, (int, float)) and float(ret.alpha) == 1.0):
        return "at=retained has no triton kernel for MLP memories yet"
    return None


def _bias_functions(ir: LayerIR, bias_params: list[dict]) -> str:
    """The @triton.jit `_bias_grad` / `_bias_vjp` pair (and the helpers they call) on [BT, BV] tiles."""
    names = {p["name"]: f"p_{p['name']}" for p in bias_params}
    tb = triton_bias_source(ir.bias, y="y", v="v", w="w", V="V", params=names, mask="vmask",
                            reduce="_vsum({x}, {mask})")
    args = "".join(f", p_{p['name']}" for p in bias_params)
    douts = "".join(f", d_{p['name']}" for p in bias_params)
    return (
        f"{tb.helpers.rstrip()}\n\n\n{_VSUM}\n\n"
        f"@triton.jit\ndef _bias_grad(y, v, vmask{args}):\n"
        f'    """dL/dy of the bias on a [BT, BV] tile (padded columns are masked out of reductions)."""\n'
        f"{_body(tb.grad)}\n    return g\n\n\n"
        f"@triton.jit\ndef _bias_vjp(y, v, w, vmask{args}):\n"
        f'    """The VJP of _bias_grad at the cotangent w: (dy, dv, d<param>...)."""\n'
        f"{_body(tb.vjp)}\n    return dy, dv{douts}\n"
    ).lstrip("\n")


def triton_mlp_context(ir: LayerIR) -> dict | None:
    """Template variables for templates/triton_mlp.py.j2, or None when the layer is not covered."""
    if mlp_unsupported_reason(ir) is not None:
        return None
    by_name = {p.name: p for p in ir.params}
    bias_params = []
    for name in ir.bias.params:
        p = by_name[name]
        kind = "learnable" if p.kind == "learnable" else ("channel" if p.shape == "channel" else "head")
        bias_params.append({"name": name, "kind": kind})
    lr = ir.algorithm.lr
    eta_channel = isinstance(lr, str) and by_name[lr].kind == "gate" and by_name[lr].shape == "channel"
    return {
        "bias_params": bias_params,
        "triton_eta": operand_source(ir, lr, "eta"),
        "triton_alpha": operand_source(ir, ir.retention.alpha, "alpha"),
        "triton_bias_args": [f"{p['name']}.float().contiguous()" for p in bias_params],
        "triton_bias_src": _bias_functions(ir, bias_params),
        "eta_channel": eta_channel,
        "min_chunk": MIN_CHUNK,
        "max_chunk": MAX_CHUNK,
    }


__all__ = ["MAX_CHUNK", "MIN_CHUNK", "mlp_unsupported_reason", "triton_mlp_context"]
