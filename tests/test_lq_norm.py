"""lq(norm=chunk|token): the two read-out rules of Moneta's Lq normalisation (docs/semantics.md, "Decision,
Moneta").

norm=token: token i reads W_i = Z_i / n(Z_i). norm=chunk (the default): token i reads Z_i / n(Z_b), the norm
of its chunk's base state, except the token that ends a chunk, which reads its own Z_i / n(Z_i). The torch
backend (the dual form scaled by 1/n(Z_b)) is tested against the reference backend (a token loop) in
float64, and the reference backend against a hand-written oracle of the rule.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close, flatten_state, import_source, make_inputs, make_state, stable_seed

from mirasc.compiler import compile_spec
from mirasc.frontend import load_spec
from mirasc.frontend.errors import SpecError

B, H, K, V = 2, 2, 4, 4

_MEMORY = {
    "matrix": "memory linear",
    "mlp": "memory mlp(depth=2, expansion=2, act=gelu, residual=true, norm=true)",
}


def _spec(memory: str = "matrix", decay: bool = True, alg: str = "gd", norm: str = "chunk",
          bias: str = "lp(p=3)", at: str = "") -> str:
    lq = "lq(q=4)" if norm == "default" else f"lq(q=4, norm={norm})"
    algorithm = (f"gd(lr=eta, chunk=4{at})" if alg == "gd" else f"momentum(beta=0.6, lr=eta, chunk=4{at})")
    return "\n".join([
        "layer LqTest {",
        "    heads 2",
        f"    key_dim {K}",
        f"    value_dim {V}",
        f"    {_MEMORY[memory]}",
        "    gate eta : head = softplus(rank=4, init=0.1)",
        *(["    gate alpha : head = sigmoid(rank=4, init=0.9)"] if decay else []),
        f"    bias {bias}",
        f"    retention {'decay(alpha) + ' if decay else ''}{lq}",
        f"    algorithm {algorithm}",
        "}",
        "",
    ])


_CACHE: dict[str, tuple] = {}


def _compile(text: str, tmp_path_factory) -> tuple:
    if text not in _CACHE:
        compiled = compile_spec(text, "lq_test.miras")
        name = f"_mirasc_lq_{stable_seed(text)}"
        module = import_source(compiled.source, name, tmp_path_factory.mktemp("lq"))
        _CACHE[text] = (module, compiled.ir)
    return _CACHE[text]


def _run(module, backend, chunk, q, k, v, params, state0, **kw):
    """memory() on fresh leaves -> (o, final state parts, leaves), every input differentiable."""
    leaves = [t.detach().clone().requires_grad_(True) for t in [q, k, v, *params.values(), *flatten_state(state0)]]
    q_, k_, v_ = leaves[:3]
    p_ = dict(zip(params, leaves[3:3 + len(params)]))
    s_ = leaves[3 + len(params):]
    init = s_[0] if torch.is_tensor(state0) else tuple(s_)
    o, final = module.memory(q_, k_, v_, **p_, initial_state=init, output_final_state=True, chunk_size=chunk,
                             backend=backend, **kw)
    return o, flatten_state(final), leaves


def _grads(o, finals, leaves, seed):
    """Gradients of every input for one random cotangent on the output and on every final state part."""
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, dtype=o.dtype, generator=gen)).sum()
    for s in finals:
        loss = loss + (s * torch.randn(s.shape, dtype=s.dtype, generator=gen)).sum()
    return torch.autograd.grad(loss, leaves)


def _compare_backends(module, ir, chunk, T, seed, **kw):
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, seed=seed)
    state0 = make_state(ir, B, H, K, V, gen=gen)
    o_ref, s_ref, l_ref = _run(module, "reference", chunk, q, k, v, params, state0, **kw)
    o_tor, s_tor, l_tor = _run(module, "torch", chunk, q, k, v, params, state0, **kw)
    assert_close(o_tor, o_ref, "o")
    for i, (a, b) in enumerate(zip(s_tor, s_ref, strict=True)):
        assert_close(a, b, f"final state[{i}]")
    names = ["q", "k", "v", *params, *[f"state[{i}]" for i in range(len(s_ref))]]
    for name, a, b in zip(names, _grads(o_tor, s_tor, l_tor, seed), _grads(o_ref, s_ref, l_ref, seed),
                          strict=True):
        assert_close(a, b, f"d/d{name}")


# ---- torch backend == reference backend ---------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
@pytest.mark.parametrize("decay, alg", [(True, "gd"), (False, "gd"), (True, "momentum"), (False, "momentum")])
@pytest.mark.parametrize("memory", ["matrix", "mlp"])
def test_torch_matches_reference(tmp_path_factory, monkeypatch, memory, decay, alg, chunk):
    module, ir = _compile(_spec(memory, decay, alg), tmp_path_factory)
    assert ir.retention.norm == "chunk"
    if chunk == 3:  # memory() takes powers of two; the rule and both backends hold for any chunk size
        monkeypatch.setattr(module, "_check_chunk_size", lambda fn, c: None)
    T = 19  # a multiple of no chunk size above 1: every call ends mid-chunk
    _compare_backends(module, ir, chunk, T, stable_seed(memory, decay, alg, chunk))


@pytest.mark.parametrize("memory", ["matrix", "mlp"])
def test_packed_sequences(tmp_path_factory, memory):
    """cu_seqlens: the chunk grid starts again at every sequence (torch == reference, and == one call per
    sequence)."""
    module, ir = _compile(_spec(memory, True, "gd"), tmp_path_factory)
    cu = torch.tensor([0, 6, 7, 17])
    q, k, v, params, gen = make_inputs(ir, 1, 17, H, K, V, seed=3)
    state0 = make_state(ir, 3, H, K, V, gen=gen)
    o_tor, s_tor, _ = _run(module, "torch", 4, q, k, v, params, state0, cu_seqlens=cu)
    o_ref, s_ref, _ = _run(module, "reference", 4, q, k, v, params, state0, cu_seqlens=cu)
    assert_close(o_tor, o_ref, "packed o")
    for a, b in zip(s_tor, s_ref, strict=True):
        assert_close(a, b, "packed final state")
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {name: (p if p.dim() == 1 else p[:, a:b]) for name, p in params.items()}
        s_n = [x[n:n + 1] for x in flatten_state(state0)]
        s_n = s_n[0] if torch.is_tensor(state0) else tuple(s_n)
        o_n, f_n, _ = _run(module, "torch", 4, q[:, a:b], k[:, a:b], v[:, a:b], part, s_n)
        assert_close(o_tor[:, a:b], o_n, f"sequence {n} alone")
        for x, y in zip(s_tor, f_n, strict=True):
            assert_close(x[n:n + 1], y, f"sequence {n} final state")


# ---- chunk against token ----------------------------------------------------------------------------

@pytest.mark.parametrize("memory", ["matrix", "mlp"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_chunk_equals_token_at_chunk_size_one(tmp_path_factory, memory, backend):
    """At C = 1 every token ends a chunk, so both rules read map(Z_i): same outputs, states, gradients."""
    chunk_mod, ir = _compile(_spec(memory, True, "momentum", norm="chunk"), tmp_path_factory)
    token_mod, _ = _compile(_spec(memory, True, "momentum", norm="token"), tmp_path_factory)
    q, k, v, params, gen = make_inputs(ir, B, 9, H, K, V, seed=11)
    state0 = make_state(ir, B, H, K, V, gen=gen)
    o_c, s_c, l_c = _run(chunk_mod, backend, 1, q, k, v, params, state0)
    o_t, s_t, l_t = _run(token_mod, backend, 1, q, k, v, params, state0)
    assert_close(o_c, o_t, "o")
    for a, b in zip(s_c, s_t, strict=True):
        assert_close(a, b, "final state")
    for a, b in zip(_grads(o_c, s_c, l_c, 5), _grads(o_t, s_t, l_t, 5), strict=True):
        assert_close(a, b, "gradient")


@pytest.mark.parametrize("memory", ["matrix", "mlp"])
def test_chunk_differs_from_token_inside_a_chunk(tmp_path_factory, memory):
    """At C = 4 the rules share every state (the gradient points are map(Z_b) in both) and the outputs of
    the chunk-ending tokens, and differ at every other token."""
    chunk_mod, ir = _compile(_spec(memory, True, "gd", norm="chunk"), tmp_path_factory)
    token_mod, _ = _compile(_spec(memory, True, "gd", norm="token"), tmp_path_factory)
    q, k, v, params, gen = make_inputs(ir, B, 12, H, K, V, seed=13)
    state0 = make_state(ir, B, H, K, V, gen=gen)
    with torch.no_grad():
        o_c, s_c = chunk_mod.memory(q, k, v, **params, initial_state=state0, output_final_state=True,
                                    chunk_size=4, backend="torch")
        o_t, s_t = token_mod.memory(q, k, v, **params, initial_state=state0, output_final_state=True,
                                    chunk_size=4, backend="torch")
    for a, b in zip(flatten_state(s_c), flatten_state(s_t), strict=True):
        assert_close(a, b, "final state")
    ends = torch.arange(12) % 4 == 3
    assert_close(o_c[:, ends], o_t[:, ends], "chunk-ending tokens")
    gap = (o_c[:, ~ends] - o_t[:, ~ends]).abs().amax(dim=(0, 2, 3))  # per token inside a chunk
    assert (gap > 1e-4).all(), f"norm=chunk equals norm=token inside a chunk: {gap}"


def test_default_is_chunk(tmp_path_factory):
    spec = load_spec(_spec(norm="default"), "lq.miras")
    ir = _compile(_spec(norm="default"), tmp_path_factory)[1]
    assert dict(spec.retention.terms[-1].args)["norm"] == "chunk"
    assert ir.retention.norm == "chunk"
    assert _compile(_spec(norm="token"), tmp_path_factory)[1].retention.norm == "token"


# ---- the rule by hand ---------------------------------------------------------------------------------

def _n(z):
    """n(Z) = max(||Z||_4^2, eps), q = 4."""
    return z.pow(4).sum().sqrt().clamp_min(1e-6)


def _oracle(q, k, v, eta, alpha, z0, C):
    """One head: l2 bias, gd, decay, lq(q=4, norm=chunk), straight from the rule. q, k [T, K], v [T, V]."""
    z, out = z0, []
    for t in range(q.shape[0]):
        if t % C == 0:
            zb = z  # the chunk's base: gradients at map(Z_b), reads through n(Z_b)
        g = eta[t] * torch.outer(k[t], k[t] @ (zb / _n(zb)) - v[t])
        z = alpha[t] * z - g
        out.append(q[t] @ z / (_n(z) if t % C == C - 1 else _n(zb)))
    return torch.stack(out), z


@pytest.mark.parametrize("T", [8, 11])
def test_reference_matches_hand_written_rule(tmp_path_factory, T):
    module, ir = _compile(_spec("matrix", True, "gd", bias="l2"), tmp_path_factory)
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, seed=T)
    state0 = make_state(ir, B, H, K, V, gen=gen)
    with torch.no_grad():
        o, final = module.memory(q, k, v, **params, initial_state=state0, output_final_state=True,
                                 chunk_size=4, backend="reference")
    for b in range(B):
        for h in range(H):
            o_bh, z_bh = _oracle(q[b, :, h], k[b, :, h], v[b, :, h], params["eta"][b, :, h],
                                 params["alpha"][b, :, h], state0[b, h], 4)
            assert_close(o[b, :, h], o_bh, f"output b={b} h={h}")
            assert_close(final[b, h], z_bh, f"final state b={b} h={h}")


# ---- decoding -----------------------------------------------------------------------------------------

def _at(params, t):
    return {n: p if p.dim() == 1 else p[:, t] for n, p in params.items()}


@pytest.mark.parametrize("memory, alg", [("matrix", "gd"), ("matrix", "momentum"), ("mlp", "gd")])
def test_prefill_then_decode_equals_one_call(tmp_path_factory, memory, alg):
    """A prompt that ends mid-chunk (C = 4, P = 10): memory() over it gives the full call's outputs (its last
    token reads through the base norm); memory() over its whole chunks, then step() token by token over
    the rest of the prompt and beyond, gives the full call's outputs too."""
    module, ir = _compile(_spec(memory, True, alg), tmp_path_factory)
    C, P, T = 4, 10, 19
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, seed=17)
    state0 = make_state(ir, B, H, K, V, gen=gen)
    with torch.no_grad():
        o_full, s_full = module.memory(q, k, v, **params, initial_state=state0, output_final_state=True,
                                       chunk_size=C, backend="torch")
        pre = {n: p if p.dim() == 1 else p[:, :P] for n, p in params.items()}
        o_pre, _ = module.memory(q[:, :P], k[:, :P], v[:, :P], **pre, initial_state=state0, chunk_size=C,
                                 backend="torch")
        assert_close(o_pre, o_full[:, :P], "prompt ending mid-chunk")
        whole = P // C * C
        pre = {n: p if p.dim() == 1 else p[:, :whole] for n, p in params.items()}
        _, s_pre = module.memory(q[:, :whole], k[:, :whole], v[:, :whole], **pre, initial_state=state0,
                                 output_final_state=True, chunk_size=C, backend="torch")
        state = module.decode_state(s_pre)
        for t in range(whole, T):
            o_t, state = module.step(q[:, t], k[:, t], v[:, t], **_at(params, t), state=state, chunk_size=C)
            assert_close(o_t, o_full[:, t], f"decoded output at t={t} (chunk position {t % C})")
        for a, b in zip(flatten_state(state.state), flatten_state(s_full), strict=True):
            assert_close(a, b, "decoded final state")


