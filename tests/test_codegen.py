"""The code generator: generated modules agree with their own oracle, with hand-written recurrences,
decode like they train, stand alone without mirasc, and refuse bad inputs with plain messages.

The IRs are built by tests/helpers_ir.py (no parser, no symbolic stage) and their bias is printed by the
test double there, so these tests exercise emit.py and the templates on their own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_close, flatten_state, stable_seed
from helpers_ir import gate, learnable, make_ir, use_local_printer

from mirasc.codegen.emit import CodegenError, emit_module, inverse_activation, write_module
from mirasc.testing import import_source, make_inputs, make_state, stable_range

B, H, K, V = 2, 2, 8, 8
F64 = torch.float64

# ---- the configurations: every memory family, bias class, retention and algorithm ----------------

A = gate("alpha", "sigmoid", 0.9)
AC = gate("alpha", "sigmoid", 0.9, shape="channel")
BETA = gate("beta", "sigmoid", 0.5)
BETAC = gate("beta", "sigmoid", 0.8, shape="channel")
ETA = gate("eta", "softplus", 0.3)
ETAC = gate("eta", "softplus", 0.3, shape="channel")
MLP2 = {"memory": "mlp", "depth": 2, "expansion": 2}

CONFIGS = {
    # matrix memory
    "linear_attention": {"bias": "dot"},
    "retnet": {"bias": "dot", "alpha": 0.9},
    "gated_delta_retained": {
        "bias": "l2",
        "params": [A, BETA],
        "alpha": "alpha",
        "lr": "beta",
        "at": "retained",
    },
    "delta_channel_lr": {"bias": "l2", "params": [ETAC], "lr": "eta"},
    "lp_channel_decay_momentum": {
        "bias": "lp",
        "params": [AC, BETAC, ETA],
        "alpha": "alpha",
        "kind": "momentum",
        "beta": "beta",
        "lr": "eta",
    },
    "l2_momentum_retained": {
        "bias": "l2",
        "params": [A, ETA],
        "alpha": "alpha",
        "kind": "momentum",
        "beta": 0.8,
        "lr": "eta",
        "at": "retained",
    },
    "cauchy_learnable": {
        "bias": "cauchy",
        "params": [learnable("c", 1.0), A, ETA],
        "alpha": "alpha",
        "lr": "eta",
    },
    "huber_norm_gate": {"bias": "huber_norm", "params": [gate("delta", "softplus", 1.0)], "lr": 0.5},
    "weighted_l2_channel": {
        "bias": "weighted_l2",
        "params": [gate("w", "sigmoid", 0.5, shape="channel"), ETA],
        "lr": "eta",
    },
    "lq4": {"bias": "l2", "params": [A, ETA], "alpha": "alpha", "lr": "eta", "map": "lq", "q": 4.0},
    "lq1.5_momentum": {
        "bias": "lp",
        "params": [ETA],
        "lr": "eta",
        "map": "lq",
        "q": 1.5,
        "kind": "momentum",
        "beta": 0.7,
    },
    "kl_key": {
        "bias": "l2",
        "params": [A, ETA],
        "alpha": "alpha",
        "lr": "eta",
        "map": "softmax",
        "axis": "key",
    },
    "kl_value_scaled": {
        "bias": "l2",
        "params": [ETA],
        "lr": "eta",
        "map": "softmax",
        "axis": "value",
        "scale": 2.0,
    },
    "kl_all_retained": {
        "bias": "l2",
        "params": [A, ETA],
        "alpha": "alpha",
        "lr": "eta",
        "map": "softmax",
        "axis": "all",
        "at": "retained",
    },
    "bregman": {"bias": "l2", "params": [ETA], "lr": "eta", "map": "sigmoid"},
    "enet_ftrl": {
        "bias": "lp",
        "params": [A, ETA],
        "alpha": "alpha",
        "lr": "eta",
        "map": "soft_threshold",
        "gamma": 0.03,
    },
    "enet_retain_learnable": {
        "bias": "l2",
        "params": [A, ETA, learnable("gam", 0.02)],
        "alpha": "alpha",
        "lr": "eta",
        "map": "soft_threshold",
        "form": "prox",
        "gamma": "gam",
    },
    "enet_retain_gate_channel": {
        "bias": "l2",
        "params": [AC, ETA, gate("gam", "softplus", 0.02, shape="channel")],
        "alpha": "alpha",
        "lr": "eta",
        "map": "soft_threshold",
        "form": "prox",
        "gamma": "gam",
        "at": "retained",
    },
    # MLP memory
    "mlp1_res_norm": {
        "memory": "mlp",
        "depth": 1,
        "residual": True,
        "norm": True,
        "bias": "l2",
        "params": [A, ETA],
        "alpha": "alpha",
        "lr": "eta",
    },
    "moneta": dict(
        **MLP2, residual=True, norm=True, bias="lp", params=[A, ETA], alpha="alpha", lr="eta", map="lq", q=4.0
    ),
    "titans": dict(
        **MLP2,
        act="silu",
        residual=True,
        bias="l2",
        params=[ETA, BETA, A],
        alpha="alpha",
        lr="eta",
        kind="momentum",
        beta="beta",
    ),
    "memora": dict(
        **MLP2, residual=True, norm=True, bias="l2", params=[A, ETA], alpha="alpha", lr="eta", map="softmax"
    ),
    "mlp3_relu_channel_lr": {
        "memory": "mlp",
        "depth": 3,
        "act": "relu",
        "bias": "l2",
        "params": [ETAC],
        "lr": "eta",
    },
    "mlp3_tanh_retained_momentum": {
        "memory": "mlp",
        "depth": 3,
        "act": "tanh",
        "norm": True,
        "bias": "huber_norm",
        "params": [gate("delta", "softplus", 1.0), A, ETA],
        "alpha": "alpha",
        "lr": "eta",
        "kind": "momentum",
        "beta": 0.9,
        "at": "retained",
    },
    "mlp2_identity_enet_retain": dict(
        **MLP2,
        act="identity",
        bias="cauchy",
        params=[learnable("c", 1.0), A, ETA],
        alpha="alpha",
        lr="eta",
        map="soft_threshold",
        form="prox",
        gamma=0.01,
    ),
    "mlp2_bregman_retained": dict(
        **MLP2,
        residual=True,
        bias="l2",
        params=[A, ETA],
        alpha="alpha",
        lr="eta",
        map="sigmoid",
        at="retained",
    ),
}

_SMALL = {"gam": (0.005, 0.05)}  # thresholds: small enough to leave most of the state alive

_modules: dict = {}


def compiled(name: str, **overrides):
    """The generated module of CONFIGS[name] (emitted once, imported under a unique name)."""
    key = (name, tuple(sorted(overrides.items())))
    if key not in _modules:
        ir = make_ir(name=f"L_{len(_modules)}", **{**CONFIGS[name], **overrides})
        with pytest.MonkeyPatch.context() as mp:
            use_local_printer(mp)
            path = write_module(ir, _OUT, f"gen_{len(_modules)}")
        module = import_source(path.read_text(), f"_codegen_test_{path.stem}", path.parent)
        _modules[key] = (module, ir)
    return _modules[key]


_OUT: Path | None = None  # set by the module fixture below


@pytest.fixture(scope="module", autouse=True)
def _out_dir(tmp_path_factory):
    global _OUT
    _OUT = tmp_path_factory.mktemp("codegen")
    yield
    _modules.clear()


# ---- inputs --------------------------------------------------------------------------------------


def _range(p):
    return _SMALL.get(p.name) or stable_range(p)


def inputs_at(ir, T, seed=0, dtype=F64):
    """make_inputs at this file's shapes, with the thresholds in _SMALL."""
    return make_inputs(ir, B, T, H, K, V, dtype=dtype, seed=seed, ranges=_range)


