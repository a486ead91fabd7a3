"""Per-head constants: `param NAME = per_head(EXPR)`, EXPR in the head index `head` (0 .. H-1).

A per-head constant is a vector [H] fixed by the spec, e.g. RetNet's decay 1 - 2^(-5 - head) (Sun et al.
2023, arXiv 2307.08621). The generated module computes it for the head count it actually runs with
(q.shape[2]), in float64, so a block built with another `heads` than the spec's gets the right values.
The checker evaluates it at the spec's own heads (`values`) to refuse non-finite values with a place.

The expression language is a subset of the bias language's: numbers, `head`, unary minus, + - * / ^ and
the functions of FUNCTIONS. Nothing is ever evaluated from text: the tree is walked.
"""
from __future__ import annotations

import math

from .spec import Binary, Call, Expr, Loc, Num, Unary, Var

HEAD = "head"  # the head index's name inside per_head(...)
FUNCTIONS = {"exp": 1, "log": 1, "sqrt": 1, "min": 2, "max": 2}
# Binding strength for printing: + - loosest, then * /, unary minus, ^ (right-associative).
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "^": 4}
_UNARY = 3
_TORCH_FN = {"exp": "torch.exp", "log": "torch.log", "sqrt": "torch.sqrt"}


class PerHeadError(ValueError):
    """A per-head expression with no finite real value at some head: the message and where."""

    def __init__(self, message: str, loc: Loc) -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc


def text(expr: Expr) -> str:
    """The expression in the spec's own notation, with only the parentheses it needs."""
    return _text(expr)[0]


def _text(node: Expr) -> tuple[str, int]:
    if isinstance(node, Num):
        return _num(node.value), 5
    if isinstance(node, Var):
        return node.name, 5
    if isinstance(node, Unary):
        arg, prec = _text(node.arg)
        return "-" + (arg if prec > _UNARY else f"({arg})"), _UNARY
    if isinstance(node, Call):
        return f"{node.fn}({', '.join(_text(a)[0] for a in node.args)})", 5
    assert isinstance(node, Binary)
    prec = _PREC[node.op]
    lhs, lp = _text(node.lhs)
    rhs, rp = _text(node.rhs)
    if node.op == "^":  # right-associative: the left operand needs parentheses at equal strength
        lhs = lhs if lp > prec else f"({lhs})"
        rhs = rhs if rp >= _UNARY else f"({rhs})"
        return f"{lhs}^{rhs}", prec
    lhs = lhs if lp >= prec else f"({lhs})"
    rhs = rhs if rp > prec else f"({rhs})"  # a - (b - c), a / (b * c)
    return f"{lhs} {node.op} {rhs}", prec


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def mentions_head(node: Expr) -> bool:
    if isinstance(node, Var):
        return node.name == HEAD
    if isinstance(node, Unary):
        return mentions_head(node.arg)
    if isinstance(node, Binary):
        return mentions_head(node.lhs) or mentions_head(node.rhs)
    if isinstance(node, Call):
        return any(mentions_head(a) for a in node.args)
    return False


def evaluate(expr: Expr, head: int) -> float:
    """The value at one head in float64; PerHeadError at the node whose value is not a finite real."""
    value = _eval(expr, float(head))
    return value


def _eval(node: Expr, head: float) -> float:
    if isinstance(node, Num):
        return float(node.value)
    if isinstance(node, Var):
        return head
    if isinstance(node, Unary):
        return -_eval(node.arg, head)
    if isinstance(node, Call):
        args = [_eval(a, head) for a in node.args]
        if node.fn == "min":
            return min(args)
        if node.fn == "max":
            return max(args)
        (x,) = args
        if node.fn in ("log", "sqrt") and (x < 0 or (node.fn == "log" and x == 0)):
            raise PerHeadError(f"{node.fn} of {x:g} at head {head:g} has no finite real value", node.loc)
        try:
            value = {"exp": math.exp, "log": math.log, "sqrt": math.sqrt}[node.fn](x)
        except OverflowError:
            value = math.inf
        return _finite(value, node, head)
    assert isinstance(node, Binary)
    a, b = _eval(node.lhs, head), _eval(node.rhs, head)
    if node.op == "+":
        return _finite(a + b, node, head)
    if node.op == "-":
        return _finite(a - b, node, head)
    if node.op == "*":
        return _finite(a * b, node, head)
    if node.op == "/":
        if b == 0:
            raise PerHeadError(f"division by zero at head {head:g}", node.loc)
        return _finite(a / b, node, head)
    if a == 0 and b < 0:
        raise PerHeadError(f"0^{b:g} at head {head:g} is infinite", node.loc)
    if a < 0 and not float(b).is_integer():
        raise PerHeadError(f"{a:g}^{b:g} at head {head:g} has no real value", node.loc)
    try:
        value = a ** b
    except OverflowError:
        value = math.inf
    return _finite(value, node, head)


def _finite(value: float, node: Expr, head: float) -> float:
    if not math.isfinite(value):
        raise PerHeadError(f"the value at head {head:g} is not finite", node.loc)
    return value


def torch_source(expr: Expr, head: str = "head") -> str:
    """Python source of the expression over the float64 tensor `head` [H]; parts free of `head` are
    folded to their float64 value (the checker has evaluated them, so they are finite). Without `head`
    at all the source is one number, which the caller broadcasts to [H]."""
    return _torch(expr, head)[0]


def _torch(node: Expr, head: str) -> tuple[str, int]:
    if not mentions_head(node):
        value = _eval(node, 0.0)
        return repr(float(value)), (5 if value >= 0 else _UNARY)
    if isinstance(node, Var):
        return head, 5
    if isinstance(node, Unary):
        arg, prec = _torch(node.arg, head)
        return "-" + (arg if prec > _UNARY else f"({arg})"), _UNARY
    if isinstance(node, Call):
        if node.fn in _TORCH_FN:
            return f"{_TORCH_FN[node.fn]}({_torch(node.args[0], head)[0]})", 5
        fn = "torch.minimum" if node.fn == "min" else "torch.maximum"
        tensors = [mentions_head(a) for a in node.args]
        args = [_torch(a, head)[0] for a in node.args]
        if all(tensors):
            return f"{fn}({args[0]}, {args[1]})", 5
        tensor, number = (args[0], args[1]) if tensors[0] else (args[1], args[0])
        bound = "max" if node.fn == "min" else "min"
        return f"torch.clamp({tensor}, {bound}={number})", 5
    assert isinstance(node, Binary)
    prec = _PREC[node.op]
    lhs, lp = _torch(node.lhs, head)
    rhs, rp = _torch(node.rhs, head)
    if node.op == "^":
        lhs = lhs if lp > prec else f"({lhs})"
        rhs = rhs if rp >= _UNARY else f"({rhs})"
        return f"{lhs} ** {rhs}", prec
    lhs = lhs if lp >= prec else f"({lhs})"
    rhs = rhs if rp > prec else f"({rhs})"
    return f"{lhs} {node.op} {rhs}", prec


__all__ = ["FUNCTIONS", "HEAD", "PerHeadError", "evaluate", "mentions_head", "text", "torch_source"]
