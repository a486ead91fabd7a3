"""sympy -> source printers: PyTorch (`torch.*`) and Triton (`tl.*`), and the printed bias functions.

`torch_bias_source(bias)` is the contract the torch/reference backends build on: self-contained source
(it uses only `torch` and `math`, which the enclosing module imports) that defines

    bias_loss(y, v, P1, ...)         -> [...]      L per token
    bias_grad(y, v, P1, ...)         -> [..., V]   g = dL/dy
    bias_grad_vjp(y, v, P1, ..., w)  -> (dy, dv, dP1, ...)   the VJP of bias_grad at the cotangent w

with P1.. = BiasIR.params (non-constant parameters, in that order; constants are inlined).  y, v, w are
[..., V]; a scalar parameter arrives as [..., 1] and a channel parameter as [..., V], all with the same
leading dims; each dP has the shape of its P.  The functions are built from differentiable torch ops
(torch.where, torch.minimum, ...), so autograd can train through bias_grad; numbers are Python floats, so
the result keeps the dtype of y (float64, float32, bfloat16).

`triton_bias_source(bias, ...)` prints the same three computations as lists of Triton statements over
named tiles, for the kernel templates, plus `TRITON_HELPERS` (jit functions for what `tl` lacks).

`torch_activation_source(act)` / `triton_activation_source(act)` print an activation of
mirasc.symbolic.activations and its derivatives (sympy's) as functions of generated code; `num(x)` is a
float as generated Python source.

Both printers share one base (`_CodePrinter`), in the manner of sympy's own table-driven printers: a
table of the functions each backend knows (sympy class name -> what to print) and small methods for
the special cases (numbers, powers, min / max, piecewise, Heaviside).

Every expression set goes through sympy's cse; the statements are then scheduled so that each reduction
(S_r, then the VJP's R_r, then the sums of scalar-parameter VJPs) comes after what it reads.
"""
from __future__ import annotations

import keyword
import math
from dataclasses import dataclass, field
from typing import ClassVar

import sympy as sp
from sympy.printing.precedence import precedence
from sympy.printing.pycode import PythonCodePrinter

# ---- shared: kinds of values and numbers -----------------------------------------------------------
# "py": a Python number (the value dim V and numbers); "token": one value per token ([..., 1]);
# "elem": one value per coordinate ([..., V]).
_RANK = {"py": 0, "token": 1, "elem": 2}


def num(x: float) -> str:
    """A float as Python source for generated code (repr round-trips exactly; infinities as float())."""
    x = float(x)
    if math.isinf(x):
        return 'float("inf")' if x > 0 else '-float("inf")'
    return repr(x)


def _num_str(x) -> str:
    """A float inside printed torch expressions (the bias functions import math)."""
    x = float(x)
    if math.isnan(x):
        return "math.nan"
    if x in (float("inf"), float("-inf")):
        return "math.inf" if x > 0 else "(-math.inf)"
    return repr(x)


class _CodePrinter(PythonCodePrinter):
    """What the torch and Triton printers share, in the manner of sympy's table-driven printers
    (sympy.printing.pycode): a subclass gives FUNCTIONS, its table of known functions (sympy class name
    -> what to print), and methods only for the special cases (numbers, powers, min/max, piecewise).

    `kinds` maps symbols to "py" / "token" / "elem" (unknown symbols are tensors), so a printer can tell
    Python numbers from tensors.
    """

    FUNCTIONS: ClassVar[dict] = {}
    BACKEND = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.FUNCTIONS:  # sympy dispatches on _print_<class name>; every table row prints alike
            setattr(cls, f"_print_{name}", cls._print_Function)

    def __init__(self, kinds: dict | None = None, settings=None):
        super().__init__(dict(settings or {}, fully_qualified_modules=True))
        self.kinds = dict(kinds or {})

    def kind(self, expr) -> str:
        k = "py"
        for s in sp.sympify(expr).free_symbols:
            ks = self.kinds.get(s, "token")
            if _RANK[ks] > _RANK[k]:
                k = ks
        return k

    def is_py(self, expr) -> bool:
        return self.kind(expr) == "py"

    def _args(self, expr) -> str:
        return ", ".join(self._print(a) for a in expr.args)

    def _function(self, name: str, expr) -> str:
        """A call of the table's function `name` (a subclass may choose by the arguments' kind)."""
        return f"{self.FUNCTIONS[name]}({self._args(expr)})"

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name not in self.FUNCTIONS:
            raise NotImplementedError(f"the {self.BACKEND} printer does not know the function {name!r}")
        return self._function(name, expr)

    def _print_Half(self, expr):
        return "0.5"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_Symbol(self, expr):
        return expr.name

    def _print_Relational(self, expr):
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    # elementwise logic on boolean tensors (the torch printer uses Python's for numbers)
    def _print_And(self, expr):
        return "(" + " & ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"(~{self._print(expr.args[0])})"


