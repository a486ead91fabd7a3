"""AST -> mirasc.spec.LayerSpec: resolve every name, bind every argument, check every number.

This is the one place where text becomes trusted data.  Later stages put parameter names and numbers
into generated Python and Triton source, so nothing leaves this module except identifiers that match
`[A-Za-z_][A-Za-z0-9_]*` and are not reserved (Python keywords and builtins, `_`-prefixed names, the
names generated code uses), numbers converted with float()/int(), and words chosen from fixed tables.
Nothing is ever evaluated.

Each rule that a spec can break raises a SpecError at the place in the text that breaks it.  The rules
and their reasons are listed in docs/language.md.
"""
from __future__ import annotations

import builtins
import keyword
import math
import re
from dataclasses import dataclass
from typing import NoReturn

from mirasc import catalog, per_head
from mirasc.catalog import Arg, Entry
from mirasc.spec import (
    AlgorithmSpec,
    BiasSpec,
    Binary,
    BlockSpec,
    Call,
    Compare,
    IfElse,
    LayerSpec,
    Loc,
    MemorySpec,
    Num,
    Param,
    Ref,
    RetentionSpec,
    RetentionTerm,
    Unary,
    Var,
)
from mirasc.spec import Expr as SpecExpr

from . import ast
from .errors import SpecError

_ARITHMETIC = frozenset({"+", "-", "*", "/"})
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Names the generated module uses itself (arguments, locals, imports) or that the spec language owns.
GENERATED_NAMES = frozenset({
    "y", "v", "q", "k", "o", "x", "self", "torch", "nn", "F", "math", "triton", "tl", "state",
    "initial_state", "output_final_state", "chunk_size", "backend", "cu_seqlens",
})
# Module-level names of the generated module: the layer's class sits beside them, so a layer may not
# take one (tests/test_names.py keeps this list complete).
MODULE_NAMES = frozenset({
    "memory", "step", "decode_state", "DecodeState", "LayerState", "State", "bias_loss", "bias_grad",
    "bias_grad_vjp", "HEADS", "KEY_DIM", "VALUE_DIM", "CHUNK_SIZE", "DEPTH", "EXPANSION", "TRITON_KERNELS",
    "TRITON_REASON", "NamedTuple",
    "annotations", "pairwise", "os", "uuid", "math",
})
# Long enough for any real name; the layer's name can become the generated file's name.
MAX_NAME = 64
RESERVED = (frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins))
            | GENERATED_NAMES | catalog.RESERVED)

# Statements that may appear once (const, param and gate declare names and may repeat).
REQUIRED = ("memory", "bias", "retention", "algorithm")
_BOOLS = {"true": True, "false": False}

# Argument tables of the entries that are not in the catalog (they are not Miras choices).
MLP = Entry("mlp", (
    Arg("depth", 2, number_only=True),
    Arg("expansion", 4, number_only=True),
    Arg("act", "gelu", choices=catalog.ACTIVATIONS),
    Arg("residual", "true", choices=("true", "false")),
    Arg("norm", "true", choices=("true", "false")),
), "M(x) = [x +] [LN](W_L act(... act(W_1 x)))")
LEARNABLE = Entry("learnable", (
    Arg("init", None, number_only=True),
    Arg("act", "identity", choices=catalog.GATE_ACTIVATIONS),
), "one scalar per head, act(raw) starts at init")
GATE_ARGS = (Arg("rank", 32, number_only=True), Arg("init", None, number_only=True))

# Open intervals an activation maps onto: a gate's or learnable's `init` must lie inside, because the
# raw parameter is initialised to the activation's inverse at `init`.
ACTIVATION_RANGE = {
    "sigmoid": (0.0, 1.0), "softplus": (0.0, math.inf), "exp": (0.0, math.inf), "tanh": (-1.0, 1.0),
    "relu": (0.0, math.inf), "identity": (-math.inf, math.inf),
}
MAX_SIZE = 65536  # a sanity cap on heads, dims and ranks: beyond it a typo, not a model
MAP_TERMS = ("lq", "kl", "elastic_net", "bregman")
NORM_THRESHOLD_BIASES = ("huber_norm", "huber_mix", "robust")
MAX_PER_HEAD = 200  # nodes of a per_head(...) expression


@dataclass(frozen=True)
class Bound:
    """An argument after binding: a Ref (number or parameter) or a word, and where it was written."""
    value: Ref | str
    loc: Loc
    given: bool  # False when the catalog default was used


def check(layer: ast.Layer, source: str, file: str = "<spec>") -> LayerSpec:
    """Check a parsed spec and resolve it into a LayerSpec; raises SpecError on the first problem."""
    return _Checker(source).run(layer, file)


