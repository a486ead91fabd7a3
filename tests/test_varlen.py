"""Packed variable-length batches (cu_seqlens): equal to one call per sequence, gradients included."""
from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from conftest import flatten_state, make_inputs, make_state

H, K, V = 2, 16, 16


def _pack(ir, lengths, seed):
    """N sequences drawn separately, then packed into one batch row."""
    seqs = [make_inputs(ir, 1, n, H, K, V, dtype=torch.float32, seed=seed + i) for i, n in enumerate(lengths)]
    q, k, v = (torch.cat([s[i] for s in seqs], 1) for i in range(3))
    params = {}
    for name in seqs[0][3]:
        xs = [s[3][name] for s in seqs]
        params[name] = xs[0] if xs[0].dim() == 1 else torch.cat(xs, 1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return q, k, v, params, cu


@pytest.mark.parametrize("name,backend,lengths", [
    ("cauchy", "torch", [21, 5, 40]), ("titans", "torch", [21, 5, 40]), ("deltanet", "reference", [21, 5, 40]),
    # the triton kernels run the sequences side by side in one launch; tiles of 16 or 64 tokens
    ("cauchy", "triton", [21, 5, 40]), ("gated_deltanet", "triton", [70, 5, 63]),
    ("quantile", "triton", [17, 33]), ("log_cosh", "triton", [9, 40, 16]), ("retnet", "triton", [65, 1, 64]),
])
def test_packed_equals_separate_calls(compiled_examples, name, backend, lengths):
    """Outputs, final states and the gradients of every input (gates, learnable parameters and the
    initial states included) of one packed call equal those of the reference backend in float64, called
    once per sequence (the oracle)."""
    module, ir = compiled_examples[name]
    chunk = 16 if backend == "triton" else 4
    q, k, v, params, cu = _pack(ir, lengths, seed=11)
    gen = torch.Generator().manual_seed(3)
    state0 = make_state(ir, len(lengths), H, K, V, dtype=torch.float32, gen=gen)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *params.values(), *flatten_state(state0))]
    np_ = len(params)
    packed_params = dict(zip(params, leaves[3:3 + np_]))
    s0 = leaves[3 + np_:]
    o, final = module.memory(*leaves[:3], **packed_params, initial_state=s0[0] if torch.is_tensor(state0) else
                             tuple(s0), output_final_state=True, chunk_size=chunk, backend=backend, cu_seqlens=cu)
    w_o = torch.randn(o.shape, generator=gen)
    w_s = [torch.randn(x.shape, generator=gen) for x in flatten_state(final)]
    loss = (o * w_o).sum() + sum((x * w).sum() for x, w in zip(flatten_state(final), w_s))
    loss.backward()
    learnable_grads = {p: torch.zeros_like(x, dtype=torch.float64) for p, x in params.items() if x.dim() == 1}
    for n, (a, b) in enumerate(pairwise(cu.tolist())):
        def oracle_leaf(x):
            return x.detach().double().clone().requires_grad_()
        sub = [oracle_leaf(x[:, a:b]) for x in (q, k, v)]
        sub_params = {p: oracle_leaf(x if x.dim() == 1 else x[:, a:b]) for p, x in params.items()}
        s_n = [oracle_leaf(x[n:n + 1]) for x in flatten_state(state0)]
        o_n, f_n = module.memory(*sub, **sub_params, initial_state=s_n[0] if torch.is_tensor(state0) else
                                 tuple(s_n), output_final_state=True, chunk_size=chunk, backend="reference")
        loss_n = ((o_n * w_o[:, a:b].double()).sum()
                  + sum((x * w[n:n + 1].double()).sum() for x, w in zip(flatten_state(f_n), w_s)))
        loss_n.backward()
        _close(o[:, a:b], o_n, f"o of sequence {n}")
        for i, (x, y) in enumerate(zip(flatten_state(final), flatten_state(f_n))):
            _close(x[n:n + 1], y, f"final state[{i}] of sequence {n}")
        for what, full, part in zip("qkv", leaves, sub):
            _close(full.grad[:, a:b], part.grad, f"d{what} of sequence {n}")
        for p, x in sub_params.items():
            if x.dim() == 1:
                learnable_grads[p] += x.grad
            else:
                _close(packed_params[p].grad[:, a:b], x.grad, f"d{p} of sequence {n}")
        for i, (full, part) in enumerate(zip(s0, s_n)):
            _close(full.grad[n:n + 1], part.grad, f"d initial_state[{i}] of sequence {n}")
    for p, g in learnable_grads.items():
        _close(packed_params[p].grad, g, f"d{p} (summed over the sequences)")


def _close(a, b, what, tol=2e-4):
    """a (float32) against the float64 oracle b: relative error over all elements."""
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    assert b.abs().sum() > 0, f"{what}: the oracle is zero, the comparison could not fail"
    err = ((a.double() - b).norm() / b.norm()).item()
    assert err < tol, f"{what}: relative error {err:.2e}"


def test_packed_input_errors(compiled_examples):
    module, ir = compiled_examples["cauchy"]
    q, k, v, params, cu = _pack(ir, [4, 6], seed=0)
    with pytest.raises(ValueError, match="rise strictly"):
        module.memory(q, k, v, **params, cu_seqlens=torch.tensor([0, 6, 4]))
    with pytest.raises(ValueError, match="int32/int64"):
        module.memory(q, k, v, **params, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="one batch row"):
        module.memory(*(x.expand(2, -1, -1, -1) for x in (q, k, v)), **params, cu_seqlens=cu)
    with pytest.raises(ValueError, match="N = 2"):
        module.memory(q, k, v, **params, cu_seqlens=cu, initial_state=torch.zeros(3, H, K, V))
