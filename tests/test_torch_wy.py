"""The torch backend's WY form for affine biases (l2: DeltaNet, Gated DeltaNet) against the reference.

Chunks under 64 tokens of an affine bias run on the torch backend in blocks of 64 tokens, each block's
exact per-token (or per-chunk) gradients solved as one unit lower-triangular system (_wy_deltas). These
tests compare outputs, final states and the gradients of every input with the reference backend (token by
token, autograd through it) in float64, for the examples and for spec variants the language allows:
per-channel decay, per-channel lr, at=previous / at=retained, momentum, a constant or no lr.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_close, compile_module, flatten_state, make_inputs, make_state, stable_seed

from mirasc.testing import cu_seqlens

F64 = torch.float64
B, H, K, V = 2, 2, 8, 8

_HEAD = "heads 2\n key_dim 8\n value_dim 8\n memory linear\n bias l2\n"
SPECS = {
    "deltanet": (ROOT / "examples" / "deltanet.miras").read_text(),
    "gated_deltanet": (ROOT / "examples" / "gated_deltanet.miras").read_text(),
    # per-channel decay, gradient at the previous state
    "channel_decay": "layer ChannelDecay {\n" + _HEAD + """
        gate eta : head = softplus(rank=4, init=0.3)
        gate alpha : channel = sigmoid(rank=4, init=0.9)
        retention decay(alpha)
        algorithm gd(lr=eta, chunk=1) }""",
    # per-channel decay and lr, gradient at the retained state
    "channel_decay_lr_retained": "layer ChannelRetained {\n" + _HEAD + """
        gate eta : channel = softplus(rank=4, init=0.3)
        gate alpha : channel = sigmoid(rank=4, init=0.9)
        retention decay(alpha)
        algorithm gd(lr=eta, chunk=1, at=retained) }""",
    # a constant decay and a learnable lr
    "const_decay_learnable_lr": "layer ConstDecay {\n" + _HEAD + """
        const gamma = 0.95
        param eta = learnable(0.4, softplus)
        retention decay(gamma)
        algorithm gd(lr=eta, chunk=1) }""",
    # the plain delta rule with a constant lr and no decay
    "const_lr": "layer LrOne {\n" + _HEAD + """
        retention none
        algorithm gd(lr=0.5, chunk=1) }""",
    # momentum (Titans' rule on a matrix) with decay, at the previous and the retained state
    "momentum": "layer Momentum {\n" + _HEAD + """
        gate eta : head = softplus(rank=4, init=0.3)
        gate alpha : head = sigmoid(rank=4, init=0.9)
        gate beta : head = sigmoid(rank=4, init=0.8)
        retention decay(alpha)
        algorithm momentum(beta=beta, lr=eta, chunk=1) }""",
    "momentum_channel_retained": "layer MomentumChannel {\n" + _HEAD + """
        gate eta : head = softplus(rank=4, init=0.3)
        gate alpha : head = sigmoid(rank=4, init=0.9)
        gate beta : channel = sigmoid(rank=4, init=0.8)
        retention decay(alpha)
        algorithm momentum(beta=beta, lr=eta, chunk=1, at=retained) }""",
}

_modules: dict = {}


def compiled(name: str, tmp_dir: Path):
    """The generated module of SPECS[name], compiled once into tmp_dir and imported."""
    if name not in _modules:
        module, c = compile_module(SPECS[name], f"{name}.miras", tmp_dir, f"_mirasc_wy_{name}")
        _modules[name] = (module, c.ir)
    return _modules[name]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("wy")


class CountCalls:
    """Wraps a function of a generated module and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def run(module, backend, q, k, v, params, state0, chunk=1, dtype=F64, cu_seqlens=None):
    """memory() with fresh leaves in dtype; returns (o, final state list, leaves)."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in [q, k, v, *params.values(), *flatten_state(state0)]]
    p = dict(zip(params, leaves[3 : 3 + len(params)]))
    s = leaves[3 + len(params) :]
    init = None if state0 is None else s[0] if torch.is_tensor(state0) else tuple(s)
    o, final = module.memory(*leaves[:3], **p, initial_state=init, output_final_state=True, chunk_size=chunk,
                             backend=backend, cu_seqlens=cu_seqlens)
    return o, flatten_state(final), leaves


def backward(outs, leaves, gen):
    """Gradients of every leaf for a random linear function of the outputs (o and the final state)."""
    cot = [torch.randn(x.shape, dtype=F64, generator=gen).to(x.dtype) for x in outs]
    grads = torch.autograd.grad(sum((x * w).sum() for x, w in zip(outs, cot)), leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def compare(name, out_dir, T, with_state, chunk=1, dtype=F64, rtol=1e-9, atol=1e-10):
    """Torch (in dtype) against the reference (float64): outputs, final state, every gradient."""
    module, ir = compiled(name, out_dir)
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, seed=stable_seed(name, T, with_state, chunk))
    state0 = make_state(ir, B, H, K, V, gen=gen) if with_state else None
    names = ["q", "k", "v", *params, *[f"initial_state[{i}]" for i in range(len(flatten_state(state0)))]]
    seed = stable_seed("cot", name, T)
    o_ref, s_ref, l_ref = run(module, "reference", q, k, v, params, state0, chunk)
    g_ref = backward([o_ref, *s_ref], l_ref, torch.Generator().manual_seed(seed))
    module._wy_deltas = counter = CountCalls(module._wy_deltas)
    try:
        o, s, leaves = run(module, "torch", q, k, v, params, state0, chunk, dtype)
        g = backward([o, *s], leaves, torch.Generator().manual_seed(seed))
    finally:
        module._wy_deltas = counter.fn
    assert counter.calls == -(-T // 64), f"the WY form ran {counter.calls} times for {T} tokens"
    errors = {}
    for what, a, b in zip(["o", *[f"final state[{i}]" for i in range(len(s))], *[f"d{n}" for n in names]],
                          [o, *s, *g], [o_ref, *s_ref, *g_ref]):
        assert b.abs().sum() > 0, f"{what} is zero in the reference: the comparison could not fail"
        assert_close(a.to(F64), b, f"{name} T={T} {what}", rtol=rtol, atol=atol)
        errors[what] = (a.to(F64) - b).abs().max().item()
    return errors


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("T", [1, 5, 64, 130])
@pytest.mark.parametrize("name", list(SPECS))
def test_chunk1_float64_matches_reference(name, T, with_state, out_dir):
    if not with_state and T == 1:
        pytest.skip("from a zero state a single token's decay acts on nothing: its gradient is zero")
    compare(name, out_dir, T, with_state)


@pytest.mark.parametrize("name", ["gated_deltanet", "channel_decay_lr_retained", "momentum"])
def test_chunk1_float32(name, out_dir):
    """float32 inputs (the state in float32) stay within float32 round-off of the float64 reference."""
    compare(name, out_dir, 130, True, dtype=torch.float32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [2, 16, 32])
@pytest.mark.parametrize("name", ["gated_deltanet", "channel_decay", "momentum_channel_retained"])
def test_short_chunks_match_reference(name, chunk, out_dir):
    """Chunks of 2 to 32 tokens share a block too, each chunk's gradients at its own first state."""
    compare(name, out_dir, 130, True, chunk=chunk)


