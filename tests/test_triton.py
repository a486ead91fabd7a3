"""The triton backend (fused chunked kernels) against the reference backend, on drawn layer variants.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py), so CI checks the very kernels a GPU runs, at small shapes.
"""
from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton")

from conftest import (
    LinearVariant,
    compile_module,
    flatten_state,
    import_source,
    indexed_params,
    make_inputs,
    rel,
)

from mirasc.codegen.plan.linear import refusal_reason as unsupported_reason
from mirasc.compiler import compile_spec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Linear layers under gd (LinearVariant in conftest.py): every bias class, parameters per head / channel /
# learnable, each chunk regime; the test id names the layer, its chunk and the dtype of q, k, v
VARIANTS = [
    LinearVariant("lp3_decay_gate", "lp(p=3)", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 16),
    LinearVariant("l2_const_lr", "l2", [], "none", "0.5", 32, V=32, dtype=torch.float16),
    LinearVariant("dot_learnable_lr", "dot", ["param lr = learnable(0.5, softplus)"], "decay(0.9)", "lr", 16),
    LinearVariant("cauchy_channel_lr", "sum(log(1 + ((y - v) / c)^2))", ["param c = learnable(1.0, softplus)",
                  "gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : channel = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 16),
    LinearVariant("huber_learnable_decay", "huber(d)", ["gate d : channel = softplus(rank=4, init=0.5)",
                  "param a = learnable(0.9, sigmoid)", "gate eta : head = softplus(rank=4, init=0.1)"],
                  "decay(a)", "eta", 16, at="retained"),
    LinearVariant("huber_norm_k24_v20", "huber_norm(d)", ["gate d : head = softplus(rank=4, init=1.0)",
                  "gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 32, K=24, V=20),
    LinearVariant("robust", "robust(0.5)", ["gate eta : head = softplus(rank=4, init=0.1)"], "none", "eta",
                  16),
    LinearVariant("l2_eta", "l2", ["gate eta : head = softplus(rank=4, init=0.1)"], "none", "eta", 16,
                  dtype=torch.bfloat16),
    LinearVariant("huber_mix", "huber_mix(d)", ["gate d : head = softplus(rank=4, init=1.0)",
                  "gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 16, at="retained"),
    LinearVariant("logcosh_norm", "sum(log(cosh(y - v))) + 0.1 * norm(y - v)",
                  ["gate a : head = sigmoid(rank=4, init=0.9)"], "decay(a)", "0.3", 16, K=32,
                  dtype=torch.bfloat16),
    # its second derivative near e = 0 is ~1/sqrt(eps): too sharp for fp16 inputs
    LinearVariant("quantile",
                  "sum(if v - y >= 0 then tau * smooth_abs(v - y) else (1 - tau) * smooth_abs(v - y))",
                  ["const tau = 0.8", "gate eta : head = softplus(rank=4, init=0.1)"], "decay(0.95)", "eta",
                  16),
    # chunks under 16 tokens share a tile and are solved one after another (chunk 1: the exact rule)
    LinearVariant("gated_delta", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = sigmoid(rank=4, init=0.5)"], "decay(a)", "eta", 1, V=32),
    LinearVariant("gated_delta_retained", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = sigmoid(rank=4, init=0.5)"], "decay(a)", "eta", 1, at="retained", K=32),
    LinearVariant("lp3_channel_lr", "lp(p=3)", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : channel = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 4),
    LinearVariant("huber_norm_learnable_decay", "huber_norm(d)",
                  ["gate d : head = softplus(rank=4, init=1.0)", "param a = learnable(0.9, sigmoid)",
                  "gate eta : head = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 2, at="retained", V=24),
    LinearVariant("cauchy_const_decay", "sum(log(1 + ((y - v) / c)^2))",
                  ["param c = learnable(1.0, softplus)", "gate eta : head = softplus(rank=4, init=0.1)"],
                  "decay(0.9)", "eta", 8),
    LinearVariant("delta_rule", "l2", ["gate eta : head = sigmoid(rank=4, init=0.5)"], "none", "eta", 1,
                  dtype=torch.bfloat16),
    LinearVariant("dot_decay_gate", "dot", ["gate a : head = sigmoid(rank=4, init=0.9)"], "decay(a)", "1.0",
                  1),
]


def _compile(i, variant, tmp_path):
    """The layer of one variant, compiled into tmp_path and imported as `_variant<i>`."""
    module, compiled = compile_module(variant.spec(f"Variant{i}"), f"variant{i}.miras", tmp_path, f"_variant{i}")
    return module, compiled.ir


def _assert_agree(outs, ref_outs, out_names, leaves, ref_leaves, leaf_names, tol):
    """Outputs finite and within tol (relative) of the reference; every leaf's gradient too, and non-zero in
    the reference (else the comparison could not fail)."""
    for what, a, b in zip(out_names, outs, ref_outs):
        assert torch.isfinite(a).all(), what
        assert rel(a, b) < tol, f"{what}: relative error {rel(a, b):.2e}"
    for what, a, b in zip(leaf_names, leaves, ref_leaves):
        assert a.grad is not None and torch.isfinite(a.grad).all(), f"d{what}"
        assert b.grad.abs().sum() > 0, f"d{what} is zero: the comparison could not fail"
        assert rel(a.grad, b.grad) < tol, f"d{what}: relative error {rel(a.grad, b.grad):.2e}"


def _run(module, backend, dtype, chunk, q, k, v, params, s0, w_o, w_s):
    """memory() and the backward of a random linear function of its output and final state. s0 and w_s
    are a tensor or, for momentum, a tuple (S, m); the leaves are q, k, v, the parameters, the state's
    tensors."""
    parts = list(s0) if isinstance(s0, tuple) else [s0]
    leaves = [x.to(DEVICE, dtype if i < 3 else torch.float32 if dtype != torch.float64 else dtype)
              .detach().requires_grad_() for i, x in enumerate([q, k, v, *params.values(), *parts])]
    p = dict(zip(params, leaves[3:len(leaves) - len(parts)]))
    init = tuple(leaves[-len(parts):]) if isinstance(s0, tuple) else leaves[-1]
    o, s = module.memory(*leaves[:3], **p, initial_state=init, output_final_state=True,
                         chunk_size=chunk, backend=backend)
    finals, weights = (list(s), list(w_s)) if isinstance(s, tuple) else ([s], [w_s])
    loss = (o.double() * w_o.to(DEVICE)).sum()
    for x, w in zip(finals, weights):
        loss = loss + (x.double() * w.to(DEVICE)).sum()
    loss.backward()
    return [o, *finals], leaves


@pytest.mark.parametrize(("i", "variant"), indexed_params(VARIANTS))
def test_triton_matches_reference(i, variant, tmp_path):
    chunk, K, V, dtype = variant.chunk, variant.K, variant.V, variant.dtype
    module, ir = _compile(i, variant, tmp_path)
    B, H, T = 2, 2, chunk + 21  # ragged: the last chunk is partial
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, dtype=torch.float64, seed=1000 + i)
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # values the low-precision run sees exactly
    s0 = 0.3 * torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    w_o = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
    w_s = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    outs, leaves = _run(module, "triton", dtype, chunk, q, k, v, params, s0, w_o, w_s)
    ref_outs, ref_leaves = _run(module, "reference", torch.float64, chunk, q, k, v, params, s0, w_o, w_s)
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    _assert_agree(outs, ref_outs, ["o", "final state"], leaves, ref_leaves, ["q", "k", "v", *params, "initial_state"],
                  tol)


# Per-channel decay gates (alpha [B, T, H, V]) and momentum (scalar alpha and beta):
# (with T, the sequence length, and with_s0=False: memory() starts from zeros)
GATE_VARIANTS = [
    # per-channel decay: every chunk regime (a tile of chunks 1, 4, 8; one chunk per tile 16, 32, 64)
    LinearVariant("lp3_channel_decay", "lp(p=3)", ["gate a : channel = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 16, T=37),
    # a per-channel gated delta rule
    LinearVariant("channel_gated_delta_retained", "l2", ["gate a : channel = sigmoid(rank=4, init=0.9)",
                  "gate eta : channel = sigmoid(rank=4, init=0.5)"], "decay(a)", "eta", 1, at="retained",
                  V=32, T=21),
    LinearVariant("huber_channel_decay", "huber(d)", ["gate d : channel = softplus(rank=4, init=0.5)",
                  "gate a : channel = sigmoid(rank=4, init=0.9)", "param lr = learnable(0.3, softplus)"],
                  "decay(a)", "lr", 4, K=24, V=20, T=27),
    LinearVariant("cauchy_channel_decay_zero_state", "sum(log(1 + ((y - v) / c)^2))",
                  ["param c = learnable(1.0, softplus)", "gate a : channel = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 64, at="retained",
                  dtype=torch.bfloat16, T=40, with_s0=False),
    # y-independent: tiles of 64 whatever the chunk
    LinearVariant("dot_channel_decay", "dot", ["gate a : channel = sigmoid(rank=4, init=0.9)"], "decay(a)",
                  "0.5", 8, T=19),
    LinearVariant("channel_gated_delta", "l2", ["gate a : channel = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = sigmoid(rank=4, init=0.5)"], "decay(a)", "eta", 2, dtype=torch.bfloat16,
                  T=23),
    LinearVariant("lp3_channel_decay_zero_state", "lp(p=3)", ["gate a : channel = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 32, at="retained", T=40,
                  with_s0=False),
    # the WY form (an affine bias, chunks under 16) over several 64-token tiles, the last one partial
    LinearVariant("gated_deltanet_wy", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = sigmoid(rank=4, init=0.5)"], "decay(a)", "eta", 1, at="retained", V=24,
                  T=150),
    LinearVariant("delta_rule_wy", "l2", ["gate eta : head = sigmoid(rank=4, init=0.5)"], "none", "eta", 4,
                  K=32, dtype=torch.bfloat16, T=140),
    # momentum (Titans' rule on a linear memory first)
    LinearVariant("titans_momentum", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)",
                  "gate b : head = sigmoid(rank=4, init=0.8)"], "decay(a)", "eta", 1, beta="b", T=23),
    LinearVariant("titans_momentum_retained", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)",
                  "gate b : head = sigmoid(rank=4, init=0.8)"], "decay(a)", "eta", 2, at="retained", beta="b",
                  T=131),
    LinearVariant("titans_momentum_retained", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)",
                  "gate b : head = sigmoid(rank=4, init=0.8)"], "decay(a)", "eta", 4, at="retained", V=24,
                  beta="b", T=25),
    LinearVariant("cauchy_const_momentum", "sum(log(1 + ((y - v) / c)^2))",
                  ["param c = learnable(1.0, softplus)", "param a = learnable(0.9, sigmoid)",
                  "gate eta : channel = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 16, at="retained",
                  beta="0.9", T=37),
    LinearVariant("huber_norm_momentum_zero_state", "huber_norm(d)",
                  ["gate d : head = softplus(rank=4, init=1.0)", "gate b : head = sigmoid(rank=4, init=0.8)",
                  "gate eta : head = softplus(rank=4, init=0.1)"], "none", "eta", 2, K=20, beta="b", T=21,
                  with_s0=False),
    LinearVariant("lp3_learnable_momentum", "lp(p=3)", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "param b = learnable(0.8, sigmoid)", "gate eta : head = softplus(rank=4, init=0.1)"],
                  "decay(a)", "eta", 64, dtype=torch.bfloat16, beta="b", T=40),
    LinearVariant("dot_momentum", "dot", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate b : head = sigmoid(rank=4, init=0.8)"], "decay(a)", "0.5", 8, beta="b", T=19),
]


# Head dims above 128: a head's state runs as column slices of at most
# 128 columns (K <= 128) or 64 columns (K = 256), each a head of its own for the kernels
WIDE_VARIANTS = [
    # 4 slices of 64, K = 256
    LinearVariant("cauchy_256x256", "sum(log(1 + ((y - v) / c)^2))", ["param c = learnable(1.0, softplus)",
                  "gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : channel = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 16, K=256, V=256,
                  dtype=torch.bfloat16, T=21),
    # 2 slices of 80, chunk 1
    LinearVariant("channel_gated_delta_32x160", "l2", ["gate a : channel = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = sigmoid(rank=4, init=0.5)"], "decay(a)", "eta", 1, at="retained", K=32,
                  V=160, T=9),
    # momentum, 2 slices
    LinearVariant("lp3_momentum_64x256", "lp(p=3)", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "param b = learnable(0.8, sigmoid)", "gate d : head = softplus(rank=4, init=0.1)"],
                  "decay(a)", "d", 16, K=64, V=256, dtype=torch.bfloat16, beta="b", T=20),
    # K = 200 unsliced
    LinearVariant("huber_200x48", "huber(d)", ["gate d : channel = softplus(rank=4, init=0.5)",
                  "param lr = learnable(0.3, softplus)"], "none", "lr", 16, K=200, V=48, dtype=torch.bfloat16,
                  T=18, with_s0=False),
    # 64-token tiles: 2 slices
    LinearVariant("l2_decay_128x128", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 64, K=128, V=128,
                  dtype=torch.bfloat16, T=70),
    # fp32 in 64-token tiles: 64 x 64 per program, 2 slices
    LinearVariant("l2_const_decay_64x128", "l2", ["gate eta : head = softplus(rank=4, init=0.1)"],
                  "decay(0.95)", "eta", 64, K=64, V=128, T=67),
    # the WY form in 16-token tiles, where 64-token tiles would not fit the keys: fp32, K = 128
    LinearVariant("gated_delta_wy_128x32", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = sigmoid(rank=4, init=0.5)"], "decay(a)", "eta", 1, at="retained", K=128,
                  V=32, T=40),
    # K = 256
    LinearVariant("delta_rule_wy_256x64", "l2", ["gate eta : head = sigmoid(rank=4, init=0.5)"], "none",
                  "eta", 2, K=256, V=64, dtype=torch.bfloat16, T=37),
]


@pytest.mark.parametrize(("i", "variant"), indexed_params(GATE_VARIANTS))
def test_triton_gates_match_reference(i, variant, tmp_path):
    """Per-channel decay and momentum: outputs, final state (S and m), every gradient, ragged T."""
    _check_variant(100 + i, variant, tmp_path)


@pytest.mark.parametrize(("i", "variant"), indexed_params(WIDE_VARIANTS))
def test_triton_wide_heads_match_reference(i, variant, tmp_path):
    """Head dims above 128: the column slices agree with the reference in every output and gradient."""
    module = _check_variant(200 + i, variant, tmp_path, heads=1 + i % 2)  # H = 1: zero strides
    chunk, K, V, dtype = variant.chunk, variant.K, variant.V, variant.dtype
    expected = {(256, 256): 4, (32, 160): 2, (64, 256): 2, (200, 48): 1, (128, 128): 2, (64, 128): 2, (128, 32): 1,
                (256, 64): 1}[K, V]
    assert module._value_slices(K, V, chunk, dtype) == expected


def test_triton_wide_heads_refused_for_coupled_columns(tmp_path):
    """A bias that reduces over the value dimension couples the columns: no slices, a clear error, and
    "auto" takes the torch backend."""
    module, ir = _compile(300, LinearVariant("huber_norm_192", "huber_norm(d)",
                                             ["gate d : head = softplus(rank=4, init=1.0)"], "decay(0.9)", "0.1",
                                             16, V=192), tmp_path)
    assert not module._COLUMN_SEPARABLE
    q, k, v, params, _ = make_inputs(ir, 1, 8, 2, 16, 192, dtype=torch.float32)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    params = {n: p.to(DEVICE) for n, p in params.items()}
    with pytest.raises(ValueError, match="reduces over the value dimension"):
        module.memory(q, k, v, **params, chunk_size=16, backend="triton")
    o, _ = module.memory(q, k, v, **params, chunk_size=16, backend="auto")
    ref, _ = module.memory(q, k, v, **params, chunk_size=16, backend="reference")
    assert rel(o, ref) < 1e-4
    # K = V = 128 in 64-token tiles: the whole state does not fit one program, and slices would be wrong
    q128 = torch.randn(1, 8, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    assert "reduces over the value dimension" in module._triton_usable(q128, q128, 64)
    assert module._triton_usable(q128, q128, 32) is None
    assert module._triton_usable(q128.float(), q128.float(), 32) is not None  # fp32 operands: twice the room
    with pytest.raises(ValueError, match="cannot hold a K = 264"):
        module.memory(*(torch.randn(1, 8, 2, 264, device=DEVICE) for _ in range(2)), v, **params, backend="triton")


def _check_variant(idx, variant, tmp_path, heads=2):
    beta, chunk, K, V, dtype, T, with_s0 = (variant.beta, variant.chunk, variant.K, variant.V, variant.dtype,
                                            variant.T, variant.with_s0)
    module, ir = _compile(idx, variant, tmp_path)
    assert "_memory_triton" in vars(module), unsupported_reason(ir)
    B, H = 2 if K * V <= 256 else 1, heads
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, dtype=torch.float64, seed=1900 + idx)
    q, k, v = (x.to(dtype).double() for x in (q, k, v))
    n = 2 if beta is not None else 1
    states = [0.3 * torch.randn(B, H, K, V, dtype=torch.float64, generator=gen) for _ in range(n)]
    w_o = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
    w_s = [torch.randn(B, H, K, V, dtype=torch.float64, generator=gen) for _ in range(n)]
    s0, w_s = (tuple(states), tuple(w_s)) if beta is not None else (states[0], w_s[0])
    if not with_s0:  # zero initial state (memory() starts from zeros itself)
        s0 = tuple(0 * x for x in s0) if beta is not None else 0 * s0
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    runs = []
    for backend, dt in (("triton", dtype), ("reference", torch.float64)):
        if with_s0:
            runs.append(_run(module, backend, dt, chunk, q, k, v, params, s0, w_o, w_s))
            continue
        leaves = [x.to(DEVICE, dt if j < 3 else torch.float32 if dt != torch.float64 else dt)
                  .detach().requires_grad_() for j, x in enumerate([q, k, v, *params.values()])]
        o, s = module.memory(*leaves[:3], **dict(zip(params, leaves[3:])), output_final_state=True,
                             chunk_size=chunk, backend=backend)
        finals = list(s) if isinstance(s, tuple) else [s]
        weights = list(w_s) if isinstance(w_s, tuple) else [w_s]
        loss = (o.double() * w_o.to(DEVICE)).sum()
        for x, w in zip(finals, weights):
            loss = loss + (x.double() * w.to(DEVICE)).sum()
        loss.backward()
        runs.append(([o, *finals], leaves))
    (outs, leaves), (ref_outs, ref_leaves) = runs
    names = ["q", "k", "v", *params, *(["S0", "m0"][:n] if with_s0 else [])]
    _assert_agree(outs, ref_outs, ["o", "final S", "final m"], leaves, ref_leaves, names, tol)
    return module


def test_triton_prefill_then_decode(tmp_path):
    """A triton prefill's final state continues exactly under step()."""
    module, ir = _compile(0, VARIANTS[0], tmp_path)
    B, H, K, V, P, T = 2, 2, 16, 16, 32, 37
    q, k, v, params, _gen = make_inputs(ir, B, T, H, K, V, dtype=torch.float32, seed=5)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    params = {n: p.to(DEVICE) for n, p in params.items()}
    with torch.no_grad():
        o_full, _ = module.memory(q, k, v, **params, chunk_size=16, backend="reference")
        pre = {n: p[:, :P] for n, p in params.items()}
        o_pre, s = module.memory(q[:, :P], k[:, :P], v[:, :P], **pre, output_final_state=True, chunk_size=16,
                                 backend="triton")
        assert rel(o_pre, o_full[:, :P]) < 1e-4
        state = module.decode_state(s)
        for t in range(P, T):
            o_t, state = module.step(q[:, t], k[:, t], v[:, t], **{n: p[:, t] for n, p in params.items()},
                                     state=state, chunk_size=16)
            assert rel(o_t, o_full[:, t]) < 1e-4, t
    assert flatten_state(state.state)


def test_triton_refusals(tmp_path):
    module, ir = _compile(1, VARIANTS[1], tmp_path)
    q, k, v, params, _ = make_inputs(ir, 1, 8, 2, 16, 32, dtype=torch.float32)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    with pytest.raises(ValueError, match="float64"):
        module.memory(q.double(), k.double(), v.double(), **params, chunk_size=16, backend="triton")
    _, ir = _compile(99, LinearVariant("channel_momentum", "l2", ["gate a : channel = sigmoid(rank=4, init=0.9)"],
                                       "decay(a)", "0.1", 16, beta="0.9"), tmp_path)
    assert unsupported_reason(ir) == "momentum with a per-channel decay or momentum gate has no triton kernel yet"


EXAMPLES = sorted((sys.modules["conftest"].ROOT / "examples").glob("*.miras"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_triton_examples_match_reference(path, tmp_path):
    """Every example with triton kernels, at its own chunk size: outputs, final state, every gradient."""
    compiled = compile_spec(path.read_text(), path.name)
    if compiled.ir.memory.kind == "mlp":
        pytest.skip("MLP memory: tests/test_triton_mlp.py runs the MLP examples the MLP kernels cover")
    if "_memory_triton" not in compiled.source:
        reason = unsupported_reason(compiled.ir)
        assert reason, path.name
        pytest.skip(f"no triton kernels: {reason}")
    module = import_source(compiled.source, f"_ex_{path.stem}", tmp_path)
    chunk = compiled.ir.algorithm.chunk
    B, H, K, V, T = 1, 2, 16, 16, chunk + 21
    q, k, v, params, gen = make_inputs(compiled.ir, B, T, H, K, V, dtype=torch.float64, seed=7)
    n = 2 if compiled.ir.algorithm.kind == "momentum" else 1  # the state: S, or (S, m)
    s0 = [0.3 * torch.randn(B, H, K, V, dtype=torch.float64, generator=gen) for _ in range(n)]
    w_o = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
    w_s = [torch.randn(B, H, K, V, dtype=torch.float64, generator=gen) for _ in range(n)]
    s0, w_s = (tuple(s0), tuple(w_s)) if n == 2 else (s0[0], w_s[0])
    outs, leaves = _run(module, "triton", torch.float32, chunk, q, k, v, params, s0, w_o, w_s)
    ref_outs, ref_leaves = _run(module, "reference", torch.float64, chunk, q, k, v, params, s0, w_o, w_s)
    _assert_agree(outs, ref_outs, ["o", "final S", "final m"], leaves, ref_leaves, ["q", "k", "v", *params, "S0", "m0"],
                  2e-4)
