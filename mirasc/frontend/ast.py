"""The raw parse tree of a spec: frozen dataclasses, every node with the `Loc` of its text.

This is what the text says, before any name is resolved or any number converted: words are kept as
`Name`s and numbers as their literal text.  mirasc.frontend.check turns it into a mirasc.spec.LayerSpec.
Keeping the two apart means the checker sees every statement with its place in the text and can point
at it, while the grammar stays small and loose (which words are allowed is the checker's business).
"""
from __future__ import annotations

from dataclasses import dataclass

from mirasc.spec import Loc

# ---- leaves and expressions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Name:
    """An identifier as written: a keyword argument's value, a library name, a variable."""
    text: str
    loc: Loc


@dataclass(frozen=True)
class Number:
    """A number literal, unsigned, as written (`3`, `0.5`, `1e-6`); the checker converts it."""
    text: str
    loc: Loc


@dataclass(frozen=True)
class Neg:
    """Unary minus; `loc` is the `-`."""
    operand: Expr
    loc: Loc


@dataclass(frozen=True)
class BinOp:
    """`lhs op rhs` with op one of + - * / ^; `loc` is the operator."""
    op: str
    lhs: Expr
    rhs: Expr
    loc: Loc


@dataclass(frozen=True)
class Arg:
    """One call argument: positional (`key` None) or `key=value`."""
    key: Name | None
    value: Expr
    loc: Loc


@dataclass(frozen=True)
class Call:
    """`fn(args)`: a function in a bias expression, or a library entry with arguments; `loc` is `fn`."""
    fn: Name
    args: tuple[Arg, ...]
    loc: Loc


@dataclass(frozen=True)
class Compare:
    """`lhs op rhs` with op one of < <= > >=, the condition of an if; `loc` is the operator."""
    op: str
    lhs: Expr
    rhs: Expr
    loc: Loc


@dataclass(frozen=True)
class IfElse:
    """`if cond then a else b`; `loc` is the `if`."""
    cond: Compare
    then: Expr
    other: Expr
    loc: Loc


Expr = Name | Number | Neg | BinOp | Call | IfElse
Named = Name | Call  # a library name with or without arguments: `l2`, `lp(3)`, `mlp`


# ---- statements ----------------------------------------------------------------------------------
# Every statement keeps its keyword and the keyword's place (`loc`).


@dataclass(frozen=True)
class IntStmt:
    """`heads N`, `key_dim N`, `value_dim N`, `conv N`; `value` is a Number or Neg(Number)."""
    keyword: str
    value: Expr
    loc: Loc


@dataclass(frozen=True)
class WordStmt:
    """`qk_norm W`, `out_norm W`, `out_gate W`."""
    keyword: str
    value: Name
    loc: Loc


@dataclass(frozen=True)
class MemoryStmt:
    """`memory linear|mlp(...) [init zero|learned]`."""
    keyword: str
    kind: Named
    init: Name | None
    loc: Loc


@dataclass(frozen=True)
class ConstStmt:
    """`const NAME = NUMBER`; `value` is a Number or Neg(Number)."""
    keyword: str
    name: Name
    value: Expr
    loc: Loc


@dataclass(frozen=True)
class ParamStmt:
    """`param NAME = learnable(INIT[, ACT])`."""
    keyword: str
    name: Name
    value: Named
    loc: Loc


@dataclass(frozen=True)
class GateStmt:
    """`gate NAME : SHAPE = ACT(rank=R, init=I)`."""
    keyword: str
    name: Name
    shape: Name
    value: Named
    loc: Loc


@dataclass(frozen=True)
class BiasStmt:
    """`bias EXPR`; `start` is where the expression begins (its own `loc` may be an operator)."""
    keyword: str
    expr: Expr
    start: Loc
    loc: Loc


@dataclass(frozen=True)
class RetentionStmt:
    """`retention TERM + TERM ...`."""
    keyword: str
    terms: tuple[Named, ...]
    loc: Loc


@dataclass(frozen=True)
class AlgorithmStmt:
    """`algorithm gd(...)` or `algorithm momentum(...)`."""
    keyword: str
    value: Named
    loc: Loc


Stmt = (IntStmt | WordStmt | MemoryStmt | ConstStmt | ParamStmt | GateStmt | BiasStmt | RetentionStmt
        | AlgorithmStmt)


@dataclass(frozen=True)
class Layer:
    """`layer NAME { statements }`, the whole spec; `loc` is the `layer` keyword."""
    name: Name
    stmts: tuple[Stmt, ...]
    loc: Loc
