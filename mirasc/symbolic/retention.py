"""RetentionSpec / AlgorithmSpec -> RetentionIR / AlgorithmIR (plain operands, no sympy).

An operand is a float literal or the name of a runtime Param (learnable scalar or gate); a `const`
Param referenced by name is inlined as its float value (see mirasc/ir.py).  Arguments the catalog marks
number-only (q, eps, scale, chunk) must resolve to numbers.
"""
from __future__ import annotations

from ..catalog import ALGORITHMS, RETENTIONS
from ..ir import AlgorithmIR, Operand, RetentionIR
from ..spec import NOLOC, AlgorithmSpec, Loc, Param, Ref, RetentionSpec
from .objectives import DeriveError

_MAPS = {"lq": "lq", "kl": "softmax", "bregman": "sigmoid", "elastic_net": "soft_threshold"}


def resolve(ref: Ref | str | float | None, params: tuple[Param, ...], what: str, loc: Loc = NOLOC,
            number_only: bool = False) -> Operand:
    """A Ref (or literal) as an Operand: a float, or the name of a non-constant Param."""
    if isinstance(ref, bool):
        return float(ref)
    if isinstance(ref, (int, float)):
        return float(ref)
    if ref is None:
        raise DeriveError(f"argument {what!r} is missing", loc)
    if isinstance(ref, str):
        raise DeriveError(f"argument {what!r} must be a number or a parameter, not the word {ref!r}", loc)
    if ref.name is None:
        if ref.value is None:
            raise DeriveError(f"argument {what!r} is empty", ref.loc or loc)
        return float(ref.value)
    for p in params:
        if p.name == ref.name:
            if p.kind == "const":
                return float(p.value)
            if number_only:
                raise DeriveError(f"argument {what!r} must be a compile-time number, {p.name!r} is not",
                                  ref.loc or loc)
            return p.name
    raise DeriveError(f"unknown parameter {ref.name!r}", ref.loc or loc)


def _word(ref: Ref | str, choices: tuple[str, ...], what: str, loc: Loc) -> str:
    word = ref.name if isinstance(ref, Ref) else ref
    if word not in choices:
        raise DeriveError(f"argument {what!r} must be one of {', '.join(choices)}; got {word!r}", loc)
    return word


def _args(kind: str, given: tuple[tuple[str, Ref | str], ...], table) -> dict:
    out = {a.name: a.default for a in table[kind].args}
    out.update(dict(given))
    return out


def retention_ir(ret: RetentionSpec, params: tuple[Param, ...]) -> RetentionIR:
    fields: dict = {"alpha": 1.0}
    seen_decay = seen_map = None
    for term in ret.terms:
        kind = "decay" if term.kind == "l2" else term.kind
        if kind not in RETENTIONS:
            raise DeriveError(f"unknown retention {term.kind!r}", term.loc)
        args = _args(kind, term.args, RETENTIONS)
        number_only = {a.name for a in RETENTIONS[kind].args if a.number_only}

        def op(name: str, _args=args, _term=term, _num=number_only) -> Operand:
            return resolve(_args[name], params, name, _term.loc, name in _num)

        if kind == "none":
            continue
        if kind == "decay":
            if seen_decay is not None:
                raise DeriveError("at most one decay term", term.loc)
            seen_decay = term
            fields["alpha"] = op("alpha")
            continue
        if seen_map is not None:
            raise DeriveError(f"at most one of lq, kl, elastic_net, bregman (already {seen_map.kind})", term.loc)
        seen_map = term
        fields["map"] = _MAPS[kind]
        if kind == "lq":
            fields["q"] = op("q")
            fields["eps"] = op("eps")
            fields["norm"] = _word(args["norm"], ("chunk", "token"), "norm", term.loc)
        elif kind == "kl":
            fields["axis"] = _word(args["axis"], ("key", "value", "all"), "axis", term.loc)
            fields["scale"] = op("scale")
        elif kind == "elastic_net":
            fields["gamma"] = op("gamma")
            form = _word(args["form"], ("retain", "ftrl"), "form", term.loc)
            fields["form"] = "prox" if form == "retain" else "accumulate"
        elif kind == "bregman":
            _word(args["map"], ("sigmoid",), "map", term.loc)
    return RetentionIR(**fields)


def algorithm_ir(alg: AlgorithmSpec, params: tuple[Param, ...]) -> AlgorithmIR:
    if alg.kind not in ALGORITHMS:
        raise DeriveError(f"unknown algorithm {alg.kind!r}", alg.loc)
    beta = None
    if alg.kind == "momentum":
        beta = resolve(alg.beta, params, "beta", alg.loc)
    chunk = int(alg.chunk)
    if chunk < 1 or chunk & (chunk - 1):
        raise DeriveError(f"chunk size must be a power of two, got {chunk}", alg.loc)
    return AlgorithmIR(kind=alg.kind, lr=resolve(alg.lr, params, "lr", alg.loc), beta=beta, chunk=chunk,
                       at=getattr(alg, "at", "previous"))


__all__ = ["algorithm_ir", "resolve", "retention_ir"]
