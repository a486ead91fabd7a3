"""derive(spec) -> LayerIR: the bias's gradient, its VJPs and class; the resolved retention and algorithm.

The bias of one token is L = F(S_1..S_m; p) with S_r = sum_j f_r(y_j, v_j; p_j) (see objectives.py).
Write a_r = dF/dS_r (per token), d_r(j) = df_r/dy_j (elementwise).  Then

    g_j = dL/dy_j = sum_r a_r d_r(j)                                              (BiasIR.grad)

The backward kernels need the VJP of y -> g (and of v, p -> g) at a cotangent w in R^V.  With the
extra reductions R_r = sum_j w_j d_r(j) and the per-token coefficients c_s = sum_r d2F/dS_r dS_s R_r:

    (w^T dg/dy)_l = sum_s c_s d_s(l)          + w_l sum_r a_r d2f_r/dy2 (l)         (BiasVJP.dy)
    (w^T dg/dv)_l = sum_s c_s df_s/dv (l)     + w_l sum_r a_r d2f_r/dydv (l)        (BiasVJP.dv)
    e_p(l)        = sum_s c_s df_s/dp (l)     + w_l sum_r a_r d2f_r/dydp (l)        (ParamVJP.elem)
    channel p:  w^T dg/dp_l = e_p(l)
    scalar p:   w^T dg/dp   = sum_l e_p(l) + sum_r R_r d2F/dS_r dp                  (ParamVJP.token)

i.e. a diagonal term plus rank-m corrections through the reductions.  Everything is an expression in
the coordinate symbols (y, v, w, channel parameters), the per-token symbols (S_r, R_r, scalar
parameters, V) and numbers; a printer computes the S_r, then the R_r, then the outputs, applying sympy's
cse to each expression set (mirasc.codegen.printers).

Class (the kernel family): with H_jl = sum_{r,s} d2F/dS_r dS_s d_r(j) d_s(l) + delta_jl sum_r a_r d2f_r/dy2(j)
the Hessian of L in y, "independent" if H = 0, "affine" if H = I (g = y - c(v)), else "nonlinear".  A
zero test first evaluates numerically at fixed pseudo-random points (a quick refutation) and only then
asks sympy.simplify for a proof; an unproved zero counts as nonzero (the nonlinear class is always
correct, only slower).

Nothing is memoised; a derivation takes a few tens of milliseconds.
"""
from __future__ import annotations

import cmath
import hashlib
import math
import random
from dataclasses import dataclass, replace
from typing import Literal

import sympy as sp

from ..ir import BiasIR, LayerIR
from ..spec import BiasSpec, LayerSpec, Param
from .objectives import (
    DeriveError,
    Objective,
    SymbolTable,
    expr_text,
    library_bias,
    library_text,
    make_symbols,
    user_bias,
)
from .retention import algorithm_ir, retention_ir


@dataclass(frozen=True)
class ParamVJP:
    """The VJP of g with respect to one non-constant parameter (see the module docstring).

    shape "channel": dP_j = elem.  shape "scalar": dP = sum_j elem + token (token is per token).
    """
    name: str
    shape: Literal["scalar", "channel"]
    symbol: sp.Symbol
    elem: sp.Expr
    token: sp.Expr


@dataclass(frozen=True)
class BiasVJP:
    """Second-order pieces of the bias: the VJP of g = dL/dy at a cotangent w (module docstring).

    w:         the cotangent coordinate symbol w_j.
    sums:      (R_r, body) with R_r = sum_j body, body = w * d_r; only the R_r the outputs use.
    dy, dv:    elementwise expressions of the VJPs w^T dg/dy, w^T dg/dv.
    dparams:   one ParamVJP per BiasIR.params entry, in that order.
    outer:     a_r = dF/dS_r, one per reduction (per token).
    inner:     d_r = df_r/dy, one per reduction (elementwise).
    hess_outer: d2F/dS_r dS_s, an m x m tuple of tuples (per token).
    hess_diag: sum_r a_r d2f_r/dy2, the diagonal part of the Hessian (elementwise).
    """
    w: sp.Symbol
    sums: tuple[tuple[sp.Symbol, sp.Expr], ...]
    dy: sp.Expr
    dv: sp.Expr
    dparams: tuple[ParamVJP, ...]
    outer: tuple[sp.Expr, ...]
    inner: tuple[sp.Expr, ...]
    hess_outer: tuple[tuple[sp.Expr, ...], ...]
    hess_diag: sp.Expr