def test_block_prefill_then_decode(tmp_path_factory):
    """The whole block at C = 4: a forward over a prompt that ends mid-chunk, then one token per call."""
    module, ir = _compile(_spec("mlp", True, "gd"), tmp_path_factory)
    torch.manual_seed(0)
    layer = getattr(module, ir.name)(16, chunk_size=4).double()
    x = torch.randn(1, 15, 16, dtype=torch.float64)
    with torch.no_grad():
        y_full, _ = layer(x)
        y, state = layer(x[:, :6])
        assert_close(y, y_full[:, :6], "prompt")
        for t in range(6, 15):
            y_t, state = layer(x[:, t:t + 1], state)
            assert_close(y_t, y_full[:, t:t + 1], f"token {t}")


# ---- the frontend -------------------------------------------------------------------------------------

def test_bad_norm_is_located():
    text = _spec(norm="tokens")
    with pytest.raises(SpecError) as info:
        load_spec(text, "bad.miras")
    line = text.splitlines().index("    retention decay(alpha) + lq(q=4, norm=tokens)") + 1
    col = text.splitlines()[line - 1].index("tokens") + 1
    assert str(info.value).startswith(f"bad.miras:{line}:{col}: error: argument 'norm' of lq must be one of: ")


def test_chunk_with_at_retained_is_refused():
    text = _spec(at=", at=retained")
    with pytest.raises(SpecError) as info:
        load_spec(text, "r.miras")
    line = text.splitlines().index("    retention decay(alpha) + lq(q=4, norm=chunk)") + 1
    assert str(info.value).startswith(f"r.miras:{line}:")
    assert "norm=token" in str(info.value)
    load_spec(_spec(at=", at=retained", norm="token"), "r.miras")  # the per-token rule decodes at=retained


