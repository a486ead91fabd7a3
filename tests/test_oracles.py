"""The paper's per-token equations, written out by hand, against the reference backend (chunk size 1).

Each oracle is an independent loop over tokens in float64 that follows the equation as the paper (and
docs/semantics.md for its open choices) writes it; the MLP and its gradient are written here from
scratch, with torch.autograd only differentiating the hand-written loss.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, make_inputs, make_state

B, T, H, K, V = 2, 9, 2, 6, 6


def _reference(compiled_examples, name, q, k, v, params, state0):
    module, _ = compiled_examples[name]
    return module.memory(q, k, v, **params, initial_state=state0, output_final_state=True,
                         chunk_size=1, backend="reference")


def _setup(compiled_examples, name, seed=0):
    _, ir = compiled_examples[name]
    q, k, v, params, gen = make_inputs(ir, B, T, H, K, V, seed=seed)
    return ir, q, k, v, params, gen


def _outer(a, b):
    return a[..., :, None] * b[..., None, :]


def test_linear_attention(compiled_examples):
    _ir, q, k, v, params, gen = _setup(compiled_examples, "linear_attention")
    S = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    o_ref, s_ref = _reference(compiled_examples, "linear_attention", q, k, v, params, S)
    o = []
    for t in range(T):  # Eq. 8 with alpha = 1: S_t = S_{t-1} + k_t^T v_t, o_t = q_t S_t
        S = S + _outer(k[:, t], v[:, t])
        o.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    assert_close(o_ref, torch.stack(o, 1), "o")
    assert_close(s_ref, S, "final state")


def test_mamba2_decay(compiled_examples):
    _ir, q, k, v, params, gen = _setup(compiled_examples, "mamba2")
    S = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    o_ref, s_ref = _reference(compiled_examples, "mamba2", q, k, v, params, S)
    a = params["alpha"]
    o = []
    for t in range(T):  # S_t = alpha_t S_{t-1} + k_t^T v_t
        S = a[:, t, :, None, None] * S + _outer(k[:, t], v[:, t])
        o.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    assert_close(o_ref, torch.stack(o, 1), "o")
    assert_close(s_ref, S, "final state")


def test_deltanet(compiled_examples):
    _ir, q, k, v, params, gen = _setup(compiled_examples, "deltanet")
    S = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    o_ref, s_ref = _reference(compiled_examples, "deltanet", q, k, v, params, S)
    beta = params["beta"]
    eye = torch.eye(K, dtype=torch.float64)
    o = []
    for t in range(T):  # Eq. 9 / Table 1: S_t = (I - beta k^T k) S_{t-1} + beta k^T v
        kt, bt = k[:, t], beta[:, t, :, None, None]
        S = (eye - bt * _outer(kt, kt)) @ S + bt * _outer(kt, v[:, t])
        o.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    assert_close(o_ref, torch.stack(o, 1), "o")
    assert_close(s_ref, S, "final state")


def test_gated_deltanet(compiled_examples):
    _ir, q, k, v, params, gen = _setup(compiled_examples, "gated_deltanet")
    S = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen)
    o_ref, s_ref = _reference(compiled_examples, "gated_deltanet", q, k, v, params, S)
    beta, alpha = params["beta"], params["alpha"]
    eye = torch.eye(K, dtype=torch.float64)
    o = []
    for t in range(T):  # Table 1: S_t = alpha_t (I - beta_t k^T k) S_{t-1} + beta_t k^T v
        kt, bt, at = k[:, t], beta[:, t, :, None, None], alpha[:, t, :, None, None]
        S = at * (eye - bt * _outer(kt, kt)) @ S + bt * _outer(kt, v[:, t])
        o.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    assert_close(o_ref, torch.stack(o, 1), "o")
    assert_close(s_ref, S, "final state")


def test_momentum_deltanet(compiled_examples):
    ir, q, k, v, params, gen = _setup(compiled_examples, "momentum_deltanet")
    S, M = make_state(ir, B, H, K, V, gen=gen)
    o_ref, (s_ref, m_ref) = _reference(compiled_examples, "momentum_deltanet", q, k, v, params, (S, M))
    eta, alpha, mu = params["eta"], params["alpha"], params["mu"]
    o = []
    for t in range(T):  # M_t = mu_t M + eta_t k^T (k (alpha_t S) - v), S_t = alpha_t S - M_t
        kt, at = k[:, t], alpha[:, t, :, None, None]
        err = torch.einsum("bhk,bhkv->bhv", kt, at * S) - v[:, t]
        M = mu[:, t, :, None, None] * M + eta[:, t, :, None, None] * _outer(kt, err)
        S = at * S - M
        o.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    assert_close(o_ref, torch.stack(o, 1), "o")
    assert_close(s_ref, S, "final state")
    assert_close(m_ref, M, "final momentum")


# ---- MLP memories: M(x) = x + [LN](W2 act(W1 x)), written here from scratch -----------------------

def _mlp(Ws, x, act, norm, residual=True):
    h = x
    for i, W in enumerate(Ws):
        h = torch.einsum("bhi,bhio->bho", h, W)
        if i < len(Ws) - 1:
            h = act(h)
    if norm:
        mu = h.mean(-1, keepdim=True)
        var = (h - mu).square().mean(-1, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5)
    return x + h if residual else h


def _grads(loss_fn, Ws, x, target, act, norm):
    """d loss(M(W, x), target) / dW, per batch and head (the loss sums over them independently)."""
    Ws = [W.detach().requires_grad_(True) for W in Ws]
    loss = loss_fn(_mlp(Ws, x, act, norm), target).sum()
    return torch.autograd.grad(loss, Ws)


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def test_titans_momentum(compiled_examples):
    ir, q, k, v, params, gen = _setup(compiled_examples, "titans")
    state0 = make_state(ir, B, H, K, V, gen=gen)
    o_ref, s_ref = _reference(compiled_examples, "titans", q, k, v, params, state0)
    W, m = list(state0[:2]), list(state0[2:])
    theta, eta, alpha = params["theta"], params["eta"], params["alpha"]
    o = []
    for t in range(T):  # S_t = eta_t S_{t-1} - theta_t grad; M_t = alpha_t M_{t-1} + S_t (momentum as m = -S)
        G = _grads(lambda y, tv: 0.5 * (y - tv).square().sum(-1), W, k[:, t], v[:, t], torch.nn.functional.silu,
                   False)
        m = [eta[:, t, :, None, None] * mi + theta[:, t, :, None, None] * g for mi, g in zip(m, G)]
        W = [alpha[:, t, :, None, None] * w - mi for w, mi in zip(W, m)]
        o.append(_mlp(W, q[:, t], torch.nn.functional.silu, False))
    assert_close(o_ref, torch.stack(o, 1), "o")
    for i, (a, b) in enumerate(zip(s_ref, W + m)):
        assert_close(a, b, f"final state[{i}]")


def test_moneta(compiled_examples):
    ir, q, k, v, params, gen = _setup(compiled_examples, "moneta")
    A = list(make_state(ir, B, H, K, V, gen=gen))
    o_ref, s_ref = _reference(compiled_examples, "moneta", q, k, v, params, tuple(A))
    eta, alpha = params["eta"], params["alpha"]

    def normalise(a):  # Eq. 24: W = A / ||A||_4^2, the norm over each weight matrix
        return a / a.abs().pow(4).sum((-2, -1), keepdim=True).pow(0.5)

    def lp3(y, tv):  # Eq. 10 with |x| ~ sqrt(x^2 + 1e-6) (Remark 5)
        return ((y - tv).square() + 1e-6).pow(1.5).sum(-1)

    o = []
    for t in range(T):
        W = [normalise(a) for a in A]
        G = _grads(lp3, W, k[:, t], v[:, t], _gelu, True)
        A = [alpha[:, t, :, None, None] * a - eta[:, t, :, None, None] * g for a, g in zip(A, G)]
        o.append(_mlp([normalise(a) for a in A], q[:, t], _gelu, True))
    assert_close(o_ref, torch.stack(o, 1), "o")
    for i, (a, b) in enumerate(zip(s_ref, A)):
        assert_close(a, b, f"final state[{i}]")


def test_yaad(compiled_examples):
    ir, q, k, v, params, gen = _setup(compiled_examples, "yaad")
    W = list(make_state(ir, B, H, K, V, gen=gen))
    # Thresholds around the typical error norm, so that both branches of Eq. 26 occur.
    params["delta"] = 0.5 + 5.0 * torch.rand(params["delta"].shape, dtype=torch.float64, generator=gen)
    eta, alpha, delta = params["eta"], params["alpha"], params["delta"]
    o_ref, s_ref = _reference(compiled_examples, "yaad", q, k, v, params, tuple(W))

    def l2(y, tv):
        return 0.5 * (y - tv).square().sum(-1)

    def l1(y, tv):
        return ((y - tv).square() + 1e-6).sqrt().sum(-1)

    o, branches = [], set()
    for t in range(T):  # Eq. 26: W_t = alpha W - (eta grad l2 if ||M(k) - v|| <= delta else eta delta grad l1)
        err = (_mlp(W, k[:, t], _gelu, True) - v[:, t]).square().sum(-1).add(1e-6).sqrt()
        small = (err <= delta[:, t])[..., None, None]
        branches |= set(small.flatten().tolist())
        G2 = _grads(l2, W, k[:, t], v[:, t], _gelu, True)
        G1 = _grads(l1, W, k[:, t], v[:, t], _gelu, True)
        d, e, a = (x[:, t, :, None, None] for x in (delta, eta, alpha))
        W = [a * w - e * torch.where(small, g2, d * g1) for w, g2, g1 in zip(W, G2, G1)]
        o.append(_mlp(W, q[:, t], _gelu, True))
    assert branches == {True, False}, "both branches of Eq. 26 must be exercised"
    assert_close(o_ref, torch.stack(o, 1), "o")
    for i, (a, b) in enumerate(zip(s_ref, W)):
        assert_close(a, b, f"final state[{i}]")


def test_memora(compiled_examples):
    ir, q, k, v, params, gen = _setup(compiled_examples, "memora")
    Z0 = make_state(ir, B, H, K, V, gen=gen)
    o_ref, s_ref = _reference(compiled_examples, "memora", q, k, v, params, Z0)
    eta, alpha = params["eta"], params["alpha"]
    # Eq. 27 on the weights themselves: W_t = softmax(alpha log W_{t-1} - eta grad), softmax over the
    # input (key) axis of each weight matrix; W_0 = softmax(Z_0).
    W = [torch.softmax(z, dim=-2) for z in Z0]
    o = []
    for t in range(T):
        G = _grads(lambda y, tv: 0.5 * (y - tv).square().sum(-1), W, k[:, t], v[:, t], _gelu, True)
        a, e = alpha[:, t, :, None, None], eta[:, t, :, None, None]
        W = [torch.softmax(a * torch.log(w) - e * g, dim=-2) for w, g in zip(W, G)]
        o.append(_mlp(W, q[:, t], _gelu, True))
    assert_close(o_ref, torch.stack(o, 1), "o")
    for i, (z, w) in enumerate(zip(s_ref, W)):  # the carried state is the logits Z: softmax(Z) = W
        assert_close(torch.softmax(z, dim=-2), w, f"softmax(final state[{i}])")


@pytest.mark.parametrize("chunk", [4, 8])
def test_ttt_linear_mini_batch_gd(compiled_examples, chunk):
    """TTT-Linear's inner model f(x) = x + LN(x W) and its mini-batch rule: in a chunk every gradient of
    the l2 loss is taken at the chunk's first W (autograd through the model written out here)."""
    _ir, q, k, v, params, gen = _setup(compiled_examples, "ttt_linear", seed=3)
    module, _ = compiled_examples["ttt_linear"]
    W0 = torch.randn(B, H, K, V, dtype=torch.float64, generator=gen) / K ** 0.5
    o_ref, s_ref = module.memory(q, k, v, **params, initial_state=(W0,), output_final_state=True,
                                 chunk_size=chunk, backend="reference")
    eta = params["eta"]
    W, o = W0, []
    for start in range(0, T, chunk):
        base = W
        for t in range(start, min(start + chunk, T)):
            (g,) = _grads(lambda y, tv: 0.5 * (y - tv).square().sum(-1), [base], k[:, t], v[:, t], None, True)
            W = W - eta[:, t, :, None, None] * g
            o.append(_mlp([W], q[:, t], None, True))
    assert_close(o_ref, torch.stack(o, 1), "o")
    assert_close(s_ref[0], W, "final state")
