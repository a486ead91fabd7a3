"""LayerSpec: a checked spec, the contract between the frontend and the symbolic stage.

Everything here is validated (names resolved, arities and numbers checked) and carries no sympy.
Every node keeps the `Loc` of the text it came from, so later stages can still point at the source.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union


@dataclass(frozen=True)
class Loc:
    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


NOLOC = Loc("<builtin>", 0, 0)


# ---- bias expressions (a small tree; the symbolic stage turns it into sympy) ----------------------

@dataclass(frozen=True)
class Num:
    value: float
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class Var:
    """`y` (memory output), `v` (target value) or the name of a declared parameter."""
    name: str
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class Unary:
    op: Literal["-"]
    arg: Expr
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class Binary:
    op: Literal["+", "-", "*", "/", "^"]
    lhs: Expr
    rhs: Expr
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class Call:
    """An elementwise function (catalog.FUNCTIONS) or a reduction over the value dim (catalog.REDUCTIONS)."""
    fn: str
    args: tuple[Expr, ...]
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class Compare:
    op: Literal["<", "<=", ">", ">="]
    lhs: Expr
    rhs: Expr
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class IfElse:
    cond: Compare
    then: Expr
    other: Expr
    loc: Loc = field(default=NOLOC, compare=False)


Expr = Union[Num, Var, Unary, Binary, Call, IfElse]


# ---- parameters ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """A named quantity the rule uses: a constant, a learnable scalar per head, or a data-dependent gate.

    kind "const":     value is the number.
    kind "learnable": one scalar per head, an nn.Parameter initialised so that activation(raw) == init.
    kind "gate":      per token and head (shape "head": [B,T,H]) or per value channel ("channel": [B,T,H,V]),
                      activation(low-rank projection of x); `init` is the value the gate starts near.
    kind "per_head":  a constant per head (shape "head": [H]), `expr` in the head index `head` (0 .. H-1),
                      computed for the actual head count at run time (mirasc.per_head); not learnable.
    """
    name: str
    kind: Literal["const", "learnable", "gate", "per_head"]
    value: float | None = None
    init: float | None = None
    shape: Literal["scalar", "head", "channel"] = "scalar"
    activation: str = "identity"
    rank: int = 0
    expr: Expr | None = None  # per_head only: numbers, Var("head"), - + * / ^, exp log sqrt min max
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class Ref:
    """An argument: a literal number (`value`) or the name of a declared Param (`name`)."""
    name: str | None = None
    value: float | None = None
    loc: Loc = field(default=NOLOC, compare=False)


# ---- the four Miras choices ----------------------------------------------------------------------

@dataclass(frozen=True)
class MemorySpec:
    kind: Literal["linear", "mlp"]
    depth: int = 1
    expansion: int = 1
    act: str = "gelu"
    residual: bool = False
    norm: bool = False  # LayerNorm on the MLP branch: M(x) = x + LN(W1 act(W2 x))
    init: Literal["zero", "learned"] = "zero"  # W_0 (or Z_0) of the module: zeros, or an outer-loop Parameter
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class BiasSpec:
    """A library bias (`name` with `args` in catalog order) or a user expression (`expr`, name None)."""
    name: str | None
    args: tuple[tuple[str, Ref | str], ...] = ()  # (arg name, Ref or a word choice), defaults filled in
    expr: Expr | None = None
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class RetentionTerm:
    kind: str  # catalog.RETENTIONS key, "l2" normalised to "decay"
    args: tuple[tuple[str, Ref | str], ...] = ()
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class RetentionSpec:
    """At most one decay term and at most one map term (lq, kl, elastic_net, bregman)."""
    terms: tuple[RetentionTerm, ...]
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class AlgorithmSpec:
    kind: Literal["gd", "momentum"]
    lr: Ref
    beta: Ref | None = None  # momentum only
    chunk: int = 1  # a power of two, 1..256
    at: Literal["previous", "retained"] = "previous"  # where the gradient is taken (docs/semantics.md)
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class BlockSpec:
    """The Miras block around the memory (Miras §5.4; docs/semantics.md, "The block")."""
    heads: int = 1
    key_dim: int = 64
    value_dim: int = 64
    conv: int = 4  # depthwise short-conv kernel size on q, k, v; 0 disables it
    qk_norm: bool = True  # L2-normalise q and k
    out_norm: Literal["rms", "layer", "none"] = "rms"
    out_gate: bool = True  # output gated by a linear projection of x (GSS-style)
    loc: Loc = field(default=NOLOC, compare=False)


@dataclass(frozen=True)
class LayerSpec:
    name: str  # a valid Python class name
    block: BlockSpec
    memory: MemorySpec
    params: tuple[Param, ...]
    bias: BiasSpec
    retention: RetentionSpec
    algorithm: AlgorithmSpec
    source: str = ""  # the spec text, for the content hash
    file: str = "<spec>"
    loc: Loc = field(default=NOLOC, compare=False)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)