def state_at(ir, gen, dtype=F64):
    """make_state at this file's shapes."""
    return make_state(ir, B, H, K, V, dtype=dtype, gen=gen)


def run_memory(module, backend, chunk, q, k, v, params, state0):
    leaves = [t.detach().clone().requires_grad_(True) for t in [q, k, v, *params.values(), *flatten_state(state0)]]
    p = dict(zip(params, leaves[3 : 3 + len(params)]))
    s = leaves[3 + len(params) :]
    init = None if state0 is None else s[0] if torch.is_tensor(state0) else tuple(s)
    o, final = module.memory(
        *leaves[:3], **p, initial_state=init, output_final_state=True, chunk_size=chunk, backend=backend
    )
    return o, flatten_state(final), leaves


# ---- the torch backend computes what the reference backend computes -----------------------------


@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_matches_reference(name, chunk):
    module, ir = compiled(name)
    T = {1: 7, 4: 13, 16: 21}[chunk]  # ragged: never a multiple of the chunk (except chunk 1)
    q, k, v, params, gen = inputs_at(ir, T, seed=stable_seed(name, chunk))
    state0 = state_at(ir, gen)
    o_ref, s_ref, leaves_ref = run_memory(module, "reference", chunk, q, k, v, params, state0)
    o_tor, s_tor, leaves_tor = run_memory(module, "torch", chunk, q, k, v, params, state0)
    assert_close(o_tor, o_ref, "o")
    assert len(s_tor) == len(s_ref) == len(flatten_state(state0))
    for i, (a, b) in enumerate(zip(s_tor, s_ref)):
        assert_close(a, b, f"final state[{i}]")
    cotangents = [torch.randn(x.shape, dtype=F64, generator=gen) for x in [o_ref, *s_ref]]
    for outs, leaves in (([o_ref, *s_ref], leaves_ref), ([o_tor, *s_tor], leaves_tor)):
        sum((x * w).sum() for x, w in zip(outs, cotangents)).backward()
    names = ["q", "k", "v", *params, *[f"initial_state[{i}]" for i in range(len(s_ref))]]
    for what, a, b in zip(names, leaves_tor, leaves_ref):
        assert a.grad is not None and b.grad is not None, f"no gradient for {what}"
        assert b.grad.abs().sum() > 0, f"the gradient of {what} is zero: the comparison could not fail"
        assert_close(a.grad, b.grad, f"d{what}")