def _join(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(names)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class _Checker:
    """One pass over one layer: declarations first (statements may come in any order), then uses."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.params: dict[str, Param] = {}
        self.used: set[str] = set()
        self.heads = 1  # the spec's head count: per_head(...) constants are checked at these heads

    def fail(self, loc: Loc, message: str) -> NoReturn:
        raise SpecError.at(loc, message, self.source)

    # ---- the layer ------------------------------------------------------------------------------

    def run(self, layer: ast.Layer, file: str) -> LayerSpec:
        self.identifier(layer.name, "layer name")
        single: dict[str, ast.Stmt] = {}
        decls: list[ast.ConstStmt | ast.ParamStmt | ast.GateStmt] = []
        for stmt in layer.stmts:
            if isinstance(stmt, (ast.ConstStmt, ast.ParamStmt, ast.GateStmt)):
                decls.append(stmt)
            elif stmt.keyword in single:
                first = single[stmt.keyword].loc
                self.fail(stmt.loc, f"duplicate '{stmt.keyword}' statement (first at line {first.line})")
            else:
                single[stmt.keyword] = stmt

        block = self.block(single, layer)
        memory = self.memory(single.get("memory"), block)
        self.heads = block.heads
        for decl in decls:
            self.declare(decl)
        bias = self.bias(single.get("bias"))
        retention = self.retention(single.get("retention"), memory)
        algorithm = self.algorithm(single.get("algorithm"), memory)
        if retention is not None and algorithm is not None:
            self.lq_norm_at(retention, algorithm)
        for keyword_ in REQUIRED:
            if keyword_ not in single:
                self.fail(layer.name.loc, f"layer '{layer.name.text}' has no '{keyword_}' statement "
                                          f"(memory, bias, retention and algorithm are required)")
        for decl in decls:
            if decl.name.text not in self.used:
                what = {"const": "constant", "param": "parameter", "gate": "gate"}[decl.keyword]
                self.fail(decl.name.loc, f"{what} '{decl.name.text}' is declared but not used")
        assert bias is not None and retention is not None and algorithm is not None and memory
        return LayerSpec(name=layer.name.text, block=block, memory=memory, params=tuple(self.params.values()),
                         bias=bias, retention=retention, algorithm=algorithm, source=self.source, file=file,
                         loc=layer.name.loc)

    def identifier(self, name: ast.Name, what: str) -> str:
        """A name that may become a Python identifier in generated code, or an error saying why not."""
        text = name.text
        if not IDENTIFIER.fullmatch(text) or not text.isascii():
            self.fail(name.loc, f"{what} '{text}' is not a valid identifier")
        if text.startswith("_"):
            self.fail(name.loc, f"{what} '{text}': names starting with '_' are reserved")
        if len(text) > MAX_NAME:
            self.fail(name.loc, f"{what} '{text[:20]}...' is {len(text)} characters long; "
                                f"names have at most {MAX_NAME}")
        if what == "layer name" and text in MODULE_NAMES:
            self.fail(name.loc, f"layer name '{text}' is reserved (the generated module defines it); "
                                f"choose another name")
        if text in RESERVED:
            if keyword.iskeyword(text) or keyword.issoftkeyword(text):
                why = "a Python keyword"
            elif text in catalog.RESERVED:
                why = "a name of the bias language"
            elif text in GENERATED_NAMES:
                why = "used by the generated code"
            else:
                why = "a Python builtin"
            self.fail(name.loc, f"{what} '{text}' is reserved ({why}); choose another name")
        return text

    # ---- numbers --------------------------------------------------------------------------------

    def literal(self, expr: ast.Expr) -> float | None:
        """The value of a number literal or a negated one, None for anything else."""
        if isinstance(expr, ast.Number):
            value = float(expr.text)  # the grammar admits only decimal literals
            if not math.isfinite(value):
                self.fail(expr.loc, f"number {expr.text} is too large")
            return value
        if isinstance(expr, ast.Neg) and isinstance(expr.operand, ast.Number):
            value = self.literal(expr.operand)
            return None if value is None else -value
        return None

    def integer(self, value: float, loc: Loc, what: str, lo: int, hi: int | None = None) -> int:
        """`value` as an int in [lo, hi], or an error naming `what`."""
        if not value.is_integer():
            self.fail(loc, f"{what} must be a whole number, not {value:g}")
        if value < lo or (hi is not None and value > hi):
            bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            self.fail(loc, f"{what} must be {bound}, not {int(value)}")
        return int(value)

    # ---- block options --------------------------------------------------------------------------

    def block(self, single: dict[str, ast.Stmt], layer: ast.Layer) -> BlockSpec:
        defaults = BlockSpec()
        values: dict[str, object] = {}
        limits = {"heads": (1, MAX_SIZE), "key_dim": (1, MAX_SIZE), "value_dim": (1, MAX_SIZE), "conv": (0, 16)}
        for kw, (lo, hi) in limits.items():
            stmt = single.get(kw)
            if isinstance(stmt, ast.IntStmt):
                value = self.literal(stmt.value)
                assert value is not None  # the grammar takes only a (signed) number here
                values[kw] = self.integer(value, stmt.value.loc, kw, lo, hi)
        words = {"qk_norm": {"l2": True, "none": False},
                 "out_norm": {n: n for n in catalog.NORMS},
                 "out_gate": _BOOLS}
        for kw, table in words.items():
            stmt = single.get(kw)
            if isinstance(stmt, ast.WordStmt):
                values[kw] = self.word(stmt.value, table, kw)
        return BlockSpec(
            heads=values.get("heads", defaults.heads), key_dim=values.get("key_dim", defaults.key_dim),
            value_dim=values.get("value_dim", defaults.value_dim), conv=values.get("conv", defaults.conv),
            qk_norm=values.get("qk_norm", defaults.qk_norm), out_norm=values.get("out_norm", defaults.out_norm),
            out_gate=values.get("out_gate", defaults.out_gate), loc=layer.name.loc)

    def word(self, name: ast.Name, table: dict[str, object], what: str) -> object:
        if name.text not in table:
            self.fail(name.loc, f"unknown {what} '{name.text}'; expected one of: {_join(list(table))}")
        return table[name.text]

    # ---- memory ---------------------------------------------------------------------------------

    def memory(self, stmt: ast.Stmt | None, block: BlockSpec) -> MemorySpec | None:
        if not isinstance(stmt, ast.MemoryStmt):
            return None
        kind = stmt.kind
        fn = kind.fn if isinstance(kind, ast.Call) else kind
        init = "zero"
        if stmt.init is not None:
            init = str(self.word(stmt.init, {"zero": "zero", "learned": "learned"}, "memory init"))
        if fn.text == "linear":
            if isinstance(kind, ast.Call) and kind.args:
                self.fail(kind.args[0].loc, "memory linear takes no arguments")
            return MemorySpec(kind="linear", init=init, loc=fn.loc)  # type: ignore[arg-type]
        if fn.text != "mlp":
            self.fail(fn.loc, f"unknown memory '{fn.text}'; expected one of: linear, mlp")
        if stmt.init is None:
            init = "learned"  # an MLP memory starts from outer-loop weights (a zero MLP cannot learn)
        elif init == "zero":
            self.fail(stmt.init.loc, "an MLP memory has no useful zero state (its gradients vanish); "
                                     "use init learned")
        args = self.bind(kind, MLP, "mlp")
        depth = self.integer(self.number(args["depth"]), args["depth"].loc, "mlp depth", 1, 4)
        expansion = self.integer(self.number(args["expansion"]), args["expansion"].loc, "mlp expansion", 1, 8)
        residual = _BOOLS[str(args["residual"].value)]
        if residual and block.key_dim != block.value_dim:
            self.fail(args["residual"].loc, f"mlp residual=true adds the input to the output, so it needs "
                                            f"key_dim == value_dim (got {block.key_dim} and {block.value_dim})")
        return MemorySpec(kind="mlp", depth=depth, expansion=expansion, act=str(args["act"].value),
                          residual=residual, norm=_BOOLS[str(args["norm"].value)],
                          init=init, loc=fn.loc)  # type: ignore[arg-type]

    # ---- declarations ---------------------------------------------------------------------------

    def declare(self, decl: ast.ConstStmt | ast.ParamStmt | ast.GateStmt) -> None:
        what = {"const": "constant", "param": "parameter", "gate": "gate"}[decl.keyword]
        name = self.identifier(decl.name, f"{what} name")
        if name in self.params:
            first = self.params[name].loc
            self.fail(decl.name.loc, f"'{name}' is already declared (at line {first.line})")
        loc = decl.name.loc
        if isinstance(decl, ast.ConstStmt):
            value = self.literal(decl.value)
            assert value is not None  # the grammar takes only a (signed) number here
            param = Param(name, "const", value=value, loc=loc)
        elif isinstance(decl, ast.ParamStmt):
            fn = decl.value.fn if isinstance(decl.value, ast.Call) else decl.value
            if fn.text == "per_head":
                self.params[name] = self.per_head(decl.value, name, loc)
                return
            if fn.text != "learnable":
                self.fail(fn.loc, f"a param is learnable(INIT[, ACTIVATION]) or "
                                  f"per_head(EXPRESSION IN head), not '{fn.text}'")
            args = self.bind(decl.value, LEARNABLE, "learnable")
            act = str(args["act"].value)
            init = self.init(args["init"], act)
            param = Param(name, "learnable", init=init, shape="head", activation=act, loc=loc)
        else:
            shape = str(self.word(decl.shape, {"head": "head", "channel": "channel"}, "gate shape"))
            fn = decl.value.fn if isinstance(decl.value, ast.Call) else decl.value
            if fn.text not in catalog.GATE_ACTIVATIONS:
                self.fail(fn.loc, f"unknown gate activation '{fn.text}'; expected one of: "
                                  f"{_join(catalog.GATE_ACTIVATIONS)}")
            args = self.bind(decl.value, Entry(fn.text, GATE_ARGS, ""), fn.text)
            rank = self.integer(self.number(args["rank"]), args["rank"].loc, "gate rank", 1, MAX_SIZE)
            init = self.init(args["init"], fn.text)
            param = Param(name, "gate", init=init, shape=shape, activation=fn.text, rank=rank,  # type: ignore[arg-type]
                          loc=loc)
        self.params[name] = param

    def per_head(self, named: ast.Named, name: str, loc: Loc) -> Param:
        """`per_head(EXPR)`: a constant vector [H], EXPR in the head index `head` (mirasc.per_head)."""
        if not isinstance(named, ast.Call) or len(named.args) != 1:
            got = 0 if not isinstance(named, ast.Call) else len(named.args)
            self.fail(named.loc, f"per_head takes one expression in the head index 'head', got {got} "
                                 f"arguments (e.g. per_head(1 - 2^(-5 - head)))")
        (arg,) = named.args
        if arg.key is not None:
            self.fail(arg.key.loc, f"per_head takes one positional expression, not '{arg.key.text}='")
        count, stack = 0, [arg.value]
        while stack:  # a size cap first: the walks below recurse
            node = stack.pop()
            count += 1
            if count > MAX_PER_HEAD:
                self.fail(arg.loc, f"per_head '{name}' is too long (more than {MAX_PER_HEAD} numbers, "
                                   f"names and operations)")
            if isinstance(node, ast.Neg):
                stack.append(node.operand)
            elif isinstance(node, ast.BinOp):
                stack += [node.lhs, node.rhs]
            elif isinstance(node, ast.Call):
                stack += [a.value for a in node.args]
        tree = self.per_head_expr(arg.value)
        for h in range(self.heads):
            try:
                per_head.evaluate(tree, h)
            except per_head.PerHeadError as err:
                self.fail(err.loc, f"per_head '{name}': {err.message} (the spec has {self.heads} heads)")
        return Param(name, "per_head", shape="head", expr=tree, loc=loc)

    def per_head_expr(self, node: ast.Expr) -> SpecExpr:
        """A per_head(...) expression as a mirasc.spec expression: numbers, `head`, - + * / ^ and the
        functions of mirasc.per_head.FUNCTIONS, nothing else."""
        allowed = f"numbers, 'head', + - * / ^ and {_join(list(per_head.FUNCTIONS))}"
        if isinstance(node, ast.Number):
            value = self.literal(node)
            assert value is not None
            return Num(value, node.loc)
        if isinstance(node, ast.Name):
            if node.text != per_head.HEAD:
                what = ("the parameter" if node.text in self.params else
                        "the memory's" if node.text in ("y", "v") else "the name")
                self.fail(node.loc, f"per_head(...) cannot use {what} '{node.text}': it is a constant per "
                                    f"head, an expression in {allowed}")
            return Var(per_head.HEAD, node.loc)
        if isinstance(node, ast.Neg):
            return Unary("-", self.per_head_expr(node.operand), node.loc)
        if isinstance(node, ast.BinOp):
            lhs, rhs = self.per_head_expr(node.lhs), self.per_head_expr(node.rhs)
            return Binary(node.op, lhs, rhs, node.loc)  # type: ignore[arg-type]
        if isinstance(node, ast.Call):
            fn = node.fn.text
            if fn not in per_head.FUNCTIONS:
                self.fail(node.fn.loc, f"unknown function '{fn}' in per_head(...); expected one of: "
                                       f"{_join(list(per_head.FUNCTIONS))}")
            for a in node.args:
                if a.key is not None:
                    self.fail(a.key.loc, f"{fn} takes positional arguments only (got '{a.key.text}=')")
            arity = per_head.FUNCTIONS[fn]
            if len(node.args) != arity:
                self.fail(node.fn.loc, f"{fn} takes {_plural(arity, 'argument')}, got {len(node.args)}")
            return Call(fn, tuple(self.per_head_expr(a.value) for a in node.args), node.loc)
        self.fail(node.loc, f"per_head(...) has no if/else: it is an expression in {allowed}")

    def per_head_values(self, bound: Bound) -> tuple[float, ...] | None:
        """The values of a per_head constant argument at the spec's heads, None for anything else."""
        ref = bound.value
        param = self.params.get(ref.name) if isinstance(ref, Ref) and ref.name else None
        if param is None or param.kind != "per_head" or param.expr is None:
            return None
        return tuple(per_head.evaluate(param.expr, h) for h in range(self.heads))

    def per_head_range(self, bound: Bound, what: str, ok, rule: str) -> None:
        """Range rules of an operand (decay alpha, lr, momentum beta) applied to a per-head constant."""
        values = self.per_head_values(bound)
        for h, value in enumerate(values or ()):
            if not ok(value):
                self.fail(bound.loc, f"{what} {rule}, not {value:g} "
                                     f"(per_head '{bound.value.name}' at head {h})")

    def init(self, bound: Bound, act: str) -> float:
        """An init value the activation can reach (the raw parameter starts at its inverse)."""
        value = self.number(bound)
        lo, hi = ACTIVATION_RANGE[act]
        if not lo < value < hi:
            self.fail(bound.loc, f"init {value:g} is outside the range of {act}, "
                                 f"({lo:g}, {hi:g}); the raw parameter starts at {act}^-1(init)")
        return value

    # ---- argument binding -----------------------------------------------------------------------

    def bind(self, named: ast.Named, entry: Entry, what: str) -> dict[str, Bound]:
        """Bind positional and keyword arguments to the entry's arguments, filling in defaults."""
        call_loc = named.loc
        args = named.args if isinstance(named, ast.Call) else ()
        names = tuple(a.name for a in entry.args)
        given: dict[str, tuple[ast.Arg, Arg]] = {}
        seen_keyword = False
        for i, arg in enumerate(args):
            if arg.key is None:
                if seen_keyword:
                    self.fail(arg.loc, f"positional argument after a keyword argument in {what}(...)")
                if i >= len(entry.args):
                    takes = ("takes no arguments" if not names else
                             f"takes at most {_plural(len(names), 'argument')} ({_join(names)})")
                    self.fail(arg.loc, f"too many arguments: {what} {takes}")
                spec = entry.args[i]
            else:
                seen_keyword = True
                if arg.key.text not in names:
                    expected = f"expected one of: {_join(names)}" if names else "it takes no arguments"
                    self.fail(arg.key.loc, f"unknown argument '{arg.key.text}' for {what}; {expected}")
                spec = entry.args[names.index(arg.key.text)]
            if spec.name in given:
                self.fail(arg.loc, f"argument '{spec.name}' of {what} is given twice")
            given[spec.name] = (arg, spec)
        bound: dict[str, Bound] = {}
        for spec in entry.args:
            if spec.name in given:
                arg, _ = given[spec.name]
                bound[spec.name] = Bound(self.argument(arg.value, spec, what), arg.value.loc, True)
            elif spec.default is None:
                self.fail(call_loc, f"{what} needs the argument '{spec.name}' "
                                    f"({what}({_join(names)}))")
            elif isinstance(spec.default, str):
                bound[spec.name] = Bound(spec.default, call_loc, False)
            else:
                bound[spec.name] = Bound(Ref(value=float(spec.default), loc=call_loc), call_loc, False)
        return bound

    def argument(self, expr: ast.Expr, spec: Arg, what: str) -> Ref | str:
        """One argument value: a word from `choices`, a literal number, or a declared parameter."""
        if spec.choices:
            if not isinstance(expr, ast.Name) or expr.text not in spec.choices:
                options = "true or false" if spec.choices == ("true", "false") else \
                    f"one of: {_join(spec.choices)}"
                self.fail(expr.loc, f"argument '{spec.name}' of {what} must be {options}")
            return expr.text
        value = self.literal(expr)
        if value is not None:
            return Ref(value=value, loc=expr.loc)
        if spec.number_only:
            if isinstance(expr, ast.Name):
                const = self.params.get(expr.text)
                got = (f"the constant '{expr.text}' (write its value here)" if const and const.kind == "const"
                       else f"the parameter '{expr.text}'")
            else:
                got = "an expression"
            self.fail(expr.loc, f"argument '{spec.name}' of {what} must be a literal number (it fixes the "
                                f"shape of the derivation), not {got}")
        if not isinstance(expr, ast.Name):
            self.fail(expr.loc, f"argument '{spec.name}' of {what} must be a number or a parameter name")
        return Ref(name=self.use(expr), loc=expr.loc)

    def use(self, name: ast.Name) -> str:
        """A reference to a declared parameter; records it as used."""
        if name.text not in self.params:
            declared = _join(list(self.params)) if self.params else "none"
            self.fail(name.loc, f"unknown parameter '{name.text}' (declared: {declared})")
        self.used.add(name.text)
        return name.text

    def number(self, bound: Bound) -> float:
        """The value of a number_only argument (bind guarantees a literal)."""
        assert isinstance(bound.value, Ref) and bound.value.value is not None
        return bound.value.value

    def value_of(self, bound: Bound) -> float | None:
        """The compile-time value of an argument: a literal or a const; None for learnables and gates."""
        ref = bound.value
        if not isinstance(ref, Ref):
            return None
        if ref.value is not None:
            return ref.value
        param = self.params[ref.name] if ref.name else None
        return param.value if param is not None and param.kind == "const" else None

    def channel_gate(self, bound: Bound) -> Param | None:
        ref = bound.value
        if isinstance(ref, Ref) and ref.name is not None:
            param = self.params[ref.name]
            if param.kind == "gate" and param.shape == "channel":
                return param
        return None

    def in_range(self, bound: Bound, what: str, ok: bool, rule: str) -> None:
        if not ok:
            value = self.value_of(bound)
            self.fail(bound.loc, f"{what} {rule}, not {value:g}")

    # ---- bias -----------------------------------------------------------------------------------

    def bias(self, stmt: ast.Stmt | None) -> BiasSpec | None:
        if not isinstance(stmt, ast.BiasStmt):
            return None
        expr = stmt.expr
        head = expr.fn if isinstance(expr, ast.Call) else expr
        if isinstance(head, ast.Name) and head.text in catalog.BIASES:
            return self.library_bias(expr, head)  # type: ignore[arg-type]
        if isinstance(head, ast.Name) and not (head.text in ("y", "v") or head.text in self.params
                                               or head.text in catalog.FUNCTIONS
                                               or head.text in catalog.REDUCTIONS):
            self.fail(head.loc, f"unknown bias '{head.text}'; expected one of: {_join(list(catalog.BIASES))}"
                                f" (or an expression in y and v)")
        tree = self.expr(expr)
        if not _mentions(tree, "y"):
            self.fail(stmt.start, "the bias does not depend on y, so its gradient is zero and the memory "
                                  "never learns")
        self.scalar(tree, inside=False)
        self.smooth(tree, in_condition=False)
        self.derivable(tree, stmt.start)
        return BiasSpec(name=None, expr=tree, loc=stmt.start)

    def derivable(self, tree: SpecExpr, start: Loc) -> None:
        """The bias as sympy (no derivatives yet): what cancels there, e.g. sum(y - y), no longer depends
        on y, and the derivation would refuse it; refuse it here so that every checked spec compiles."""
        from mirasc.symbolic.objectives import DeriveError, make_symbols, user_bias

        try:
            user_bias(tree, make_symbols(tuple(self.params.values())), start)
        except DeriveError as err:
            loc = err.loc if err.loc.line > 0 else start
            message = err.message
            if "does not depend on y" in message:
                message = ("the bias does not depend on y once simplified (its terms in y cancel), so its "
                           "gradient is zero and the memory never learns")
            self.fail(loc, message)

    def library_bias(self, named: ast.Named, head: ast.Name) -> BiasSpec:
        entry = catalog.BIASES[head.text]
        args = self.bind(named, entry, head.text)
        for name, bound in args.items():
            value = self.value_of(bound)
            if name == "eps":
                self.in_range(bound, f"{head.text} eps", value is not None and value > 0, "must be > 0")
            elif name == "p":
                self.in_range(bound, "lp p", value is not None and value >= 1, "must be >= 1")
            elif name in ("delta", "Delta") and value is not None:
                rule = "must be > 0" if name == "delta" else "must be >= 0"
                self.in_range(bound, f"{head.text} {name}", value > 0 if name == "delta" else value >= 0, rule)
            if name in ("delta", "Delta") and head.text in NORM_THRESHOLD_BIASES:
                gate = self.channel_gate(bound)
                if gate is not None:
                    self.fail(bound.loc, f"{head.text} tests a norm, its threshold must be a scalar: "
                                         f"gate '{gate.name}' is per channel")
        return BiasSpec(name=head.text, args=tuple((n, b.value) for n, b in args.items()), loc=head.loc)

    def expr(self, node: ast.Expr) -> SpecExpr:
        """An AST expression as a mirasc.spec expression, every name and call resolved."""
        if isinstance(node, ast.Number):
            value = self.literal(node)
            assert value is not None
            return Num(value, node.loc)
        if isinstance(node, ast.Name):
            if node.text in ("y", "v"):
                return Var(node.text, node.loc)
            if node.text in self.params:
                return Var(self.use(node), node.loc)
            if node.text in catalog.BIASES:
                self.fail(node.loc, f"'{node.text}' is a library bias; it cannot be part of an expression "
                                    f"(write its formula out, e.g. sum((y - v)^2) / 2 for l2)")
            if node.text in catalog.FUNCTIONS or node.text in catalog.REDUCTIONS:
                self.fail(node.loc, f"'{node.text}' is a function; call it as {node.text}(...)")
            declared = _join(list(self.params)) if self.params else "none declared"
            self.fail(node.loc, f"unknown name '{node.text}' in the bias; expected y, v or a declared "
                                f"parameter ({declared})")
        if isinstance(node, ast.Neg):
            return Unary("-", self.expr(node.operand), node.loc)
        if isinstance(node, ast.BinOp) and node.op in _ARITHMETIC:
            # a left-associated chain, walked in a loop: its length costs no recursion (parse.MAX_DEPTH)
            links = []
            while isinstance(node, ast.BinOp) and node.op in _ARITHMETIC:
                links.append(node)
                node = node.lhs
            built = self.expr(node)
            for link in reversed(links):
                rhs = self.expr(link.rhs)
                if link.op == "/" and isinstance(rhs, Num) and rhs.value == 0:
                    self.fail(link.rhs.loc, "division by zero")
                built = Binary(link.op, built, rhs, link.loc)  # type: ignore[arg-type]
            return built
        if isinstance(node, ast.BinOp):  # ^
            return Binary(node.op, self.expr(node.lhs), self.expr(node.rhs), node.loc)  # type: ignore[arg-type]
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.IfElse):
            cond = node.cond
            compare = Compare(cond.op, self.expr(cond.lhs), self.expr(cond.rhs), cond.loc)  # type: ignore[arg-type]
            return IfElse(compare, self.expr(node.then), self.expr(node.other), node.loc)
        raise AssertionError(f"unknown expression node {node!r}")

    def call(self, node: ast.Call) -> Call:
        fn = node.fn.text
        for arg in node.args:
            if arg.key is not None:
                self.fail(arg.key.loc, f"functions of the bias language take positional arguments only "
                                       f"({fn}(...) got '{arg.key.text}=')")
        if fn in catalog.FUNCTIONS:
            arity = catalog.FUNCTIONS[fn]
        elif fn in catalog.REDUCTIONS:
            arity = 1
        elif fn in catalog.BIASES:
            self.fail(node.fn.loc, f"'{fn}' is a library bias; it cannot be part of an expression")
        else:
            names = list(catalog.FUNCTIONS) + list(catalog.REDUCTIONS)
            self.fail(node.fn.loc, f"unknown function '{fn}'; expected one of: {_join(names)}")
        if len(node.args) != arity:
            self.fail(node.fn.loc, f"{fn} takes {_plural(arity, 'argument')}, got {len(node.args)}")
        return Call(fn, tuple(self.expr(a.value) for a in node.args), node.loc)

    def scalar(self, root: SpecExpr | Compare, inside: bool) -> None:
        """Every y, v and per-channel gate must sit inside a reduction: the loss is one number.

        Reductions do not nest: a reduction's body is elementwise (docs/language.md, "Bias expressions").
        """
        stack: list[tuple[SpecExpr | Compare, Call | None]] = [(root, None)]
        while stack:
            node, reduction = stack.pop()
            if isinstance(node, Var) and reduction is None and not inside:
                if node.name in ("y", "v"):
                    self.fail(node.loc, f"the bias must be a scalar: wrap elementwise terms in sum(...) or "
                                        f"mean(...) ('{node.name}' is a vector over the value dimension)")
                param = self.params.get(node.name)
                if param is not None and param.shape == "channel":
                    self.fail(node.loc, f"the bias must be a scalar: wrap elementwise terms in sum(...) or "
                                        f"mean(...) (gate '{node.name}' is per channel)")
            if isinstance(node, Call) and node.fn in catalog.REDUCTIONS:
                if reduction is not None:
                    self.fail(node.loc, f"reductions do not nest: '{node.fn}' is inside '{reduction.fn}' "
                                        f"(line {reduction.loc.line}, column {reduction.loc.col}); "
                                        f"a reduction's body is elementwise")
                reduction = node
            stack.extend((child, reduction) for child in reversed(_children(node)))

    def smooth(self, root: SpecExpr | Compare, in_condition: bool) -> None:
        """No sign() of a y-dependent value outside an if-condition: its gradient is zero."""
        stack: list[tuple[SpecExpr | Compare, bool]] = [(root, in_condition)]
        while stack:
            node, cond = stack.pop()
            if isinstance(node, Call) and node.fn == "sign" and not cond and _mentions(node, "y"):
                self.fail(node.loc, "sign has zero gradient almost everywhere; use smooth_sign")
            if isinstance(node, IfElse):
                stack.extend([(node.other, cond), (node.then, cond), (node.cond, True)])
            else:
                stack.extend((child, cond) for child in reversed(_children(node)))

    # ---- retention ------------------------------------------------------------------------------

    def retention(self, stmt: ast.Stmt | None, memory: MemorySpec | None) -> RetentionSpec | None:
        if not isinstance(stmt, ast.RetentionStmt):
            return None
        terms: list[RetentionTerm] = []
        decay_at: ast.Name | None = None
        map_at: ast.Name | None = None
        for named in stmt.terms:
            fn = named.fn if isinstance(named, ast.Call) else named
            if fn.text not in catalog.RETENTIONS:
                self.fail(fn.loc, f"unknown retention '{fn.text}'; expected one of: "
                                  f"{_join(list(catalog.RETENTIONS))}")
            if fn.text == "none" and len(stmt.terms) > 1:
                self.fail(fn.loc, "retention 'none' cannot be combined with other terms")
            args = self.bind(named, catalog.RETENTIONS[fn.text], fn.text)
            kind = "decay" if fn.text == "l2" else fn.text
            if kind == "decay":
                if decay_at is not None:
                    self.fail(fn.loc, f"a retention has at most one decay term (decay or l2); "
                                      f"'{decay_at.text}' at line {decay_at.loc.line} is one already")
                decay_at = fn
            if kind in MAP_TERMS:
                if map_at is not None:
                    self.fail(fn.loc, f"a retention has at most one of {_join(MAP_TERMS)}; '{fn.text}' "
                                      f"conflicts with '{map_at.text}'")
                map_at = fn
            self.retention_args(kind, args, memory)
            terms.append(RetentionTerm(kind, tuple((n, b.value) for n, b in args.items()), fn.loc))
        return RetentionSpec(tuple(terms), stmt.loc)

    def retention_args(self, kind: str, args: dict[str, Bound], memory: MemorySpec | None) -> None:
        for name, bound in args.items():
            value = self.value_of(bound)
            if name == "eps":
                self.in_range(bound, f"{kind} eps", value is not None and value > 0, "must be > 0")
            elif name == "q":
                self.in_range(bound, "lq q", value is not None and value > 1, "must be > 1")
            elif name == "scale":
                self.in_range(bound, "kl scale", value is not None and value > 0, "must be > 0")
            elif name == "alpha" and value is not None:
                self.in_range(bound, "decay alpha", 0 < value <= 1, "must be in (0, 1]")
            elif name == "alpha":
                self.per_head_range(bound, "decay alpha", lambda x: 0 < x <= 1, "must be in (0, 1]")
            elif name == "gamma" and value is not None:
                self.in_range(bound, "elastic_net gamma", value >= 0, "must be >= 0")
            if name in ("alpha", "gamma"):
                self.per_channel(bound, memory, f"{kind} {name}")

    def lq_norm_at(self, retention: RetentionSpec, algorithm: AlgorithmSpec) -> None:
        """lq(norm=chunk) reads through the norm of the chunk's base state Z_b; at=retained with a decay,
        step() carries the base already decayed (a_i Z_b), from which that norm cannot be recovered."""
        if algorithm.at != "retained" or not any(t.kind == "decay" for t in retention.terms):
            return
        for term in retention.terms:
            if term.kind == "lq" and dict(term.args).get("norm") == "chunk":
                self.fail(term.loc, "lq(norm=chunk) cannot be combined with a decay and at=retained (decoding "
                                    "cannot recover the chunk's base norm); write lq(..., norm=token)")

    def per_channel(self, bound: Bound, memory: MemorySpec | None, what: str) -> None:
        gate = self.channel_gate(bound)
        if gate is not None and memory is not None and memory.kind != "linear":
            self.fail(bound.loc, f"per-channel retention needs a linear memory: gate '{gate.name}' "
                                 f"({what}) is per channel and the memory is an mlp")

    # ---- algorithm ------------------------------------------------------------------------------

    def algorithm(self, stmt: ast.Stmt | None, memory: MemorySpec | None) -> AlgorithmSpec | None:
        if not isinstance(stmt, ast.AlgorithmStmt):
            return None
        named = stmt.value
        fn = named.fn if isinstance(named, ast.Call) else named
        if fn.text not in catalog.ALGORITHMS:
            self.fail(fn.loc, f"unknown algorithm '{fn.text}'; expected one of: {_join(list(catalog.ALGORITHMS))}")
        args = self.bind(named, catalog.ALGORITHMS[fn.text], fn.text)
        chunk_bound = args["chunk"]
        chunk = self.number(chunk_bound)
        if not chunk.is_integer() or chunk < 1 or int(chunk) & (int(chunk) - 1):
            self.fail(chunk_bound.loc, f"chunk size must be a power of two (1, 2, 4, ..., 256), not {chunk:g}")
        if chunk > 256:
            self.fail(chunk_bound.loc, f"chunk size must be a power of two between 1 and 256, not {chunk:g}")
        lr = args["lr"]
        value = self.value_of(lr)
        if value is not None:
            self.in_range(lr, f"{fn.text} lr", value > 0, "must be > 0")
        self.per_head_range(lr, f"{fn.text} lr", lambda x: x > 0, "must be > 0")
        beta = args.get("beta")
        if beta is not None:
            value = self.value_of(beta)
            if value is not None:
                self.in_range(beta, "momentum beta", 0 <= value < 1, "must be in [0, 1)")
            self.per_head_range(beta, "momentum beta", lambda x: 0 <= x < 1, "must be in [0, 1)")
            self.per_channel(beta, memory, "momentum beta")
        assert isinstance(lr.value, Ref)
        beta_ref = beta.value if beta is not None else None
        assert beta_ref is None or isinstance(beta_ref, Ref)
        at = str(args["at"].value) if "at" in args else "previous"
        return AlgorithmSpec(kind=fn.text, lr=lr.value, beta=beta_ref, chunk=int(chunk),  # type: ignore[arg-type]
                             at=at, loc=fn.loc)  # type: ignore[arg-type]


# ---- expression walks ----------------------------------------------------------------------------


def _children(node: SpecExpr | Compare) -> tuple[SpecExpr | Compare, ...]:
    if isinstance(node, Unary):
        return (node.arg,)
    if isinstance(node, (Binary, Compare)):
        return (node.lhs, node.rhs)
    if isinstance(node, Call):
        return node.args
    if isinstance(node, IfElse):
        return (node.cond, node.then, node.other)
    return ()


def _mentions(root: SpecExpr | Compare, name: str) -> bool:
    """Whether the variable `name` occurs anywhere in the expression (a loop: chains may be long)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Var) and node.name == name:
            return True
        stack.extend(_children(node))
    return False
