"""The symbolic middle: derived gradients, VJPs, classes, printed sources, retention/algorithm IR.

Oracles: torch.autograd on the printed loss (gradient) and on the printed gradient (VJP); hand-written
torch formulas of the paper's definitions (loss values); sympy-free AST checks of the printed source.
"""
from __future__ import annotations

import ast
import functools
import math
import time
import zlib

import pytest
import torch
from conftest import assert_close

from mirasc.codegen.printers import TRITON_HELPERS, torch_bias_source, triton_bias_source, triton_expr
from mirasc.ir import AlgorithmIR, LayerIR, RetentionIR
from mirasc.spec import (
    AlgorithmSpec,
    BiasSpec,
    Binary,
    BlockSpec,
    Call,
    Compare,
    IfElse,
    LayerSpec,
    MemorySpec,
    Num,
    Param,
    Ref,
    RetentionSpec,
    RetentionTerm,
    Unary,
    Var,
)
from mirasc.symbolic import DeriveError, derive, derive_bias, explain

DT = torch.float64


# ---- spec builders --------------------------------------------------------------------------------

def gate(name, shape="head", act="softplus"):
    return Param(name, "gate", init=0.5, shape=shape, activation=act, rank=8)


def learnable(name):
    return Param(name, "learnable", init=1.0, activation="softplus")


def const(name, value):
    return Param(name, "const", value=value)


def lib(name, **args):
    return BiasSpec(name, tuple((k, a if isinstance(a, (Ref, str)) else Ref(value=a)) for k, a in args.items()))


def ref(name):
    return Ref(name=name)


Y, VV = Var("y"), Var("v")
E = Binary("-", Y, VV)


def C(fn, *args):
    return Call(fn, tuple(args))


def B(op, a, b):
    return Binary(op, a, b)


def layer(bias, params=(), retention=None, algorithm=None, name="T", source="layer T {}"):
    params = tuple(params) + (gate("eta"), gate("alpha", act="sigmoid"))
    retention = retention or RetentionSpec((RetentionTerm("decay", (("alpha", ref("alpha")),)),))
    algorithm = algorithm or AlgorithmSpec("gd", ref("eta"), chunk=16)
    return LayerSpec(name, BlockSpec(), MemorySpec("linear"), params, bias, retention, algorithm,
                     source=source)


# ---- the cases: (bias spec, params, oracle of L or None, expected class or None, input maker) -------

def _sa(x, eps=1e-6):
    return torch.sqrt(x * x + eps)


def _huber(a, d):
    return torch.where(a.abs() <= d, 0.5 * a * a, d * (a.abs() - 0.5 * d))


def _norm(e, eps=1e-6):
    return torch.sqrt((e * e).sum(-1) + eps)


def _draw(lead, V, gen, params, kind="plain"):
    """y, v and parameter tensors; `kind` keeps inputs away from the kinks of each piecewise bias."""
    v = torch.randn(*lead, V, dtype=DT, generator=gen)
    mag = 0.1 + 2.0 * torch.rand(*lead, V, dtype=DT, generator=gen)
    sign = torch.where(torch.rand(*lead, V, generator=gen) < 0.5, -1.0, 1.0).to(DT)
    if kind == "huber":  # |e| in [0.05, 0.4] or [1.7, 3]: delta in [0.6, 1.4]
        small = torch.rand(*lead, V, generator=gen) < 0.5
        mag = torch.where(small, 0.05 + 0.35 * torch.rand(*lead, V, dtype=DT, generator=gen),
                          1.7 + 1.3 * torch.rand(*lead, V, dtype=DT, generator=gen))
    if kind == "deadzone":  # |e| away from 0.1 and 0
        mag = torch.where(torch.rand(*lead, V, generator=gen) < 0.3, 0.03 + 0.04 * torch.rand(
            *lead, V, dtype=DT, generator=gen), 0.2 + 2 * torch.rand(*lead, V, dtype=DT, generator=gen))
    e = sign * mag
    y = v + e
    P = {}
    for name, shape in params:
        s = (*lead, V) if shape == "channel" else (*lead, 1)
        P[name] = 0.6 + 0.8 * torch.rand(*s, dtype=DT, generator=gen)
    if kind == "trunc":  # c_j away from e_j^2
        P["c"] = torch.where(torch.rand(*lead, V, generator=gen) < 0.5, 0.5, 2.0).to(DT) * e * e
    if kind == "normsplit":  # the norm test ||e|| <= delta: half the tokens on each side, far from it
        n = torch.sqrt((e * e).sum(-1, keepdim=True))
        side = torch.where(torch.rand(*lead, 1, generator=gen) < 0.5, 0.5, 2.0).to(DT)
        P["delta"] = n * side
    return y, v, P