# ---- expression hygiene ---------------------------------------------------------------------------

def clean(e: sp.Expr) -> sp.Expr:
    """Derivative post-processing: arg -> 0 (see below), DiracDelta -> 0 (derivatives of sign/Heaviside vanish a.e.), a few
    Piecewise folded into one (when that is not larger) and sinh(a)/cosh(a) -> tanh(a) (log cosh's
    derivative, stable in low precision)."""
    e = sp.sympify(e)
    if e.has(sp.arg):
        # arg() comes from sign() of a value sympy cannot prove real (sign(sqrt(y)) = exp(i arg(y)/2));
        # where a bias is defined that value is real and >= 0 (a principal root), so its arg is 0
        e = e.replace(lambda x: isinstance(x, sp.arg), lambda x: sp.S.Zero)
    if e.has(sp.DiracDelta):
        e = e.replace(lambda x: isinstance(x, sp.DiracDelta), lambda x: sp.S.Zero)
    if e.has(sp.Piecewise) and len(e.atoms(sp.Piecewise)) <= 3 and at_most_nodes(e, 2000):  # one where() instead of several
        folded = sp.piecewise_fold(e)
        if sp.count_ops(folded) <= sp.count_ops(e):
            e = folded
    if e.has(sp.sinh) and e.has(sp.cosh):
        for s in e.atoms(sp.sinh):
            a = s.args[0]
            e = e.subs(sp.sinh(a) / sp.cosh(a), sp.tanh(a))
    return e


class _RealAbs(sp.Function):
    """|u| for real u while differentiating: d|u| = sign(u) du.  sympy's Abs differentiates a value it
    cannot prove real (sqrt(y)) through re() and im(), which leave atan2 terms and unevaluated
    derivatives; every quantity of a bias is real where it is defined."""

    def fdiff(self, argindex=1):
        return _RealSign(self.args[0])


class _RealSign(sp.Function):
    """sign(u) for real u while differentiating: its derivative vanishes almost everywhere."""

    def fdiff(self, argindex=1):
        return sp.S.Zero


def _d(e: sp.Expr, x: sp.Symbol) -> sp.Expr:
    if x not in e.free_symbols:
        return sp.S.Zero
    real = e.replace(sp.Abs, _RealAbs).replace(sp.sign, _RealSign)
    d = sp.diff(real, x).replace(_RealAbs, sp.Abs).replace(_RealSign, sp.sign)
    if d.has(sp.Derivative):
        raise DeriveError(f"cannot differentiate {d.atoms(sp.Derivative).pop()} in closed form")
    return clean(d)


def cancelled(e: sp.Expr, y: sp.Symbol, v: sp.Symbol) -> sp.Expr:
    """e over one denominator with its numerator expanded in the error y - v, where that is shorter.

    Second derivatives of a smoothed |e| come out as 1/sa - e^2/sa^3, which cancels to eps/sa^3 in
    exact arithmetic but loses most of its digits in floating point; the cancelled form is exact.
    Each Piecewise branch is treated alone; a longer result keeps the original.
    """
    if isinstance(e, sp.Piecewise):
        return sp.Piecewise(*[(cancelled(a, y, v), c) for a, c in e.args])
    if not e.is_Add or y not in e.free_symbols or not _small_polynomial(e) or e.has(sp.Derivative, sp.Subs):
        return e  # (an unevaluated derivative cannot take y -> err + v: it differentiates in y)
    err = sp.Dummy("e", real=True)
    try:
        num, den = sp.fraction(sp.together(e.xreplace({y: err + v})))
        cand = (sp.expand(num) / den).xreplace({err: y - v})
    except (ValueError, TypeError):  # best effort: the original is always correct
        return e
    return cand if sp.count_ops(cand) < sp.count_ops(e) else e


# Bounds on the work of the best-effort rewrites (cancelled, is_zero's proof): past them an expression
# stays as it is, so a derivation costs time polynomial in the size of the bias (docs/language.md).
CANCEL_MAX_OPS = 60
CANCEL_MAX_DEGREE = 12
SIMPLIFY_MAX_OPS = 30


