"""The triton backend (fused chunked kernels) against the reference backend, on drawn layer variants.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py), so CI checks the very kernels a GPU runs, at small shapes.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

pytest.importorskip("triton")

from conftest import flatten_state, make_inputs

from mirasc.codegen.plan.linear import refusal_reason as unsupported_reason
from mirasc.compiler import compile_spec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (bias, declarations, retention, lr, chunk, at, K, V, dtype)
VARIANTS = [
    ("lp(p=3)", ["gate a : head = sigmoid(rank=4, init=0.9)", "gate eta : head = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", 16, "previous", 16, 16, torch.float32),
    ("l2", [], "none", "0.5", 32, "previous", 16, 32, torch.float16),
    ("dot", ["param lr = learnable(0.5, softplus)"], "decay(0.9)", "lr", 16, "previous", 16, 16, torch.float32),
    ("sum(log(1 + ((y - v) / c)^2))", ["param c = learnable(1.0, softplus)",
                                        "gate a : head = sigmoid(rank=4, init=0.9)",
                                        "gate eta : channel = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", 16, "previous", 16, 16, torch.float32),
    ("huber(d)", ["gate d : channel = softplus(rank=4, init=0.5)", "param a = learnable(0.9, sigmoid)",
                  "gate eta : head = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", 16, "retained", 16, 16, torch.float32),
    ("huber_norm(d)", ["gate d : head = softplus(rank=4, init=1.0)", "gate a : head = sigmoid(rank=4, init=0.9)",
                       "gate eta : head = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", 32, "previous", 24, 20, torch.float32),
    ("robust(0.5)", ["gate eta : head = softplus(rank=4, init=0.1)"], "none", "eta", 16, "previous", 16, 16,
     torch.float32),
    ("l2", ["gate eta : head = softplus(rank=4, init=0.1)"], "none", "eta", 16, "previous", 16, 16,
     torch.bfloat16),
    ("huber_mix(d)", ["gate d : head = softplus(rank=4, init=1.0)", "gate a : head = sigmoid(rank=4, init=0.9)",
                      "gate eta : head = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", 16, "retained", 16, 16, torch.float32),
    ("sum(log(cosh(y - v))) + 0.1 * norm(y - v)", ["gate a : head = sigmoid(rank=4, init=0.9)"],
     "decay(a)", "0.3", 16, "previous", 32, 16, torch.bfloat16),
    ("sum(if v - y >= 0 then tau * smooth_abs(v - y) else (1 - tau) * smooth_abs(v - y))",
     ["const tau = 0.8", "gate eta : head = softplus(rank=4, init=0.1)"], "decay(0.95)", "eta", 16, "previous",
     16, 16, torch.float32),  # its second derivative near e = 0 is ~1/sqrt(eps): too sharp for fp16 inputs
    # chunks under 16 tokens share a tile and are solved one after another (chunk 1: the exact rule)
    ("l2", ["gate a : head = sigmoid(rank=4, init=0.9)", "gate eta : head = sigmoid(rank=4, init=0.5)"],
     "decay(a)", "eta", 1, "previous", 16, 32, torch.float32),
    ("l2", ["gate a : head = sigmoid(rank=4, init=0.9)", "gate eta : head = sigmoid(rank=4, init=0.5)"],
     "decay(a)", "eta", 1, "retained", 32, 16, torch.float32),
    ("lp(p=3)", ["gate a : head = sigmoid(rank=4, init=0.9)", "gate eta : channel = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", 4, "previous", 16, 16, torch.float32),
    ("huber_norm(d)", ["gate d : head = softplus(rank=4, init=1.0)", "param a = learnable(0.9, sigmoid)",
                       "gate eta : head = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", 2, "retained", 16, 24, torch.float32),
    ("sum(log(1 + ((y - v) / c)^2))", ["param c = learnable(1.0, softplus)",
                                        "gate eta : head = softplus(rank=4, init=0.1)"],
     "decay(0.9)", "eta", 8, "previous", 16, 16, torch.float32),
    ("l2", ["gate eta : head = sigmoid(rank=4, init=0.5)"], "none", "eta", 1, "previous", 16, 16, torch.bfloat16),
    ("dot", ["gate a : head = sigmoid(rank=4, init=0.9)"], "decay(a)", "1.0", 1, "previous", 16, 16,
     torch.float32),
]


def _compile(i, bias, decls, retention, lr, chunk, at, K, V, tmp_path, beta=None):
    """A layer of one variant; beta (an operand) makes its algorithm momentum instead of gd."""
    algorithm = (f"gd(lr={lr}, chunk={chunk}, at={at})" if beta is None
                 else f"momentum(beta={beta}, lr={lr}, chunk={chunk}, at={at})")
    text = "\n".join([f"layer Variant{i} {{", "    heads 2", f"    key_dim {K}", f"    value_dim {V}",
                      "    memory linear", *("    " + d for d in decls), f"    bias {bias}",
                      f"    retention {retention}", f"    algorithm {algorithm}", "}"])
    compiled = compile_spec(text, f"variant{i}.miras")
    path = tmp_path / f"variant{i}.py"
    path.write_text(compiled.source)
    spec = importlib.util.spec_from_file_location(f"_variant{i}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module, compiled.ir


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


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("i", range(len(VARIANTS)))
def test_triton_matches_reference(i, tmp_path):
    bias, decls, retention, lr, chunk, at, K, V, dtype = VARIANTS[i]
    module, ir = _compile(i, bias, decls, retention, lr, chunk, at, K, V, tmp_path)
    B, H, T = 2, 2, chunk + 21  # ragged: the last chunk is partial
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, dtype=torch.float64, seed=1000 + i)
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # values the low-precision run sees exactly
    s0 = 0.3 * torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    w_o = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
    w_s = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    outs, leaves = _run(module, "triton", dtype, chunk, q, k, v, params, s0, w_o, w_s)
    ref_outs, ref_leaves = _run(module, "reference", torch.float64, chunk, q, k, v, params, s0, w_o, w_s)
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    names = ["q", "k", "v", *params, "initial_state"]
    for what, a, b in zip(["o", "final state"], outs, ref_outs):
        assert torch.isfinite(a).all(), what
        assert _rel(a, b) < tol, f"{what}: relative error {_rel(a, b):.2e}"
    for what, a, b in zip(names, leaves, ref_leaves):
        assert a.grad is not None and torch.isfinite(a.grad).all(), f"d{what}"
        assert b.grad.abs().sum() > 0, f"d{what} is zero: the comparison could not fail"
        assert _rel(a.grad, b.grad) < tol, f"d{what}: relative error {_rel(a.grad, b.grad):.2e}"


# Per-channel decay gates (alpha [B, T, H, V]) and momentum (scalar alpha and beta):
# (bias, declarations, retention, lr, beta or None for gd, chunk, at, K, V, dtype, T, initial state)
GATE_VARIANTS = [
    # per-channel decay: every chunk regime (a tile of chunks 1, 4, 8; one chunk per tile 16, 32, 64)
    ("lp(p=3)", ["gate a : channel = sigmoid(rank=4, init=0.9)", "gate eta : head = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", None, 16, "previous", 16, 16, torch.float32, 37, True),
    ("l2", ["gate a : channel = sigmoid(rank=4, init=0.9)", "gate eta : channel = sigmoid(rank=4, init=0.5)"],
     "decay(a)", "eta", None, 1, "retained", 16, 32, torch.float32, 21, True),  # a per-channel gated delta rule
    ("huber(d)", ["gate d : channel = softplus(rank=4, init=0.5)", "gate a : channel = sigmoid(rank=4, init=0.9)",
                  "param lr = learnable(0.3, softplus)"],
     "decay(a)", "lr", None, 4, "previous", 24, 20, torch.float32, 27, True),
    ("sum(log(1 + ((y - v) / c)^2))", ["param c = learnable(1.0, softplus)",
                                        "gate a : channel = sigmoid(rank=4, init=0.9)",
                                        "gate eta : head = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", None, 64, "retained", 16, 16, torch.bfloat16, 40, False),
    ("dot", ["gate a : channel = sigmoid(rank=4, init=0.9)"], "decay(a)", "0.5", None, 8, "previous", 16, 16,
     torch.float32, 19, True),  # y-independent: tiles of 64 whatever the chunk
    ("l2", ["gate a : channel = sigmoid(rank=4, init=0.9)", "gate eta : head = sigmoid(rank=4, init=0.5)"],
     "decay(a)", "eta", None, 2, "previous", 16, 16, torch.bfloat16, 23, True),
    ("lp(p=3)", ["gate a : channel = sigmoid(rank=4, init=0.9)", "gate eta : head = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", None, 32, "retained", 16, 16, torch.float32, 40, False),
    # the WY form (an affine bias, chunks under 16) over several 64-token tiles, the last one partial
    ("l2", ["gate a : head = sigmoid(rank=4, init=0.9)", "gate eta : head = sigmoid(rank=4, init=0.5)"],
     "decay(a)", "eta", None, 1, "retained", 16, 24, torch.float32, 150, True),  # Gated DeltaNet
    ("l2", ["gate eta : head = sigmoid(rank=4, init=0.5)"],
     "none", "eta", None, 4, "previous", 32, 16, torch.bfloat16, 140, True),
    # momentum
    ("l2", ["gate a : head = sigmoid(rank=4, init=0.9)", "gate eta : head = softplus(rank=4, init=0.1)",
            "gate b : head = sigmoid(rank=4, init=0.8)"],
     "decay(a)", "eta", "b", 1, "previous", 16, 16, torch.float32, 23, True),  # Titans' rule, linear memory
    ("l2", ["gate a : head = sigmoid(rank=4, init=0.9)", "gate eta : head = softplus(rank=4, init=0.1)",
            "gate b : head = sigmoid(rank=4, init=0.8)"],
     "decay(a)", "eta", "b", 2, "retained", 16, 16, torch.float32, 131, True),
    ("l2", ["gate a : head = sigmoid(rank=4, init=0.9)", "gate eta : head = softplus(rank=4, init=0.1)",
            "gate b : head = sigmoid(rank=4, init=0.8)"],
     "decay(a)", "eta", "b", 4, "retained", 16, 24, torch.float32, 25, True),
    ("sum(log(1 + ((y - v) / c)^2))", ["param c = learnable(1.0, softplus)", "param a = learnable(0.9, sigmoid)",
                                        "gate eta : channel = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", "0.9", 16, "retained", 16, 16, torch.float32, 37, True),
    ("huber_norm(d)", ["gate d : head = softplus(rank=4, init=1.0)", "gate b : head = sigmoid(rank=4, init=0.8)",
                       "gate eta : head = softplus(rank=4, init=0.1)"],
     "none", "eta", "b", 2, "previous", 20, 16, torch.float32, 21, False),
    ("lp(p=3)", ["gate a : head = sigmoid(rank=4, init=0.9)", "param b = learnable(0.8, sigmoid)",
                 "gate eta : head = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", "b", 64, "previous", 16, 16, torch.bfloat16, 40, True),
    ("dot", ["gate a : head = sigmoid(rank=4, init=0.9)", "gate b : head = sigmoid(rank=4, init=0.8)"],
     "decay(a)", "0.5", "b", 8, "previous", 16, 16, torch.float32, 19, True),
]


# Head dims above 128 (same fields as GATE_VARIANTS): a head's state runs as column slices of at most
# 128 columns (K <= 128) or 64 columns (K = 256), each a head of its own for the kernels
WIDE_VARIANTS = [
    ("sum(log(1 + ((y - v) / c)^2))", ["param c = learnable(1.0, softplus)", "gate a : head = sigmoid(rank=4, init=0.9)",
                                        "gate eta : channel = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", None, 16, "previous", 256, 256, torch.bfloat16, 21, True),  # 4 slices of 64, K = 256
    ("l2", ["gate a : channel = sigmoid(rank=4, init=0.9)", "gate eta : head = sigmoid(rank=4, init=0.5)"],
     "decay(a)", "eta", None, 1, "retained", 32, 160, torch.float32, 9, True),  # 2 slices of 80, chunk 1
    ("lp(p=3)", ["gate a : head = sigmoid(rank=4, init=0.9)", "param b = learnable(0.8, sigmoid)",
                 "gate d : head = softplus(rank=4, init=0.1)"],
     "decay(a)", "d", "b", 16, "previous", 64, 256, torch.bfloat16, 20, True),  # momentum, 2 slices
    ("huber(d)", ["gate d : channel = softplus(rank=4, init=0.5)", "param lr = learnable(0.3, softplus)"],
     "none", "lr", None, 16, "previous", 200, 48, torch.bfloat16, 18, False),  # K = 200 unsliced
    ("l2", ["gate a : head = sigmoid(rank=4, init=0.9)", "gate eta : head = softplus(rank=4, init=0.1)"],
     "decay(a)", "eta", None, 64, "previous", 128, 128, torch.bfloat16, 70, True),  # 64-token tiles: 2 slices
    ("l2", ["gate eta : head = softplus(rank=4, init=0.1)"], "decay(0.95)", "eta", None, 64, "previous", 64, 128,
     torch.float32, 67, True),  # fp32 in 64-token tiles: 64 x 64 per program, 2 slices
    # the WY form in 16-token tiles, where 64-token tiles would not fit the keys
    ("l2", ["gate a : head = sigmoid(rank=4, init=0.9)", "gate eta : head = sigmoid(rank=4, init=0.5)"],
     "decay(a)", "eta", None, 1, "retained", 128, 32, torch.float32, 40, True),  # fp32, K = 128
    ("l2", ["gate eta : head = sigmoid(rank=4, init=0.5)"], "none", "eta", None, 2, "previous", 256, 64,
     torch.bfloat16, 37, True),  # K = 256
]


@pytest.mark.parametrize("i", range(len(GATE_VARIANTS)))
def test_triton_gates_match_reference(i, tmp_path):
    """Per-channel decay and momentum: outputs, final state (S and m), every gradient, ragged T."""
    _check_variant(100 + i, GATE_VARIANTS[i], tmp_path)


@pytest.mark.parametrize("i", range(len(WIDE_VARIANTS)))
def test_triton_wide_heads_match_reference(i, tmp_path):
    """Head dims above 128: the column slices agree with the reference in every output and gradient."""
    module = _check_variant(200 + i, WIDE_VARIANTS[i], tmp_path, heads=1 + i % 2)  # H = 1: zero strides
    chunk, _, K, V, dtype = WIDE_VARIANTS[i][5:10]
    expected = {(256, 256): 4, (32, 160): 2, (64, 256): 2, (200, 48): 1, (128, 128): 2, (64, 128): 2, (128, 32): 1,
                (256, 64): 1}[K, V]
    assert module._value_slices(K, V, chunk, dtype) == expected


def test_triton_wide_heads_refused_for_coupled_columns(tmp_path):
    """A bias that reduces over the value dimension couples the columns: no slices, a clear error, and
    "auto" takes the torch backend."""
    module, ir = _compile(300, "huber_norm(d)", ["gate d : head = softplus(rank=4, init=1.0)"], "decay(0.9)", "0.1",
                          16, "previous", 16, 192, tmp_path)
    assert not module._COLUMN_SEPARABLE
    q, k, v, params, _ = make_inputs(ir, 1, 8, 2, 16, 192, dtype=torch.float32)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    params = {n: p.to(DEVICE) for n, p in params.items()}
    with pytest.raises(ValueError, match="reduces over the value dimension"):
        module.memory(q, k, v, **params, chunk_size=16, backend="triton")
    o, _ = module.memory(q, k, v, **params, chunk_size=16, backend="auto")
    ref, _ = module.memory(q, k, v, **params, chunk_size=16, backend="reference")
    assert _rel(o, ref) < 1e-4
    # K = V = 128 in 64-token tiles: the whole state does not fit one program, and slices would be wrong
    q128 = torch.randn(1, 8, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    assert "reduces over the value dimension" in module._triton_usable(q128, q128, 64)
    assert module._triton_usable(q128, q128, 32) is None
    assert module._triton_usable(q128.float(), q128.float(), 32) is not None  # fp32 operands: twice the room
    with pytest.raises(ValueError, match="cannot hold a K = 264"):
        module.memory(*(torch.randn(1, 8, 2, 264, device=DEVICE) for _ in range(2)), v, **params, backend="triton")


def _check_variant(idx, variant, tmp_path, heads=2):
    bias, decls, retention, lr, beta, chunk, at, K, V, dtype, T, with_s0 = variant
    module, ir = _compile(idx, bias, decls, retention, lr, chunk, at, K, V, tmp_path, beta=beta)
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
    for what, a, b in zip(["o", "final S", "final m"], outs, ref_outs):
        assert torch.isfinite(a).all(), what
        assert _rel(a, b) < tol, f"{what}: relative error {_rel(a, b):.2e}"
    for what, a, b in zip(names, leaves, ref_leaves):
        assert a.grad is not None and torch.isfinite(a.grad).all(), f"d{what}"
        assert b.grad.abs().sum() > 0, f"d{what} is zero: the comparison could not fail"
        assert _rel(a.grad, b.grad) < tol, f"d{what}: relative error {_rel(a.grad, b.grad):.2e}"
    return module


def test_triton_prefill_then_decode(tmp_path):
    """A triton prefill's final state continues exactly under step()."""
    module, ir = _compile(0, *VARIANTS[0][:8], tmp_path)
    B, H, K, V, P, T = 2, 2, 16, 16, 32, 37
    q, k, v, params, _gen = make_inputs(ir, B, T, H, K, V, dtype=torch.float32, seed=5)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    params = {n: p.to(DEVICE) for n, p in params.items()}
    with torch.no_grad():
        o_full, _ = module.memory(q, k, v, **params, chunk_size=16, backend="reference")
        pre = {n: p[:, :P] for n, p in params.items()}
        o_pre, s = module.memory(q[:, :P], k[:, :P], v[:, :P], **pre, output_final_state=True, chunk_size=16,
                                 backend="triton")
        assert _rel(o_pre, o_full[:, :P]) < 1e-4
        state = module.decode_state(s)
        for t in range(P, T):
            o_t, state = module.step(q[:, t], k[:, t], v[:, t], **{n: p[:, t] for n, p in params.items()},
                                     state=state, chunk_size=16)
            assert _rel(o_t, o_full[:, t]) < 1e-4, t
    assert flatten_state(state.state)


