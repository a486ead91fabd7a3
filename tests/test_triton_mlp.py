"""The triton backend of MLP memories (fused chunked kernels) against the reference backend.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py), so CI checks the very kernels a GPU runs, at small shapes: the reference runs in float64,
the kernels in float32 (or bf16 inputs), on ragged sequences (T not a multiple of the chunk).
"""
from __future__ import annotations

import importlib.util
import itertools
import sys

import pytest
import torch

pytest.importorskip("triton")

from conftest import ROOT, make_inputs

from mirasc.compiler import compile_spec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 2000
ETA = "gate eta : head = softplus(rank=4, init=0.1)"
ALPHA = "gate alpha : head = sigmoid(rank=4, init=0.9)"

# (memory args, bias, declarations, retention, lr, chunk, K, V, T, dtype)
VARIANTS = {
    # Titans' memory (silu, residual, no LN, l2, decay) with plain gd
    "titans_gd": ("expansion=4, act=silu, residual=true, norm=false", "l2", [ETA, ALPHA], "decay(alpha)", "eta",
                  16, 16, 16, 40, torch.float32),
    # Moneta's memory and bias (gelu, residual, LN, lp(3)) with plain decay
    "moneta_decay": ("expansion=4, act=gelu, residual=true, norm=true", "lp(p=3)", [ETA, ALPHA], "decay(alpha)",
                     "eta", 16, 16, 16, 40, torch.float32),
    # the robust bias (Eq. 17) with head dims that are not powers of two (padded tiles)
    "robust_k20": ("expansion=2, act=gelu, residual=true, norm=true", "robust(0.5)", [ETA, ALPHA],
                   "decay(alpha)", "eta", 16, 20, 20, 40, torch.float32),
    # per-channel lr and a per-channel bias parameter, no residual (K != V), no retention
    "relu_channel": ("expansion=2, act=relu, residual=false, norm=true", "huber(d)",
                     ["gate d : channel = softplus(rank=4, init=0.5)", "gate eta : channel = softplus(rank=4, init=0.1)"],
                     "none", "eta", 16, 16, 8, 40, torch.float32),
    # a user bias with a learnable scale, a learnable decay, a constant lr, chunk 32, expansion 3
    "tanh_cauchy": ("expansion=3, act=tanh, residual=false, norm=false", "sum(log(1 + ((y - v) / c)^2))",
                    ["param c = learnable(1.0, softplus)", "param a = learnable(0.9, sigmoid)"], "decay(a)", "0.3",
                    32, 16, 24, 70, torch.float32),
    # a y-independent bias, expansion 1, chunk 64 with a partial second chunk
    "identity_dot": ("expansion=1, act=identity, residual=true, norm=true", "dot", [ETA, ALPHA], "decay(alpha)",
                     "eta", 64, 16, 16, 80, torch.float32),
    # bf16 inputs (the state stays fp32)
    "silu_bf16": ("expansion=4, act=silu, residual=true, norm=true", "l2", [ETA, ALPHA], "decay(alpha)", "eta",
                  16, 16, 16, 40, torch.bfloat16),
}