CASES = {
    "dot": (lib("dot"), (), lambda y, v, P: -(y * v).sum(-1), "independent", "plain"),
    "l2": (lib("l2"), (), lambda y, v, P: 0.5 * ((y - v) ** 2).sum(-1), "affine", "plain"),
    "l1": (lib("l1"), (), lambda y, v, P: _sa(y - v).sum(-1), "nonlinear", "plain"),
    "l1_eps": (lib("l1", eps=0.01), (), lambda y, v, P: _sa(y - v, 0.01).sum(-1), "nonlinear", "plain"),
    "lp3": (lib("lp", p=3), (), lambda y, v, P: (_sa(y - v) ** 3).sum(-1), "nonlinear", "plain"),
    "lp1.5": (lib("lp", p=1.5, eps=1e-4), (), lambda y, v, P: (_sa(y - v, 1e-4) ** 1.5).sum(-1),
              "nonlinear", "plain"),
    "huber_channel": (lib("huber", delta=ref("delta")), (gate("delta", "channel"),),
                      lambda y, v, P: _huber(y - v, P["delta"]).sum(-1), "nonlinear", "huber"),
    "huber_head": (lib("huber", delta=ref("delta")), (gate("delta"),),
                   lambda y, v, P: _huber(y - v, P["delta"]).sum(-1), "nonlinear", "huber"),
    "huber_const": (lib("huber", delta=ref("d")), (const("d", 1.0),),
                    lambda y, v, P: _huber(y - v, 1.0).sum(-1), "nonlinear", "huber"),
    "huber_norm": (lib("huber_norm", delta=ref("delta")), (gate("delta"),),
                   lambda y, v, P: _huber(_norm(y - v), P["delta"][..., 0]), "nonlinear", "normsplit"),
    "huber_mix": (lib("huber_mix", delta=ref("delta")), (gate("delta"),),
                  lambda y, v, P: torch.where(_norm(y - v) <= P["delta"][..., 0], 0.5 * ((y - v) ** 2).sum(-1),
                                              P["delta"][..., 0] * _sa(y - v).sum(-1)), "nonlinear", "normsplit"),
    "robust": (lib("robust", Delta=ref("D")), (learnable("D"),),
               lambda y, v, P: 0.5 * ((y - v) ** 2).sum(-1) + P["D"][..., 0] * _norm(y - v)
               + 0.5 * P["D"][..., 0] ** 2, "nonlinear", "plain"),
    "robust_lit": (lib("robust", Delta=0.5), (),
                   lambda y, v, P: 0.5 * ((y - v) ** 2).sum(-1) + 0.5 * _norm(y - v) + 0.125, "nonlinear", "plain"),
    # user expressions
    "cauchy": (BiasSpec(None, expr=C("sum", C("log", B("+", Num(1), B("^", B("/", E, Var("c")), Num(2)))))),
               (learnable("c"),), lambda y, v, P: torch.log(1 + ((y - v) / P["c"]) ** 2).sum(-1), "nonlinear",
               "plain"),
    "log_cosh": (BiasSpec(None, expr=C("sum", C("log", C("cosh", E)))), (),
                 lambda y, v, P: torch.log(torch.cosh(y - v)).sum(-1), "nonlinear", "plain"),
    "quantile": (BiasSpec(None, expr=C("sum", IfElse(
        Compare(">=", B("-", VV, Y), Num(0)), B("*", Var("tau"), C("smooth_abs", B("-", VV, Y))),
        B("*", B("-", Num(1), Var("tau")), C("smooth_abs", B("-", VV, Y)))))), (const("tau", 0.8),),
        lambda y, v, P: torch.where(v - y >= 0, 0.8 * _sa(v - y), (1 - 0.8) * _sa(v - y)).sum(-1), "nonlinear",
        "plain"),
    "two_reductions": (BiasSpec(None, expr=B("+", C("norm", E), B("*", Num(0.1), C("mean", B("^", E, Num(2)))))),
                       (), lambda y, v, P: _norm(y - v) + 0.1 * ((y - v) ** 2).mean(-1), "nonlinear", "plain"),
    "trunc_min": (BiasSpec(None, expr=C("sum", C("min", B("^", E, Num(2)), Var("c")))), (gate("c", "channel"),),
                  lambda y, v, P: torch.minimum((y - v) ** 2, P["c"]).sum(-1), "nonlinear", "trunc"),
    "deadzone_max": (BiasSpec(None, expr=C("sum", B("^", C("max", B("-", C("abs", E), Num(0.1)), Num(0)), Num(2)))),
                     (), lambda y, v, P: (torch.clamp((y - v).abs() - 0.1, min=0) ** 2).sum(-1), "nonlinear",
                     "deadzone"),
    "kitchen_sink": (BiasSpec(None, expr=B("+", B("*", Var("a"), C("log", C("sum", C("exp", E)))), C("sum", B(
        "+", B("*", C("softplus", Y), C("tanh", VV)), B("+", C("log1p", C("sigmoid", E)),
                                                          B("*", B("*", Num(0.1), C("sin", Y)), C("cos", VV))))))),
        (learnable("a"),),
        lambda y, v, P: P["a"][..., 0] * torch.logsumexp(y - v, -1) + (torch.nn.functional.softplus(y) * torch.tanh(v)
                                                                       + torch.log1p(torch.sigmoid(y - v))
                                                                       + 0.1 * torch.sin(y) * torch.cos(v)).sum(-1),
        "nonlinear", "plain"),
    "gated_sq": (BiasSpec(None, expr=B("*", Var("a"), C("sum", B("*", Var("g"), C("sqrt", B("+", B("^", E, Num(2)),
                                                                                               Num(1))))))),
                 (learnable("a"), gate("g", "channel")),
                 lambda y, v, P: P["a"][..., 0] * (P["g"] * torch.sqrt((y - v) ** 2 + 1)).sum(-1), "nonlinear",
                 "plain"),
    "sqrt_offset": (BiasSpec(None, expr=C("sqrt", C("sum", B("+", B("^", E, Num(2)), Var("c"))))), (learnable("c"),),
                    lambda y, v, P: torch.sqrt(((y - v) ** 2).sum(-1) + y.shape[-1] * P["c"][..., 0]), "nonlinear",
                    "plain"),
    "cross": (BiasSpec(None, expr=B("/", B("*", C("sum", B("^", E, Num(2))), C("sum", C("smooth_abs", E))),
                                    B("+", Num(1), C("sum", B("*", Y, Y))))), (),
              lambda y, v, P: ((y - v) ** 2).sum(-1) * _sa(y - v).sum(-1) / (1 + (y * y).sum(-1)), "nonlinear",
              "plain"),
    "half_sq": (BiasSpec(None, expr=B("/", C("sum", B("^", E, Num(2))), Num(2))), (),
                lambda y, v, P: 0.5 * ((y - v) ** 2).sum(-1), "affine", "plain"),
    "neg_dot": (BiasSpec(None, expr=Unary("-", C("sum", B("*", Y, VV)))), (),
                lambda y, v, P: -(y * v).sum(-1), "independent", "plain"),
    "hebb_scaled": (BiasSpec(None, expr=B("*", Var("a"), C("sum", B("*", Var("g"), B("*", Y, VV))))),
                    (learnable("a"), gate("g", "channel")), lambda y, v, P: P["a"][..., 0] * (P["g"] * y * v).sum(-1),
                    "independent", "plain"),
}

