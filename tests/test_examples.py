"""Every example: the torch backend equals the reference backend, and decoding equals the parallel call.

The reference backend is the oracle (a token loop whose gradients come from torch.autograd); its own
correctness against the paper's per-token equations is tested in test_oracles.py.
"""
from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLE_NAMES, assert_close, flatten_state, make_inputs, make_state, stable_seed

B, H, K, V = 2, 2, 8, 8


def _run(module, ir, backend, chunk, q, k, v, params, state0):
    leaves = [q, k, v, *params.values(), *flatten_state(state0)]
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    q_, k_, v_ = leaves[:3]
    p_ = dict(zip(params, leaves[3:3 + len(params)]))
    s_ = leaves[3 + len(params):]
    init = None if state0 is None else (s_[0] if torch.is_tensor(state0) else tuple(s_))
    o, final = module.memory(q_, k_, v_, **p_, initial_state=init, output_final_state=True,
                             chunk_size=chunk, backend=backend)
    return o, flatten_state(final), leaves


@pytest.mark.parametrize("chunk", [1, 16, 64])
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_torch_backend_matches_reference(compiled_examples, name, chunk):
    module, ir = compiled_examples[name]
    T = {1: 11, 16: 37, 64: 70}[chunk]  # ragged: never a multiple of the chunk
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, seed=stable_seed(name, chunk))
    state0 = make_state(ir, B, H, K, V, gen=gen)
    o_ref, s_ref, leaves_ref = _run(module, ir, "reference", chunk, q, k, v, params, state0)
    o_tor, s_tor, leaves_tor = _run(module, ir, "torch", chunk, q, k, v, params, state0)
    assert_close(o_tor, o_ref, "o")
    assert len(s_tor) == len(s_ref)
    for i, (a, b) in enumerate(zip(s_tor, s_ref)):
        assert_close(a, b, f"final state[{i}]")
    # One random cotangent on the output and on every part of the final state.
    loss_terms = [torch.randn(o_ref.shape, dtype=o_ref.dtype, generator=gen)]
    loss_terms += [torch.randn(s.shape, dtype=s.dtype, generator=gen) for s in s_ref]
    for outs, leaves in ((([o_ref] + s_ref), leaves_ref), (([o_tor] + s_tor), leaves_tor)):
        sum((a * w).sum() for a, w in zip(outs, loss_terms)).backward()
    names = ["q", "k", "v", *params, *[f"initial_state[{i}]" for i in range(len(s_ref))]]
    for what, a, b in zip(names, leaves_tor, leaves_ref):
        assert b.grad is not None and a.grad is not None, f"no gradient for {what}"
        assert b.grad.abs().sum() > 0, f"gradient of {what} is identically zero: the test could not fail"
        assert_close(a.grad, b.grad, f"d{what}")


def _slice_params(params, t):
    """Per-token parameter values for step(): gates lose their time axis, learnables stay [H]."""
    return {n: (p if p.dim() == 1 else p[:, t]) for n, p in params.items()}


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_decode_equals_parallel(compiled_examples, name, backend):
    module, ir = compiled_examples[name]
    chunk = min(ir.algorithm.chunk, 8)
    T, P = 3 * chunk + 5, 2 * chunk  # prefill two whole chunks, then decode the rest
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, seed=7)
    state0 = make_state(ir, B, H, K, V, gen=gen)
    with torch.no_grad():
        o_full, _s_full = module.memory(q, k, v, **params, initial_state=state0, output_final_state=True,
                                       chunk_size=chunk, backend=backend)
        pre = {n: (p if p.dim() == 1 else p[:, :P]) for n, p in params.items()}
        o_pre, s_pre = module.memory(q[:, :P], k[:, :P], v[:, :P], **pre, initial_state=state0,
                                     output_final_state=True, chunk_size=chunk, backend=backend)
        assert_close(o_pre, o_full[:, :P], "prefill output")
        state = module.decode_state(s_pre)
        for t in range(P, T):
            o_t, state = module.step(q[:, t], k[:, t], v[:, t], **_slice_params(params, t), state=state,
                                     chunk_size=chunk)
            assert_close(o_t, o_full[:, t], f"decoded output at t={t}")


@pytest.mark.parametrize("name", ["moneta", "gated_deltanet", "cauchy", "titans"])
def test_module_prefill_then_decode(compiled_examples, name):
    """The whole block: forward over a prefix, then one token per call, equals one forward call."""
    module, ir = compiled_examples[name]
    torch.manual_seed(0)
    layer = getattr(module, ir.name)(32).double()
    T, P = 70, 66
    x = torch.randn(1, T, 32, dtype=torch.float64)
    with torch.no_grad():
        y_full, _ = layer(x)
        y_pre, state = layer(x[:, :P])
        assert_close(y_pre, y_full[:, :P], "prefix")
        for t in range(P, T):
            y_t, state = layer(x[:, t:t + 1], state)
            assert_close(y_t, y_full[:, t:t + 1], f"token {t}")


def test_one_token_call_decodes_with_step(compiled_examples, monkeypatch):
    """A one-token call at chunk size 1 (Gated DeltaNet) runs step(), not memory()'s chunk machinery,
    and its short convolution's weighted sum equals conv1d's output."""
    module, ir = compiled_examples["gated_deltanet"]
    assert ir.algorithm.chunk == 1
    torch.manual_seed(1)
    layer = getattr(module, ir.name)(32).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        y_full, _ = layer(x)
        _, state = layer(x[:, :8])

        def no_memory(*args, **kwargs):
            raise AssertionError("a one-token call ran memory()")

        monkeypatch.setattr(module, "memory", no_memory)
        y_t, _ = layer(x[:, 8:9], state)
    assert_close(y_t, y_full[:, 8:9], "the decoded token")


def test_module_trains(compiled_examples):
    """Every parameter of a block receives a finite, non-zero gradient."""
    module, ir = compiled_examples["yaad"]
    layer = getattr(module, ir.name)(32)
    y, _ = layer(torch.randn(2, 20, 32))
    y.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} received a zero gradient"