def _load(name: str, text: str, tmp_path):
    compiled = compile_spec(text, f"{name}.miras")
    path = tmp_path / f"{name}.py"
    path.write_text(compiled.source)
    spec = importlib.util.spec_from_file_location(f"_mlp_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module, compiled


def _compile(name, mem, bias, decls, retention, lr, chunk, K, V, tmp_path, depth=2, algorithm="gd"):
    beta = "beta=0.9, " if algorithm == "momentum" else ""
    text = "\n".join([f"layer Mlp_{name} {{", "    heads 2", f"    key_dim {K}", f"    value_dim {V}",
                      f"    memory mlp(depth={depth}, {mem}) init learned", *("    " + d for d in decls),
                      f"    bias {bias}", f"    retention {retention}",
                      f"    algorithm {algorithm}({beta}lr={lr}, chunk={chunk})", "}"])
    return _load(name, text, tmp_path)


def _state(ir, B, H, K, V, gen):
    x = ir.memory.expansion * K
    return [torch.randn(B, H, a, b, dtype=torch.float64, generator=gen) / a ** 0.5 for a, b in ((K, x), (x, V))]


def _run(module, backend, dtype, chunk, q, k, v, params, s0, w_o, w_s):
    """memory() on fresh leaves (state and parameters in fp32 unless the run is float64) and one backward
    of a random linear function of the output and the final state."""
    low = torch.float32 if dtype != torch.float64 else dtype
    leaves = [x.to(DEVICE, dtype if i < 3 else low).detach().requires_grad_()
              for i, x in enumerate([q, k, v, *params.values(), *s0])]
    p = dict(zip(params, leaves[3:3 + len(params)]))
    o, final = module.memory(*leaves[:3], **p, initial_state=tuple(leaves[3 + len(params):]),
                             output_final_state=True, chunk_size=chunk, backend=backend)
    loss = (o.double() * w_o.to(DEVICE)).sum() + sum((s.double() * w.to(DEVICE)).sum() for s, w in zip(final, w_s))
    loss.backward()
    return [o, *final], leaves


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compare(module, ir, dtype, chunk, B, H, K, V, T, seed, scale=None, tol=None):
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, dtype=torch.float64, seed=seed)
    params = {n: x * (scale or {}).get(n, 1.0) for n, x in params.items()}
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # values the low-precision run sees exactly
    s0 = _state(ir, B, H, K, V, gen)
    w_o = torch.randn(B, T, H, V, dtype=torch.float64, generator=gen)
    w_s = [torch.randn(s.shape, dtype=torch.float64, generator=gen) for s in s0]
    outs, leaves = _run(module, "triton", dtype, chunk, q, k, v, params, s0, w_o, w_s)
    ref_outs, ref_leaves = _run(module, "reference", torch.float64, chunk, q, k, v, params, s0, w_o, w_s)
    tol = tol or (2e-4 if dtype == torch.float32 else 2e-2)
    for what, a, b in zip(["o", "final W1", "final W2"], outs, ref_outs):
        assert torch.isfinite(a).all(), what
        assert _rel(a, b) < tol, f"{what}: relative error {_rel(a, b):.2e}"
    names = ["q", "k", "v", *params, "initial W1", "initial W2"]
    for what, a, b in zip(names, leaves, ref_leaves):
        assert a.grad is not None and torch.isfinite(a.grad).all(), f"d{what}"
        assert b.grad.abs().sum() > 0, f"d{what} is zero: the comparison could not fail"
        assert _rel(a.grad, b.grad) < tol, f"d{what}: relative error {_rel(a.grad, b.grad):.2e}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_mlp_matches_reference(name, tmp_path):
    mem, bias, decls, retention, lr, chunk, K, V, T, dtype = VARIANTS[name]
    module, compiled = _compile(name, mem, bias, decls, retention, lr, chunk, K, V, tmp_path)
    assert "_TritonMLPMemory" in compiled.source
    # the Cauchy scale c drawn in (0.5, 5): a tiny c makes the loss (and its gradients ~1/c^3) ill-conditioned
    _compare(module, compiled.ir, dtype, chunk, 2 if T <= 40 else 1, 2, K, V, T, seed=SEED + list(VARIANTS).index(name),
             scale={"c": 10.0})


@pytest.mark.parametrize("delta_scale", [20.0, 1.0])
def test_yaad_example_on_the_kernels(compiled_examples, delta_scale):
    """examples/yaad.miras as shipped (small head dims: memory() takes them from the inputs).

    With a large threshold every token takes the l2 branch; with the drawn one most take the smoothed
    l1 branch, whose second derivative reaches 1/sqrt(eps) = 1e3 near e_j = 0 and turns fp32 rounding
    into ~1e-3 relative differences of the gradients: a looser tolerance there.
    """
    module, ir = compiled_examples["yaad"]
    _compare(module, ir, torch.float32, 16, 1, 2, 16, 16, 40, seed=7, scale={"delta": delta_scale},
             tol=2e-4 if delta_scale > 1 else 1e-2)


