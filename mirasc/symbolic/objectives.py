"""Attentional biases as sympy, in the structured form L = F(S_1..S_m; params), S_r = sum_j f_r(y_j, v_j).

Two sources of a bias: the library (`library_bias`, the table of docs/semantics.md) and a user
expression (`user_bias`, a spec Expr tree).  Both produce an `Objective`: the outer function F of the
reduction symbols S_r and of the per-token scalar parameters, and the reductions (S_r, f_r) whose bodies
are elementwise expressions in the coordinate symbols y, v and the per-channel parameters.

Conventions (docs/semantics.md, "The attentional bias"):
- e = y - v;  sa(x) = sqrt(x^2 + eps) (smooth |x|, eps = 1e-6 unless an `eps` argument says otherwise);
  ||e|| = sqrt(sum_j e_j^2 + eps).
- "1/2 ||e||^2" (l2, the quadratic branch of huber_mix, robust) is the exact 1/2 sum_j e_j^2 of Eq. 9;
  H_delta(||e||) (huber_norm) applies the Huber function to the smoothed norm, so its quadratic branch is
  1/2 ||e||^2 = 1/2 (sum_j e_j^2 + eps), which keeps H continuous at ||e|| = delta.
- Constants (Params of kind "const") are inlined as numbers; learnable scalars and head gates are
  per-token scalar symbols; channel gates are per-coordinate symbols and may appear only inside
  reductions.  `mean(x)` = sum(x) / V with V the value dimension (a positive integer symbol);
  `norm(x)` = sqrt(sum(x^2) + 1e-6).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import sympy as sp
from sympy.codegen.cfunctions import log1p

from ..catalog import BIASES, FUNCTIONS, REDUCTIONS
from ..spec import NOLOC, BiasSpec, Binary, Call, Compare, IfElse, Loc, Num, Param, Ref, Unary, Var

SMOOTH_EPS = 1e-6  # eps of smooth_abs / smooth_sign / norm (Remark 5)


class DeriveError(ValueError):
    """A spec the symbolic stage cannot derive (the checker should have refused it); carries a Loc."""

    def __init__(self, message: str, loc: Loc = NOLOC):
        self.loc = loc
        self.message = message
        super().__init__(f"{loc}: {message}" if loc != NOLOC else message)


# ---- functions sympy lacks ------------------------------------------------------------------------

class sigmoid(sp.Function):  # lower case: printers dispatch on the class name
    """sigmoid(x) = 1 / (1 + exp(-x))."""

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return 1 / (1 + sp.exp(-x))
        return None

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))


class softplus(sp.Function):
    """softplus(x) = log(1 + exp(x))."""

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sp.log(1 + sp.exp(x))
        return None

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return sp.log(1 + sp.exp(x))


def num(x: float) -> sp.Expr:
    """A spec number as sympy: integers exactly, everything else as a float."""
    x = float(x)
    if x.is_integer() and abs(x) < 2**53:
        return sp.Integer(int(x))
    return sp.Float(x)


def smooth_abs(x: sp.Expr, eps: float | sp.Expr = SMOOTH_EPS) -> sp.Expr:
    """sa(x) = sqrt(x^2 + eps), the smooth |x| of Remark 5 (printed as this definition)."""
    return sp.sqrt(x**2 + (eps if isinstance(eps, sp.Basic) else num(eps)))


def smooth_sign(x: sp.Expr, eps: float = SMOOTH_EPS) -> sp.Expr:
    return x / smooth_abs(x, eps)


# ---- symbols --------------------------------------------------------------------------------------

@dataclass
class ParamSym:
    """A Param as the derivation sees it: kind "const" (inlined number), "scalar" or "channel"."""
    name: str
    kind: str
    symbol: sp.Symbol | None = None
    value: float | None = None


@dataclass
class SymbolTable:
    """The symbols of one derivation.  Internal names avoid every parameter name."""
    y: sp.Symbol
    v: sp.Symbol
    V: sp.Symbol  # the value dimension
    params: dict[str, ParamSym]
    taken: set[str] = field(default_factory=set)

    def fresh(self, base: str, **assumptions) -> sp.Symbol:
        name = base
        while name in self.taken:
            name += "_"
        self.taken.add(name)
        return sp.Symbol(name, **assumptions)

    @property
    def elementwise(self) -> set[sp.Symbol]:
        """Per-coordinate symbols: y, v and the channel parameters."""
        return {self.y, self.v} | {p.symbol for p in self.params.values() if p.kind == "channel"}

    def channel_symbols(self) -> set[sp.Symbol]:
        return {p.symbol for p in self.params.values() if p.kind == "channel"}


def param_kind(p: Param) -> str:
    if p.kind == "const":
        return "const"
    if p.kind == "gate" and p.shape == "channel":
        return "channel"
    return "scalar"


def make_symbols(params: tuple[Param, ...]) -> SymbolTable:
    taken = {p.name for p in params} | {"y", "v"}
    table: dict[str, ParamSym] = {}
    for p in params:
        kind = param_kind(p)
        if kind == "const":
            if p.value is None:
                raise DeriveError(f"constant {p.name!r} has no value", p.loc)
            table[p.name] = ParamSym(p.name, kind, None, float(p.value))
        else:
            table[p.name] = ParamSym(p.name, kind, sp.Symbol(p.name, real=True))
    st = SymbolTable(sp.Symbol("y", real=True), sp.Symbol("v", real=True), sp.Symbol("V"), table, taken)
    st.V = st.fresh("V", integer=True, positive=True)
    return st


# ---- the structured objective ---------------------------------------------------------------------

@dataclass
class Objective:
    """L = F(S; params) with reductions S_r = sum_j f_r."""
    F: sp.Expr
    reductions: list[tuple[sp.Symbol, sp.Expr]]


class Reducer:
    """Collects reduction bodies, one symbol per distinct body (so norm(e) and mean(e^2) share S)."""

    def __init__(self, st: SymbolTable):
        self.st = st
        self.items: list[tuple[sp.Symbol, sp.Expr]] = []
        self._index: dict[sp.Expr, sp.Symbol] = {}

    def sum(self, body: sp.Expr) -> sp.Expr:
        body = sp.sympify(body)
        if not (body.free_symbols & self.st.elementwise):
            return self.st.V * body  # a per-token quantity summed over the V coordinates
        sym = self._index.get(body)
        if sym is None:
            sym = self.st.fresh(f"S{len(self.items) + 1}", real=True)
            self._index[body] = sym
            self.items.append((sym, body))
        return sym

    def objective(self, F: sp.Expr) -> Objective:
        # keep only the reductions F still uses (a branch may have folded away)
        used = [(s, f) for s, f in self.items if s in F.free_symbols]
        return Objective(sp.sympify(F), used)


# ---- library biases -------------------------------------------------------------------------------

def _arg_dict(bias: BiasSpec) -> dict[str, Ref | str]:
    return dict(bias.args)


def operand(ref: Ref | str | float | None, st: SymbolTable, what: str, loc: Loc,
            number_only: bool = False, allow_channel: bool = True) -> sp.Expr:
    """A bias argument as sympy: a literal number, or a Param (const inlined, else its symbol)."""
    if isinstance(ref, (int, float)):
        return num(ref)
    if isinstance(ref, str):
        raise DeriveError(f"argument {what!r} must be a number or a parameter, not {ref!r}", loc)
    if ref is None:
        raise DeriveError(f"argument {what!r} is missing", loc)
    if ref.name is None:
        if ref.value is None:
            raise DeriveError(f"argument {what!r} is empty", ref.loc or loc)
        return num(ref.value)
    p = st.params.get(ref.name)
    if p is None:
        raise DeriveError(f"unknown parameter {ref.name!r}", ref.loc or loc)
    if p.kind == "const":
        return num(p.value)
    if number_only:
        raise DeriveError(f"argument {what!r} must be a compile-time number, {ref.name!r} is not", ref.loc or loc)
    if p.kind == "channel" and not allow_channel:
        raise DeriveError(f"argument {what!r} of this bias is a scalar; {ref.name!r} is a per-channel gate",
                          ref.loc or loc)
    return p.symbol


def _huber(a: sp.Expr, delta: sp.Expr, absolute: sp.Expr | None = None) -> sp.Expr:
    """H_delta(a) of Eq. 13: 1/2 a^2 if |a| <= delta else delta (|a| - delta/2)."""
    absolute = sp.Abs(a) if absolute is None else absolute
    return sp.Piecewise((a**2 / 2, absolute <= delta), (delta * (absolute - delta / 2), True))


def library_bias(bias: BiasSpec, st: SymbolTable) -> Objective:
    name = bias.name
    if name not in BIASES:
        raise DeriveError(f"unknown bias {name!r}", bias.loc)
    given = _arg_dict(bias)
    entry = BIASES[name]

    def arg(arg_name: str, allow_channel: bool = False) -> sp.Expr:
        spec_arg = next(a for a in entry.args if a.name == arg_name)
        ref = given.get(arg_name, spec_arg.default)
        return operand(ref, st, arg_name, bias.loc, spec_arg.number_only, allow_channel)

    y, v = st.y, st.v
    e = y - v
    red = Reducer(st)
    half = sp.Rational(1, 2)
    if name == "dot":
        F = -red.sum(y * v)
    elif name == "l2":
        F = half * red.sum(e**2)
    elif name == "l1":
        F = red.sum(smooth_abs(e, arg("eps")))
    elif name == "lp":
        p, eps = arg("p"), arg("eps")
        F = red.sum((e**2 + eps) ** (p / 2))
    elif name == "huber":
        F = red.sum(_huber(e, arg("delta", allow_channel=True)))
    elif name == "huber_norm":
        delta, eps = arg("delta"), arg("eps")
        n = sp.sqrt(red.sum(e**2) + eps)
        F = _huber(n, delta, absolute=n)
    elif name == "huber_mix":
        delta, eps = arg("delta"), arg("eps")
        s2 = red.sum(e**2)
        F = sp.Piecewise((half * s2, sp.sqrt(s2 + eps) <= delta),
                         (delta * red.sum(smooth_abs(e, eps)), True))
    elif name == "robust":
        Delta, eps = arg("Delta"), arg("eps")
        s2 = red.sum(e**2)
        F = half * s2 + Delta * sp.sqrt(s2 + eps) + half * Delta**2
    else:  # pragma: no cover - the catalog and this table must agree
        raise DeriveError(f"bias {name!r} has no derivation", bias.loc)
    return red.objective(F)


# Readable definitions of the library biases (for BiasIR.text); {a} placeholders are argument names.
LIBRARY_TEXT = {
    "dot": "L = -<y, v>",
    "l2": "L = 1/2 ||y - v||^2",
    "l1": "L = sum_j sa(y_j - v_j),  sa(x) = sqrt(x^2 + {eps})",
    "lp": "L = sum_j sa(y_j - v_j)^{p},  sa(x) = sqrt(x^2 + {eps})",
    "huber": "L = sum_j H_{delta}(y_j - v_j),  H_d(a) = a^2/2 if |a| <= d else d (|a| - d/2)",
    "huber_norm": "L = H_{delta}(||y - v||),  H_d(a) = a^2/2 if a <= d else d (a - d/2),  "
                  "||e|| = sqrt(sum_j e_j^2 + {eps})",
    "huber_mix": "L = 1/2 ||y - v||^2 if ||y - v|| <= {delta} else {delta} sum_j sa(y_j - v_j),  "
                 "||e|| = sqrt(sum_j e_j^2 + {eps}),  sa(x) = sqrt(x^2 + {eps})",
    "robust": "L = 1/2 ||y - v||^2 + {Delta} ||y - v|| + {Delta}^2/2,  ||e|| = sqrt(sum_j e_j^2 + {eps})",
}


def library_text(bias: BiasSpec) -> str:
    given = _arg_dict(bias)
    values = {}
    for a in BIASES[bias.name].args:
        ref = given.get(a.name, a.default)
        if isinstance(ref, Ref):
            values[a.name] = ref.name if ref.name is not None else _fmt_num(ref.value)
        else:
            values[a.name] = _fmt_num(ref) if isinstance(ref, (int, float)) else str(ref)
    return LIBRARY_TEXT[bias.name].format(**values)


def _fmt_num(x: float | None) -> str:
    if x is None:
        return "?"
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


# ---- user expressions -----------------------------------------------------------------------------

def _fn_table(st: SymbolTable) -> dict[str, Callable[..., sp.Expr]]:
    return {
        "abs": sp.Abs, "sign": sp.sign, "sqrt": sp.sqrt, "exp": sp.exp, "log": sp.log, "tanh": sp.tanh,
        "sigmoid": sigmoid, "softplus": softplus, "log1p": log1p, "cosh": sp.cosh, "sin": sp.sin,
        "cos": sp.cos, "min": sp.Min, "max": sp.Max,
        "smooth_abs": smooth_abs, "smooth_sign": smooth_sign,
    }


_CHAIN = frozenset({"+", "-", "*", "/"})
_COMPARE = {"<": sp.StrictLessThan, "<=": sp.LessThan, ">": sp.StrictGreaterThan, ">=": sp.GreaterThan}
_BINARY = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: a / b, "^": lambda a, b: a**b,
}


def user_bias(expr, st: SymbolTable, loc: Loc = NOLOC) -> Objective:
    """A spec Expr tree -> Objective.  Refuses y/v/channel gates outside reductions and nested reductions."""
    red = Reducer(st)
    fns = _fn_table(st)
    missing = set(FUNCTIONS) - set(fns)
    assert not missing, missing

    def conv(node, inside: bool) -> sp.Expr:
        if isinstance(node, Num):
            return num(node.value)
        if isinstance(node, Var):
            if node.name in ("y", "v"):
                if not inside:
                    raise DeriveError(f"`{node.name}` is a vector: use it inside a reduction (sum, mean, norm)",
                                      node.loc)
                return st.y if node.name == "y" else st.v
            p = st.params.get(node.name)
            if p is None:
                raise DeriveError(f"unknown name {node.name!r}", node.loc)
            if p.kind == "const":
                return num(p.value)
            if p.kind == "channel" and not inside:
                raise DeriveError(f"per-channel gate {node.name!r} is a vector: use it inside a reduction",
                                  node.loc)
            return p.symbol
        if isinstance(node, Unary):
            return -conv(node.arg, inside)
        if isinstance(node, Binary) and node.op in _CHAIN:
            # a left-associated chain in a loop, its terms collected into one Add/Mul where possible:
            # its length costs no recursion, and n terms cost O(n) rather than n re-flattenings
            links = []
            while isinstance(node, Binary) and node.op in _CHAIN:
                links.append(node)
                node = node.lhs
            terms = [conv(node, inside)]
            kind = "+"
            for link in reversed(links):
                rhs = conv(link.rhs, inside)
                op_kind = "+" if link.op in "+-" else "*"
                if op_kind != kind:
                    terms = [sp.Add(*terms) if kind == "+" else sp.Mul(*terms)]
                    kind = op_kind
                terms.append(-rhs if link.op == "-" else 1 / rhs if link.op == "/" else rhs)
            return sp.Add(*terms) if kind == "+" else sp.Mul(*terms)
        if isinstance(node, Binary):
            return _BINARY[node.op](conv(node.lhs, inside), conv(node.rhs, inside))
        if isinstance(node, Call):
            if node.fn in REDUCTIONS:
                if inside:
                    raise DeriveError(f"nested reduction `{node.fn}`", node.loc)
                if len(node.args) != 1:
                    raise DeriveError(f"`{node.fn}` takes one argument", node.loc)
                body = conv(node.args[0], True)
                if node.fn == "sum":
                    return red.sum(body)
                if node.fn == "mean":
                    return red.sum(body) / st.V
                return sp.sqrt(red.sum(body**2) + num(SMOOTH_EPS))  # norm
            fn = fns.get(node.fn)
            if fn is None:
                raise DeriveError(f"unknown function {node.fn!r}", node.loc)
            if len(node.args) != FUNCTIONS[node.fn]:
                raise DeriveError(f"`{node.fn}` takes {FUNCTIONS[node.fn]} argument(s)", node.loc)
            return fn(*[conv(a, inside) for a in node.args])
        if isinstance(node, IfElse):
            cond = node.cond
            if not isinstance(cond, Compare):
                raise DeriveError("the condition of if/else must be a comparison", node.loc)
            c = _COMPARE[cond.op](conv(cond.lhs, inside), conv(cond.rhs, inside))
            return sp.Piecewise((conv(node.then, inside), c), (conv(node.other, inside), True))
        raise DeriveError(f"unexpected expression node {type(node).__name__}", getattr(node, "loc", loc))

    F = conv(expr, False)
    obj = red.objective(F)
    if not any(st.y in f.free_symbols for _, f in obj.reductions):
        raise DeriveError("the bias does not depend on y", loc)
    return obj


# ---- readable text of a spec expression -----------------------------------------------------------

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "neg": 3, "^": 4}


def expr_text(node) -> str:
    """A spec Expr tree back as readable text (minimal parentheses)."""

    def go(n, parent: int = 0, right: bool = False) -> str:
        if isinstance(n, Num):
            return _fmt_num(n.value)
        if isinstance(n, Var):
            return n.name
        if isinstance(n, Unary):
            s = "-" + go(n.arg, _PREC["neg"])
            return f"({s})" if parent >= _PREC["neg"] else s
        if isinstance(n, Binary) and n.op != "^":
            # a left-associated chain in a loop (its length costs no recursion)
            links = []
            while isinstance(n, Binary) and n.op != "^" and _PREC[n.op] == _PREC[links[-1].op if links else n.op]:
                links.append(n)
                n = n.lhs
            p = _PREC[links[0].op]
            s = go(n, p)
            for link in reversed(links):
                s = f"{s} {link.op} {go(link.rhs, p, right=True)}"
            needs = parent > p or (parent == p and right)
            return f"({s})" if needs else s
        if isinstance(n, Binary):
            p = _PREC[n.op]
            if n.op == "^":  # right-associative
                s = f"{go(n.lhs, p + 1)}^{go(n.rhs, p)}"
            else:
                s = f"{go(n.lhs, p)} {n.op} {go(n.rhs, p, right=True)}"
            needs = parent > p or (parent == p and right and n.op in "+-*/")
            return f"({s})" if needs else s
        if isinstance(n, Call):
            return f"{n.fn}({', '.join(go(a) for a in n.args)})"
        if isinstance(n, Compare):
            return f"{go(n.lhs)} {n.op} {go(n.rhs)}"
        if isinstance(n, IfElse):
            s = f"if {go(n.cond)} then {go(n.then)} else {go(n.other)}"
            return f"({s})" if parent else s
        return str(n)

    return go(node)


__all__ = [
    "DeriveError",
    "Objective",
    "ParamSym",
    "Reducer",
    "SymbolTable",
    "expr_text",
    "library_bias",
    "library_text",
    "log1p",
    "make_symbols",
    "num",
    "operand",
    "sigmoid",
    "smooth_abs",
    "smooth_sign",
    "softplus",
    "user_bias",
]