def _degree(e: sp.Expr) -> float:
    """An upper bound on the polynomial degree that expanding e can reach (functions count 1)."""
    if e.is_Atom:
        return 0 if e.is_Number else 1
    if e.is_Add:
        return max(_degree(a) for a in e.args)
    if e.is_Mul:
        return sum(_degree(a) for a in e.args)
    if e.is_Pow:
        base, exp = e.args
        if exp.is_Rational:  # together() works with the numerator's power of the base: x^(65537/2) is big
            return abs(int(exp.p)) * max(1, _degree(base))
        if exp.is_number:
            return math.ceil(abs(float(exp))) * max(1, _degree(base))
        return 1
    return 1


def at_most_nodes(e: sp.Basic, limit: int) -> bool:
    """Whether e's tree has at most `limit` nodes; stops counting past the limit (count_ops does not)."""
    for n, _ in enumerate(sp.preorder_traversal(e), 1):
        if n > limit:
            return False
    return True


def _small_polynomial(e: sp.Expr) -> bool:
    """Whether together() and expand() of e are cheap: a small tree and a low expanded degree."""
    return at_most_nodes(e, 2 * CANCEL_MAX_OPS) and _degree(e) <= CANCEL_MAX_DEGREE


# ---- zero tests -----------------------------------------------------------------------------------

def _sample(sym: sp.Symbol, rng: random.Random) -> complex:
    if sym.is_integer:
        return complex(rng.randint(1, 16))
    mag = 10 ** rng.uniform(-1.5, 1.3)
    if sym.name.startswith("S"):  # reductions: mostly sums of squares, keep them positive
        return complex(mag)
    return complex(mag if rng.random() < 0.5 else -mag)


class _NoValue(Exception):
    """The expression has no finite value at the point (or uses a function the evaluator lacks)."""


def _real(x: complex) -> float:
    if abs(x.imag) > 1e-12 * max(1.0, abs(x.real)):
        raise _NoValue("a comparison of complex values")
    return x.real


def _sigmoid(x: complex) -> complex:
    return 1 / (1 + cmath.exp(-x))


def _softplus(x: complex) -> complex:
    return cmath.log(1 + cmath.exp(x))


def _sign(x: complex) -> complex:
    r = _real(x)
    return complex((r > 0) - (r < 0))


_UNARY = {
    "exp": cmath.exp, "log": cmath.log, "tanh": cmath.tanh, "sinh": cmath.sinh, "cosh": cmath.cosh,
    "sin": cmath.sin, "cos": cmath.cos, "Abs": lambda x: complex(abs(x)), "sign": _sign,
    "sigmoid": _sigmoid, "softplus": _softplus, "log1p": lambda x: cmath.log(1 + x),
    "Heaviside": lambda x: complex(_real(x) > 0) if _real(x) != 0 else complex(0.5),
    "DiracDelta": lambda x: 0j,
}
_RELATIONS = {
    sp.StrictLessThan: lambda a, b: a < b, sp.LessThan: lambda a, b: a <= b,
    sp.StrictGreaterThan: lambda a, b: a > b, sp.GreaterThan: lambda a, b: a >= b,
}


def evaluate(e: sp.Basic, point: dict[sp.Symbol, complex]) -> complex | bool:
    """e at `point` in complex floating point; raises _NoValue where that fails.

    Written against sympy's tree instead of calling evalf: mpmath evaluates exp(exp(exp(...))) to
    arbitrary size and then never finishes, while a float overflows at once.  Every distinct node is
    evaluated once (sympy shares equal subtrees), and without recursion, so nesting costs no stack.
    """
    done: dict[sp.Basic, complex | bool] = {}
    stack: list[sp.Basic] = [e]
    while stack:
        node = stack[-1]
        if node in done:
            stack.pop()
            continue
        if isinstance(node, sp.Piecewise):
            # only the branches up to the first true condition
            pending = None
            for value, cond in node.args:
                if cond not in done:
                    pending = cond
                    break
                if done[cond]:
                    if value not in done:
                        pending = value
                    break
            if pending is not None:
                stack.append(pending)
                continue
            stack.pop()
            for value, cond in node.args:
                if done[cond]:
                    done[node] = done[value]
                    break
            else:
                raise _NoValue("no branch of a Piecewise applies")
            continue
        waiting = [a for a in node.args if a not in done]
        if waiting and not node.is_Atom:
            stack.extend(waiting)
            continue
        stack.pop()
        done[node] = _node_value(node, [done[a] for a in node.args] if not node.is_Atom else [], point)
    return done[e]