def test_zero_initial_state_and_no_grad():
    """initial_state=None is zeros; under no_grad nothing is recorded, in both backends."""
    module, ir = compiled("gated_delta_retained")
    q, k, v, params, _ = inputs_at(ir, 9)
    zeros = torch.zeros(B, H, K, V, dtype=F64)
    for backend in ("reference", "torch"):
        with torch.no_grad():
            o, s = module.memory(q, k, v, **params, chunk_size=4, backend=backend, output_final_state=True)
        o2, s2 = module.memory(
            q, k, v, **params, initial_state=zeros, chunk_size=4, backend=backend, output_final_state=True
        )
        assert not o.requires_grad and not s.requires_grad
        assert_close(o, o2, f"{backend}: zero start")
        assert_close(s, s2, f"{backend}: zero start, state")


# ---- the reference backend against recurrences written out here --------------------------------


def _outer(a, b):
    return a[..., :, None] * b[..., None, :]


def test_reference_is_the_gated_delta_rule():
    """Chunk 1, l2, lr beta, decay alpha, at=retained: S_t = alpha_t (I - beta_t k^T k) S + beta_t k^T v."""
    module, ir = compiled("gated_delta_retained")
    T = 9
    q, k, v, params, gen = inputs_at(ir, T, seed=1)
    S = torch.randn(B, H, K, V, dtype=F64, generator=gen)
    o_ref, s_ref = module.memory(
        q, k, v, **params, initial_state=S, output_final_state=True, chunk_size=1, backend="reference"
    )
    eye = torch.eye(K, dtype=F64)
    out = []
    for t in range(T):
        kt, a, b = k[:, t], params["alpha"][:, t, :, None, None], params["beta"][:, t, :, None, None]
        S = a * (eye - b * _outer(kt, kt)) @ S + b * _outer(kt, v[:, t])
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    assert_close(o_ref, torch.stack(out, 1), "o")
    assert_close(s_ref, S, "final state")


def test_reference_is_chunked_momentum_with_decay():
    """Titans on a matrix, chunk 4: gradients at the chunk's first state, momentum and decay per token."""
    module, ir = compiled("titans", memory="linear", residual=False)
    T, C = 11, 4
    q, k, v, params, gen = inputs_at(ir, T, seed=2)
    Z, m = state_at(ir, gen)
    o_ref, (z_ref, m_ref) = module.memory(
        q, k, v, **params, initial_state=(Z, m), output_final_state=True, chunk_size=C, backend="reference"
    )
    eta, beta, alpha = (params[n][:, :, :, None, None] for n in ("eta", "beta", "alpha"))
    out = []
    for start in range(0, T, C):
        base = Z
        for t in range(start, min(start + C, T)):
            err = (
                torch.einsum("bhk,bhkv->bhv", k[:, t], base) - v[:, t]
            )  # dL/dy of 1/2 ||y - v||^2 at the base
            m = beta[:, t] * m + eta[:, t] * _outer(k[:, t], err)
            Z = alpha[:, t] * Z - m
            out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], Z))
    assert_close(o_ref, torch.stack(out, 1), "o")
    assert_close(z_ref, Z, "final Z")
    assert_close(m_ref, m, "final m")