SHAPES = [(5,), (2, 3)]
DIMS = [1, 7, 16]


def _compile(bias_src: str) -> dict:
    """The namespace of printed bias functions (exec'd source, not a layer module)."""
    ns = {"torch": torch, "math": math}
    exec(compile(bias_src, "<bias>", "exec"), ns)  # noqa: S102 - the printed source under test
    return ns


def _build(case):
    bias, params, *_ = CASES[case]
    ir = derive_bias(bias, tuple(params))
    return ir, _compile(torch_bias_source(ir))


def _param_shapes(ir):
    return [(n, "channel" if n in ir.channel_params else "scalar") for n in ir.params]


_close = functools.partial(assert_close, rtol=1e-9, atol=1e-11)  # float64 derivations: tight


# ---- gradient and VJP against autograd ------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_grad_and_vjp_match_autograd(case):
    ir, ns = _build(case)
    kind = CASES[case][4]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    for lead in SHAPES:
        for V in DIMS:
            y, v, P = _draw(lead, V, gen, _param_shapes(ir), kind)
            y.requires_grad_(True)
            v.requires_grad_(True)
            ps = [P[n].requires_grad_(True) for n in ir.params]
            L = ns["bias_loss"](y, v, *ps)
            assert L.shape == y.shape[:-1]
            g_auto, = torch.autograd.grad(L.sum(), y)
            g = ns["bias_grad"](y, v, *ps)
            _close(g, g_auto, f"{case} grad lead={lead} V={V}")

            w = torch.randn(*lead, V, dtype=DT, generator=gen)
            auto = torch.autograd.grad(g, [y, v, *ps], w, allow_unused=True)
            auto = [torch.zeros_like(x) if a is None else a for a, x in zip(auto, [y, v, *ps])]
            mine = ns["bias_grad_vjp"](y, v, *ps, w)
            assert len(mine) == 2 + len(ps)
            for name, a, b in zip(["dy", "dv", *ir.params], mine, auto):
                _close(a, b, f"{case} vjp {name} lead={lead} V={V}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_matches_hand_written_oracle(case):
    ir, ns = _build(case)
    oracle, kind = CASES[case][2], CASES[case][4]
    gen = torch.Generator().manual_seed(7)
    for V in DIMS:
        y, v, P = _draw((4, 3), V, gen, _param_shapes(ir), kind)
        _close(ns["bias_loss"](y, v, *[P[n] for n in ir.params]), oracle(y, v, P), f"{case} loss V={V}")


def test_smooth_abs_curvature_is_printed_cancelled():
    """The VJP of the smoothed l1 must be eps / sa^3, not 1/sa - e^2/sa^3 (which loses its digits)."""
    ns = _compile(torch_bias_source(derive_bias(lib("l1"), ())))
    e = torch.tensor([-30.0, -2.0, 0.5, 3.0, 40.0], dtype=DT)
    v = torch.randn(5, dtype=DT, generator=torch.Generator().manual_seed(11))
    w = torch.rand(5, dtype=DT, generator=torch.Generator().manual_seed(12)) + 0.5
    dy, dv = ns["bias_grad_vjp"](v + e, v, w)
    exact = w * 1e-6 / (e**2 + 1e-6) ** 1.5
    torch.testing.assert_close(dy, exact, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(dv, -exact, rtol=1e-12, atol=0.0)


def test_paper_definitions_without_smoothing():
    """With eps = 0 the library losses are exactly the paper's Eqs. 10, 12, 15 and 17."""
    gen = torch.Generator().manual_seed(3)
    y, v, _ = _draw((6,), 9, gen, ())
    e = y - v
    n = torch.linalg.vector_norm(e, dim=-1)
    # Eq. 10: ||e||_p^p
    ns = _compile(torch_bias_source(derive_bias(lib("lp", p=3, eps=0.0), ())))
    _close(ns["bias_loss"](y, v), torch.linalg.vector_norm(e, 3, dim=-1) ** 3, "lp")
    # Eq. 12: ||e||_1
    ns = _compile(torch_bias_source(derive_bias(lib("l1", eps=0.0), ())))
    _close(ns["bias_loss"](y, v), torch.linalg.vector_norm(e, 1, dim=-1), "l1")
    # Eq. 17: max over ||dv|| <= Delta of 1/2 ||y - (v + dv)||^2, attained at dv = -Delta e / ||e||
    ns = _compile(torch_bias_source(derive_bias(lib("robust", Delta=0.7, eps=0.0), ())))
    worst = 0.5 * ((e + 0.7 * e / n[..., None]) ** 2).sum(-1)
    _close(ns["bias_loss"](y, v), worst, "robust")
    # Eq. 15 (Huber of the Euclidean norm), Eq. 13's H
    ns = _compile(torch_bias_source(derive_bias(lib("huber_norm", delta=2.0, eps=0.0), ())))
    _close(ns["bias_loss"](y, v), torch.where(n <= 2.0, 0.5 * n**2, 2.0 * (n - 1.0)), "huber_norm")


def test_gradients_are_the_papers_update_directions():
    """Eq. 9 (l2: e), Eq. 8 (dot: -v), Eq. 14 (huber: e or delta sign(e)), Eq. 15, Eq. 17."""
    gen = torch.Generator().manual_seed(5)
    y, v, P = _draw((8,), 6, gen, [("delta", "channel")], "huber")
    e = y - v
    g = _compile(torch_bias_source(derive_bias(lib("l2"), ())))["bias_grad"]
    _close(g(y, v), e, "l2")
    g = _compile(torch_bias_source(derive_bias(lib("dot"), ())))["bias_grad"]
    _close(g(y, v), -v, "dot")
    _, ns = _build("huber_channel")
    d = P["delta"]
    _close(ns["bias_grad"](y, v, d), torch.where(e.abs() <= d, e, d * torch.sign(e)), "huber")
    ns = _compile(torch_bias_source(derive_bias(lib("robust", Delta=0.5, eps=0.0), ())))
    n = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    _close(ns["bias_grad"](y, v), e + 0.5 * e / n, "robust")
    ns = _compile(torch_bias_source(derive_bias(lib("huber_norm", delta=1.5, eps=0.0), ())))
    _close(ns["bias_grad"](y, v), torch.where(n <= 1.5, e, 1.5 * e / n), "huber_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["l2", "lp3", "huber_channel", "huber_mix", "cauchy", "quantile", "trunc_min",
                                  "two_reductions", "dot"])
def test_low_precision_dtypes(case, dtype):
    """Outputs keep the input dtype and stay close to float64."""
    ir, ns = _build(case)
    gen = torch.Generator().manual_seed(11)
    y, v, P = _draw((4,), 16, gen, _param_shapes(ir), CASES[case][4])
    w = torch.randn(4, 16, dtype=DT, generator=gen)
    ps = [P[n] for n in ir.params]
    ref_out = [ns["bias_loss"](y, v, *ps), ns["bias_grad"](y, v, *ps), *ns["bias_grad_vjp"](y, v, *ps, w)]
    low = [x.to(dtype) for x in (y, v, *ps, w)]
    out = [ns["bias_loss"](*low[:-1]), ns["bias_grad"](*low[:-1]), *ns["bias_grad_vjp"](*low)]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for a, b in zip(out, ref_out):
        assert a.dtype == dtype
        scale = b.abs().max().clamp_min(1.0)
        assert ((a.double() - b).abs().max() / scale) < tol * 10, case


def test_autograd_through_grad_trains():
    """The torch backend differentiates bias_grad; second order through it must work (no NaN)."""
    ir, ns = _build("huber_mix")
    gen = torch.Generator().manual_seed(1)
    y, v, P = _draw((3,), 8, gen, _param_shapes(ir), "normsplit")
    d = P["delta"].requires_grad_(True)
    y.requires_grad_(True)
    ns["bias_grad"](y, v, d).pow(2).sum().backward()
    assert torch.isfinite(y.grad).all() and torch.isfinite(d.grad).all()


# ---- classes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_class(case):
    ir = derive_bias(CASES[case][0], tuple(CASES[case][1]))
    assert ir.klass == CASES[case][3]


def test_class_scaled_l2_is_not_affine():
    # Hessian c I with a learnable c: not the unit Hessian of the delta rule
    bias = BiasSpec(None, expr=B("*", Var("c"), C("sum", B("^", E, Num(2)))))
    assert derive_bias(bias, (learnable("c"),)).klass == "nonlinear"
    # mean((y - v)^2) has Hessian 2/V I
    bias = BiasSpec(None, expr=C("mean", B("^", E, Num(2))))
    assert derive_bias(bias, ()).klass == "nonlinear"


# ---- printed source: identifiers, structure -------------------------------------------------------

_TORCH_ATTRS = {"where", "sqrt", "exp", "log", "tanh", "cosh", "sinh", "sin", "cos", "log1p", "sigmoid", "abs",
                "sign", "minimum", "maximum", "clamp", "zeros_like", "full_like", "nn", "functional", "softplus",
                "atan", "erf", "sum", "squeeze", "new_tensor", "to", "dtype", "shape", "clone",
                "pi", "e", "nan", "inf"}


def _names(tree):
    names, attrs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            attrs.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names, attrs


def _internal(name):
    return (name[0] in "tSR" and name[1:].isdigit()) or name.startswith("D_")


@pytest.mark.parametrize("case", sorted(CASES))
def test_printed_source_names(case):
    ir = derive_bias(CASES[case][0], tuple(CASES[case][1]))
    src = torch_bias_source(ir)
    tree = ast.parse(src)
    funcs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert funcs == ["bias_loss", "bias_grad", "bias_grad_vjp"]
    for fn in tree.body:
        args = [a.arg for a in fn.args.args]
        expect = ["y", "v", *ir.params] + (["w"] if fn.name == "bias_grad_vjp" else [])
        assert args == expect
        first = src.splitlines()[fn.lineno]  # the line after `def`
        assert first.strip().startswith("# "), first
    names, attrs = _names(tree)
    allowed = {"torch", "math", "y", "v", "w", "V", *ir.params, "bias_loss", "bias_grad", "bias_grad_vjp"}
    bad = {n for n in names if n not in allowed and not _internal(n)}
    assert not bad, bad
    assert attrs <= _TORCH_ATTRS, attrs - _TORCH_ATTRS
    assert "import" not in src


def test_printed_source_is_ruff_clean(tmp_path):
    """The printed functions go verbatim into generated modules, which must be ruff clean."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff missing")
    files = []
    for case in sorted(CASES):
        ir = derive_bias(CASES[case][0], tuple(CASES[case][1]))
        src = torch_bias_source(ir)
        assert max(len(line) for line in src.splitlines()) <= 110
        f = tmp_path / f"b_{len(files)}.py"
        f.write_text("import math  # noqa: F401\n\nimport torch  # noqa: F401\n\n\n" + src)
        files.append(str(f))
    res = subprocess.run([ruff, "check", "--isolated", "--line-length", "110", "--select", "E,F,W,B", *files],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_param_names_that_would_shadow_are_renamed():
    bias = BiasSpec(None, expr=B("*", Var("torch"), C("sum", B("*", Var("t0"), B("^", E, Num(2))))))
    ir = derive_bias(bias, (learnable("torch"), gate("t0", "channel")))
    ns = _compile(torch_bias_source(ir))
    gen = torch.Generator().manual_seed(0)
    y, v, P = _draw((2,), 5, gen, [("torch", "scalar"), ("t0", "channel")])
    ref_loss = P["torch"][..., 0] * (P["t0"] * (y - v) ** 2).sum(-1)
    _close(ns["bias_loss"](y, v, P["torch"], P["t0"]), ref_loss, "renamed")


def test_no_unused_reductions():
    src = torch_bias_source(derive_bias(lib("l2"), ()))
    grad_src = src.split("def bias_grad(")[1].split("def bias_grad_vjp")[0]
    assert ".sum(" not in grad_src  # g = y - v needs no reduction


# ---- Triton printer -------------------------------------------------------------------------------

_TL_ATTRS = {"exp", "log", "sqrt", "sin", "cos", "abs", "sigmoid", "erf", "where", "minimum", "maximum", "sum",
             "zeros_like"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_source_parses(case):
    ir = derive_bias(CASES[case][0], tuple(CASES[case][1]))
    tb = triton_bias_source(ir, params={n: f"{n}_tile" for n in ir.params})
    assert tb.params == ir.params
    helpers = {"_mx_tanh", "_mx_cosh", "_mx_sinh", "_mx_log1p", "_mx_softplus", "_mx_sign"}
    for block, outs in ((tb.loss, {"loss"}), (tb.grad, {"g"}), (tb.vjp, {"dy", "dv"} | {f"d_{p}_tile" for p in ir.params})):
        tree = ast.parse("\n".join(block))
        assigned = {t.id for s in tree.body for t in s.targets}
        assert outs <= assigned
        names, attrs = _names(tree)
        allowed = {"tl", "y", "v", "w", "V", "mask", "float", *(f"{n}_tile" for n in ir.params)} | helpers | assigned
        bad = {n for n in names if n not in allowed and not _internal(n)}
        assert not bad, bad
        assert attrs <= _TL_ATTRS, attrs - _TL_ATTRS
    ast.parse(TRITON_HELPERS)


def test_triton_expr_functions_and_powers():
    import sympy as sp

    x, y = sp.symbols("x y", real=True)
    from mirasc.symbolic.objectives import log1p, sigmoid, softplus

    s = triton_expr(sp.tanh(x) + sp.cosh(y) + log1p(x) + softplus(y) + sigmoid(x) + sp.sign(x) + x**3 + x**-2
                    + sp.sqrt(x**2 + 1) ** 3 + (x**2 + 1) ** sp.Float(1.25) + sp.Min(x, y) + sp.Max(x, 0.5)
                    + sp.Piecewise((x, x > y), (y, True)) + sp.Heaviside(x))
    ast.parse(s)
    for piece in ("_mx_tanh(x)", "_mx_cosh(y)", "_mx_log1p(x)", "_mx_softplus(y)", "tl.sigmoid(x)",
                  "_mx_sign(x)", "(x*x*x)", "tl.minimum(", "tl.maximum(", "tl.where((x > y), x, y)",
                  "tl.exp(1.25*tl.log("):
        assert piece in s, (piece, s)
    assert "**" not in s


# ---- derive(): the whole layer ---------------------------------------------------------------------

def test_derive_layer_ir():
    spec = layer(lib("lp", p=3), retention=RetentionSpec((
        RetentionTerm("decay", (("alpha", ref("alpha")),)), RetentionTerm("lq", (("q", Ref(value=4.0)),)))),
        algorithm=AlgorithmSpec("gd", ref("eta"), chunk=64), source="layer Moneta { ... }")
    ir = derive(spec)
    assert isinstance(ir, LayerIR)
    assert ir.retention == RetentionIR(alpha="alpha", map="lq", q=4.0, eps=1e-6)
    assert ir.algorithm == AlgorithmIR("gd", "eta", None, 64)
    assert len(ir.source_hash) == 64 and ir.spec is spec
    assert "Z_t = alpha_t Z_{t-1} - G_t" in ir.rule and "||Z_t||_4" in ir.rule
    text = explain(ir)
    assert "g_j = dL/dy_j" in text and "w^T dg/dy" in text


def test_retention_and_algorithm_variants():
    P = (const("gamma", 0.96875), gate("beta", act="sigmoid"))
    cases = [
        (RetentionSpec((RetentionTerm("none"),)), RetentionIR(alpha=1.0)),
        (RetentionSpec((RetentionTerm("l2", (("alpha", ref("gamma")),)),)), RetentionIR(alpha=0.96875)),
        (RetentionSpec((RetentionTerm("decay", (("alpha", ref("alpha")),)), RetentionTerm("kl", (("axis", "value"),)))),
         RetentionIR(alpha="alpha", map="softmax", axis="value")),
        (RetentionSpec((RetentionTerm("elastic_net", (("gamma", Ref(value=0.01)),)),)),
         RetentionIR(alpha=1.0, map="soft_threshold", form="prox", gamma=0.01)),
        (RetentionSpec((RetentionTerm("elastic_net", (("gamma", ref("beta")), ("form", "ftrl"))),)),
         RetentionIR(alpha=1.0, map="soft_threshold", form="accumulate", gamma="beta")),
        (RetentionSpec((RetentionTerm("bregman"),)), RetentionIR(alpha=1.0, map="sigmoid")),
    ]
    for ret, want in cases:
        ir = derive(layer(lib("l2"), P, retention=ret))
        assert ir.retention == want
    alg = AlgorithmSpec("momentum", Ref(value=1.0), beta=ref("beta"), chunk=8, at="retained")
    ir = derive(layer(lib("l2"), P, algorithm=alg))
    assert ir.algorithm == AlgorithmIR("momentum", 1.0, "beta", 8, "retained")
    assert "m_t = beta_t m_{t-1} + G_t" in ir.rule
    with pytest.raises(DeriveError):
        derive(layer(lib("l2"), P, algorithm=AlgorithmSpec("gd", ref("eta"), chunk=12)))
    with pytest.raises(DeriveError):
        derive(layer(lib("l2"), P, retention=RetentionSpec((RetentionTerm("lq", (("q", Ref(value=4.0)),)),
                                                            RetentionTerm("bregman")))))


def test_refusals():
    with pytest.raises(DeriveError, match="inside a reduction"):
        derive_bias(BiasSpec(None, expr=B("+", C("sum", E), Y)), ())
    with pytest.raises(DeriveError, match="nested"):
        derive_bias(BiasSpec(None, expr=C("sum", C("sum", E))), ())
    with pytest.raises(DeriveError, match="does not depend on y"):
        derive_bias(BiasSpec(None, expr=C("sum", B("*", VV, VV))), ())
    with pytest.raises(DeriveError, match="per-channel"):
        derive_bias(lib("huber_mix", delta=ref("delta")), (gate("delta", "channel"),))
    with pytest.raises(DeriveError, match="compile-time"):
        derive_bias(lib("lp", p=ref("eta")), (gate("eta"),))


def test_constants_are_inlined():
    ir = derive_bias(CASES["quantile"][0], tuple(CASES["quantile"][1]))
    assert ir.params == ()
    src = torch_bias_source(ir)
    assert "tau" not in src.split("\n", 1)[1] and "0.8" in src


# ---- speed ----------------------------------------------------------------------------------------

EXAMPLE_BIASES = {  # the biases of examples/*.miras
    "linear_attention": (lib("dot"), ()),
    "deltanet": (lib("l2"), ()),
    "moneta": (lib("lp", p=3), ()),
    "yaad": (lib("huber_mix", delta=ref("delta")), (gate("delta"),)),
    "cauchy": CASES["cauchy"][:2],
    "log_cosh": CASES["log_cosh"][:2],
    "quantile": CASES["quantile"][:2],
}


def test_compile_is_fast():
    derive(layer(*EXAMPLE_BIASES["cauchy"]))  # warm sympy's lazy imports
    for name, (bias, params) in EXAMPLE_BIASES.items():
        t0 = time.perf_counter()
        ir = derive(layer(bias, params))
        torch_bias_source(ir.bias)
        triton_bias_source(ir.bias)
        dt = time.perf_counter() - t0
        assert dt < 0.5, f"{name}: {dt:.3f} s"


def test_examples_through_the_frontend():
    """Every example spec derives and prints, when the parser is available."""
    frontend = pytest.importorskip("mirasc.frontend")
    load_spec = getattr(frontend, "load_spec", None)
    if load_spec is None:
        pytest.skip("mirasc.frontend.load_spec not available yet")
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.miras")):
        spec = load_spec(path.read_text(), str(path))
        ir = derive(spec)
        _compile(torch_bias_source(ir.bias))
        ast.parse("\n".join(triton_bias_source(ir.bias).vjp))


# ---- the Triton printer on a GPU: printed statements inside a real kernel ---------------------------

_KERNEL = '''
import triton
import triton.language as tl

{helpers}

@triton.jit
def bias_kernel(Y, Vv, W, {pptrs}LOSS, G, DY, DV, {dptrs}N, V, BT: tl.constexpr, BV: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BV)
    rmask = rows < N
    mask = rmask[:, None] & (cols[None, :] < V)
    offs = rows[:, None] * V + cols[None, :]
    y = tl.load(Y + offs, mask=mask, other=0.0)
    v = tl.load(Vv + offs, mask=mask, other=0.0)
    w = tl.load(W + offs, mask=mask, other=0.0)
{loads}
{loss}
    tl.store(LOSS + rows[:, None], loss, mask=rmask[:, None])
{grad}
    tl.store(G + offs, g, mask=mask)
{vjp}
    tl.store(DY + offs, dy, mask=mask)
    tl.store(DV + offs, dv, mask=mask)
{stores}
'''


def _kernel_source(ir):
    tb = triton_bias_source(ir, params={n: f"p_{n}" for n in ir.params})
    ind = "    "
    pptrs = "".join(f"P_{n}, " for n in ir.params)
    dptrs = "".join(f"D_{n}_out, " for n in ir.params)
    loads, stores = [], []
    for n in ir.params:
        if n in ir.channel_params:
            loads.append(f"p_{n} = tl.load(P_{n} + offs, mask=mask, other=1.0)")
            stores.append(f"tl.store(D_{n}_out + offs, d_{n}, mask=mask)")
        else:
            loads.append(f"p_{n} = tl.load(P_{n} + rows[:, None], mask=rmask[:, None], other=1.0)")
            stores.append(f"tl.store(D_{n}_out + rows[:, None], d_{n}, mask=rmask[:, None])")

    def block(lines):
        return "\n".join(ind + s for s in lines) if lines else ind + "pass"

    return _KERNEL.format(helpers=TRITON_HELPERS, pptrs=pptrs, dptrs=dptrs, loads=block(loads),
                          loss=block(tb.loss), grad=block(tb.grad), vjp=block(tb.vjp), stores=block(stores))


@pytest.mark.gpu
def test_triton_printer_in_a_kernel(tmp_path):
    """Every case's printed Triton statements compile and agree with the printed torch functions."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    from mirasc.testing import import_source

    failures = []
    for case in sorted(CASES):
        ir, ns = _build(case)
        mod = import_source(_kernel_source(ir), f"k_{case.replace('.', '_')}", tmp_path)
        for V in (1, 7, 16, 100):
            gen = torch.Generator().manual_seed(V)
            y, v, P = _draw((37,), V, gen, _param_shapes(ir), CASES[case][4])
            w = torch.randn(37, V, dtype=DT, generator=gen)
            ps = [P[n] for n in ir.params]
            want = [ns["bias_loss"](y, v, *ps)[:, None], ns["bias_grad"](y, v, *ps),
                    *ns["bias_grad_vjp"](y, v, *ps, w)]
            cu = [x.float().cuda().contiguous() for x in (y, v, w, *ps)]
            outs = [torch.empty_like(x) for x in want]
            outs = [o.float().cuda() for o in outs]
            BV = max(16, triton_next_pow2(V))
            mod.bias_kernel[(triton_cdiv(37, 16),)](*cu, *outs, 37, V, BT=16, BV=BV)
            for name, a, b in zip(["loss", "g", "dy", "dv", *ir.params], outs, want):
                scale = b.abs().max().clamp_min(1.0).item()
                err = (a.double().cpu() - b).abs().max().item() / scale
                if not err < 1e-4:
                    failures.append(f"{case} V={V} {name}: rel err {err:.2e}")
    assert not failures, "\n".join(failures)


def triton_next_pow2(n):
    return 1 << (max(n, 1) - 1).bit_length()


def triton_cdiv(a, b):
    return (a + b - 1) // b
