"""Build LayerIR objects for codegen tests without the parser or the symbolic stage.

    ir = make_ir(bias="l2", alpha="alpha", params=[gate("alpha", init=0.9), gate("eta", "softplus", 0.5)],
                 lr="eta", chunk=4)

The biases here are written directly as sympy (in BiasIR's structured form), and `local_bias_source`
prints them to torch source with sympy's TorchPrinter. That printer is a test double for
mirasc.codegen.printers.torch_bias_source, used only so these tests exercise the code generator on its
own; `use_local_printer` installs it for one test (the shipped emit.py always imports the real one).
"""

from __future__ import annotations

import sys
import types

import sympy as sp
from sympy.printing.pytorch import TorchPrinter

from mirasc.ir import AlgorithmIR, BiasIR, LayerIR, RetentionIR
from mirasc.spec import BlockSpec, MemorySpec, Param

Y, VV = sp.symbols("y v", real=True)
EPS = sp.Float(1e-6)


def gate(
    name: str, activation: str = "sigmoid", init: float = 0.9, shape: str = "head", rank: int = 4
) -> Param:
    return Param(name, "gate", init=init, shape=shape, activation=activation, rank=rank)


def learnable(name: str, init: float = 1.0, activation: str = "softplus") -> Param:
    return Param(name, "learnable", init=init, shape="head", activation=activation)


def const(name: str, value: float) -> Param:
    return Param(name, "const", value=value)


def _bias(name: str, params: tuple[Param, ...]) -> BiasIR:
    """A BiasIR: (reductions, F) by name; parameter symbols are named like their Params."""
    sym = {p.name: sp.Symbol(p.name, real=True) for p in params}
    S1 = sp.Symbol("S1", real=True)
    e = Y - VV
    klass = "nonlinear"
    pnames: tuple[str, ...] = ()
    if name == "dot":  # L = -<y, v>
        f, F, klass = -Y * VV, S1, "independent"
    elif name == "l2":  # L = 1/2 ||y - v||^2
        f, F, klass = e**2 / 2, S1, "affine"
    elif name == "lp":  # L = sum_j sa(e_j)^3
        f, F = (e**2 + EPS) ** sp.Rational(3, 2), S1
    elif name == "cauchy":  # L = sum_j log(1 + (e_j / c)^2), c a learnable scalar
        f, F, pnames = sp.log(1 + (e / sym["c"]) ** 2), S1, ("c",)
    elif name == "huber_norm":  # L = H_delta(||e||), delta a head gate
        d = sym["delta"]
        n = sp.sqrt(S1 + EPS)
        f = e**2
        F = sp.Piecewise((S1 / 2, n <= d), (d * (n - d / 2), True))
        pnames = ("delta",)
    elif name == "weighted_l2":  # L = sum_j w_j e_j^2 / 2, w a channel gate
        f, F, klass, pnames = sym["w"] * e**2 / 2, S1, "nonlinear", ("w",)
    else:
        raise KeyError(name)
    grad = sp.diff(F, S1) * sp.diff(f, Y)
    channel = tuple(n for n in pnames if next(p for p in params if p.name == n).shape == "channel")
    return BiasIR(
        name=name,
        klass=klass,
        params=pnames,
        y=Y,
        v=VV,
        reductions=((S1, f),),
        loss=F,
        grad=grad,
        text=f"test bias {name}",
        param_symbols=tuple((n, sym[n]) for n in pnames),
        channel_params=channel,
    )


def local_bias_source(bias: BiasIR) -> str:
    """bias_loss / bias_grad as torch source, reductions over the last dim (the test double)."""
    pr = TorchPrinter()
    args = ", ".join(["y", "v", *bias.params])
    out = []
    for fname, expr, doc in (
        ("bias_loss", bias.loss, "L of one token, [..., 1]."),
        ("bias_grad", bias.grad, "dL/dy of one token, [..., V]."),
    ):
        lines = [
            f"    {s} = torch.sum({pr.doprint(f)}, dim=-1, keepdim=True)"
            for s, f in bias.reductions
            if s in expr.free_symbols
        ]
        common, (expr,) = sp.cse([expr], symbols=sp.numbered_symbols("x"))
        lines += [f"    {x} = {pr.doprint(e)}" for x, e in common]
        out += [f"def {fname}({args}):", f'    """{doc}"""', *lines, f"    return {pr.doprint(expr)}", "", ""]
    return "\n".join(out).rstrip() + "\n"


def use_local_printer(monkeypatch) -> None:
    """Make `from mirasc.codegen.printers import torch_bias_source` return the test double."""
    fake = types.ModuleType("mirasc.codegen.printers")
    fake.torch_bias_source = local_bias_source
    monkeypatch.setitem(sys.modules, "mirasc.codegen.printers", fake)


def make_ir(
    *,
    name: str = "TestLayer",
    memory: str = "linear",
    depth: int = 2,
    expansion: int = 2,
    act: str = "gelu",
    residual: bool = False,
    norm: bool = False,
    init: str = "zero",
    bias: str = "l2",
    params=(),
    alpha=1.0,
    map: str = "id",
    form: str = "accumulate",
    q: float = 2.0,
    axis: str = "key",
    scale: float = 1.0,
    gamma=0.0,
    kind: str = "gd",
    lr=1.0,
    beta=None,
    chunk: int = 4,
    at: str = "previous",
    heads: int = 2,
    key_dim: int = 8,
    value_dim: int = 8,
    conv: int = 4,
    qk_norm: bool = True,
    out_norm: str = "rms",
    out_gate: bool = True,
) -> LayerIR:
    params = tuple(params)
    mem = MemorySpec(
        memory,
        depth=depth if memory == "mlp" else 1,
        expansion=expansion,
        act=act,
        residual=residual,
        norm=norm,
        init=init,
    )
    return LayerIR(
        name=name,
        block=BlockSpec(
            heads=heads,
            key_dim=key_dim,
            value_dim=value_dim,
            conv=conv,
            qk_norm=qk_norm,
            out_norm=out_norm,
            out_gate=out_gate,
        ),
        memory=mem,
        params=params,
        bias=_bias(bias, params),
        retention=RetentionIR(alpha=alpha, map=map, form=form, q=q, axis=axis, scale=scale, gamma=gamma),
        algorithm=AlgorithmIR(kind=kind, lr=lr, beta=beta, chunk=chunk, at=at),
        rule=f"test rule for {name}:\n    Z_t = alpha_t Z_(t-1) - lr_t G_t",
        source_hash="0" * 64,
        source_file="<test>",
    )
