"""The fused triton decode step against the torch step and the reference backend, on drawn variants.

Every variant decodes from a random (never zero) state and crosses a chunk boundary, so the base /
pos bookkeeping of DecodeState is exercised, not only the arithmetic. Without a GPU the kernel runs in
Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py): shapes stay small.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from conftest import (
    ROOT,
    CountLaunches,
    LinearVariant,
    closed_state,
    compile_module,
    decode_steps,
    indexed_params,
    make_inputs,
    prefill_then_steps,
    reference_call,
    rel,
    state_vector,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (bias, declarations, retention, lr, chunk, at, K, V, dtype): every bias class, bias parameters per
# head / channel / learnable, lr constant / per head / per channel / learnable, decay none / constant /
# gate / learnable, at=previous and at=retained, chunk 1 and 16, K != V, head dims that are no powers
# of two (masked lanes), fp32 and bf16.
VARIANTS = [
    LinearVariant("lp3_decay_gate", "lp(p=3)", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 16, V=8),
    LinearVariant("deltanet", "l2", ["gate beta : head = sigmoid(rank=4, init=0.5)"], "none", "beta", 1),  # DeltaNet
    # Gated DeltaNet
    LinearVariant("gated_deltanet_retained", "l2", ["gate beta : head = sigmoid(rank=4, init=0.5)",
                  "gate a : head = sigmoid(rank=4, init=0.95)"], "decay(a)", "beta", 1, at="retained", K=8,
                  dtype=torch.bfloat16),
    LinearVariant("retnet", "dot", [], "decay(0.9)", "1", 16, dtype=torch.bfloat16),  # RetNet
    LinearVariant("huber_norm_channel_lr", "huber_norm(d)", ["gate d : head = softplus(rank=4, init=1.0)",
                  "param a = learnable(0.9, sigmoid)", "gate eta : channel = softplus(rank=4, init=0.1)"],
                  "decay(a)", "eta", 16, at="retained", K=12, V=20),
    # a custom (Cauchy) bias with a learnable parameter
    LinearVariant("cauchy_learnable", "sum(log(1 + ((y - v) / c)^2))", ["param c = learnable(1.0, softplus)"],
                  "none", "0.3", 1, V=8),
    LinearVariant("lp3_channel_lr", "lp(p=3)", ["gate eta : channel = softplus(rank=4, init=0.1)"],
                  "decay(0.95)", "eta", 16, at="retained", dtype=torch.bfloat16),
    LinearVariant("huber_learnable_lr", "huber(d)", ["gate d : channel = softplus(rank=4, init=0.5)",
                  "gate a : head = sigmoid(rank=4, init=0.9)", "param lr = learnable(0.3, softplus)"],
                  "decay(a)", "lr", 1, at="retained", K=8, V=8),
    # y-independent bias: the base is still carried (and decayed) for at=retained
    LinearVariant("dot_retained", "dot", ["gate a : head = sigmoid(rank=4, init=0.9)"], "decay(a)", "0.5", 16,
                  at="retained", V=8),
    # per-channel decay gates ([B, H, V] per token)
    LinearVariant("lp3_channel_decay", "lp(p=3)", ["gate a : channel = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.1)"], "decay(a)", "eta", 16, V=8),
    LinearVariant("channel_gated_deltanet", "l2", ["gate beta : head = sigmoid(rank=4, init=0.5)",
                  "gate a : channel = sigmoid(rank=4, init=0.95)"], "decay(a)", "beta", 1, at="retained", K=8,
                  dtype=torch.bfloat16),
]

# Momentum (the state is (Z, m)): with and without decay, beta a per-head gate, a learnable, a constant
# or per channel, at=previous and at=retained.
MOMENTUM_VARIANTS = [
    LinearVariant("momentum_decay_gates", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)",
                  "gate b : head = sigmoid(rank=4, init=0.8)", "gate eta : head = softplus(rank=4, init=0.1)"],
                  "decay(a)", "eta", 4, V=8, beta="b"),
    LinearVariant("momentum_learnable_no_decay", "lp(p=3)", ["param b = learnable(0.7, sigmoid)"], "none", "0.2", 1,
                  K=8, beta="b"),
    LinearVariant("momentum_const_retained", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)"], "decay(a)", "0.3",
                  4, at="retained", K=12, V=8, beta="0.85", dtype=torch.bfloat16),
    LinearVariant("momentum_channel_gates", "huber(d)", ["gate d : head = softplus(rank=4, init=1.0)",
                  "gate a : channel = sigmoid(rank=4, init=0.9)", "gate b : channel = sigmoid(rank=4, init=0.8)"],
                  "decay(a)", "0.3", 1, V=8, beta="b"),
]

# Retention maps: every token's gradient at map(Z_b), o = q map(Z'); chunk 1 and 4 (chunk 4 over 9
# tokens crosses two chunk ends, where lq(norm=chunk) and elastic_net(form=retain) act).
MAP_VARIANTS = [
    LinearVariant("kl_key", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)"], "decay(a) + kl(axis=key)", "0.5",
                  4, V=8),
    LinearVariant("kl_value", "l2", [], "kl(axis=value, scale=2.0)", "0.5", 1, K=8, V=12),
    LinearVariant("kl_all_retained", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)"],
                  "decay(a) + kl(axis=all, scale=4.0)", "0.5", 4, at="retained", V=8),
    LinearVariant("bregman_retained", "l2", ["gate a : channel = sigmoid(rank=4, init=0.9)",
                  "gate eta : head = softplus(rank=4, init=0.3)"], "decay(a) + bregman", "eta", 4, at="retained",
                  K=8),
    LinearVariant("bregman", "dot", [], "bregman", "0.3", 1, V=8),
    LinearVariant("elastic_net_ftrl", "l2", ["param g = learnable(0.05, softplus)"],
                  "decay(0.95) + elastic_net(g, form=ftrl)", "0.5", 4, V=8),
    LinearVariant("elastic_net_retain", "l2", ["gate g : channel = softplus(rank=4, init=0.05)"],
                  "decay(0.95) + elastic_net(g, form=retain)", "0.5", 4, K=12, V=8),
    LinearVariant("elastic_net_retain_retained", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)"],
                  "decay(a) + elastic_net(0.02, form=retain)", "0.5", 1, at="retained", V=8),
    LinearVariant("lq_chunk_decay", "l2", [], "decay(0.9) + lq(q=3)", "0.5", 4, V=8),
    LinearVariant("lq_chunk", "l2", [], "lq(q=3, norm=chunk)", "0.5", 1, K=12, V=8),
    LinearVariant("lq_token_retained", "l2", ["gate a : head = sigmoid(rank=4, init=0.9)"],
                  "decay(a) + lq(q=3, norm=token)", "0.5", 4, at="retained", V=8, dtype=torch.bfloat16),
    LinearVariant("lq_q1_5", "l2", [], "lq(q=1.5)", "0.5", 4, V=8),
    # momentum and a map together
    LinearVariant("momentum_kl", "l2", ["gate b : head = sigmoid(rank=4, init=0.8)"], "decay(0.95) + kl",
                  "0.3", 4, V=8, beta="b"),
]

ALL_VARIANTS = VARIANTS + MOMENTUM_VARIANTS + MAP_VARIANTS


def _compile(i, variant, tmp_path):
    module, compiled = compile_module(variant.spec(f"StepVariant{i}"), f"step_variant{i}.miras", tmp_path,
                                      f"_step_variant{i}")
    assert hasattr(module, "_step_kernel"), "the variant has no fused step kernel"
    return module, compiled.ir


def _inputs(ir, dtype, B, T, H, K, V, seed):
    """Inputs in the run's dtype, their float64 images (the values it sees exactly) and a random state:
    Z, or (Z, m) with momentum."""
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, dtype=torch.float64, seed=seed)
    low = [x.to(dtype).to(DEVICE) for x in (q, k, v, *params.values())]
    n = 2 if ir.algorithm.kind == "momentum" else 1
    s0 = tuple((0.5 * torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)).float().to(DEVICE)
               for _ in range(n))
    return low[:3], dict(zip(params, low[3:])), (s0[0] if n == 1 else s0)




@pytest.mark.parametrize(("i", "variant"), indexed_params(ALL_VARIANTS))
def test_triton_step_matches_torch_step_and_reference(i, variant, tmp_path, monkeypatch):
    chunk, K, V, dtype = variant.chunk, variant.K, variant.V, variant.dtype
    module, ir = _compile(i, variant, tmp_path)
    counter = CountLaunches(module._step_kernel)
    monkeypatch.setattr(module, "_step_kernel", counter)
    B, H = 2, 2
    T = chunk + 5 if chunk > 1 else 7  # crosses a chunk boundary, ends inside a chunk
    qkv, params, s0 = _inputs(ir, dtype, B, T, H, K, V, seed=2000 + i)

    o_tr, st_tr = decode_steps(module, qkv, params, module.decode_state(s0), chunk, "triton", 0, T)
    assert counter.launches == T, "step(backend='triton') did not run the fused kernel for every token"
    o_to, st_to = decode_steps(module, qkv, params, module.decode_state(s0), chunk, "torch", 0, T)
    assert counter.launches == T
    o_ref, s_ref = reference_call(module, qkv, params, s0, chunk)

    # Triton and torch steps: the same rule in float32, only summation order differs.
    o_tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 outputs: 8 bits (the interpreter truncates)
    assert rel(o_tr, o_to) < o_tol, f"o vs torch step: {rel(o_tr, o_to):.2e}"
    assert st_tr.pos == st_to.pos == T % chunk
    assert type(st_tr.state) is type(st_to.state)
    assert state_vector(st_tr.state).dtype == torch.float32 and st_tr.base.dtype == torch.float32
    s_tr, s_to = state_vector(st_tr.state), state_vector(st_to.state)
    assert rel(s_tr, s_to) < 1e-5, f"state vs torch step: {rel(s_tr, s_to):.2e}"
    assert rel(st_tr.base, st_to.base) < 1e-5, f"base vs torch step: {rel(st_tr.base, st_to.base):.2e}"
    # Against the oracle: the whole sequence as one memory() call, float64.
    o_tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert torch.isfinite(o_tr).all() and torch.isfinite(s_tr).all()
    assert rel(o_tr, o_ref) < o_tol, f"o vs reference: {rel(o_tr, o_ref):.2e}"
    s_end = state_vector(closed_state(ir, st_tr, params))
    assert rel(s_end, state_vector(s_ref)) < 1e-4, f"final state vs reference: {rel(s_end, state_vector(s_ref)):.2e}"
    assert rel(state_vector(s_ref), state_vector(s0)) > 1e-2, "the state barely moved: the comparison could not fail"


# the gd variants 0, 2, 4, 5, 6, and every momentum and map variant
PREFILL = [p for p in indexed_params(ALL_VARIANTS) if p.values[0] in (0, 2, 4, 5, 6) or p.values[0] >= len(VARIANTS)]


@pytest.mark.parametrize(("i", "variant"), PREFILL)
def test_prefill_then_triton_steps_equals_one_call(i, variant, tmp_path):
    chunk, K, V, dtype = variant.chunk, variant.K, variant.V, variant.dtype
    module, ir = _compile(i, variant, tmp_path)
    B, H = 2, 2
    P = 2 * chunk if chunk > 1 else 5  # the prefill: whole chunks
    T = P + chunk + 3 if chunk > 1 else P + 6
    qkv, params, s0 = _inputs(ir, dtype, B, T, H, K, V, seed=3000 + i)
    with torch.no_grad():
        o_pre, o_dec, state = prefill_then_steps(module, qkv, params, s0, chunk, P, T)
    o_ref, s_ref = reference_call(module, qkv, params, s0, chunk)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert rel(o_pre, o_ref[:, :P]) < tol, f"prefill: {rel(o_pre, o_ref[:, :P]):.2e}"
    assert rel(o_dec, o_ref[:, P:]) < tol, f"decoded tokens: {rel(o_dec, o_ref[:, P:]):.2e}"
    s_end = state_vector(closed_state(ir, state, params))
    assert rel(s_end, state_vector(s_ref)) < 1e-4, f"final state: {rel(s_end, state_vector(s_ref)):.2e}"


def test_auto_picks_the_kernel_only_where_it_applies(tmp_path, monkeypatch):
    module, ir = _compile(4, VARIANTS[4], tmp_path)
    counter = CountLaunches(module._step_kernel)
    monkeypatch.setattr(module, "_step_kernel", counter)
    B, H, K, V = 2, 2, 12, 20
    (q, k, v), params, s0 = _inputs(ir, torch.float32, B, 2, H, K, V, seed=7)
    tok = {n: (p if p.dim() == 1 else p[:, 0]) for n, p in params.items()}
    state = module.decode_state(s0)
    o, _ = module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=state)  # auto, no gradient wanted
    assert counter.launches == 1
    o_torch, _ = module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=state, backend="torch")
    assert counter.launches == 1
    assert rel(o, o_torch) < 1e-5
    # Inputs whose last dimension is strided are copied, not misread.
    qt = q[:, 0].transpose(1, 2).contiguous().transpose(1, 2)
    assert qt.stride(-1) != 1
    o_strided, _ = module.step(qt, k[:, 0], v[:, 0], **tok, state=state, backend="triton")
    assert rel(o_strided, o_torch) < 1e-5
    # A recorded gradient or float64 inputs: auto falls back to the (differentiable) torch step.
    qg = q[:, 0].clone().requires_grad_()
    launches = counter.launches
    o_grad, _ = module.step(qg, k[:, 0], v[:, 0], **tok, state=state)
    assert counter.launches == launches and o_grad.requires_grad
    o64, _ = module.step(q[:, 0].double(), k[:, 0].double(), v[:, 0].double(),
                         **{n: p.double() for n, p in tok.items()}, state=state)
    assert counter.launches == launches and o64.dtype == torch.float64
    assert rel(o64, o_torch) < 1e-5


def test_triton_step_refusals(tmp_path, monkeypatch, compiled_examples):
    module, ir = _compile(0, VARIANTS[0], tmp_path)
    counter = CountLaunches(module._step_kernel)
    monkeypatch.setattr(module, "_step_kernel", counter)
    B, H, K, V = 1, 2, 16, 8
    (q, k, v), params, s0 = _inputs(ir, torch.float32, B, 1, H, K, V, seed=8)
    tok = {n: p[:, 0] for n, p in params.items()}
    state = module.decode_state(s0)
    with pytest.raises(ValueError, match="backend must be"):
        module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=state, backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        module.step(q[:, 0].double(), k[:, 0].double(), v[:, 0].double(), **tok, state=state, backend="triton")
    with pytest.raises(ValueError, match="no backward"):
        module.step(q[:, 0].clone().requires_grad_(), k[:, 0], v[:, 0], **tok, state=state, backend="triton")
    big = torch.zeros(B, H, 136, device=DEVICE)
    with pytest.raises(ValueError, match="up to 128"):
        module.step(big, big, v[:, 0], **tok, backend="triton")
    # step()'s checks still come first on the triton path.
    with pytest.raises(ValueError, match=r"eta must have shape \[B, H\]"):
        module.step(q[:, 0], k[:, 0], v[:, 0], a=tok["a"], eta=tok["eta"][:, :1], state=state, backend="triton")
    with pytest.raises(ValueError, match="state.pos"):
        module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=state._replace(pos=16), backend="triton")
    with pytest.raises(ValueError, match=r"state.base must have shape"):
        module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=state._replace(base=s0[:, :1]), backend="triton")
    with pytest.raises(TypeError, match="DecodeState"):
        module.step(q[:, 0], k[:, 0], v[:, 0], **tok, state=s0, backend="triton")
    assert counter.launches == 0
    # Layers without triton kernels keep the torch step and say why backend='triton' cannot run: an MLP
    # memory with kl over the value axis (Memora's example normalises over the key axis, which has one)
    text = (ROOT / "examples" / "memora.miras").read_text().replace("kl(axis=key)", "kl(axis=value)")
    other, compiled = compile_module(text, "memora_value.miras", tmp_path, "_step_memora_value")
    assert not hasattr(other, "_step_kernel") and hasattr(compiled_examples["memora"][0], "_step_kernel")
    x = torch.zeros(1, compiled.ir.block.heads, compiled.ir.block.key_dim)
    gates = {p.name: torch.zeros(1) for p in compiled.ir.inputs()}  # refused before they are read
    with pytest.raises(ValueError, match="backend='triton' is not available"):
        other.step(x, x, x, **gates, backend="triton")
