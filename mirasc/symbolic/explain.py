"""Readable math of a LayerIR: the bias, its derived gradient and VJP pieces, and the update rule.

Used by `mirasc explain`, by the generated module's docstring (LayerIR.rule) and by the one-line
comments of the printed bias functions.  Plain ASCII text, one fact per line.
"""
from __future__ import annotations

from typing import ClassVar

import sympy as sp
from sympy.printing.precedence import precedence
from sympy.printing.str import StrPrinter

from .. import per_head
from ..ir import LayerIR, Operand
from .derive import at_most_nodes


class MathPrinter(StrPrinter):
    """sympy -> readable math: x^2, sqrt(x), (a if c else b), H(x) for the Heaviside step."""

    _default_settings: ClassVar[dict] = {**StrPrinter._default_settings, "rename": {}}

    def _print_Pow(self, expr, rational=False):
        if expr.exp == sp.S.Half:
            return f"sqrt({self._print(expr.base)})"
        if expr.exp == -sp.S.Half:
            return f"1/sqrt({self._print(expr.base)})"
        if expr.exp == -1:
            return f"1/{self.parenthesize(expr.base, precedence(expr), strict=False)}"
        PREC = precedence(expr)
        return f"{self.parenthesize(expr.base, PREC, strict=False)}^{self.parenthesize(expr.exp, PREC)}"

    def _print_Float(self, expr):
        x = float(expr)
        return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)

    def _print_Piecewise(self, expr):
        *pieces, (last, cond) = expr.args
        out = self._print(last) if cond == sp.true else f"({self._print(last)} if {self._print(cond)} else nan)"
        for e, c in reversed(pieces):
            out = f"({self._print(e)} if {self._print(c)} else {out})"
        return out

    def _print_Heaviside(self, expr):
        return f"H({self._print(expr.args[0])})"

    def _print_Symbol(self, expr):
        renamed = self._settings["rename"].get(expr)
        return super()._print_Symbol(renamed if renamed is not None else expr)


_PRINTER = MathPrinter({"order": "none"})
FACTOR_MAX_OPS = 400  # factor_terms on larger expressions costs more than its nicer print is worth


def math_str(e, coordinate: dict | None = None) -> str:
    """Print e; `coordinate` renames symbols (e.g. y -> y_j) as they are printed.

    The renaming happens in the printer rather than by substitution: rebuilding the expression with
    assumption-free symbols makes sympy re-ask every function's assumptions, which for nested
    functions (tanh(tanh(...))) costs time exponential in the depth.
    """
    e = sp.sympify(e)
    if at_most_nodes(e, 2 * FACTOR_MAX_OPS):
        e = sp.factor_terms(e)  # 2*(y - v) rather than -2*v + 2*y
    if not coordinate:
        return _PRINTER.doprint(e)
    return MathPrinter({"order": "none", "rename": dict(coordinate)}).doprint(e)


def _coord_map(bias, index: str = "j") -> dict:
    names = [bias.y, bias.v] + [s for n, s in bias.param_symbols if n in bias.channel_params]
    vjp = bias.vjp
    if vjp is not None:
        names.append(vjp.w)
    return {s: sp.Symbol(f"{s.name}_{index}") for s in names}


def bias_lines(bias) -> list[str]:
    """The bias in structured form: L, the reductions, the gradient, the class."""
    cm = _coord_map(bias)
    lines = [f"bias {bias.name}: {bias.text}" if bias.text else f"bias {bias.name}"]
    lines.append(f"  L = {math_str(bias.loss, cm)}")
    for s, f in bias.reductions:
        lines.append(f"  {s} = sum_j {math_str(f, cm)}")
    lines.append(f"  g_j = dL/dy_j = {math_str(bias.grad, cm)}")
    lines.append(f"  class: {bias.klass} ({_CLASS_NOTE[bias.klass]})")
    return lines


def grad_comment(bias) -> str:
    return f"g_j = dL/dy_j = {math_str(bias.grad, _coord_map(bias))}"


def loss_comment(bias) -> str:
    cm = _coord_map(bias)
    red = "; ".join(f"{s} = sum_j {math_str(f, cm)}" for s, f in bias.reductions)
    return f"L = {math_str(bias.loss, cm)}" + (f", {red}" if red else "")


def vjp_lines(bias) -> list[str]:
    vjp = bias.vjp
    if vjp is None:
        return []
    cm = _coord_map(bias)
    lines = ["bias VJP at a cotangent w (backward pass):"]
    for r, body in vjp.sums:
        lines.append(f"    {r} = sum_j {math_str(body, cm)}")
    lines.append(f"    (w^T dg/dy)_j = {math_str(vjp.dy, cm)}")
    lines.append(f"    (w^T dg/dv)_j = {math_str(vjp.dv, cm)}")
    for p in vjp.dparams:
        if p.shape == "channel":
            lines.append(f"    (w^T dg/d{p.name})_j = {math_str(p.elem, cm)}")
        else:
            terms = ([f"sum_j {math_str(p.elem, cm)}"] if p.elem != 0 else []) + (
                [math_str(p.token, cm)] if p.token != 0 else [])
            lines.append(f"    w^T dg/d{p.name} = {' + '.join(terms) or '0'}")
    return lines