def _node_value(node: sp.Basic, args: list, point: dict[sp.Symbol, complex]) -> complex | bool:
    try:
        if node.is_Symbol:
            if node not in point:
                raise _NoValue(f"no value for {node}")
            return point[node]
        if node is sp.true or node is sp.false:
            return bool(node)
        if node.is_Number or node.is_NumberSymbol:
            if node.is_infinite or node is sp.nan or node is sp.zoo:
                raise _NoValue("not a finite number")
            return complex(node)
        if node.is_Add:
            return sum(args, 0j)
        if node.is_Mul:
            out = 1 + 0j
            for a in args:
                out *= a
            return out
        if node.is_Pow:
            base, exponent = args
            if exponent.imag == 0 and exponent.real.is_integer() and abs(exponent.real) <= 64:
                return base ** int(exponent.real)
            return base ** exponent
        relation = _RELATIONS.get(type(node))
        if relation is not None:
            return relation(_real(args[0]), _real(args[1]))
        if isinstance(node, sp.And):
            return all(args)
        if isinstance(node, sp.Or):
            return any(args)
        if isinstance(node, sp.Not):
            return not args[0]
        if isinstance(node, (sp.Min, sp.Max)):
            reals = [_real(a) for a in args]
            return complex(min(reals) if isinstance(node, sp.Min) else max(reals))
        fn = _UNARY.get(type(node).__name__)
        if fn is not None and len(args) == 1:
            return fn(args[0])
    except (OverflowError, ZeroDivisionError, ValueError) as exc:
        raise _NoValue(str(exc)) from None
    raise _NoValue(f"cannot evaluate {type(node).__name__}")


def is_zero(e: sp.Expr, trials: int = 10) -> bool:
    """True only when e is proved identically zero; refutes quickly by evaluation at fixed points.

    The proof (sympy.simplify) is tried only on small expressions: its time grows without bound in the
    size, and an unproved zero only costs speed (the nonlinear class is always correct).
    """
    e = sp.sympify(e)
    if e == 0:
        return True
    if e.is_Number:
        return False
    rng = random.Random(1234)
    syms = sorted(e.free_symbols, key=lambda s: s.name)
    for _ in range(trials):
        point = {s: _sample(s, rng) for s in syms}
        try:
            val = evaluate(e, point)
        except _NoValue:
            continue
        if isinstance(val, bool) or cmath.isnan(val) or cmath.isinf(val):
            continue
        if abs(val) > 1e-9:
            return False
    if not at_most_nodes(e, 2 * SIMPLIFY_MAX_OPS) or _degree(e) > CANCEL_MAX_DEGREE:
        return False  # simplify expands powers: x^(65537/2) would take forever
    try:
        return sp.simplify(e) == 0
    except Exception:  # noqa: BLE001 - simplify is best effort; unproved means nonzero
        return False


def _primed(e: sp.Expr, syms: set[sp.Symbol]) -> sp.Expr:
    return e.xreplace({s: sp.Symbol(s.name + "_l", **s.assumptions0) for s in syms})


def classify(st: SymbolTable, outer2, inner, hess_diag) -> str:
    m = len(inner)
    elementwise = st.elementwise
    rank = sp.Add(*[outer2[r][s] * inner[r] * _primed(inner[s], elementwise)
                    for r in range(m) for s in range(m)])
    if not is_zero(rank):
        return "nonlinear"
    if is_zero(hess_diag):
        return "independent"
    if is_zero(hess_diag - 1):
        return "affine"
    return "nonlinear"


# ---- the bias -------------------------------------------------------------------------------------