def test_reference_elastic_net_retain_carries_the_thresholded_state():
    """Eq. 22 at chunk 1: W_t = S_gamma(alpha_t W_(t-1) - eta_t k^T (k W_(t-1) - v)), o_t = q_t W_t."""
    module, ir = compiled("enet_retain_learnable")
    T = 8
    q, k, v, params, gen = inputs_at(ir, T, seed=3)
    W = torch.randn(B, H, K, V, dtype=F64, generator=gen) / K**0.5
    o_ref, s_ref = module.memory(
        q, k, v, **params, initial_state=W, output_final_state=True, chunk_size=1, backend="reference"
    )
    gam = params["gam"][None, :, None, None]
    out = []
    for t in range(T):
        kt = k[:, t]
        err = torch.einsum("bhk,bhkv->bhv", kt, W) - v[:, t]
        Z = params["alpha"][:, t, :, None, None] * W - params["eta"][:, t, :, None, None] * _outer(kt, err)
        W = torch.sign(Z) * torch.clamp(Z.abs() - gam, min=0)
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], W))
    assert_close(o_ref, torch.stack(out, 1), "o")
    assert_close(s_ref, W, "final state")


def test_independent_bias_is_chunk_invariant():
    """For the dot bias (g independent of y) every chunk size gives the per-token rule."""
    module, ir = compiled("retnet")
    q, k, v, params, _ = inputs_at(ir, 19, seed=4)
    o1, s1 = module.memory(q, k, v, **params, chunk_size=1, output_final_state=True)
    o8, s8 = module.memory(q, k, v, **params, chunk_size=8, output_final_state=True)
    assert_close(o8, o1, "o")
    assert_close(s8, s1, "state")


# ---- decoding ------------------------------------------------------------------------------------

DECODE = [
    "gated_delta_retained",
    "lp_channel_decay_momentum",
    "enet_retain_gate_channel",
    "kl_all_retained",
    "moneta",
    "titans",
    "mlp3_tanh_retained_momentum",
    "mlp2_bregman_retained",
]


def _at(params, t):
    return {n: p if p.dim() == 1 else p[:, t] for n, p in params.items()}


@pytest.mark.parametrize("name", DECODE)
def test_decode_equals_parallel(name):
    module, ir = compiled(name)
    C = 4
    T, P = 3 * C + 3, 2 * C
    q, k, v, params, gen = inputs_at(ir, T, seed=5)
    state0 = state_at(ir, gen)
    with torch.no_grad():
        o_full, _s_full = module.memory(
            q, k, v, **params, initial_state=state0, output_final_state=True, chunk_size=C
        )
        pre = {n: p if p.dim() == 1 else p[:, :P] for n, p in params.items()}
        _, s_pre = module.memory(
            q[:, :P], k[:, :P], v[:, :P], **pre, initial_state=state0, output_final_state=True, chunk_size=C
        )
        state = module.decode_state(s_pre)
        for t in range(P, T):
            o_t, state = module.step(q[:, t], k[:, t], v[:, t], **_at(params, t), state=state, chunk_size=C)
            assert_close(o_t, o_full[:, t], f"decoded output at t={t}")
        assert state.pos == (T - P) % C


def test_step_ignores_base_at_a_chunk_boundary():
    module, ir = compiled("titans")
    q, k, v, params, gen = inputs_at(ir, 3, seed=9)
    state0 = state_at(ir, gen)
    stale = module.DecodeState(state0, tuple(torch.zeros_like(z) for z in state0[:2]), 0)
    for t in range(3):
        o_a, a = module.step(q[:, t], k[:, t], v[:, t], **_at(params, t), state=module.decode_state(state0))
        o_b, b = module.step(q[:, t], k[:, t], v[:, t], **_at(params, t), state=stale)
        assert_close(o_b, o_a, "output")
        assert a.pos == b.pos == 1


