"""The activations, defined once as sympy expressions in z.

One table row per activation: the MLP memory's hidden activations (`memory mlp(act=...)`) and the gates'
and learnables' activations (`gate g : head = softplus(...)`). Everything generated code needs follows
from the row: the first and second derivatives are sympy's (`Activation.d1`, `.d2`), printed for every
backend by mirasc.codegen.printers (`torch_activation_source`, `triton_activation_source`); the inverse
that starts a gate at its init value is a row's expression in u, checked against the forward by
tests/test_activations.py.

`torch` names the fused torch function that computes the forward (the expression itself otherwise):
generated forwards call it, the derivatives are printed from the expression. sigmoid and softplus are
mirasc's own sympy functions (mirasc.symbolic.objectives), whose derivatives stay in terms of sigmoid,
so printed derivatives do not overflow for large |z|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import sympy as sp
from sympy.codegen.cfunctions import expm1

from .objectives import sigmoid, softplus

z = sp.Symbol("z", real=True)  # the activation's argument
u = sp.Symbol("u", real=True)  # a value the activation takes (the inverse's argument)


def _almost_everywhere(expr: sp.Expr) -> sp.Expr:
    """A derivative where it exists: relu's DiracDelta (second derivative at 0) is 0."""
    return expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)


@dataclass(frozen=True)
class Activation:
    """One activation: act(z) as a sympy expression and what generated code calls for it."""

    name: str
    expr: sp.Expr  # act(z)
    doc: str  # one line for generated docstrings
    torch: str | None  # the torch function computing act (None: the identity, nothing to call)
    values: tuple[float, float] = (-math.inf, math.inf)  # the open interval act maps onto
    inverse: sp.Expr | None = None  # r(u) with act(r(u)) == u on `values` (None: not a gate activation)
    note: str = ""  # why an init at the interval's edge is refused, when that is not obvious
    hidden: bool = False  # an MLP memory's hidden activation (`memory mlp(act=...)`)

    @cached_property
    def d1(self) -> sp.Expr:
        """d act / dz."""
        return _almost_everywhere(sp.diff(self.expr, z))

    @cached_property
    def d2(self) -> sp.Expr:
        """d^2 act / dz^2 (the MLP backward differentiates d act / dz again)."""
        return _almost_everywhere(sp.diff(self.d1, z))

    def invert(self, value: float) -> float:
        """The raw value r with act(r) == value, or ValueError where act never takes value."""
        lo, hi = self.values
        if self.inverse is None:
            raise ValueError(f"{self.name} is not a gate activation")
        if not lo < value < hi:
            where = f"be > {lo:g}" if hi == math.inf else f"lie in ({lo:g}, {hi:g})"
            raise ValueError(f"{self.name} cannot start at {value}: it must {where}{self.note}")
        return float(_lambdify(self.inverse)(float(value)))


def _lambdify(expr: sp.Expr):
    return sp.lambdify(u, expr, modules="math")


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("gelu", z / 2 * (1 + sp.erf(z / sp.sqrt(2))), "GELU, the exact erf form", "F.gelu",
               hidden=True),
    Activation("silu", z * sigmoid(z), "SiLU", "F.silu", hidden=True),
    Activation("relu", sp.Max(z, 0), "ReLU", "F.relu", (0.0, math.inf), u,
               " (its gradient vanishes below)", hidden=True),
    Activation("tanh", sp.tanh(z), "The hyperbolic tangent", "torch.tanh", (-1.0, 1.0), sp.atanh(u),
               hidden=True),
    Activation("identity", z, "The identity", None, (-math.inf, math.inf), u, hidden=True),
    Activation("sigmoid", sigmoid(z), "The logistic sigmoid", "torch.sigmoid", (0.0, 1.0), sp.log(u / (1 - u))),
    # log(exp(u) - 1) computed as u + log(1 - exp(-u)), stable for large u
    Activation("softplus", softplus(z), "Softplus", "F.softplus", (0.0, math.inf), u + sp.log(-expm1(-u))),
    Activation("exp", sp.exp(z), "The exponential", "torch.exp", (0.0, math.inf), sp.log(u)),
)}


HIDDEN = tuple(n for n, a in ACTIVATIONS.items() if a.hidden)  # memory mlp(act=...)
GATES = tuple(n for n, a in ACTIVATIONS.items() if a.inverse is not None)  # gates and learnables


def activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}") from None


__all__ = ["ACTIVATIONS", "GATES", "HIDDEN", "Activation", "activation", "u", "z"]