_CLASS_NOTE = {
    "independent": "g does not depend on y: the chunked form is exact for any chunk size",
    "affine": "g = y - c(v), unit Hessian: the delta-rule class",
    "nonlinear": "chunk-wise mini-batch GD at the chunk's base state; chunk 1 is exact",
}


def _op(x: Operand, suffix: str = "_t") -> str:
    if isinstance(x, str):
        return f"{x}{suffix}"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _map_text(ir: LayerIR, Z: str) -> str:
    r = ir.retention
    if r.map == "id":
        return Z
    if r.map == "lq":
        q = _op(r.q, "")
        return f"{Z} / max(||{Z}||_{q}^({q} - 2), {r.eps!r})"
    if r.map == "softmax":
        scale = "" if r.scale == 1 else f"{_op(r.scale, '')} * "
        return f"{scale}softmax({Z}, axis={r.axis})"
    if r.map == "sigmoid":
        return f"sigmoid({Z})"
    return f"sign({Z}) max(|{Z}| - {_op(r.gamma)}, 0)"


def rule_text(ir: LayerIR) -> str:
    """The update rule of docs/semantics.md for this layer, per token, in plain math."""
    b, r, a = ir.bias, ir.retention, ir.algorithm
    lines = [f"{ir.name}: memory {ir.memory.kind}"
             + (f"(depth={ir.memory.depth}, expansion={ir.memory.expansion}, act={ir.memory.act}"
                f"{', residual' if ir.memory.residual else ''}{', norm' if ir.memory.norm else ''})"
                if ir.memory.kind == "mlp" else "")]
    lines += bias_lines(b)
    decay = not (isinstance(r.alpha, float) and r.alpha == 1.0)
    alpha = _op(r.alpha)
    lr = _op(a.lr)
    M = "k_t W" if ir.memory.kind == "linear" else "M(W, k_t)"
    lines.append("update per token (chunk size 1):")
    Wprev = "W_{t-1}"
    if a.at == "retained" and decay:
        lines.append(f"  W'_{{t-1}} = {_map_text(ir, f'{alpha} Z_{{t-1}}')}   (gradient at the retained state)")
        Wprev = "W'_{t-1}"
    lines.append(f"  y_t = {M.replace('W', Wprev)},  g_t = {lr} * g(y_t, v_t)")
    if ir.memory.kind == "linear":
        lines.append("  G_t = k_t^T g_t")
    else:
        lines.append(f"  G_t = grad_W <g_t, M(W, k_t)> at {Wprev}")
    u = "G_t"
    if a.kind == "momentum":
        lines.append(f"  m_t = {_op(a.beta)} m_{{t-1}} + G_t")
        u = "m_t"
    lines.append(f"  Z_t = {alpha + ' ' if decay else ''}Z_{{t-1}} - {u}")
    lines.append(f"  W_t = {_map_text(ir, 'Z_t')}")
    if r.form == "prox":
        lines.append("  Z_t <- W_t   (the thresholded state is carried)")
    lines.append("  o_t = " + ("q_t W_t" if ir.memory.kind == "linear" else "M(W_t, q_t)"))
    if a.chunk > 1:
        lines.append(f"chunks of {a.chunk}: every token's gradient at the chunk's base state W_b")
        r = ir.retention
        if r.effective_map == "lq" and r.norm == "chunk":
            q = _op(r.q, "")
            lines.append(f"  lq(norm=chunk): o_t reads Z_t / max(||Z_b||_{q}^({q} - 2), {r.eps!r}) (the chunk's "
                         "base norm); the token that ends a chunk reads W_t")
    consts = [p for p in ir.params if p.kind == "per_head" and p.expr is not None]
    if consts:
        lines.append("per-head constants (head = 0 .. H-1, computed for the actual head count H):")
        lines += [f"  {p.name} = {per_head.text(p.expr)}" for p in consts]
    return "\n".join(lines)


def explain(ir: LayerIR) -> str:
    """Everything a reader wants to check: the rule, the derived gradient and its VJP pieces."""
    out = [ir.rule or rule_text(ir)]
    out += vjp_lines(ir.bias)
    if ir.params:
        out.append("parameters:")
        for p in ir.params:
            if p.kind == "const":
                out.append(f"  {p.name} = {p.value!r} (constant, inlined)")
            elif p.kind == "learnable":
                out.append(f"  {p.name}: learnable scalar per head, {p.activation}, init {p.init!r}")
            elif p.kind == "per_head" and p.expr is not None:
                out.append(f"  {p.name} = {per_head.text(p.expr)} for head = 0 .. H-1 (constant per head, "
                           f"not learnable)")
            else:
                out.append(f"  {p.name}: gate per {'value channel' if p.shape == 'channel' else 'head'}, "
                           f"{p.activation}(rank {p.rank}), init {p.init!r}")
    return "\n".join(out)


__all__ = ["MathPrinter", "bias_lines", "explain", "grad_comment", "loss_comment", "math_str", "rule_text",
           "vjp_lines"]