def test_triton_refusals(tmp_path):
    module, ir = _compile(1, *VARIANTS[1][:8], tmp_path)
    q, k, v, params, _ = make_inputs(ir, 1, 8, 2, 16, 32, dtype=torch.float32)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    with pytest.raises(ValueError, match="float64"):
        module.memory(q.double(), k.double(), v.double(), **params, chunk_size=16, backend="triton")
    _, ir = _compile(99, "l2", ["gate a : channel = sigmoid(rank=4, init=0.9)"], "decay(a)", "0.1", 16, "previous",
                     16, 16, tmp_path, beta="0.9")
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
    file = tmp_path / f"{path.stem}.py"
    file.write_text(compiled.source)
    spec = importlib.util.spec_from_file_location(f"_ex_{path.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
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
    for what, a, b in zip(["o", "final S", "final m"], outs, ref_outs):
        assert _rel(a, b) < 2e-4, f"{what}: relative error {_rel(a, b):.2e}"
    for what, a, b in zip(["q", "k", "v", *params, "S0", "m0"], leaves, ref_leaves):
        assert b.grad.abs().sum() > 0, f"d{what} is zero: the comparison could not fail"
        assert _rel(a.grad, b.grad) < 2e-4, f"d{what}: relative error {_rel(a.grad, b.grad):.2e}"