@pytest.mark.parametrize("memory", ["linear", "mlp(depth=2, expansion=2, act=gelu, residual=true, norm=true)"])
def test_lq_with_q_2_is_the_identity_map(memory, tmp_path):
    """||Z||_2^(2-2) = 1: lq(q=2) reads Z itself, so the layer equals the same layer without the lq term
    (its reference backend, float64), outputs and final states, and has no map in its plan."""
    from mirasc import __version__
    from mirasc.codegen.emit import plans
    from mirasc.testing import compile_module

    def spec(retention):
        return "\n".join(["layer Q2 {", "    heads 2", "    key_dim 8", "    value_dim 8", f"    memory {memory}",
                          "    gate eta : head = softplus(rank=4, init=0.1)",
                          "    gate alpha : head = sigmoid(rank=4, init=0.9)", "    bias lp(p=3)",
                          f"    retention {retention}", "    algorithm gd(lr=eta, chunk=4)", "}"])

    with_lq, lq_compiled = compile_module(spec("decay(alpha) + lq(q=2)"), "q2.miras", tmp_path, "_q2_lq")
    without, _ = compile_module(spec("decay(alpha)"), "q2none.miras", tmp_path, "_q2_none")
    assert plans(lq_compiled.ir, __version__).module.rule.map == "id"
    q, k, v, params, gen = make_inputs(lq_compiled.ir, 2, 11, 2, 8, 8, seed=5)
    s0 = make_state(lq_compiled.ir, 2, 2, 8, 8, gen=gen)
    o_lq, s_lq = with_lq.memory(q, k, v, **params, initial_state=s0, output_final_state=True, backend="torch")
    o_ref, s_ref = without.memory(q, k, v, **params, initial_state=s0, output_final_state=True,
                                  backend="reference")
    torch.testing.assert_close(o_lq, o_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(flatten_state(s_lq), flatten_state(s_ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
