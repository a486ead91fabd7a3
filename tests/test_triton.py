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

from mirasc.codegen.triton import unsupported_reason
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


def _compile(i, bias, decls, retention, lr, chunk, at, K, V, tmp_path):
    text = "\n".join([f"layer Variant{i} {{", "    heads 2", f"    key_dim {K}", f"    value_dim {V}",
                      "    memory linear", *("    " + d for d in decls), f"    bias {bias}",
                      f"    retention {retention}", f"    algorithm gd(lr={lr}, chunk={chunk}, at={at})", "}"])
    compiled = compile_spec(text, f"variant{i}.miras")
    path = tmp_path / f"variant{i}.py"
    path.write_text(compiled.source)
    spec = importlib.util.spec_from_file_location(f"_variant{i}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module, compiled.ir


def _run(module, backend, dtype, chunk, q, k, v, params, s0, w_o, w_s):
    leaves = [x.to(DEVICE, dtype if i < 3 else torch.float32 if dtype != torch.float64 else dtype)
              .detach().requires_grad_() for i, x in enumerate([q, k, v, *params.values(), s0])]
    p = dict(zip(params, leaves[3:-1]))
    o, s = module.memory(*leaves[:3], **p, initial_state=leaves[-1], output_final_state=True,
                         chunk_size=chunk, backend=backend)
    ((o.double() * w_o.to(DEVICE)).sum() + (s.double() * w_s.to(DEVICE)).sum()).backward()
    return [o, s], leaves


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
    titans = compile_spec((sys.modules["conftest"].ROOT / "examples" / "quantile.miras").read_text(), "quantile.miras")
    assert "momentum has no triton kernel yet" in titans.source


EXAMPLES = sorted((sys.modules["conftest"].ROOT / "examples").glob("*.miras"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_triton_examples_match_reference(path, tmp_path):
    """Every example with triton kernels, at its own chunk size: outputs, final state, every gradient."""
    compiled = compile_spec(path.read_text(), path.name)
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
    s0 = 0.3 * torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    w_o = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
    w_s = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    outs, leaves = _run(module, "triton", torch.float32, chunk, q, k, v, params, s0, w_o, w_s)
    ref_outs, ref_leaves = _run(module, "reference", torch.float64, chunk, q, k, v, params, s0, w_o, w_s)
    for what, a, b in zip(["o", "final state"], outs, ref_outs):
        assert _rel(a, b) < 2e-4, f"{what}: relative error {_rel(a, b):.2e}"
    for what, a, b in zip(["q", "k", "v", *params, "initial_state"], leaves, ref_leaves):
        assert b.grad.abs().sum() > 0, f"d{what} is zero: the comparison could not fail"
        assert _rel(a.grad, b.grad) < 2e-4, f"d{what}: relative error {_rel(a.grad, b.grad):.2e}"