def derive_bias(bias: BiasSpec, params: tuple[Param, ...]) -> BiasIR:
    """The BiasIR of a library bias or a user expression, with gradient, VJP pieces and class."""
    st = make_symbols(params)
    if bias.name is not None and bias.expr is None:
        obj: Objective = library_bias(bias, st)
        name = bias.name
        text = library_text(bias)
    elif bias.expr is not None:
        obj = user_bias(bias.expr, st, bias.loc)
        name = "custom"
        text = "L = " + expr_text(bias.expr)
    else:
        raise DeriveError("a bias needs a library name or an expression", bias.loc)

    F, reductions = obj.F, obj.reductions
    y, v = st.y, st.v
    channel = st.channel_symbols()
    if F.free_symbols & (st.elementwise):
        raise DeriveError("y, v and per-channel gates may only appear inside reductions", bias.loc)

    used = F.free_symbols.union(*[f.free_symbols for _, f in reductions])
    ordered = [p for p in params if p.name in st.params and st.params[p.name].symbol in used]
    pnames = tuple(p.name for p in ordered)
    psyms = [st.params[n].symbol for n in pnames]

    S = [s for s, _ in reductions]
    f = [fr for _, fr in reductions]
    m = len(S)
    a = [_d(F, s) for s in S]
    d = [_d(fr, y) for fr in f]
    grad = clean(sp.Add(*[a[r] * d[r] for r in range(m)]))

    # second order
    F2 = [[_d(a[r], S[s]) for s in range(m)] for r in range(m)]
    w = st.fresh("w", real=True)
    R = [st.fresh(f"R{r + 1}", real=True) for r in range(m)]
    c = [sp.Add(*[F2[r][s] * R[r] for r in range(m)]) for s in range(m)]
    dyy = [cancelled(_d(d[r], y), y, v) for r in range(m)]
    dyv = [cancelled(_d(d[r], v), y, v) for r in range(m)]
    hess_diag = clean(sp.Add(*[a[r] * dyy[r] for r in range(m)]))
    dy = clean(sp.Add(*[c[s] * d[s] for s in range(m)]) + w * hess_diag)
    dv = clean(sp.Add(*[c[s] * _d(f[s], v) for s in range(m)])
               + w * sp.Add(*[a[r] * dyv[r] for r in range(m)]))
    pvjps = []
    for pname, p in zip(pnames, psyms):
        elem = clean(sp.Add(*[c[s] * _d(f[s], p) for s in range(m)])
                     + w * sp.Add(*[a[r] * cancelled(_d(d[r], p), y, v) for r in range(m)]))
        if p in channel:
            if any(_d(a[r], p) != 0 for r in range(m)):  # pragma: no cover - refused above
                raise DeriveError(f"per-channel gate {pname!r} outside a reduction", bias.loc)
            pvjps.append(ParamVJP(pname, "channel", p, elem, sp.S.Zero))
        else:
            token = clean(sp.Add(*[R[r] * _d(a[r], p) for r in range(m)]))
            pvjps.append(ParamVJP(pname, "scalar", p, elem, token))
    outs = [dy, dv] + [q.elem for q in pvjps] + [q.token for q in pvjps]
    used_R = set().union(*[o.free_symbols for o in outs]) & set(R)
    sums = tuple((R[r], w * d[r]) for r in range(m) if R[r] in used_R)

    vjp = BiasVJP(w=w, sums=sums, dy=dy, dv=dv, dparams=tuple(pvjps), outer=tuple(a), inner=tuple(d),
                  hess_outer=tuple(tuple(row) for row in F2), hess_diag=hess_diag)
    klass = classify(st, F2, d, hess_diag)
    return BiasIR(
        name=name, klass=klass, params=pnames, y=y, v=v, reductions=tuple(reductions), loss=F, grad=grad,
        vjp=vjp, text=text, V=st.V,
        param_symbols=tuple((n, st.params[n].symbol) for n in pnames),
        channel_params=tuple(n for n in pnames if st.params[n].kind == "channel"),
    )


def derive(spec: LayerSpec) -> LayerIR:
    """The LayerIR of a checked spec: bias (sympy), retention and algorithm (plain operands), the rule."""
    from .explain import rule_text

    bias = derive_bias(spec.bias, spec.params)
    ir = LayerIR(
        name=spec.name, block=spec.block, memory=spec.memory, params=spec.params, bias=bias,
        retention=retention_ir(spec.retention, spec.params),
        algorithm=algorithm_ir(spec.algorithm, spec.params),
        rule="", source_hash=hashlib.sha256(spec.source.encode("utf-8")).hexdigest(),
        source_file=spec.file, spec=spec,
    )
    return replace(ir, rule=rule_text(ir))


__all__ = ["BiasVJP", "ParamVJP", "cancelled", "classify", "clean", "derive", "derive_bias", "is_zero"]
