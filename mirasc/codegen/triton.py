"""What every Triton kernel family needs from a LayerIR: operand shapes and sources, input identifiers,
and the bias's code.

The kernels are generic in the bias: the compiler prints the derived gradient and its VJP as two
@triton.jit functions (`_bias_grad`, `_bias_vjp`) that the kernels call on [BT, BV] tiles. Which layers a
family covers, and how, is its plan (mirasc.codegen.plan).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..ir import LayerIR
from .printers import _wrap_stmt, triton_bias_source


def shape_of(ir: LayerIR, op) -> str:
    """How an operand (lr, decay, momentum) varies: "const", "head" (per token and head, or a learnable
    scalar per head) or "channel" (per value channel)."""
    if op is None or isinstance(op, (int, float)):
        return "const"
    p = {p.name: p for p in ir.params}[op]
    return "const" if p.kind == "const" else ("channel" if p.shape == "channel" else "head")


def layout_of(p) -> str:
    """How a runtime Param reaches the backends: "learnable" (a scalar per head, [H]: a learnable or a
    per-head constant), "head" (a gate per token and head) or "channel" (per value channel)."""
    if p.kind in ("learnable", "per_head"):
        return "learnable"
    return "channel" if p.shape == "channel" else "head"


_VSUM = '''@triton.jit
def _vsum(x, vmask):
    """Sum over the value dimension of a [BT, BV] tile, padded columns excluded: [BT, 1]."""
    return tl.sum(tl.where(vmask[None, :], x, 0.0), axis=1)[:, None]
'''


def _body(lines: list[str]) -> str:
    """Statements of a jit function body (8 spaces: the kernels sit inside `if _HAS_TRITON:`)."""
    text = "\n".join(part for line in lines for part in _wrap_stmt(line, indent=" " * 4, width=106))
    if re.search(r"\bV\b", text):  # mean() divides by the true value dimension
        text = "    V = tl.sum(vmask.to(tl.float32), axis=0)\n" + text
    return text


def input_ident(ir: LayerIR, name: str) -> str:
    """The identifier generated code uses for the runtime input `name`: u<i>, its place among
    ir.backend_inputs(). Kernel and helper variables are built from it (p_u0, p_u0_ptr, dp_u0_acc, ...),
    never from the spec's own names, so no spec name can collide with a name the templates use; the public
    functions keep the spec's names as keyword arguments and pass them on in a dict."""
    for i, p in enumerate(ir.backend_inputs()):
        if p.name == name:
            return f"u{i}"
    raise KeyError(name)


@dataclass(frozen=True)
class BiasParam:
    """A non-constant bias parameter: its identifier in generated code (input_ident), the spec's name, and
    its layout: learnable ([H]; a per-head constant too), head ([B, T, H]) or channel ([B, T, H, V])."""

    name: str
    public: str
    kind: str


def bias_params_of(ir: LayerIR) -> tuple[BiasParam, ...]:
    """The bias's non-constant parameters in kernel-argument order."""
    by_name = {p.name: p for p in ir.params}
    return tuple(BiasParam(input_ident(ir, name), name, layout_of(by_name[name])) for name in ir.bias.params)


def eta_is_channel(ir: LayerIR) -> bool:
    """Whether the learning rate is a per-channel gate ([B, T, H, V])."""
    lr = ir.algorithm.lr
    return isinstance(lr, str) and shape_of(ir, lr) == "channel"


def bias_functions(ir: LayerIR, bias_params: tuple[BiasParam, ...]) -> str:
    """The @triton.jit `_bias_grad` / `_bias_vjp` pair (and the helpers they call) on [BT, BV] tiles."""
    names = {p.public: f"p_{p.name}" for p in bias_params}
    tb = triton_bias_source(ir.bias, y="y", v="v", w="w", V="V", params=names, mask="vmask",
                            reduce="_vsum({x}, {mask})")
    args = "".join(f", p_{p.name}" for p in bias_params)
    douts = "".join(f", d_p_{p.name}" for p in bias_params)
    legend = ", ".join(f"p_{p.name} = {p.public}" for p in bias_params)
    legend = f"# The bias's parameters in the kernels: {legend}\n" if legend else ""
    return (
        f"{tb.helpers.rstrip()}\n\n\n{_VSUM}\n\n{legend}"
        f"@triton.jit\ndef _bias_grad(y, v, vmask{args}):\n"
        f'    """dL/dy of the bias on a [BT, BV] tile (padded columns are masked out of reductions)."""\n'
        f"{_body(tb.grad)}\n    return g\n\n\n"
        f"@triton.jit\ndef _bias_vjp(y, v, w, vmask{args}):\n"
        f'    """The VJP of _bias_grad at the cotangent w: (dy, dv, d<param>...)."""\n'
        f"{_body(tb.vjp)}\n    return dy, dv{douts}\n"
    ).lstrip("\n")


def operand_source(ir: LayerIR, op, shape: str) -> str | None:
    """Python source that turns a lr / decay operand into the contiguous fp32 tensor the kernels read.

    shape is "[B, T, H]" for per-token scalars; None means "no tensor" (a decay of exactly 1).
    """
    if op is None or (isinstance(op, (int, float)) and float(op) == 1.0 and shape == "alpha"):
        return None
    if isinstance(op, (int, float)):
        return f"torch.full((B, T, H), {float(op)!r}, device=q.device, dtype=torch.float32)"
    p = {p.name: p for p in ir.params}[op]
    if p.kind == "const":
        return f"torch.full((B, T, H), {float(p.value)!r}, device=q.device, dtype=torch.float32)"
    if p.kind in ("learnable", "per_head"):
        return f"gates[{op!r}].float().view(1, 1, H).expand(B, T, H).contiguous()"
    return f"gates[{op!r}].float().contiguous()"