# ---- torch ----------------------------------------------------------------------------------------

class TorchPrinter(_CodePrinter):
    """sympy -> PyTorch expression source.

    Each function maps to (tensor function, math twin for Python numbers or None); `ref` names a tensor
    whose dtype and device numeric-only branches take (torch.where of two numbers).
    """

    BACKEND = "torch"
    FUNCTIONS: ClassVar[dict] = {
        "exp": ("torch.exp", "math.exp"), "log": ("torch.log", "math.log"), "sqrt": ("torch.sqrt", "math.sqrt"),
        "tanh": ("torch.tanh", "math.tanh"), "cosh": ("torch.cosh", "math.cosh"),
        "sinh": ("torch.sinh", "math.sinh"), "sin": ("torch.sin", "math.sin"), "cos": ("torch.cos", "math.cos"),
        "log1p": ("torch.log1p", "math.log1p"), "sigmoid": ("torch.sigmoid", None),
        "softplus": ("torch.nn.functional.softplus", None), "Abs": ("torch.abs", "abs"),
        "sign": ("torch.sign", None), "atan": ("torch.atan", "math.atan"), "erf": ("torch.erf", "math.erf"),
    }

    def __init__(self, kinds: dict | None = None, ref: str = "y", settings=None):
        super().__init__(kinds, settings)
        self.ref = ref

    def _function(self, name, expr):
        tfn, mfn = self.FUNCTIONS[name]
        args = self._args(expr)
        if self.is_py(expr) and mfn is not None:
            return f"{mfn}({args})"
        if self.is_py(expr):  # no math twin: evaluate through a 0-d tensor of y's dtype
            return f"{tfn}({self.ref}.new_tensor({args}))"
        return f"{tfn}({args})"

    # numbers
    def _print_Float(self, expr):
        return _num_str(expr)

    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Rational(self, expr):
        return f"({expr.p}/{expr.q})"

    def _print_Pi(self, expr):
        return "math.pi"

    def _print_Exp1(self, expr):
        return "math.e"

    # powers
    def _print_Pow(self, expr, rational=False):
        base, ex = expr.base, expr.exp
        sqrt = "math.sqrt" if self.is_py(base) else "torch.sqrt"
        if ex == sp.S.Half:
            return f"{sqrt}({self._print(base)})"
        if ex == -sp.S.Half:
            return f"(1/{sqrt}({self._print(base)}))"
        if ex == -1:
            return f"(1/{self.parenthesize(base, precedence(expr), strict=False)})"
        PREC = precedence(expr)
        b = self.parenthesize(base, PREC, strict=True)
        if ex.is_Rational and not ex.is_Integer:
            e = _num_str(ex)
        else:
            e = self.parenthesize(ex, PREC, strict=False)
        if e.startswith("-"):
            e = f"({e})"
        return f"{b}**{e}"

    def _print_Heaviside(self, expr):
        x = expr.args[0]
        if self.is_py(x):
            return f"(1.0 if {self._print(x)} > 0 else 0.0)"
        return f"({self._print(x)} > 0).to({self.ref}.dtype)"

    def _minmax(self, expr, tfn: str, clamp: str, pyfn: str):
        args = list(expr.args)
        tens = [a for a in args if not self.is_py(a)]
        nums = [a for a in args if self.is_py(a)]
        if not tens:
            return f"{pyfn}({', '.join(self._print(a) for a in args)})"
        out = self._print(tens[0])
        for a in tens[1:]:
            out = f"{tfn}({out}, {self._print(a)})"
        if nums:
            bound = self._print(nums[0]) if len(nums) == 1 else f"{pyfn}({', '.join(self._print(a) for a in nums)})"
            out = f"torch.clamp({out}, {clamp}={bound})"
        return out

    def _print_Min(self, expr):
        return self._minmax(expr, "torch.minimum", "max", "min")

    def _print_Max(self, expr):
        return self._minmax(expr, "torch.maximum", "min", "max")

    # logic: Python's operators between numbers
    def _print_And(self, expr):
        return "(" + " and ".join(self._print(a) for a in expr.args) + ")" if self.is_py(expr) else super()._print_And(expr)

    def _print_Or(self, expr):
        return "(" + " or ".join(self._print(a) for a in expr.args) + ")" if self.is_py(expr) else super()._print_Or(expr)

    def _print_Not(self, expr):
        return f"(not {self._print(expr.args[0])})" if self.is_py(expr) else super()._print_Not(expr)

    def _print_Piecewise(self, expr):
        pieces = list(expr.args)
        if pieces[-1][1] == sp.true:
            out_expr, out = pieces[-1][0], None
            pieces = pieces[:-1]
        else:
            out_expr, out = None, "math.nan"
        acc = out if out_expr is None else self._print(out_expr)
        acc_py = out_expr is None or self.is_py(out_expr)
        for e, c in reversed(pieces):
            if self.is_py(c):
                acc = f"({self._print(e)} if {self._print(c)} else {acc})"
                acc_py = acc_py and self.is_py(e)
                continue
            a = self._print(e)
            if acc_py and self.is_py(e):  # both branches numbers: give them y's dtype
                a = f"{self.ref}.new_tensor({a})"
            acc = f"torch.where({self._print(c)}, {a}, {acc})"
            acc_py = False
        return acc