def test_long_chunks_skip_the_wy_form(out_dir):
    """At chunk 64 and above the chunk rule has no in-chunk dependence: the plain chunk path runs."""
    module, ir = compiled("gated_deltanet", out_dir)
    q, k, v, params, _ = make_inputs(ir, B, 130, H, K, V, seed=1)
    module._wy_deltas = counter = CountCalls(module._wy_deltas)
    try:
        o, s, _ = run(module, "torch", q, k, v, params, None, chunk=64)
    finally:
        module._wy_deltas = counter.fn
    o_ref, s_ref, _ = run(module, "reference", q, k, v, params, None, chunk=64)
    assert counter.calls == 0
    assert_close(o, o_ref, "o")
    assert_close(s[0], s_ref[0], "final state")


@pytest.mark.parametrize("name", ["gated_deltanet", "channel_decay"])
def test_packed_sequences(name, out_dir):
    """cu_seqlens: every packed sequence from its own state, as separate reference calls."""
    module, ir = compiled(name, out_dir)
    lens = [5, 70, 1, 131]
    q, k, v, params, gen = make_inputs(ir, 1, sum(lens), H, K, V, seed=stable_seed("varlen", name))
    state0 = make_state(ir, len(lens), H, K, V, gen=gen)
    cu = cu_seqlens(lens)
    o, s, leaves = run(module, "torch", q, k, v, params, state0, cu_seqlens=cu)
    g = backward([o, *s], leaves, torch.Generator().manual_seed(5))
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        p_n = {key: x[:, a:b] if x.dim() > 1 else x for key, x in params.items()}
        o_n, s_n, _ = run(module, "reference", q[:, a:b], k[:, a:b], v[:, a:b], p_n, state0[n : n + 1])
        outs.append(o_n)
        finals.append(s_n[0])
    assert_close(o, torch.cat(outs, 1), "o")
    assert_close(s[0], torch.cat(finals, 0), "final state")
    o_ref, s_ref, l_ref = run(module, "reference", q, k, v, params, state0, cu_seqlens=cu)
    g_ref = backward([o_ref, *s_ref], l_ref, torch.Generator().manual_seed(5))
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_close(a, b, f"gradient {i}")
