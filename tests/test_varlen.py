"""Packed variable-length batches (cu_seqlens): equal to one call per sequence, gradients included."""
from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from conftest import assert_close, flatten_state, make_inputs, make_state

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


@pytest.mark.parametrize("name,backend", [("cauchy", "torch"), ("cauchy", "triton"), ("titans", "torch"),
                                          ("deltanet", "reference")])
def test_packed_equals_separate_calls(compiled_examples, name, backend):
    module, ir = compiled_examples[name]
    lengths = [21, 5, 40]
    chunk = 16 if backend == "triton" else 4
    q, k, v, params, cu = _pack(ir, lengths, seed=11)
    gen = torch.Generator().manual_seed(3)
    state0 = make_state(ir, len(lengths), H, K, V, dtype=torch.float32, gen=gen)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, final = module.memory(*leaves, **params, initial_state=state0, output_final_state=True,
                             chunk_size=chunk, backend=backend, cu_seqlens=cu)
    o.square().sum().backward()
    bounds = cu.tolist()
    for n, (a, b) in enumerate(pairwise(bounds)):
        s_n = [x[n:n + 1] for x in flatten_state(state0)]
        s_n = s_n[0] if torch.is_tensor(state0) else tuple(s_n)
        sub = [x[:, a:b].detach().clone().requires_grad_() for x in (q, k, v)]
        o_n, f_n = module.memory(*sub, **{p: (x if x.dim() == 1 else x[:, a:b]) for p, x in params.items()},
                                 initial_state=s_n, output_final_state=True, chunk_size=chunk, backend=backend)
        o_n.square().sum().backward()
        assert_close(o[:, a:b], o_n, f"o of sequence {n}", rtol=1e-5, atol=1e-6)
        for i, (x, y) in enumerate(zip(flatten_state(final), flatten_state(f_n))):
            assert_close(x[n:n + 1], y, f"final state[{i}] of sequence {n}", rtol=1e-5, atol=1e-6)
        for what, full, part in zip("qkv", leaves, sub):
            assert_close(full.grad[:, a:b], part.grad, f"d{what} of sequence {n}", rtol=1e-5, atol=1e-6)


def test_packed_input_errors(compiled_examples):
    module, ir = compiled_examples["cauchy"]
    q, k, v, params, cu = _pack(ir, [4, 6], seed=0)
    with pytest.raises(ValueError, match="rise strictly"):
        module.memory(q, k, v, **params, cu_seqlens=torch.tensor([0, 6, 4]))
    with pytest.raises(ValueError, match="int32/int64"):
        module.memory(q, k, v, **params, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="one batch row"):
        module.memory(q.expand(2, -1, -1, -1), k, v, **params, cu_seqlens=cu)
    with pytest.raises(ValueError, match="N = 2"):
        module.memory(q, k, v, **params, cu_seqlens=cu, initial_state=torch.zeros(3, H, K, V))
