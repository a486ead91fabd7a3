"""Is a layer's first update stable?  A pure function of the spec, used by `mirasc check`.

docs/semantics.md, "Stability: the learning rate, the chunk size and fp32", derives the conditions:
a gradient step of curvature h with the chunk rule and momentum is stable iff lr * h * gain(C, beta) < 2,
gain from the chunk's recurrence with aligned unit keys (the worst case, which qk_norm allows).  The
analysis looks at the gates' init values only; what training does to the gates later is not checked.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from .spec import LayerSpec, Loc

E_REF = 3.0  # error scale |y - v| per coordinate at which a bias's curvature is taken (3 sd of unit values)
LQ_DECAY_MIN = 0.999  # below this decay an lq-mapped LayerNorm'd MLP state grows (measured, docs)


@dataclass(frozen=True)
class Warning_:
    loc: Loc
    message: str

    def __str__(self) -> str:
        return f"{self.loc}: warning: {self.message}"


def momentum_gain(chunk: int, beta: float) -> float:
    """The factor G with: the chunk rule is stable iff lr * h * G < 2 (aligned keys, curvature h per token).

    Per chunk the error e and momentum m follow [[1 - aA, -P], [aS, beta^C]] (a = lr * h), A, P, S the
    sums of the unrolled momentum; Jury's conditions give the largest stable a.  beta = 0: G = C;
    C = 1: 1 / (1 + beta), the heavy-ball bound a < 2 (1 + beta).  Keys that change direction from token
    to token are worse for momentum at small C (measured: lr 0.25 at C = 1, beta 0.9), so G is at least
    1 / (1 - beta).
    """
    C, b = chunk, beta
    bc = b ** C
    P = sum(b ** i for i in range(1, C + 1))
    S = sum(b ** (C - j) for j in range(1, C + 1))
    A = sum(sum(b ** (i - j) for j in range(1, i + 1)) for i in range(1, C + 1))
    limit = 2 * (1 + bc) / (A * (1 + bc) - S * P)
    second = S * P - bc * A
    if second > 0:
        limit = min(limit, (1 - bc) / second)
    return max(2 / limit, 1 / (1 - b))


def _init_values(spec: LayerSpec) -> dict[str, float]:
    return {p.name: float(p.value if p.kind == "const" else p.init) for p in spec.params
            if (p.value if p.kind == "const" else p.init) is not None}


def _ref_value(spec: LayerSpec, ref, default: float) -> tuple[float, Loc]:
    """A Ref's number (a literal, or its Param's init) and where it was declared."""
    if ref is None:
        return default, spec.algorithm.loc
    if ref.name is None:
        return float(ref.value), ref.loc
    p = spec.param(ref.name)
    value = p.value if p.kind == "const" else p.init
    return (default if value is None else float(value)), p.loc


def bias_profile(ir, values: dict[str, float], V: int) -> tuple[bool, float]:
    """(gradient unbounded in the error, largest curvature along e for |e_j| <= E_REF) of the derived bias."""
    import sympy

    b = ir.bias
    subs = {sym: values.get(name, 1.0) for name, sym in b.param_symbols}
    fs = [sympy.lambdify((b.y, b.v), f.subs(subs), "mpmath") for _, f in b.reductions]
    grad = b.grad.subs(subs)
    if b.V is not None:
        grad = grad.subs(b.V, V)
    g = sympy.lambdify((b.y, b.v, *[s for s, _ in b.reductions]), grad, "mpmath")

    def g_at(e: float, v: float = 0.3) -> float:
        """dL/dy_j with every coordinate's error e (value v)."""
        S = [V * f(v + e, v) for f in fs]
        return float(g(v + e, v, *S))

    unbounded = abs(g_at(1e3)) > 10 * max(abs(g_at(10.0)), 1e-12)
    h, d = 0.0, 1e-4
    for i in range(-60, 61):
        e = E_REF * i / 60
        h = max(h, abs(g_at(e + d) - g_at(e - d)) / (2 * d))
    return unbounded, h


def mlp_curvature(spec: LayerSpec) -> float:
    """Top eigenvalue of J J^T, J = dy/dW, of the MLP memory at its N(0, 1/fan_in) init, unit keys."""
    import torch

    mem, K, V = spec.memory, spec.block.key_dim, spec.block.value_dim
    dims = [K] + [mem.expansion * K] * (mem.depth - 1) + [V]
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(a, b, generator=gen, dtype=torch.float64) / a ** 0.5 for a, b in itertools.pairwise(dims)]
    act = {"gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu, "relu": torch.relu,
           "tanh": torch.tanh, "identity": lambda x: x}[mem.act]
    worst = 0.0
    for _ in range(4):
        k = torch.nn.functional.normalize(torch.randn(K, generator=gen, dtype=torch.float64), dim=0)

        def f(*w, k=k):
            a = k
            for i, wi in enumerate(w):
                a = a @ wi if i == len(w) - 1 else act(a @ wi)
            return a

        jac = torch.autograd.functional.jacobian(f, tuple(ws))
        J = torch.cat([j.reshape(V, -1) for j in jac], dim=1)
        worst = max(worst, float(torch.linalg.eigvalsh(J @ J.T)[-1]))
    return worst


def analyse(spec: LayerSpec) -> list[Warning_]:
    """Warnings for a spec whose first updates diverge (or, LayerNorm'd, lose fp32 accuracy) at its inits."""
    from .symbolic.derive import derive

    ir = derive(spec)
    values = _init_values(spec)
    alg, mem = spec.algorithm, spec.memory
    lr, lr_loc = _ref_value(spec, alg.lr, 1.0)
    beta, _ = _ref_value(spec, alg.beta, 0.0) if alg.kind == "momentum" else (0.0, alg.loc)
    decay = next((t for t in spec.retention.terms if t.kind == "decay"), None)
    alpha, alpha_loc = (1.0, spec.retention.loc) if decay is None else _ref_value(spec, dict(decay.args)["alpha"],
                                                                                     1.0)
    out = []
    if mem.kind == "mlp" and mem.norm:
        # The LayerNorm bounds the output, so nothing overflows; with the lq map the output barely depends
        # on the carried Z's scale, which then drifts unless the decay is slow (measured, docs).
        if ir.retention.map == "lq" and alpha < LQ_DECAY_MIN:
            out.append(Warning_(alpha_loc, f"decay init {alpha:g} < {LQ_DECAY_MIN:g} with lq on a LayerNorm'd "
                                           "MLP memory: the carried state grows without bound and fp32 departs "
                                           "from fp64 (docs/semantics.md, Stability)"))
        return out
    if ir.bias.klass == "independent":
        return out  # the update does not read the state: no feedback, whatever the lr
    unbounded, h_bias = bias_profile(ir, values, spec.block.value_dim)
    if not unbounded:
        return out  # a bounded gradient moves the state by at most lr * |g| per token: no blow-up
    h_mem = 1.0 if mem.kind == "linear" else mlp_curvature(spec)
    gain = momentum_gain(alg.chunk, beta)
    eff = lr * h_bias * h_mem * gain
    if eff >= 2:
        what = f"chunk {alg.chunk}" + (f", momentum {beta:g}" if alg.kind == "momentum" else "")
        out.append(Warning_(lr_loc, f"initial update unstable: lr {lr:g} x gain {gain:.3g} ({what}) x curvature "
                                    f"{h_bias * h_mem:.3g} = {eff:.3g} >= 2; the state can diverge (stable "
                                    f"below lr {2 / (h_bias * h_mem * gain):.2g}; docs/semantics.md, Stability)"))
    return out