def test_step_from_nothing_equals_memory_from_zeros():
    module, ir = compiled("lp_channel_decay_momentum")
    q, k, v, params, _ = inputs_at(ir, 6, seed=6)
    o_full, _ = module.memory(q, k, v, **params, chunk_size=2)
    state = None
    for t in range(6):
        o_t, state = module.step(q[:, t], k[:, t], v[:, t], **_at(params, t), state=state, chunk_size=2)
        assert_close(o_t, o_full[:, t], f"t={t}")


# ---- the block -----------------------------------------------------------------------------------

BLOCKS = [
    ("gated_delta_retained", {}),
    ("moneta", {"init": "learned", "conv": 1}),
    ("titans", {"init": "learned", "conv": 0, "out_norm": "layer", "out_gate": False, "qk_norm": False}),
    ("cauchy_learnable", {"init": "learned", "conv": 2, "out_norm": "none"}),
]


@pytest.mark.parametrize("name,overrides", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_any_split_equals_one_call(name, overrides):
    module, ir = compiled(name, **overrides)
    torch.manual_seed(0)
    layer = getattr(module, ir.name)(16, chunk_size=4).double()
    x = torch.randn(2, 15, 16, dtype=F64)
    with torch.no_grad():
        y_full, _ = layer(x)
        for split in ([6, 1, 1, 7], [3, 6, 1, 1, 4], [1] * 15):
            ys, state, t = [], None, 0
            for n in split:
                y, state = layer(x[:, t : t + n], state)
                ys.append(y)
                t += n
            assert_close(torch.cat(ys, 1), y_full, f"split {split}")
        layer.backend = "reference"
        assert_close(layer(x)[0], y_full, "reference backend")


def test_block_under_autocast(monkeypatch):
    """Under CUDA's bf16 autocast the q/k L2 norm comes out in fp32 while v stays bf16; the block must
    hand memory() one dtype. CPU autocast keeps the norm in bf16, so the test makes it fp32 as CUDA's
    autocast does, and checks the block's output and gradients against the same block in fp32."""
    module, ir = compiled("moneta", init="learned", conv=1)
    torch.manual_seed(0)
    layer = getattr(module, ir.name)(16, chunk_size=4)
    x = torch.randn(2, 9, 16)
    y_ref, _ = layer(x)
    y_ref.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    normalize = torch.nn.functional.normalize
    monkeypatch.setattr(torch.nn.functional, "normalize", lambda t, dim: normalize(t.float(), dim=dim))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < 1e-1  # bf16 throughout: ~4e-2
    grads = torch.cat([p.grad.flatten() for p in layer.parameters()])
    assert torch.isfinite(grads).all()
    ref_grads = torch.cat([g.flatten() for g in ref.values()])
    # bf16 throughout: 0.12 here with lq(norm=chunk), 0.08 with lq(norm=token); 0.05-0.3 over seeds for both
    assert ((grads - ref_grads).norm() / ref_grads.norm()).item() < 2e-1


def test_block_trains():
    """Every parameter of a block gets a finite, non-zero gradient (float32, the default dtype)."""
    module, ir = compiled("titans", init="learned")
    layer = getattr(module, ir.name)(16)
    y, _ = layer(torch.randn(2, 9, 16))
    y.square().mean().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got a zero gradient"


def test_block_gates_start_at_init():
    module, ir = compiled("cauchy_learnable", init="learned")
    layer = getattr(module, ir.name)(16)
    for g in layer.gates.values():
        torch.nn.init.zeros_(g[-1].weight)
    x = torch.randn(1, 3, 16)
    assert torch.allclose(torch.sigmoid(layer.gates["u_alpha"](x)), torch.tensor(0.9))
    assert torch.allclose(torch.nn.functional.softplus(layer.gates["u_eta"](x)), torch.tensor(0.3))
    assert torch.allclose(torch.nn.functional.softplus(layer.learnables["u_c"]), torch.tensor(1.0))
    for act, value in (
        ("sigmoid", 0.97),
        ("softplus", 25.0),
        ("exp", 0.1),
        ("tanh", -0.5),
        ("identity", 2.0),
    ):
        raw = torch.tensor(inverse_activation(act, value), dtype=F64)
        fn = {
            "sigmoid": torch.sigmoid,
            "softplus": torch.nn.functional.softplus,
            "exp": torch.exp,
            "tanh": torch.tanh,
            "identity": lambda r: r,
        }[act]
        assert abs(fn(raw).item() - value) < 1e-9 * max(1.0, value), act


# ---- dtypes --------------------------------------------------------------------------------------


def test_low_precision_inputs():
    """float32 / bfloat16 inputs: state math in float32, output in v's dtype, close to the float64 oracle."""
    module, ir = compiled("moneta")
    q, k, v, params, gen = inputs_at(ir, 10, seed=8)
    state0 = state_at(ir, gen)
    o64, _ = module.memory(q, k, v, **params, initial_state=state0, chunk_size=4, backend="reference")
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        cast = {n: p.to(dtype) for n, p in params.items()}
        o, s = module.memory(
            q.to(dtype),
            k.to(dtype),
            v.to(dtype),
            **cast,
            initial_state=state0,
            chunk_size=4,
            output_final_state=True,
        )
        assert o.dtype == dtype and all(x.dtype == torch.float32 for x in s)
        assert_close(o.double(), o64, f"{dtype}", rtol=tol, atol=tol)


# ---- input validation ----------------------------------------------------------------------------


def test_validation_messages():
    module, ir = compiled("titans", memory="linear", residual=False)
    mlp, mir = compiled("moneta")
    q, k, v, params, gen = inputs_at(ir, 5)
    state = state_at(ir, gen)

    def err(exc, match, fn=module.memory, *args, **kw):
        with pytest.raises(exc, match=match):
            fn(*args, **kw)

    good = dict(q=q, k=k, v=v, **params, initial_state=state)
    err(
        ValueError,
        r"k must have shape \[B, T, H, K\] = \[2, 5, 2, 8\], got \[2, 5, 2, 4\]",
        **{**good, "k": k[..., :4]},
    )
    err(
        ValueError,
        r"v must have shape \[B, T, H, V\] = \[2, 5, 2, 8\], got \[2, 4, 2, 8\]",
        **{**good, "v": v[:, :4]},
    )
    err(
        ValueError,
        r"eta must have shape \[B, T, H\] = \[2, 5, 2\], got \[2, 5\]",
        **{**good, "eta": params["eta"][..., 0]},
    )
    err(TypeError, r"beta must be a tensor of shape \[B, T, H\], got float", **{**good, "beta": 0.5})
    err(
        TypeError,
        r"missing 1 required keyword-only argument: 'alpha'",
        **{n: x for n, x in good.items() if n != "alpha"},
    )
    err(ValueError, r"chunk_size must be a power of two .* got 3", **good, chunk_size=3)
    err(ValueError, r"backend must be .* got 'cuda'", **good, backend="cuda")
    err(NotImplementedError, r"the triton backend does not cover this layer yet", **good, backend="triton")
    err(TypeError, r"q, k and v must share one dtype", **{**good, "k": k.float()})
    err(
        TypeError,
        r"initial_state must be a tuple of 2 tensors \(Z, m\), got Tensor",
        **{**good, "initial_state": q},
    )
    err(
        ValueError,
        r"initial_state\[1\] must have shape \[B, H, d_in, d_out\] = \[2, 2, 8, 8\], got \[2, 2, 8, 4\]",
        **{**good, "initial_state": (state[0], state[1][..., :4])},
    )
    err(
        ValueError,
        r"an MLP memory has no useful zero state",
        mlp.memory,
        q,
        k,
        v,
        **{n: p for n, p in params.items() if n in ("alpha", "eta")},
    )
    mq, mk, mv, mparams, _mgen = inputs_at(mir, 5)
    err(
        ValueError,
        r"learnable|must have shape \[H\] = \[2\]",
        compiled("cauchy_learnable")[0].memory,
        mq,
        mk,
        mv,
        alpha=mparams["alpha"],
        eta=mparams["eta"],
        c=torch.ones(3, dtype=F64),
    )
    # step()
    t = {n: p[:, 0] for n, p in params.items()}
    err(
        ValueError,
        r"step\(\): q must have shape \[B, H, K\], got \[2, 5, 2, 8\]",
        module.step,
        q,
        k[:, 0],
        v[:, 0],
        **t,
    )
    err(TypeError, r"state must be a DecodeState", module.step, q[:, 0], k[:, 0], v[:, 0], **t, state=state)
    bad = module.decode_state(state)._replace(pos=4)
    err(
        ValueError,
        r"state.pos must be an int in \[0, chunk_size = 4\), got 4",
        module.step,
        q[:, 0],
        k[:, 0],
        v[:, 0],
        **t,
        state=bad,
        chunk_size=4,
    )
    err(
        ValueError,
        r"step\(\): alpha must have shape \[B, H\] = \[2, 2\], got \[2, 5, 2\]",
        module.step,
        q[:, 0],
        k[:, 0],
        v[:, 0],
        **{**t, "alpha": params["alpha"]},
    )


def test_unsupported_irs_are_refused(monkeypatch):
    use_local_printer(monkeypatch)
    with pytest.raises(CodegenError, match="elastic_net.form=ftrl. needs a constant or learnable gamma"):
        emit_module(make_ir(params=[gate("g", "softplus", 0.1)], map="soft_threshold", gamma="g"), "0")
    with pytest.raises(CodegenError, match="per channel, which needs a linear memory"):
        emit_module(make_ir(memory="mlp", params=[AC], alpha="alpha"), "0")
    with pytest.raises(CodegenError, match="cannot be a keyword argument"):
        emit_module(make_ir(params=[gate("chunk_size")], lr="chunk_size"), "0")


# ---- the file itself -----------------------------------------------------------------------------


def test_header_docstring_and_atomic_write(monkeypatch, tmp_path):
    use_local_printer(monkeypatch)
    ir = make_ir(**CONFIGS["moneta"], name="Moneta")
    src = emit_module(ir, "9.8.7")
    head = src.splitlines()[:4]
    assert "Moneta" in head[0] and "generated by mirasc (do not edit)" in head[0]
    assert "9.8.7" in head[1] and ir.source_hash in head[2] and "<test>" in head[3]
    assert "Z_t = alpha_t Z_(t-1) - lr_t G_t" in src  # the rule, in the module docstring
    assert "mirasc" not in "".join(line for line in src.splitlines() if line.startswith(("import", "from")))
    path = write_module(ir, tmp_path / "out", "moneta")
    assert path == tmp_path / "out" / "moneta.py"
    assert path.read_text().splitlines()[4:] == emit_module(ir, "9.8.7").splitlines()[4:]
    assert sorted(p.name for p in path.parent.iterdir()) == ["moneta.py"]  # no temporary file left


@pytest.mark.skipif(
    shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff missing"
)
def test_generated_code_is_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    files = []
    for name in (
        "gated_delta_retained",
        "lp_channel_decay_momentum",
        "enet_retain_gate_channel",
        "moneta",
        "titans",
        "mlp2_bregman_retained",
        "linear_attention",
    ):
        module, _ = compiled(name)
        files.append(module.__file__)
    res = subprocess.run(
        [ruff, "check", "--isolated", "--line-length", "110", "--extend-select", "E,W", *files],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_standalone_without_mirasc(tmp_path):
    """The generated file runs in a fresh interpreter where `import mirasc` fails."""
    for i, (name, overrides) in enumerate(
        [("moneta", {"init": "learned"}), ("lp_channel_decay_momentum", {})]
    ):
        module, _ir = compiled(name, **overrides)
        shutil.copy(module.__file__, tmp_path / f"standalone_{i}.py")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["mirasc"] = None  # any import of mirasc now raises ImportError
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        for name in ("standalone_0", "standalone_1"):
            mod = __import__(name)
            layer = [v for k, v in vars(mod).items() if isinstance(v, type) and issubclass(v, torch.nn.Module)
                     and v.__module__ == name][0](16)
            y, state = layer(torch.randn(2, 7, 16))
            y2, state = layer(torch.randn(2, 1, 16), state)
            assert y.shape == (2, 7, 16) and y2.shape == (2, 1, 16)
        print("ok")
    """)
    res = subprocess.run(
        [sys.executable, "-I", "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


@pytest.mark.skipif(
    shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff missing"
)
def test_examples_compile_to_ruff_clean_modules(tmp_path):
    """Through the whole pipeline (frontend, derivation, the real bias printer), where they exist."""
    pytest.importorskip("mirasc.codegen.printers")
    pytest.importorskip("mirasc.symbolic.derive")
    from mirasc.compiler import compile_file

    examples = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.miras"))
    files = [str(compile_file(path, tmp_path)) for path in examples]
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    res = subprocess.run(
        [ruff, "check", "--isolated", "--line-length", "110", "--extend-select", "E,W", *files],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