# ---- Triton ---------------------------------------------------------------------------------------

TRITON_HELPERS = '''\
@triton.jit
def _mx_tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _mx_cosh(x):
    return 0.5 * (tl.exp(x) + tl.exp(-x))


@triton.jit
def _mx_sinh(x):
    return 0.5 * (tl.exp(x) - tl.exp(-x))


@triton.jit
def _mx_log1p(x):
    # log(1 + x) with the rounding error of 1 + x corrected (Goldberg's trick)
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _mx_softplus(x):
    return tl.where(x > 20.0, x, _mx_log1p(tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _mx_sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
'''


class TritonPrinter(_CodePrinter):
    """sympy -> Triton (`tl.*`) expression source.  Numbers print as float literals; integer powers
    expand to products; a non-integer power b^p prints as exp(p log b) (b must be positive: the
    library's powers are of sqrt(x^2 + eps)); functions tl lacks call the TRITON_HELPERS."""

    BACKEND = "triton"
    FUNCTIONS: ClassVar[dict] = {
        "exp": "tl.exp", "log": "tl.log", "sqrt": "tl.sqrt", "sin": "tl.sin", "cos": "tl.cos",
        "Abs": "tl.abs", "sigmoid": "tl.sigmoid", "erf": "tl.erf",
        "tanh": "_mx_tanh", "cosh": "_mx_cosh", "sinh": "_mx_sinh", "log1p": "_mx_log1p",
        "softplus": "_mx_softplus", "sign": "_mx_sign",
    }

    def _print_Float(self, expr):
        x = float(expr)
        if not math.isfinite(x):
            return f"float('{x}')"
        return repr(x)

    def _print_Integer(self, expr):
        return f"{float(int(expr))!r}"

    def _print_Rational(self, expr):
        return repr(expr.p / expr.q)

    def _print_Pi(self, expr):
        return repr(3.141592653589793)

    def _print_Exp1(self, expr):
        return repr(2.718281828459045)

    def _print_Pow(self, expr, rational=False):
        base, ex = expr.base, expr.exp
        b = self.parenthesize(base, precedence(expr), strict=True)
        if ex.is_Integer and 0 < abs(int(ex)) <= 32:
            prod = "*".join([b] * abs(int(ex)))
            return f"({prod})" if ex > 0 else f"(1.0/({prod}))"
        if ex == sp.S.Half:
            return f"tl.sqrt({self._print(base)})"
        if ex == -sp.S.Half:
            return f"(1.0/tl.sqrt({self._print(base)}))"
        if ex.is_Rational and ex.q == 2 and abs(ex.p) <= 9:  # x^(k/2) = sqrt(x) * x^((k-1)/2)
            k = abs(int(ex.p))
            prod = "*".join([f"tl.sqrt({self._print(base)})"] + [b] * ((k - 1) // 2))
            return f"({prod})" if ex > 0 else f"(1.0/({prod}))"
        return f"tl.exp({self._print(ex)}*tl.log({self._print(base)}))"

    def _print_Heaviside(self, expr):
        return f"tl.where({self._print(expr.args[0])} > 0, 1.0, 0.0)"

    def _minmax(self, expr, fn: str):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"{fn}({out}, {self._print(a)})"
        return out

    def _print_Min(self, expr):
        return self._minmax(expr, "tl.minimum")

    def _print_Max(self, expr):
        return self._minmax(expr, "tl.maximum")

    def _print_Piecewise(self, expr):
        pieces = list(expr.args)
        acc = self._print(pieces[-1][0]) if pieces[-1][1] == sp.true else "float('nan')"
        if pieces[-1][1] == sp.true:
            pieces = pieces[:-1]
        for e, c in reversed(pieces):
            acc = f"tl.where({self._print(c)}, {self._print(e)}, {acc})"
        return acc


class TritonInlinePrinter(TritonPrinter):
    """The Triton printer for functions that must stand alone (the activations pasted into kernels that
    do not carry TRITON_HELPERS): the helpers' one-line forms print inline."""

    INLINE: ClassVar[dict] = {"tanh": "(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)"}

    def _function(self, name, expr):
        if name in self.INLINE:
            return self.INLINE[name].format(x=self._print(expr.args[0]))
        return super()._function(name, expr)


# ---- scheduling: cse, then statements in dependency order -----------------------------------------

@dataclass
class Stmt:
    kind: str  # "temp", "reduce", "out"
    name: str
    expr: sp.Expr
    value_kind: str  # "py", "token", "elem" of the right-hand side


@dataclass
class Program:
    stmts: list[Stmt]
    kinds: dict = field(default_factory=dict)
    uses_V: bool = False


def schedule(reductions: list[tuple[sp.Symbol, sp.Expr]], outputs: list[tuple[str, sp.Expr]],
             kinds: dict, V: sp.Symbol | None) -> Program:
    """cse over the reduction bodies and the outputs; statements ordered so every read is defined.

    Reductions the outputs do not read (transitively) are dropped before cse.
    """
    outputs = [(n, sp.sympify(e)) for n, e in outputs]
    bodies_by = {s: sp.sympify(b) for s, b in reductions}
    live: set = set()
    todo = set().union(*[e.free_symbols for _, e in outputs]) & set(bodies_by)
    while todo:
        sym = todo.pop()
        if sym not in live:
            live.add(sym)
            todo |= bodies_by[sym].free_symbols & set(bodies_by)
    reductions = [(s, bodies_by[s]) for s, _ in reductions if s in live]
    exprs = [b for _, b in reductions] + [e for _, e in outputs]
    taken = set().union(*[e.free_symbols for e in exprs]) | {s for s, _ in reductions}
    names = {s.name for s in taken} | {n for n, _ in outputs}
    gen = (sp.Symbol(f"t{i}") for i in range(10**6) if f"t{i}" not in names)
    temps, reduced = sp.cse(exprs, symbols=gen, order="none") if exprs else ([], [])
    bodies = reduced[: len(reductions)]
    outs = reduced[len(reductions):]
    kinds = dict(kinds)
    # dead-code elimination: keep only the temps and reductions the outputs read (transitively)
    defs = {t: e for t, e in temps}
    defs.update({s: b for (s, _), b in zip(reductions, bodies)})
    needed: set = set()
    todo = set().union(*[e.free_symbols for e in outs]) if outs else set()
    while todo:
        sym = todo.pop()
        if sym in needed:
            continue
        needed.add(sym)
        if sym in defs:
            todo |= defs[sym].free_symbols
    pending_t = [(t, e) for t, e in temps if t in needed]
    pending_r = [(s, b) for (s, _), b in zip(reductions, bodies) if s in needed]
    defined = set().union(*[e.free_symbols for e in exprs]) - {s for s, _ in reductions}
    defined -= {t for t, _ in temps}
    stmts: list[Stmt] = []

    def ready(e):
        return e.free_symbols <= defined

    def kind_of(e):
        k = "py"
        for s in e.free_symbols:
            ks = kinds.get(s, "token")
            if _RANK[ks] > _RANK[k]:
                k = ks
        return k

    while pending_t or pending_r:
        progress = False
        for item in list(pending_t):
            t, e = item
            if ready(e):
                kinds[t] = kind_of(e)
                stmts.append(Stmt("temp", t.name, e, kinds[t]))
                defined.add(t)
                pending_t.remove(item)
                progress = True
        for item in list(pending_r):
            s, b = item
            if ready(b):
                kinds[s] = "token"
                stmts.append(Stmt("reduce", s.name, b, kind_of(b)))
                defined.add(s)
                pending_r.remove(item)
                progress = True
        if not progress:  # pragma: no cover - cse output is acyclic
            raise RuntimeError("cyclic statements")
    for (n, _), e in zip(outputs, outs):
        stmts.append(Stmt("out", n, e, kind_of(e)))
    uses_V = V is not None and any(V in st.expr.free_symbols or (st.kind == "reduce" and st.value_kind != "elem")
                                   for st in stmts)
    return Program(stmts, kinds, uses_V)


# ---- torch bias source ----------------------------------------------------------------------------

_RESERVED = set(keyword.kwlist) | {"torch", "math", "y", "v", "w", "V", "bias_loss", "bias_grad",
                                   "bias_grad_vjp", "True", "False", "None", "abs", "min", "max", "float"}


def _arg_names(bias) -> dict[str, str]:
    """Parameter name -> the argument name in printed code (renamed only where it would shadow)."""
    internal = {s.name for s, _ in bias.reductions}
    if bias.vjp is not None:
        internal |= {s.name for s, _ in bias.vjp.sums} | {bias.vjp.w.name}
    out, used = {}, set(_RESERVED) | internal
    for n in bias.params:
        a = n
        while a in used or (a.startswith("t") and a[1:].isdigit()):
            a = "p_" + a
        used.add(a)
        out[n] = a
    return out


def _base_kinds(bias) -> dict:
    kinds = {bias.y: "elem", bias.v: "elem"}
    if bias.V is not None:
        kinds[bias.V] = "py"
    for n, s in bias.param_symbols:
        kinds[s] = "elem" if n in bias.channel_params else "token"
    for s, _ in bias.reductions:
        kinds[s] = "token"
    if bias.vjp is not None:
        kinds[bias.vjp.w] = "elem"
        for s, _ in bias.vjp.sums:
            kinds[s] = "token"
    return kinds


def _rename(bias, names: dict[str, str]) -> dict:
    sub = {}
    for n, s in bias.param_symbols:
        if names[n] != s.name:
            sub[s] = sp.Symbol(names[n], **s.assumptions0)
    return sub


def _torch_body(bias, reductions, outputs, shapes, ref_names) -> list[str]:
    """Statements of one function: reductions, temps, and the shaped return value(s)."""
    names = _arg_names(bias)
    sub = _rename(bias, names)
    kinds = _base_kinds(bias)
    for old, new in sub.items():
        kinds[new] = kinds[old]
    reductions = [(s, sp.sympify(b).xreplace(sub)) for s, b in reductions]
    outputs = [(n, sp.sympify(e).xreplace(sub)) for n, e in outputs]
    prog = schedule(reductions, outputs, kinds, bias.V)
    pr = TorchPrinter(prog.kinds, ref="y")
    lines = []
    if prog.uses_V:
        lines.append(f"{bias.V.name} = y.shape[-1]")
    rets = []
    for st in prog.stmts:
        src = pr.doprint(st.expr)
        if st.kind == "temp":
            lines.append(f"{st.name} = {src}")
        elif st.kind == "reduce":
            if st.value_kind == "elem":
                lines.append(f"{st.name} = ({src}).sum(-1, keepdim=True)")
            else:  # a per-token body summed over the V coordinates
                lines.append(f"{st.name} = {bias.V.name} * ({src})")
        else:
            internal = st.expr.is_Symbol and any(d.name == st.expr.name for d in prog.stmts if d.kind != "out")
            rets.append(_shaped(src, st, shapes[st.name], ref_names[st.name], internal))
    lines.append("return " + (rets[0] if len(rets) == 1 else "(" + ", ".join(rets) + ")"))
    return lines


def _shaped(src: str, st: Stmt, shape: str, like: str, internal: bool = False) -> str:
    """Give an output the contract's shape: "elem" [..., V], "token" [..., 1] or "loss" [...]."""
    zero = st.expr == 0
    if shape == "loss":
        if st.value_kind == "py":
            return f"torch.full_like(y[..., 0], {src})"
        if st.value_kind == "elem":  # pragma: no cover - F never reads coordinates
            raise ValueError("loss depends on coordinates outside reductions")
        return f"({src}).squeeze(-1)"
    if zero:
        return f"torch.zeros_like({like})"
    if st.value_kind == "py":
        return f"torch.full_like({like}, {src})"
    if shape == "elem" and st.value_kind == "token":
        return f"torch.zeros_like({like}) + {src}"
    if st.expr.is_Symbol and not internal:  # an input passed through: never return an alias of an argument
        return f"{src}.clone()"
    return src


WIDTH = 100  # printed lines stay within this many columns (the project's ruff allows 110)


def _wrap_stmt(line: str, indent: str = "    ", width: int = WIDTH) -> list[str]:
    """Split a long `x = expr` / `return expr` at spaces inside added parentheses (valid Python:
    the printed code has spaces only between tokens)."""
    if len(indent) + len(line) <= width:
        return [indent + line]
    if line.startswith("return "):
        head, rhs = "return ", line[len("return "):]
    else:
        name, rhs = line.split(" = ", 1)
        head = name + " = "
    out, cur = [indent + head + "("], indent + "    "
    for word in rhs.split(" "):
        if len(cur) + len(word) + 1 > width and cur.strip():
            out.append(cur.rstrip())
            cur = indent + "    "
        cur += word + " "
    out.append(cur.rstrip() + ")")
    return out


def _comment(text: str, indent: str = "    ", width: int = WIDTH) -> str:
    """A one-line comment, cut to the width (the full math is in `mirasc explain` and the docstring)."""
    line = f"{indent}# {text}"
    return line if len(line) <= width else line[: width - 4].rstrip() + " ..."


def _function(head: str, comment: str, body: list[str]) -> list[str]:
    out = [head, _comment(comment)]
    for stmt in body:
        out += _wrap_stmt(stmt)
    return out


def torch_bias_source(bias) -> str:
    """Source of bias_loss, bias_grad and bias_grad_vjp for a BiasIR (see the module docstring)."""
    from ..symbolic.explain import grad_comment, loss_comment, math_str

    names = _arg_names(bias)
    args = ", ".join(["y", "v"] + [names[n] for n in bias.params])
    out = []

    body = _torch_body(bias, list(bias.reductions), [("loss", bias.loss)], {"loss": "loss"}, {"loss": "y"})
    out += _function(f"def bias_loss({args}):", loss_comment(bias), body)
    out.append("")
    out.append("")

    body = _torch_body(bias, list(bias.reductions), [("g", bias.grad)], {"g": "elem"}, {"g": "y"})
    out += _function(f"def bias_grad({args}):", grad_comment(bias), body)
    out.append("")
    out.append("")

    vjp = bias.vjp
    w = vjp.w.name
    reductions = list(bias.reductions) + list(vjp.sums)
    outputs = [("dy", vjp.dy), ("dv", vjp.dv)]
    shapes = {"dy": "elem", "dv": "elem"}
    likes = {"dy": "y", "dv": "v"}
    for p in vjp.dparams:
        key = "d_" + p.name
        arg = names[p.name]
        likes[key] = arg
        if p.shape == "channel":
            outputs.append((key, p.elem))
            shapes[key] = "elem"
        else:
            tot = p.token
            if p.elem != 0:
                D = sp.Symbol(f"D_{p.name}")
                while D.name in {s.name for s, _ in reductions} | set(names.values()):
                    D = sp.Symbol(D.name + "_")
                reductions.append((D, p.elem))
                tot = D + p.token
            outputs.append((key, tot))
            shapes[key] = "token"
    cm = {s: sp.Symbol(f"{s.name}_j") for s in [bias.y, bias.v, vjp.w]}
    comment = f"VJP of g at w: (w^T dg/dy)_j = {math_str(vjp.dy, cm)}"
    body = _torch_body(bias, reductions, outputs, shapes, likes)
    out += _function(f"def bias_grad_vjp({args}, {w}):", comment, body)
    out.append("")
    return "\n".join(out)


# ---- Triton bias source ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TritonBias:
    """Triton statements for a bias, over tiles named as the caller asked.

    Each block is a list of statements (no indentation) that assigns its outputs: `loss` ([BT, 1]),
    `g` (like y), and for the VJP `dy`, `dv`, `d_<param>` (like the parameter).  Reductions over the
    value dim print with `reduce` (a format with {x} and {mask}: padded columns are masked out).
    """
    loss: list[str]
    grad: list[str]
    vjp: list[str]
    params: tuple[str, ...]
    helpers: str = TRITON_HELPERS


def triton_expr(expr, kinds: dict | None = None, names: dict | None = None) -> str:
    """One expression as Triton source; `names` renames symbols ({symbol: name})."""
    e = sp.sympify(expr)
    if names:
        e = e.xreplace({s: sp.Symbol(n) for s, n in names.items()})
    return TritonPrinter(kinds).doprint(e)


def _triton_block(bias, reductions, outputs, names: dict, V: str, reduce: str, mask: str,
                  likes: dict[str, str]) -> list[str]:
    sub = {s: sp.Symbol(n) for s, n in names.items() if s.name != n}
    kinds = _base_kinds(bias)
    for old, new in sub.items():
        kinds[new] = kinds.get(old, "token")
    reductions = [(sub.get(s, s), sp.sympify(b).xreplace(sub)) for s, b in reductions]
    outputs = [(n, sp.sympify(e).xreplace(sub)) for n, e in outputs]
    Vsym = sub.get(bias.V, bias.V) if bias.V is not None else None
    prog = schedule(reductions, outputs, kinds, Vsym)
    pr = TritonPrinter(prog.kinds)
    lines = []
    for st in prog.stmts:
        src = pr.doprint(st.expr)
        if st.kind == "reduce" and st.value_kind == "elem":
            src = reduce.format(x=src, mask=mask)
        elif st.kind == "reduce":
            src = f"{V} * ({src})"
        elif st.kind == "out" and st.name in likes:  # give elementwise outputs their tile's shape
            like = likes[st.name]
            if st.expr == 0:
                src = f"tl.zeros_like({like})"
            elif st.value_kind != "elem":
                src = f"tl.zeros_like({like}) + {src}"
        lines.append(f"{st.name} = {src}")
    return lines


def triton_bias_source(bias, y: str = "y", v: str = "v", w: str = "w", V: str = "V",
                       params: dict[str, str] | None = None, mask: str = "mask",
                       reduce: str = "tl.sum(tl.where({mask}, {x}, 0.0), axis=1)[:, None]") -> TritonBias:
    """The bias's loss, gradient and VJP as Triton statements over tiles named y, v, w, params."""
    params = params or {}
    names = {bias.y: y, bias.v: v}
    if bias.V is not None:
        names[bias.V] = V
    for n, s in bias.param_symbols:
        names[s] = params.get(n, n)
    vjp = bias.vjp
    names[vjp.w] = w
    loss = _triton_block(bias, list(bias.reductions), [("loss", bias.loss)], names, V, reduce, mask, {})
    grad = _triton_block(bias, list(bias.reductions), [("g", bias.grad)], names, V, reduce, mask, {"g": y})
    reds = list(bias.reductions) + list(vjp.sums)
    outs = [("dy", vjp.dy), ("dv", vjp.dv)]
    likes = {"dy": y, "dv": v}
    for p in vjp.dparams:
        ident = params.get(p.name, p.name)  # outputs are named after the caller's names, not the spec's
        if p.shape == "channel":
            outs.append((f"d_{ident}", p.elem))
            likes[f"d_{ident}"] = ident
        else:
            tot = p.token
            if p.elem != 0:
                D = sp.Symbol(f"D_{ident}")
                reds.append((D, p.elem))
                tot = D + p.token
            outs.append((f"d_{ident}", tot))
    vj = _triton_block(bias, reds, outs, names, V, reduce, mask, likes)
    return TritonBias(loss, grad, vj, tuple(bias.params))




# ---- activations ----------------------------------------------------------------------------------

def _activation_body(expr, printer, zero_like: str) -> list[str]:
    """Statements computing expr (in the activation's z) through cse; the last one returns it.

    A constant (the identity's derivatives) is `z * 0.0 + c`, a tensor like z that keeps z's NaNs."""
    from ..symbolic.activations import z

    expr = sp.nfloat(sp.sympify(expr), n=20, exponent=False)  # numbers as floats: sqrt(2) / 2 -> 0.7071...
    if z not in expr.free_symbols:
        return [f"return {zero_like} + {printer.doprint(expr)}" if expr != 0 else f"return {zero_like}"]
    temps, (reduced,) = sp.cse([expr], symbols=sp.numbered_symbols("t"), order="none")
    # a function under an integer power is computed once (the Triton printer expands powers to products)
    names = (sp.Symbol(f"t{i}") for i in range(len(temps), 10**6))
    powered = sorted({p.base for p in reduced.atoms(sp.Pow) if isinstance(p.base, sp.Function)}, key=str)
    extra = [(next(names), f) for f in powered]
    temps += extra
    reduced = reduced.xreplace({f: t for t, f in extra})
    lines = [f"{t} = {printer.doprint(e)}" for t, e in temps]
    return [*lines, f"return {printer.doprint(reduced)}"]


def torch_activation_source(act: str, grad: bool = True) -> str:
    """`_act(z)` and (with grad) `_act_grad(z)` for the torch and reference backends' MLP memory.

    _act calls the fused torch function of the activation's table row; _act_grad is sympy's derivative
    of the row's expression, printed."""
    from ..symbolic.activations import activation, z

    a = activation(act)
    pr = TorchPrinter({z: "elem"}, ref="z")
    body = f"return {a.torch}(z)" if a.torch else "return z"
    out = ["def _act(z: torch.Tensor) -> torch.Tensor:", f'    """{a.doc}."""',
           f"    {body}"]
    if not grad:
        return "\n".join(out)
    out += ["", "", "def _act_grad(z: torch.Tensor) -> torch.Tensor:",
            f'    """d {a.name} / dz (derived by sympy from {_short(a)})."""']
    for line in _activation_body(a.d1, pr, "torch.zeros_like(z)"):
        out += _wrap_stmt(line)
    return "\n".join(out)


def _short(a) -> str:
    """The row's definition for a docstring (its name alone where sympy writes it so)."""
    from ..symbolic.activations import z

    text = str(a.expr.subs(z, sp.Symbol("z")))
    return f"{a.name}(z)" if text == f"{a.name}(z)" else f"{a.name}(z) = {text}"


def triton_activation_source(act: str) -> str:
    """Three @triton.jit functions of the activation: `_tl_act(z)`, `_tl_dact(z)` (d act / dz) and
    `_tl_d2act(z)` (d^2 act / dz^2), printed from its sympy expression and sympy's derivatives.

    Self-contained (tanh prints inline as 2 sigmoid(2z) - 1, stable for large |z|); a constant
    derivative is a tensor like z."""
    from ..symbolic.activations import activation, z

    a = activation(act)
    if a.name == "softplus":  # its stable Triton form calls TRITON_HELPERS; gates are activated in torch
        raise ValueError("softplus has no self-contained Triton form")
    pr = TritonInlinePrinter({z: "elem"})
    docs = (f"{a.doc}: {_short(a)}.", f"d {a.name} / dz.",
            f"d^2 {a.name} / dz^2: the MLP backward differentiates d {a.name} / dz again.")
    out = []
    for fname, expr, doc in zip(("_tl_act", "_tl_dact", "_tl_d2act"), (a.expr, a.d1, a.d2), docs):
        out += ["@triton.jit", f"def {fname}(z):", f'    """{doc}"""']
        for line in _activation_body(expr, pr, "z * 0.0"):
            out += _wrap_stmt(line)
        out += ["", ""]
    return "\n".join(out[:-2])


__all__ = ["TRITON_HELPERS", "TorchPrinter", "TritonBias", "TritonInlinePrinter", "TritonPrinter", "num",
           "schedule", "torch_activation_source", "torch_bias_source", "triton_activation_source",
           "triton_bias_source", "triton_expr"]