def test_prefill_then_decode(tmp_path):
    """A triton prefill's final state continues exactly under step() (the torch decode path)."""
    module, compiled = _compile("decode", *VARIANTS["moneta_decay"][:8], tmp_path)
    B, H, K, V, P, T = 1, 2, 16, 16, 32, 37
    q, k, v, params, gen = make_inputs(compiled.ir, B, T, H, K, V, dtype=torch.float32, seed=5)
    s0 = tuple(s.float() for s in _state(compiled.ir, B, H, K, V, gen))
    q, k, v, s0 = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), tuple(s.to(DEVICE) for s in s0)
    params = {n: p.to(DEVICE) for n, p in params.items()}
    with torch.no_grad():
        o_full, _ = module.memory(q, k, v, **params, initial_state=s0, chunk_size=16, backend="reference")
        pre = {n: p[:, :P] for n, p in params.items()}
        o_pre, s = module.memory(q[:, :P], k[:, :P], v[:, :P], **pre, initial_state=s0, output_final_state=True,
                                 chunk_size=16, backend="triton")
        assert _rel(o_pre, o_full[:, :P]) < 1e-4
        state = module.decode_state(s)
        for t in range(P, T):
            o_t, state = module.step(q[:, t], k[:, t], v[:, t], **{n: p[:, t] for n, p in params.items()},
                                     state=state, chunk_size=16)
            assert _rel(o_t, o_full[:, t]) < 1e-4, t


def test_triton_mlp_runtime_refusals(tmp_path):
    module, compiled = _compile("refuse", *VARIANTS["titans_gd"][:8], tmp_path)
    q, k, v, params, gen = make_inputs(compiled.ir, 1, 8, 2, 16, 16, dtype=torch.float32)
    s0 = tuple(s.float() for s in _state(compiled.ir, 1, 2, 16, 16, gen))
    for chunk in (8, 128):
        with pytest.raises(ValueError, match="16 <= chunk_size <= 64"):
            module.memory(q, k, v, **params, initial_state=s0, chunk_size=chunk, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        module.memory(q.double(), k.double(), v.double(), **params, initial_state=s0, chunk_size=16,
                      backend="triton")
    # backend="auto" falls back to torch where the kernels do not apply (here: chunk 8)
    o_auto, _ = module.memory(q, k, v, **params, initial_state=s0, chunk_size=8)
    o_torch, _ = module.memory(q, k, v, **params, initial_state=s0, chunk_size=8, backend="torch")
    assert torch.equal(o_auto, o_torch)


@pytest.mark.parametrize("example, why", [
    ("titans", "momentum has no triton kernel for MLP memories"),
    ("moneta", "the retention map 'lq' has no triton kernel"),
    ("memora", "the retention map 'softmax' has no triton kernel"),
])
def test_uncovered_examples_are_refused(example, why):
    compiled = compile_spec((ROOT / "examples" / f"{example}.miras").read_text(), f"{example}.miras")
    assert "_TritonMLPMemory" not in compiled.source
    assert why in compiled.source


@pytest.mark.parametrize("depth, algorithm, why", [
    (3, "gd", "the MLP kernels cover depth 2, got depth 3"),
    (2, "momentum", "momentum has no triton kernel for MLP memories"),
])
def test_uncovered_specs_fall_back_to_torch(depth, algorithm, why, tmp_path):
    module, compiled = _compile(f"fallback{depth}{algorithm}", "expansion=2, act=gelu, residual=true, norm=true",
                                "l2", [ETA], "none", "eta", 16, 16, 16, tmp_path, depth=depth, algorithm=algorithm)
    assert "_TritonMLPMemory" not in compiled.source
    ir = compiled.ir
    q, k, v, params, gen = make_inputs(ir, 1, 20, 2, 16, 16, dtype=torch.float32, seed=3)
    dims = [16] + [32] * (depth - 1) + [16]
    s0 = [torch.randn(1, 2, a, b, generator=gen) / a ** 0.5 for a, b in itertools.pairwise(dims)]
    if algorithm == "momentum":
        s0 += [torch.zeros_like(s) for s in s0]
    with pytest.raises(NotImplementedError, match=why):
        module.memory(q, k, v, **params, initial_state=tuple(s0), chunk_size=16, backend="triton")
    o_auto, _ = module.memory(q, k, v, **params, initial_state=tuple(s0), chunk_size=16)
    o_torch, _ = module.memory(q, k, v, **params, initial_state=tuple(s0), chunk_size=16, backend="torch")
    assert torch.equal(o_auto, o_torch)
